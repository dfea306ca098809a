r"""Few-step samplers of the probability-flow ODE: EDM's Heun with churn, DPM-Solver++ (2M, 3M).

Both work on any Gaussian path and any target through the ``(x0, eps)`` hub, in the variables
where the ODE is nearly linear:

* **EDM** (Karras et al. 2022, Alg. 2): with ``y = x / alpha_t`` and ``s = sigma_t / alpha_t``
  (EDM's ``sigma``) the PF-ODE is ``dy/ds = eps_hat``; Heun's method on the Karras grid
  (:func:`~jaxdiff.karras_grid`), with optional stochastic churn that raises ``s`` to
  ``s (1 + gamma)`` by fresh noise before each step. Euler in these variables is DDIM.
* **DPM-Solver++** (Lu et al. 2022b): the exact solution in ``lambda = log(alpha / sigma)``,
  ``x_s = (sigma_s / sigma_t) x_t + sigma_s int_{lambda_t}^{lambda_s} e^l x0_hat dl``, with
  ``x0_hat`` extrapolated from the last 2 (2M) or 3 (3M) steps; one network call per step.

Both run at ``lax.scan`` speed on fixed grids and end with the denoising step to ``t = 0``
(``x <- x0_hat``; for DPM-Solver++ it is its own first-order step to ``sigma = 0``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxdiff import _loop
from jaxdiff._checks import check_positive, concrete
from jaxdiff.conversions import Target
from jaxdiff.integrate import Solution
from jaxdiff.paths import GaussianPath
from jaxdiff.schedules import karras_grid, log_snr_grid

Array = jax.Array
Field = Callable[[Array, Array], Array]

__all__ = ["edm_sample", "dpm_solver_pp"]


def _edm_sigma(path, t):
    """EDM's ``sigma = sigma_t / alpha_t = exp(-lambda_t / 2)``."""
    return jnp.exp(-0.5 * path.log_snr(t))


def edm_sample(
    key: Array | None,
    path: GaussianPath,
    field: Field,
    shape: tuple[int, ...] | None = None,
    *,
    target: Target = "score",
    steps: int = 17,
    ts: ArrayLike | None = None,
    t_start: ArrayLike = 1.0,
    t_end: ArrayLike = 1e-3,
    rho: ArrayLike = 7.0,
    churn: ArrayLike = 0.0,
    s_tmin: ArrayLike = 0.0,
    s_tmax: ArrayLike = float("inf"),
    s_noise: ArrayLike = 1.0,
    denoise: bool = True,
    x_init: ArrayLike | None = None,
    save_ts: ArrayLike | None = None,
) -> Solution:
    """EDM's Heun sampler (Karras et al. 2022, Alg. 2) on a Karras grid of ``steps`` steps.

    ``churn`` (``S_churn``) adds noise raising ``s = sigma / alpha`` by ``gamma = min(churn /
    steps, sqrt(2) - 1)`` where ``s_tmin <= s <= s_tmax`` (EDM's units), scaled by ``s_noise``;
    ``churn = 0`` is the deterministic sampler. Where ``alpha_t = 0`` (``t = 1`` on the linear
    path) ``s`` is infinite and the first step is Euler's (a DDIM step). NFE = ``2 steps +
    denoise`` (one less with that Euler step when the grid is concrete, i.e. not traced); EDM's 18-point grid is ``steps = 17``: 35 NFE.

    >>> import jax, jax.numpy as jnp, jaxdiff as jd
    >>> data = jd.GaussianMixture.isotropic(jnp.array([[2.0, 0.0], [-2.0, 0.0]]), std=0.3)
    >>> path = jd.vp_path()
    >>> sol = edm_sample(jax.random.key(0), path, data.field(path, "eps"), (4096, 2),
    ...                  target="eps", steps=17)
    >>> round(float(jnp.abs(sol.x[:, 0]).mean()), 1), int(sol.nfe)
    (2.0, 35)
    """
    check_positive(churn, "churn", strict=False)
    check_positive(s_noise, "s_noise", strict=False)
    grid = karras_grid(path, steps, t_start, t_end, rho) if ts is None else ts
    grid = _loop.decreasing_grid(grid)
    deterministic = concrete(churn) is not None and not np.any(concrete(churn) != 0)
    prior_key, key = _loop.split_key(key, x_init, deterministic)
    x = _loop.initial_state(prior_key, path, field, shape, x_init, grid[0])
    grid = grid.astype(x.dtype)
    n = grid.shape[0] - 1
    gamma_max = jnp.minimum(jnp.asarray(churn, x.dtype) / n, np.sqrt(2.0) - 1.0)
    s_max = _edm_sigma(path, grid[0])

    def pred(x, t):
        return _loop.predict(path, field, x, t, target)

    def step(carry, t, s, k, i):
        (x,) = carry
        sig = _edm_sigma(path, t)
        gamma = jnp.where((sig >= s_tmin) & (sig <= s_tmax) & (sig < s_max), gamma_max, 0.0)
        churned = gamma > 0
        sig_hat = jnp.minimum(sig * (1.0 + gamma), s_max)
        t_hat = jnp.where(churned, path.t_from_log_snr(-2.0 * jnp.log(sig_hat)), t)
        a_hat = path.alpha(t_hat)
        scale = jnp.where(churned, a_hat / path.alpha(t), 1.0)
        amp = jnp.where(churned, a_hat * jnp.sqrt(jnp.square(sig_hat) - jnp.square(sig)), 0.0)
        x_hat = scale * x + amp * s_noise * jax.random.normal(k, x.shape, x.dtype)
        # Heun in (y, s) = (x / alpha, sigma / alpha), where dy/ds = eps_hat, written in x
        x0_1, eps_1 = pred(x_hat, t_hat)
        a_s, sig_s = path.alpha(s), path.sigma(s)
        x_euler = a_s * x0_1 + sig_s * eps_1
        _, eps_2 = pred(x_euler, s)
        dsig = sig_s - a_s * _edm_sigma(path, t_hat)
        heun = (a_s / jnp.where(a_hat > 0, a_hat, 1.0)) * x_hat + dsig * 0.5 * (eps_1 + eps_2)
        # where alpha = 0 (s = inf; a traced grid starting at t = 1 on the linear path): Euler
        return (jnp.where(a_hat > 0, heun, x_euler),)

    nfe = 2 * n + int(denoise)
    a0 = concrete(path.alpha(grid[0]))
    if a0 is not None and float(a0) == 0.0:  # s = inf at the start: one Euler (DDIM) step
        x0, eps = pred(x, grid[0])
        x = path.alpha(grid[1]) * x0 + path.sigma(grid[1]) * eps
        grid, nfe = grid[1:], nfe - 1
        if save_ts is not None:
            raise ValueError("save_ts is not supported when the grid starts where alpha_t = 0")
    if grid.shape[0] < 2:
        x_out, save_ts, xs = x, None, None
        if denoise:
            x_out = pred(x, grid[-1])[0]
    else:
        final = (lambda x, t, k: pred(x, t)[0]) if denoise else None
        x_out, save_ts, xs = _loop.run_grid(step, (x,), grid, key, save_ts=save_ts, final=final)
    return Solution(x_out, save_ts, xs, jnp.asarray(nfe), jnp.asarray(n))


def _dpm_update(order, x, m0, m1, m2, h, h1, h2, ratio, a_s):
    """DPM-Solver++ multistep update of the given order (Lu et al. 2022b, Alg. 2).

    3M: ``d2`` estimates ``h^2 m''/2``, so the exact Taylor integral weighs it by ``2 phi3``; the
    reference code (and diffusers) use ``phi3``, which we measured to converge at order 2 only.
    """
    phi1 = -jnp.expm1(-h)  # 1 - e^{-h}
    out = ratio * x + a_s * phi1 * m0
    if order == 1:
        return out
    r0 = h1 / h
    d1_0 = (m0 - m1) / r0
    if order == 2:
        return out + 0.5 * a_s * phi1 * d1_0
    r1 = h2 / h
    d1_1 = (m1 - m2) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    # d1 ~ h x0', d2 ~ h^2 x0'' / 2 at lambda_t; the integrals e^{-h} int_0^h e^u u^k du / h^k:
    phi2 = phi1 / h - 1.0  # -(h - 1 + e^{-h}) / h
    phi3 = phi2 / h + 0.5  # (h^2 - 2h + 2 - 2 e^{-h}) / (2 h^2)
    return out - a_s * phi2 * d1 + 2.0 * a_s * phi3 * d2


def dpm_solver_pp(
    key: Array | None,
    path: GaussianPath,
    field: Field,
    shape: tuple[int, ...] | None = None,
    *,
    target: Target = "score",
    order: int = 2,
    steps: int = 10,
    ts: ArrayLike | None = None,
    t_start: ArrayLike = 1.0,
    t_end: ArrayLike = 1e-3,
    denoise: bool = True,
    lower_order_final: bool = True,
    x_init: ArrayLike | None = None,
    save_ts: ArrayLike | None = None,
) -> Solution:
    """DPM-Solver++ multistep, order 1, 2 (2M) or 3 (3M), data prediction (Lu et al. 2022b).

    The grid is ``ts`` or ``steps`` steps uniform in log-SNR from ``t_start`` to ``t_end``
    (:func:`~jaxdiff.log_snr_grid`), then, with ``denoise``, a first-order step to ``t = 0``. The
    first steps use lower orders (no history yet), and so do the last ones with
    ``lower_order_final`` (as diffusers, for stability with few steps). One NFE per step.
    Order 1 is DDIM with ``eta = 0``.

    >>> import jax, jax.numpy as jnp, jaxdiff as jd
    >>> data = jd.GaussianMixture.isotropic(jnp.array([[2.0, 0.0], [-2.0, 0.0]]), std=0.3)
    >>> path = jd.linear_path()
    >>> sol = dpm_solver_pp(jax.random.key(0), path, data.field(path, "velocity"), (4096, 2),
    ...                     target="velocity", steps=19, order=3)
    >>> round(float(jnp.abs(sol.x[:, 0]).mean()), 1), int(sol.nfe)
    (2.0, 20)
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3; got {order}")
    grid = log_snr_grid(path, steps, t_start, t_end) if ts is None else ts
    grid = _loop.decreasing_grid(grid)
    if denoise:
        grid = jnp.concatenate([grid, jnp.zeros((1,), grid.dtype)])
    prior_key, key = _loop.split_key(key, x_init, True)
    x = _loop.initial_state(prior_key, path, field, shape, x_init, grid[0])
    grid = grid.astype(x.dtype)
    n = grid.shape[0] - 1
    half_lam = lambda t: 0.5 * path.log_snr(t)  # noqa: E731

    def step(carry, t, s, k, i):
        x, m1, m2, h1, h2 = carry
        m0, _ = _loop.predict(path, field, x, t, target)
        h = half_lam(s) - half_lam(t)
        o = jnp.minimum(order, i + 1)
        if lower_order_final:
            o = jnp.minimum(o, n - i)
        o = jnp.where(path.sigma(s) == 0, 1, o)
        ratio, a_s = path.sigma(s) / path.sigma(t), path.alpha(s)
        args = (x, m0, m1, m2, h, h1, h2, ratio, a_s)
        branches = [lambda a, q=q: _dpm_update(q, *a) for q in range(1, order + 1)]
        x_s = jax.lax.switch(o - 1, branches, args) if order > 1 else branches[0](args)
        return (x_s, m0, m1, h, h1)

    one = jnp.ones((), x.dtype)
    carry = (x, jnp.zeros_like(x), jnp.zeros_like(x), one, one)
    x, save_ts, xs = _loop.run_grid(step, carry, grid, key, save_ts=save_ts)
    return Solution(x, save_ts, xs, jnp.asarray(n), jnp.asarray(n))
