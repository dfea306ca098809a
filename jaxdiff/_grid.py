"""The loop of the few-step samplers (internal): a pure ``step(key, x, t, s) -> x_s`` over a grid.

MeanFlow and consistency sampling are maps from ``x`` at time ``t`` to ``x`` at an earlier time
``s`` of a short decreasing grid (``1 -> 0`` in one step, ``1 -> 0.5 -> 0`` in two). ``run_grid``
scans such a step and returns a :class:`~jaxdiff.Solution`; with ``trajectory=True`` it keeps the
state at every grid time (``xs[0]`` is the start), which is what a plot of the paths needs. Each
step is already the ``(x, t, s) -> x`` function a sampler value's ``step`` wraps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff._checks import check_finite, check_time, concrete, error_if
from jaxdiff.integrate import Solution

Array = jax.Array
Step = Callable[[Array | None, Array, Array, Array], Array]


def decreasing_grid(ts: Any, steps: int) -> Array:
    """``ts`` checked (1-D, strictly decreasing, within ``[0, 1]``), or ``steps`` uniform steps ``1 -> 0``."""
    if ts is None:
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1; got {steps}")
        return jnp.linspace(1.0, 0.0, int(steps) + 1)
    ts = check_time(ts, "ts")
    if ts.ndim != 1 or ts.shape[0] < 2:
        raise ValueError(f"ts must be a 1-D grid of at least 2 times; got shape {ts.shape}")
    msg = "ts must be strictly decreasing (from the prior at t = 1 towards the data at t = 0)"
    value = concrete(ts)
    if value is None:
        return error_if(ts, jnp.any(jnp.diff(ts) >= 0), msg)
    if not np.all(np.diff(value) < 0):
        raise ValueError(f"{msg}; got {value.tolist()[:6]}")
    return ts


def batch_time(t: Array, x: Array) -> Array:
    """A scalar time as one time per sample, shape ``(batch,)`` and ``x``'s dtype."""
    return jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])


def run_grid(step: Step, x: Array, ts: Array, key: Array | None, trajectory: bool) -> Solution:
    """Scan ``x <- step(key_i, x, ts[i], ts[i + 1])``; ``nfe`` counts one evaluation per step."""
    x = check_finite(jnp.asarray(x), "x_init")
    if x.ndim < 1:
        raise ValueError(f"x must have a batch axis, shape (batch, *event); got shape {x.shape}")
    ts = ts.astype(x.dtype)
    n = ts.shape[0] - 1
    keys = jax.random.split(key, n) if key is not None else None

    def body(x, inputs):
        t, s, k = inputs
        x = step(k, x, t, s)
        return x, (x if trajectory else None)

    x_end, xs = jax.lax.scan(body, x, (ts[:-1], ts[1:], keys))
    if trajectory:
        xs = jnp.concatenate([x[None], xs], axis=0)
    steps = jnp.asarray(n, jnp.int32)
    return Solution(x_end, ts if trajectory else None, xs, steps, steps)
