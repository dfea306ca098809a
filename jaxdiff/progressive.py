r"""Progressive distillation: a student that takes one DDIM step where its teacher takes two.

Salimans & Ho (2022), "Progressive Distillation for Fast Sampling of Diffusion Models",
Algorithm 2. On the student's grid ``ts`` (decreasing, ``N + 1`` times), from ``z_t = alpha_t x +
sigma_t e`` at ``t = ts[i]`` the teacher takes two deterministic DDIM steps, to the midpoint ``m``
and on to ``s = ts[i + 1]``, reaching ``z_s``. The student's target is the data estimate whose
single DDIM step from ``t`` lands on ``z_s``:

    ``x~ = (z_s - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t)``,

and the loss is ``max(SNR_t, 1) |x0_student(z_t, t) - x~|^2`` ("truncated SNR" weighting, the
paper's). A round halves the sampling steps: train the student on ``ts``, then use it as the
teacher of the next round on ``ts[::2]``; sample each with ``jd.sample(..., sampler=
jd.samplers.ddim(), ts=ts)``. The student starts from the teacher's weights in the paper.

Time runs data (``t = 0``) to noise (``t = 1``), as the paper's ``t`` does. Fields of any target
work for both (each is converted to ``x0``); the paper's student predicts ``v`` on the cosine path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxdiff._checks import expand_like, wide_dtype
from jaxdiff._engine import prior_time
from jaxdiff.conversions import to_x0_eps
from jaxdiff.ddim import ddim_step
from jaxdiff.ddpm import _reverse_times
from jaxdiff.field import Field, as_field
from jaxdiff.losses import _split_batch, mean_sq_error
from jaxdiff.paths import GaussianPath, cosine_path
from jaxdiff.schedules import uniform_grid

Array = jax.Array

__all__ = ["progressive_distillation_loss", "progressive_target"]


def progressive_target(
    path: GaussianPath,
    teacher: Callable[[Array, Array], Array],
    target: str,
    z: Array,
    t: ArrayLike,
    s: ArrayLike,
) -> Array:
    """``x~``: the data estimate whose one DDIM step from ``(z, t)`` reaches the teacher's two
    steps ``t -> (t + s) / 2 -> s``. ``teacher(x, t)`` predicts ``target``; ``t``, ``s`` have
    shape ``(batch,)``, ``s < t`` (checked: swapped times gave a finite, wrong target)."""
    t, s = _reverse_times(t, s)
    m = (t + s) / 2
    x0, eps = to_x0_eps(path, z, t, teacher(z, t), target)
    z_m = ddim_step(path, x0, eps, t, m)
    x0, eps = to_x0_eps(path, z_m, m, teacher(z_m, m), target)
    z_s = ddim_step(path, x0, eps, m, s)
    ratio = path.sigma(s) / path.sigma(t)
    den = path.alpha(s) - ratio * path.alpha(t)
    return (z_s - expand_like(ratio, z) * z) / expand_like(den, z)


def progressive_distillation_loss(
    net: Field,
    teacher: Field,
    path: GaussianPath | None = None,
    *,
    ts: ArrayLike | None = None,
    steps: int | None = None,
) -> Callable[[Any, Array, Any], Array]:
    """The progressive-distillation loss ``(params, key, batch) -> scalar`` (Salimans & Ho 2022).

    ``net`` (any target) is the student; ``teacher`` a field of any target bound to its
    parameters (for labels in the batch it is called as ``teacher(x, t, labels)``, as the
    student). ``ts`` is the student's decreasing grid, ending at ``t = 0``; or ``steps`` uniform
    steps from ``jd.sample``'s default start (``t = 1``, or ``1 - 1e-3`` where a field divides
    by ``alpha_1 = 0``) to 0, which ``jd.sample(..., sampler=jd.samplers.ddim(), steps=steps)``
    reproduces (where the student's and the teacher's default starts differ, ``ts`` is needed). Per example a step ``i`` of the grid is drawn uniformly, ``x_t`` at
    ``t = ts[i]``, and the loss is ``max(SNR_t, 1) mean |x0_student - x~|^2``
    (:func:`progressive_target`). Default path: ``cosine_path()``, the paper's.
    """
    net, teacher = as_field(net, "net"), as_field(teacher, "teacher")
    path = cosine_path() if path is None else path
    if (ts is None) == (steps is None):
        raise ValueError("give the student's grid: ts (decreasing, to 0) or steps, not both")
    starts = {name: prior_time(path, f) for name, f in (("student", net), ("teacher", teacher))}
    if ts is None:
        if starts["student"] != starts["teacher"]:  # jd.sample(steps=) starts at the student's
            raise ValueError(
                f"the student ({net.target!r}) starts at t = {starts['student']} by default and "
                f"the teacher ({teacher.target!r}) at {starts['teacher']}: give ts= (e.g. "
                f"jd.uniform_grid({steps}, {min(starts.values())}, 0.0)) and sample the student "
                "with the same ts"
            )
        ts = uniform_grid(steps, starts["student"], 0.0)
    grid = np.asarray(ts, np.float64)
    if grid.ndim != 1 or grid.size < 2 or not np.all(np.diff(grid) < 0) or grid[-1] != 0:
        raise ValueError(f"ts must be a decreasing 1-D grid of >= 2 times ending at 0; got {ts}")
    if grid[0] > 1:
        raise ValueError(f"ts must lie in [0, 1]; got a start of {grid[0]}")
    for name, f in (("student", net), ("teacher", teacher)):
        if grid[0] > starts[name] and float(path.alpha(grid[0])) == 0:  # x0 = (x - sigma eps) / 0
            raise ValueError(
                f"ts starts at t = {grid[0]}, where alpha_t = 0 and the {name}'s {f.target!r} "
                f"prediction gives no x0: start at {starts[name]} (jd.sample's default there)"
            )

    def loss(params: Any, key: Array, batch: Any) -> Array:
        i_key, e_key = jax.random.split(key)
        x0, labels = _split_batch(batch, "progressive_distillation_loss")
        n = x0.shape[0]
        tdt = wide_dtype(x0.dtype)
        times = jnp.asarray(grid, tdt)
        i = jax.random.randint(i_key, (n,), 0, times.size - 1)
        t, s = times[i], times[i + 1]
        eps = jax.random.normal(e_key, x0.shape, tdt).astype(x0.dtype)
        z = path.interpolate(x0, eps, t)
        extra = () if labels is None else (labels,)
        # the target in float32 or wider: it subtracts two nearly equal states
        target = progressive_target(
            path, lambda x, u: teacher(x, u, *extra), teacher.target, z.astype(tdt), t, s
        )
        target = jax.lax.stop_gradient(target)
        pred = net.apply(params, z, t, *extra)
        x0_hat = to_x0_eps(path, z, t, pred, net.target)[0]
        err = mean_sq_error(x0_hat, target, tdt)
        snr = jnp.exp(path.log_snr(t)).astype(tdt)
        return jnp.mean(jnp.maximum(snr, 1.0) * err)

    return loss
