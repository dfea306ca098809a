r"""DDIM (Song, Meng & Ermon 2021): deterministic and stochastic steps, and DDIM inversion.

From time ``t`` to ``s < t`` with the network's ``(x0_hat, eps_hat)``:

    ``x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z``,
    ``c = eta sqrt(sigma_s^2 (1 - SNR_t / SNR_s))`` (``eta`` times the posterior's std).

``eta = 1`` is DDPM's ancestral step with the posterior variance (the same draw ``z`` gives the
same sample as :func:`jaxdiff.ddpm.ancestral_sample`); ``eta = 0`` is deterministic, and is the
first-order exponential integrator of the probability-flow ODE in the log-SNR variable
(DPM-Solver-1, Lu et al. 2022): ``x_s = (sigma_s / sigma_t) x_t + alpha_s (1 - e^{-h}) x0_hat``,
``h = (lambda_s - lambda_t) / 2``. It is Euler's method in ``x / alpha`` against
``sigma / alpha`` (Karras et al. 2022). Works on every Gaussian path and every target.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxdiff import _loop
from jaxdiff._checks import check_finite, check_time, concrete, expand_like
from jaxdiff.conversions import Target
from jaxdiff.paths import GaussianPath
from jaxdiff.integrate import Solution

Array = jax.Array
Field = Callable[[Array, Array], Array]

__all__ = ["ddim_step", "ddim_sample", "ddim_invert"]


def ddim_step(
    path: GaussianPath,
    x0: Array,
    eps: Array,
    t: ArrayLike,
    s: ArrayLike,
    *,
    eta: ArrayLike = 0.0,
    noise: Array | None = None,
) -> Array:
    """One DDIM step from ``t`` to ``s`` given the hub pair ``(x0, eps)`` at ``(x_t, t)``.

    ``noise`` is the standard normal ``z`` (needed when ``eta > 0``). With ``s > t`` and
    ``eta = 0`` it is a step of DDIM inversion.
    """
    a_s = expand_like(path.alpha(s), x0)
    var_s = expand_like(path.sigma_sq(s), x0)
    x = a_s * x0
    if noise is None:
        return x + jnp.sqrt(var_s) * eps
    ratio = -jnp.expm1(path.log_snr(t) - path.log_snr(s))
    c2 = expand_like(jnp.square(eta) * ratio, x0) * var_s
    return x + jnp.sqrt(jnp.maximum(var_s - c2, 0.0)) * eps + jnp.sqrt(c2) * noise


def _check_eta(eta) -> None:
    v = concrete(eta)
    if v is not None and (not np.all(np.isfinite(v)) or np.any(v < 0) or np.any(v > 1)):
        raise ValueError(f"eta must lie in [0, 1] (0: deterministic DDIM, 1: DDPM); got {v}")


def ddim_sample(
    key: Array,
    path: GaussianPath,
    field: Field,
    shape: tuple[int, ...] | None = None,
    *,
    target: Target = "score",
    eta: ArrayLike = 0.0,
    steps: int = 50,
    ts: ArrayLike | None = None,
    clip_x0: float | None = None,
    x_init: ArrayLike | None = None,
    save_ts: ArrayLike | None = None,
) -> Solution:
    """Sample with DDIM steps down a decreasing grid (default ``steps`` uniform steps from 1 to 0).

    ``ts`` may be any subset of a discrete model's times (:mod:`jaxdiff.ddpm` spacings). A step
    that ends at ``t = 0`` adds no noise. NFE = number of steps.

    >>> import jax, jax.numpy as jnp, jaxdiff as jd
    >>> data = jd.GaussianMixture.isotropic(jnp.array([[2.0, 0.0], [-2.0, 0.0]]), std=0.3)
    >>> path = jd.vp_path()
    >>> sol = ddim_sample(jax.random.key(0), path, data.field(path, "eps"), (4096, 2),
    ...                   target="eps", steps=20)
    >>> round(float(jnp.abs(sol.x[:, 0]).mean()), 1), int(sol.nfe)
    (2.0, 20)
    """
    _check_eta(eta)
    grid = _loop.decreasing_grid(jnp.linspace(1.0, 0.0, int(steps) + 1) if ts is None else ts)
    prior_key, key = jax.random.split(key)
    x = _loop.initial_state(prior_key, path, field, shape, x_init, grid[0])
    grid = grid.astype(x.dtype)
    stochastic = concrete(eta) is None or np.any(concrete(eta) != 0)

    def step(carry, t, s, k, i):
        (x,) = carry
        x0, eps = _loop.predict(path, field, x, t, target, clip_x0)
        if not stochastic:
            return (ddim_step(path, x0, eps, t, s),)
        e = jnp.where(s > 0, eta, 0.0)
        z = jax.random.normal(k, x.shape, x.dtype)
        return (ddim_step(path, x0, eps, t, s, eta=e, noise=z),)

    x, save_ts, xs = _loop.run_grid(step, (x,), grid, key, save_ts=save_ts)
    n = grid.shape[0] - 1
    return Solution(x, save_ts, xs, jnp.asarray(n), jnp.asarray(n))


def ddim_invert(
    path: GaussianPath,
    field: Field,
    x: ArrayLike,
    *,
    target: Target = "score",
    steps: int = 50,
    ts: ArrayLike | None = None,
    t_start: ArrayLike = 1e-3,
    t_end: ArrayLike = 1.0,
    save_ts: ArrayLike | None = None,
) -> Solution:
    """DDIM inversion: run deterministic DDIM steps up an increasing grid, data towards noise.

    The step from ``s`` to ``t > s`` uses the prediction at ``(x_s, s)``: ``x_t = alpha_t x0_hat +
    sigma_t eps_hat``. ``x`` is taken as the state at ``t_start`` (default ``1e-3``: the prediction
    is singular where ``sigma = 0``). Running :func:`ddim_sample` (``eta = 0``) back down the same
    grid from the result returns ``x`` up to the first-order error of both, ``O(1 / steps)``.
    """
    if ts is None:
        check_time(t_start, "t_start")
        check_time(t_end, "t_end")
        ts = jnp.linspace(jnp.asarray(t_start, float), jnp.asarray(t_end, float), int(steps) + 1)
    grid = _loop.decreasing_grid(jnp.asarray(ts)[::-1], "ts reversed (ts must increase)")[::-1]
    x = check_finite(jnp.asarray(x), "x")
    grid = grid.astype(x.dtype)
    _loop.initial_state(None, path, field, None, x, grid[0])

    def step(carry, s, t, k, i):  # s < t: up the grid
        x0, eps = _loop.predict(path, field, carry[0], s, target)
        return (ddim_step(path, x0, eps, s, t),)

    x_end, save_ts, xs = _loop.run_grid(step, (x,), grid, jax.random.key(0), save_ts=save_ts)
    n = grid.shape[0] - 1
    return Solution(x_end, save_ts, xs, jnp.asarray(n), jnp.asarray(n))
