r"""EDM's Heun sampler with stochastic churn (Karras et al. 2022, Alg. 2), on any Gaussian path.

With ``y = x / alpha_t`` and EDM's ``sigma = sigma_t / alpha_t`` the probability-flow ODE is
``dy/dsigma = eps_hat``; each step is Heun's method in these variables (Euler in them is DDIM),
optionally after "churn": fresh noise raising ``sigma`` to ``sigma (1 + gamma)``. Where
``alpha_t = 0`` (``t = 1`` on the linear path) ``sigma`` is infinite and the step is Euler's (a DDIM
step from pure noise); a step to ``sigma = 0`` is Euler's too (Alg. 2's last step).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxdiff._checks import check_order, check_positive, concrete
from jaxdiff.field import predict
from jaxdiff.samplers.base import Sampler, normal
from jaxdiff.schedules import karras_grid

Array = jax.Array

__all__ = ["edm_heun"]


class State(NamedTuple):
    x: Array
    gamma: Array  # min(churn / N, sqrt(2) - 1) for the grid's N steps
    sigma_max: Array  # EDM sigma at the first time: churn never raises sigma past it


def _edm_sigma(path, t):
    """EDM's ``sigma = sigma_t / alpha_t = exp(-lambda_t / 2)``."""
    return jnp.exp(-0.5 * path.log_snr(t))


def edm_heun(
    *,
    churn: ArrayLike = 0.0,
    s_tmin: ArrayLike = 0.0,
    s_tmax: ArrayLike = float("inf"),
    s_noise: ArrayLike = 1.0,
    rho: ArrayLike = 7.0,
) -> Sampler:
    """EDM's Heun sampler (Karras et al. 2022, Alg. 2) with churn ``S_churn``.

    ``gamma = min(churn / N, sqrt(2) - 1)`` where ``s_tmin <= sigma <= s_tmax`` (EDM's units,
    ``sigma = sigma_t / alpha_t``), with ``N`` the number of steps including the final one to
    ``t = 0`` (the denoising step), as NVlabs' EDM and k-diffusion; the noise is scaled by
    ``s_noise``. Unlike Alg. 2 with ``S_tmax = inf``, the first step is not churned and the raised
    level ``sigma_hat`` is capped at the grid's first one (``t_hat`` stays in ``[0, 1]``).
    ``churn = 0`` is the deterministic sampler. Default grid: Karras' (``rho``),
    17 steps + the denoising step = EDM's 18 noise levels, 35 evaluations.

    >>> import jax, jax.numpy as jnp, jaxdiff as jd
    >>> data = jd.GaussianMixture.isotropic(jnp.array([[2.0, 0.0], [-2.0, 0.0]]), std=0.3)
    >>> path = jd.vp_path()
    >>> sol = jd.sample(jax.random.key(0), path, data.field(path, "eps"), (4096, 2),
    ...                 sampler=edm_heun())
    >>> round(float(jnp.abs(sol.x[:, 0]).mean()), 1), int(sol.nfe)
    (2.0, 35)
    """
    churn = check_positive(churn, "churn", strict=False)
    s_noise = check_positive(s_noise, "s_noise", strict=False)
    rho = check_positive(rho, "rho")
    s_tmin = check_positive(s_tmin, "s_tmin", strict=False)
    s_tmin, s_tmax = check_order(s_tmin, s_tmax, "s_tmin", "s_tmax", strict=False)  # inf allowed
    churn_value = concrete(churn)
    stochastic = churn_value is None or bool(np.any(churn_value != 0))

    def grid(path, steps, t_start, t_end):
        return karras_grid(path, steps, t_start, t_end, rho)

    def init(path, field, x, ts) -> State:
        dtype = jnp.result_type(x.dtype, jnp.float32)
        n = ts.shape[0] - 1
        gamma = jnp.minimum(jnp.asarray(churn, dtype) / n, np.sqrt(2.0) - 1.0)
        return State(x, gamma, _edm_sigma(path, ts[0]).astype(dtype))

    def step(key, path, field, state: State, t, s) -> State:
        x = state.x
        sig = _edm_sigma(path, t)
        if stochastic:
            inside = (sig >= s_tmin) & (sig <= s_tmax) & (sig < state.sigma_max)
            gamma = jnp.where(inside, state.gamma, 0.0)
            churned = gamma > 0
            sig_hat = jnp.minimum(sig * (1.0 + gamma), state.sigma_max)
            t_hat = jnp.where(churned, path.t_from_log_snr(-2.0 * jnp.log(sig_hat)), t)
            a_hat = path.alpha(t_hat)
            scale = jnp.where(churned, a_hat / path.alpha(t), 1.0)
            amp = jnp.where(churned, a_hat * jnp.sqrt(jnp.square(sig_hat) - jnp.square(sig)), 0.0)
            x = scale * x + amp * s_noise * normal(key, x)
        else:
            t_hat, a_hat = t, path.alpha(t)
        # Heun in (y, sigma) = (x / alpha, sigma / alpha), where dy/dsigma = eps_hat, written in x
        x0_1, eps_1 = predict(path, field, x, t_hat)
        a_s, sig_s = path.alpha(s), path.sigma(s)
        x_euler = a_s * x0_1 + sig_s * eps_1
        # on the step to sigma = 0 the Euler step is taken and eps_2 discarded: evaluate it at
        # t_hat there, as dividing by sigma_s = 0 gave a NaN that reached the gradients
        _, eps_2 = predict(path, field, x_euler, jnp.where(sig_s == 0, t_hat, s))
        euler = (a_hat == 0) | (sig_s == 0)  # sigma = inf at the start, or the step to sigma = 0
        # dsig is -inf at a_hat = 0: 0 (the discarded branch's cotangent) times it made every
        # gradient NaN from the linear path's default start at t = 1; taken at s there, then 0
        dsig = sig_s - a_s * _edm_sigma(path, jnp.where(a_hat > 0, t_hat, s))
        dsig = jnp.where(euler, jnp.zeros_like(dsig), dsig)
        heun = (a_s / jnp.where(a_hat > 0, a_hat, 1.0)) * x + dsig * 0.5 * (eps_1 + eps_2)
        return State(jnp.where(euler, x_euler, heun), state.gamma, state.sigma_max)

    return Sampler(
        name=f"edm_heun(churn={churn})",
        init=init,
        step=step,
        evals_per_step=2,
        stochastic=stochastic,
        grid=grid,
        steps=17,
        denoise=True,
        reaches_zero=True,
    )
