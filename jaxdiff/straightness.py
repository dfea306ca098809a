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
divides by ``E |x(1) - x(0)|^2``, so flows of different scales compare.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxdiff._checks import concrete
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


def straightness(
    field: Field, x1: Array, *, path: GaussianPath | None = None, steps: int = 100
) -> Straightness:
    """``S = E ∫_0^1 |(x(1) - x(0)) - v(x(t), t)|^2 dt`` along Euler trajectories from ``x1``.

    ``field`` predicts ``"velocity"``, or any target of ``path`` (converted to the velocity).

    >>> import jax, jax.numpy as jnp, jaxdiff as jd
    >>> straight = jd.Field(lambda x, t: jnp.ones_like(x), "velocity")  # x(t) = x1 - (1 - t)
    >>> float(straightness(straight, jnp.zeros((8, 2)), steps=4).value)
    0.0
    """
    field = as_field(field, "field")
    if field.target != "velocity" and path is None:
        raise ValueError(f"a field predicting {field.target!r} needs its path to give the velocity")
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    alpha_1 = None if path is None else concrete(path.alpha(1.0))
    if field.target in ("eps", "score") and alpha_1 is not None and float(alpha_1) == 0.0:
        raise ValueError(
            f"alpha_t = 0 at t = 1 on this path, where an {field.target!r} prediction says nothing "
            "about x0 (it gave NaN): measure a field predicting 'x0', 'v' or 'velocity'"
        )
    x1 = jnp.asarray(x1)
    ts = jnp.linspace(1.0, 0.0, steps + 1, dtype=x1.dtype)
    dt = ts[1] - ts[0]

    def velocity(x, t):
        tb = jnp.full(x.shape[:1], t, x.dtype)
        out = field(x, tb)
        if field.target == "velocity":
            return out
        return convert(path, x, tb, out, src=field.target, dst="velocity")

    def step(x, t):
        v = velocity(x, t)
        return x + v * dt, v

    x0, vs = jax.lax.scan(step, x1, ts[:-1])
    chord = x1 - x0  # x(1) - x(0)
    n = x1.shape[0]
    dev = jnp.sum(jnp.square(chord[None] - vs).reshape(steps, n, -1), axis=-1)
    value = jnp.mean(dev)
    relative = value / jnp.mean(jnp.sum(jnp.square(chord).reshape(n, -1), axis=-1))
    return Straightness(value, relative, x0)
