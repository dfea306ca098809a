"""Shared machinery of the fixed-grid samplers (internal): the scan over a time grid, the prior,
and the network's prediction mapped to the ``(x0, eps)`` hub.

Every sampler of ``ddpm``, ``ddim``, ``pc`` and ``fewstep`` is a pure ``step(carry, t, s, key, i)``
from time ``t`` to the next grid time ``s < t``, run by one ``lax.scan``: no per-step Python, one
compile per shape, memory independent of the number of steps unless a trajectory is saved.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff._checks import as_time, check_finite, check_time, concrete, expand_like
from jaxdiff.conversions import Target, _check_target, to_x0_eps
from jaxdiff.paths import GaussianPath
from jaxdiff.integrate import _save_slots

Array = jax.Array
Field = Callable[[Array, Array], Array]


def decreasing_grid(ts: Any, name: str = "ts") -> Array:
    """``ts`` as a 1-D float array after checking it is strictly decreasing within ``[0, 1]``."""
    ts = check_time(ts, name)
    if ts.ndim != 1 or ts.shape[0] < 2:
        raise ValueError(f"{name} must be a 1-D grid of at least 2 times; got shape {ts.shape}")
    value = concrete(ts)
    if value is not None and not np.all(np.diff(value) < 0):
        raise ValueError(
            f"{name} must be strictly decreasing (samplers run from the prior at t = 1 towards the "
            f"data at t = 0); got {value.tolist()[:6]}"
        )
    return ts


def initial_state(key: Array, path: GaussianPath, field: Field, shape, x_init, t0: Array) -> Array:
    """``x_init``, or a draw of ``N(0, sigma_{t0}^2 I)``; checks ``field``'s output shape."""
    if x_init is None:
        if shape is None:
            raise ValueError("give the sample shape, or x_init")
        dtype = jnp.result_type(float)
        x_init = path.sigma(t0).astype(dtype) * jax.random.normal(key, tuple(shape), dtype)
    x_init = check_finite(jnp.asarray(x_init), "x_init")
    out = jax.eval_shape(field, x_init, jnp.asarray(t0, x_init.dtype))
    if out.shape != x_init.shape:
        raise ValueError(
            f"field(x, t) returned shape {out.shape} but x has shape {x_init.shape}; the field "
            "must predict its target with x's shape"
        )
    return x_init


def predict(
    path: GaussianPath,
    field: Field,
    x: Array,
    t: Array,
    target: Target,
    clip_x0: float | None = None,
) -> tuple[Array, Array]:
    """The field's prediction at ``(x, t)`` as the hub pair ``(x0, eps)``.

    With ``clip_x0 = c`` the data estimate is clipped to ``[-c, c]`` and ``eps`` recomputed from
    it, so that ``x = alpha_t x0 + sigma_t eps`` still holds (Ho et al. 2020 clip to ``[-1, 1]``).
    """
    _check_target(target)
    t = as_time(t, x.dtype)
    x0, eps = to_x0_eps(path, x, t, field(x, t), target)
    if clip_x0 is None:
        return x0, eps
    x0 = jnp.clip(x0, -clip_x0, clip_x0)
    a, s = expand_like(path.alpha(t), x), expand_like(path.sigma(t), x)
    return x0, (x - a * x0) / s


def run_grid(
    step: Callable[[Any, Array, Array, Array, Array], Any],
    carry: Any,
    grid: Array,
    key: Array,
    *,
    save_ts: Any = None,
    final: Callable[[Array, Array, Array], Array] | None = None,
) -> tuple[Array, Array | None, Array | None]:
    """Scan ``carry = step(carry, t, s, key, i)`` over the pairs of the decreasing ``grid``.

    ``carry[0]`` is the state ``x``. ``final(x, t_last, key)``, if given, is one more step from
    the last grid time to ``t = 0`` (the denoising step). ``save_ts`` must be points of the grid
    (or 0 with ``final``); returns ``(x, save_ts, xs)``.
    """
    x = carry[0]
    full = jnp.append(grid, jnp.zeros((1,), grid.dtype)) if final is not None else grid
    n = grid.shape[0] - 1
    keys = jax.random.split(key, n + 1)
    buf, slots = None, jnp.full((full.shape[0],), 0, jnp.int32)
    if save_ts is not None:
        save_ts = jnp.atleast_1d(as_time(save_ts)).astype(grid.dtype)
        slots = _save_slots(full, save_ts)
        buf = jnp.zeros(save_ts.shape + x.shape, x.dtype).at[slots[0]].set(x, mode="drop")

    def body(state, inputs):
        carry, buf = state
        t, s, k, i, slot = inputs
        carry = step(carry, t, s, k, i)
        if buf is not None:
            buf = buf.at[slot].set(carry[0], mode="drop")
        return (carry, buf), None

    inputs = (grid[:-1], grid[1:], keys[:n], jnp.arange(n), slots[1 : n + 1])
    (carry, buf), _ = jax.lax.scan(body, (carry, buf), inputs)
    x = carry[0]
    if final is not None:
        x = final(x, grid[-1], keys[n])
        if buf is not None:
            buf = buf.at[slots[-1]].set(x, mode="drop")
    x = check_finite(x, "the sample (check the field, the time grid and the step sizes)")
    return x, save_ts, buf
