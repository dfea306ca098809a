r"""Straightness of a flow: how far its velocity strays from the straight line along trajectories.

Liu et al. (2023), "Flow straight and fast" (rectified flow), define for the ODE ``dx/dt = v(x, t)``
with trajectories ``x(t)``, ``t`` in ``[0, 1]``:

    ``S = E ∫_0^1 |(x(1) - x(0)) - v(x(t), t)|^2 dt``,

the mean squared deviation of the velocity from the chord ``x(1) - x(0)``; ``S = 0`` iff every
trajectory is a straight line run at constant speed, which one Euler step integrates exactly.
Here ``t = 1`` is the source and ``t = 0`` the data: trajectories start at ``x(1) = x1`` drawn
from the source and run to ``t = 0`` with ``steps`` Euler steps on the uniform grid; the integral
is the mean over the ``steps`` evaluations (a left Riemann sum in reverse time, consistent with
the Euler solve, whose chord is exactly ``dt`` times the sum of the velocities). ``relative``
divides by ``E |x(1) - x(0)|^2``, so flows of different scales compare (0 for a flow that does
not move).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxdiff._checks import check_count, concrete, data_dtype, wide_dtype
from jaxdiff._engine import is_gaussian_path, prior_time, require_gaussian_path
from jaxdiff.conversions import convert
from jaxdiff.field import Field, as_field
from jaxdiff.paths import GaussianPath

Array = jax.Array

__all__ = ["Straightness", "straightness"]


class Straightness(NamedTuple):
    """``value`` (Liu et al.'s ``S``), ``relative`` (``S / E|x(1) - x(0)|^2``), ``x0`` (the
    trajectories' ends at ``t = 0``)."""

    value: Array
    relative: Array
    x0: Array

    def __repr__(self) -> str:  # the scalars, and x0's shape rather than its thousands of rows
        x0 = getattr(self.x0, "shape", None)
        x0 = f"<{getattr(self.x0, 'dtype', '')}{list(x0)}>" if x0 is not None else repr(self.x0)
        return (
            f"Straightness(value={_scalar(self.value)}, relative={_scalar(self.relative)}, x0={x0})"
        )


def _scalar(a: Any) -> str:
    try:
        return f"{float(a):.6g}"
    except (TypeError, ValueError):  # a tracer, or a batch of values
        return repr(a)


def straightness(
    field: Field,
    x1: Array,
    *,
    path: GaussianPath | None = None,
    steps: int = 100,
    t_start: float | None = None,
) -> Straightness:
    """``S = E ∫_0^1 |(x(1) - x(0)) - v(x(t), t)|^2 dt`` along Euler trajectories from ``x1``.

    ``field`` predicts ``"velocity"``, or any target of ``path`` (converted to the velocity).
    Trajectories start at ``t_start``: 1, or ``1 - 1e-3`` where ``jd.sample``'s default start is
    there (an ``eps`` or ``score`` field where ``alpha_1 = 0``, any field on a schedule stiff at
    1 such as ``cosine_betas()``: the README's Time convention); ``x1`` is then the state at ``t_start`` and ``S`` is measured on
    ``[0, t_start]`` with the chord ``(x(t_start) - x(0)) / t_start``.

    >>> import jax, jax.numpy as jnp, jaxdiff as jd
    >>> straight = jd.Field(lambda x, t: jnp.ones_like(x), "velocity")  # x(t) = x1 - (1 - t)
    >>> float(straightness(straight, jnp.zeros((8, 2)), steps=4).value)
    0.0
    """
    field = as_field(field, "field")
    if path is not None and not is_gaussian_path(path):
        if field.target != "velocity":
            require_gaussian_path(path, f"straightness of a field predicting {field.target!r}")
        path = None  # a velocity field is measured as it is
    if field.target != "velocity" and path is None:
        raise ValueError(f"a field predicting {field.target!r} needs its path to give the velocity")
    steps = check_count(steps, "steps")
    if t_start is None:
        t_start = 1.0 if path is None else prior_time(path, field)
    t_start = float(t_start)
    if not 0.0 < t_start <= 1.0:
        raise ValueError(f"t_start must lie in (0, 1]; got {t_start}")
    alpha_0 = None if path is None else concrete(path.alpha(t_start))
    if field.target in ("eps", "score") and alpha_0 is not None and float(alpha_0) == 0.0:
        raise ValueError(
            f"alpha_t = 0 at t_start = {t_start} on this path, where an {field.target!r} "
            "prediction says nothing about x0 (it gave NaN): start inside (the default, "
            "1 - 1e-3) or measure a field predicting 'x0', 'v' or 'velocity'"
        )
    x1 = jnp.asarray(x1)
    if x1.ndim == 0:
        raise ValueError("x1 must have a batch axis, shape (batch, *event); got a scalar")
    # times and the Euler state in max(float32, dtype of x1), never x1's own dtype: a
    # bfloat16 grid 1, 0.99, ... rounded to dt = -0.0117 and ran the flow to t = -0.17; an
    # integer grid was [1, 0, 0, ...]
    out = data_dtype(x1)
    wide = wide_dtype(out)
    x1 = x1.astype(out)
    ts = jnp.linspace(t_start, 0.0, steps + 1, dtype=wide)
    dt = ts[1] - ts[0]

    def velocity(x, t):
        tb = jnp.full(x.shape[:1], t, ts.dtype)
        pred = field(x, tb)
        if field.target == "velocity":
            return pred
        return convert(path, x, tb, pred, src=field.target, dst="velocity")

    def step(x, t):  # the state accumulates in ``wide``; the field sees it in x1's dtype
        v = velocity(x.astype(out), t).astype(wide)
        return x + v * dt, v

    x0, vs = jax.lax.scan(step, x1.astype(wide), ts[:-1])
    chord = (x1.astype(wide) - x0) / t_start  # the mean velocity: x(1) - x(0) from t = 1
    n = x1.shape[0]
    dev = jnp.sum(jnp.square(chord[None] - vs).reshape(steps, n, -1), axis=-1)
    value = jnp.mean(dev)
    chord_sq = jnp.mean(jnp.sum(jnp.square(chord).reshape(n, -1), axis=-1))
    # a flow that does not move is straight: 0, not 0 / 0 = NaN (a loop back to x1 is inf)
    relative = jnp.where(value == 0, jnp.zeros_like(value), value / chord_sq)
    return Straightness(value, relative, x0.astype(out))
