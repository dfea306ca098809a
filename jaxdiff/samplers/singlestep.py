r"""Singlestep DPM-Solver++(2S) samplers with noise: k-diffusion's ``dpmpp_2s_ancestral`` and
``dpmpp_sde`` (diffusers' ``DPMSolverSDEScheduler``), on any Gaussian path.

Both work in EDM's variables ``y = x / alpha`` and ``sigma = sigma_t / alpha_t = e^{-lambda}``
(``lambda`` half the log-SNR) and take two network evaluations per step: one at ``t``, one at an
intermediate time ``lambda_t + r h``. With ``eta > 0`` each step lands at a reduced level
``sigma_down`` and adds fresh noise ``sigma_up`` (``sigma_down^2 + sigma_up^2 = sigma_s^2``,
k-diffusion's ``get_ancestral_step``); ``eta = 0`` is the deterministic DPM-Solver++(2S).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxdiff._checks import check_positive, safe_sqrt
from jaxdiff.field import predict
from jaxdiff.samplers.base import Sampler, normal
from jaxdiff.schedules import log_snr_grid
from jaxdiff.sde import Eta, _is_zero, check_eta, eta_at

Array = jax.Array

__all__ = ["dpm_solver_2s", "dpm_solver_sde"]


class State(NamedTuple):
    x: Array


def _lam(path, t):
    """``lambda_t = log(alpha_t / sigma_t)``, half the log-SNR."""
    return 0.5 * path.log_snr(t)


def _ancestral(sig_from, sig_to, eta, finite):
    """``(sigma_down, sigma_up)`` of a step from ``sig_from`` to ``sig_to`` in EDM units; where
    ``finite`` is false (the true ``sig_from`` is inf, from ``alpha = 0``; the callers pass a
    finite stand-in above ``sig_to``: an infinite one gave NaN slopes), the limit."""
    up = jnp.minimum(sig_to, eta * jnp.sqrt(sig_to**2 * (sig_from**2 - sig_to**2) / sig_from**2))
    up = jnp.where(finite, up, jnp.minimum(1.0, eta) * sig_to)
    return safe_sqrt(sig_to**2 - up**2), up  # down = 0 at eta = 1 from alpha = 0: slope 0


def _move(x, x0, a_t, s_t, sig_to):
    """The first-order (DDIM) move of ``x`` at time ``t`` to EDM level ``sig_to``, in ``y``:
    ``x0 + sig_to eps`` with ``eps = (x - alpha_t x0) / sigma_t`` (finite where ``alpha_t = 0``)."""
    return x0 + sig_to * (x - a_t * x0) / s_t


def _mid(lam_t, lam_to, r=0.5, halve=True):
    """The point at fraction ``r`` of the step in ``lambda``; from ``lambda_t = -inf``
    (``alpha_t = 0``, where ``lambda`` has no finite fraction), at fraction ``r`` in
    ``u = alpha / sigma = e^lambda``: ``lambda_to + log r``. There ``x / sigma`` moves by
    ``int x0_hat du`` from ``u = 0``, and the update's weights ``(1 - 1/(2r), 1/(2r))`` are the
    second-order rule in ``u`` (the midpoint rule at ``r = 1/2``, the trapezoid at ``r = 1``); a
    point placed otherwise (one e-fold above, before) made the first step first order, a
    convergence floor (~2.3e-4 on the tests' mixture from ~256 steps)."""
    finite = jnp.isfinite(lam_t)
    lt = jnp.where(finite, lam_t, lam_to)
    # 2S's midpoint (halve) and the SDE's point as each was written before: the same bits where
    # alpha(1) > 0
    inner = 0.5 * (lt + lam_to) if halve else lt + r * (lam_to - lt)
    return jnp.where(finite, inner, lam_to + math.log(r))


def _at(path, field, y, lam, used=True, t_else=None):
    """``x0_hat`` where EDM's sigma is ``e^{-lam}``: the field is evaluated at the time of ``lam``;
    where not ``used`` (a step to ``sigma = 0``, whose second evaluation is discarded) at
    ``t_else``, the step's own time: at ``t = 0`` an ``"x0"`` field's conversion divides by
    ``sigma = 0`` (an error in a loop of one's own, a NaN gradient under ``jit``)."""
    t = path.t_from_log_snr(2.0 * jnp.where(used, lam, 0.0))
    if t_else is not None:
        t = jnp.where(used, t, t_else)
    a = path.alpha(t)
    x0, _ = predict(path, field, (a * y).astype(y.dtype), t)
    return x0


def _grid(path, steps, t_start, t_end):
    return log_snr_grid(path, steps, t_start, t_end)


def dpm_solver_2s(*, eta: Eta = 1.0, s_noise: ArrayLike = 1.0) -> Sampler:
    """DPM-Solver++(2S) ancestral (k-diffusion's ``sample_dpmpp_2s_ancestral``).

    Each step goes to ``sigma_down`` by the second-order singlestep update with its midpoint
    ``r = 1/2`` in ``lambda``, then adds ``s_noise sigma_up`` of fresh noise (``eta = 0``:
    deterministic 2S). Two evaluations per step; default grid: 10 steps uniform in log-SNR, then
    the denoising step.
    """
    eta = check_eta(eta)
    s_noise = check_positive(s_noise, "s_noise", strict=False)
    stochastic = not _is_zero(eta)

    def init(path, field, x, ts) -> State:
        return State(x)

    def step(key, path, field, state: State, t, s) -> State:
        x = state.x
        a_t, s_t, a_s = path.alpha(t), path.sigma(t), path.alpha(s)
        lam_t, lam_s = _lam(path, t), _lam(path, s)
        x0 = predict(path, field, x, t)[0]
        e = eta_at(eta, t)  # a function of t is called (it was multiplied: a TypeError)
        fin = jnp.isfinite(lam_t)  # from alpha = 0: a finite stand-in, the limit below
        sig_from = jnp.exp(-jnp.where(fin, lam_t, lam_s - 1.0))
        down, up = _ancestral(sig_from, jnp.exp(-lam_s), e, fin)
        lam_down = -jnp.log(jnp.where(down > 0, down, 1.0))  # used where down > 0 only
        lam_mid = jnp.where(down > 0, _mid(lam_t, lam_down), lam_s)
        y_mid = _move(x, x0, a_t, s_t, jnp.exp(-lam_mid))
        x0_mid = _at(path, field, y_mid, lam_mid, down > 0, t)  # unused where down = 0
        y = jnp.where(down > 0, _move(x, x0_mid, a_t, s_t, down), x0)  # to sigma = 0: x0_hat
        if stochastic:
            y = y + (s_noise * up).astype(y.dtype) * normal(key, y)
        return State((a_s * y).astype(x.dtype))

    return Sampler(
        name=f"dpm_solver_2s(eta={eta})",
        init=init,
        step=step,
        evals_per_step=2,
        stochastic=stochastic,
        grid=_grid,
        steps=10,
        denoise=True,
        reaches_zero=True,
    )


def dpm_solver_sde(*, eta: Eta = 1.0, r: float = 0.5, s_noise: ArrayLike = 1.0) -> Sampler:
    """DPM-Solver++ SDE (k-diffusion's ``sample_dpmpp_sde``; diffusers' ``DPMSolverSDEScheduler``
    is ``eta = 1``, ``r = 1/2``).

    Two ancestral substeps per step: to ``lambda_t + r h`` with the prediction at ``t``, then from
    ``t`` to ``s`` with the combination ``(1 - 1/(2r)) x0_hat(t) + 1/(2r) x0_hat(mid)``. The two
    noises are the increments of one Brownian motion in EDM's sigma over ``[sigma_mid, sigma_t]``
    and ``[sigma_s, sigma_t]`` (correlation ``sqrt((sigma_t - sigma_mid) / (sigma_t - sigma_s))``),
    as k-diffusion's ``BrownianTreeNoiseSampler`` draws them. Two evaluations per step.
    """
    eta = check_eta(eta)
    s_noise = check_positive(s_noise, "s_noise", strict=False)
    if not 0.0 < r <= 1.0:
        raise ValueError(f"r must lie in (0, 1]; got {r}")
    fac = 1.0 / (2.0 * r)
    stochastic = not _is_zero(eta)

    def init(path, field, x, ts) -> State:
        return State(x)

    def step(key, path, field, state: State, t, s) -> State:
        x = state.x
        a_t, s_t, a_s = path.alpha(t), path.sigma(t), path.alpha(s)
        lam_t, lam_s = _lam(path, t), _lam(path, s)
        x0 = predict(path, field, x, t)[0]
        y = x  # only for shapes and dtypes below
        fin = jnp.isfinite(lam_t)  # from alpha = 0: finite stand-ins (their slopes were NaN)
        lam_mid = _mid(lam_t, lam_s, r, halve=False)  # from alpha = 0: fraction r in u
        sig_t = jnp.exp(-jnp.where(fin, lam_t, lam_mid - 1.0))  # inf stood here: the limit below
        sig_mid, sig_s = jnp.exp(-lam_mid), jnp.exp(-lam_s)
        if stochastic:
            k1, k2 = jax.random.split(key)
            z1, z2 = normal(k1, y), normal(k2, y)
        else:  # eta = 0: no noise (up = 0), and no key needed
            z1 = z2 = jnp.zeros_like(y)
        rho = jnp.sqrt(jnp.clip((sig_t - sig_mid) / (sig_t - sig_s), 0.0, 1.0))
        rho = jnp.where(fin, rho, 1.0).astype(y.dtype)  # its limit from alpha = 0
        n1, n2 = z1, rho * z1 + jnp.sqrt(1.0 - rho**2) * z2
        # substep 1: to the midpoint level with the prediction at t
        e = eta_at(eta, t)  # a function of t is called (it was multiplied: a TypeError)
        down, up = _ancestral(sig_t, sig_mid, e, fin)
        y_mid = _move(x, x0, a_t, s_t, down) + (s_noise * up).astype(y.dtype) * n1
        to_zero = sig_s == 0  # k-diffusion's last step: x0_hat at t (the midpoint unused)
        x0_mid = _at(path, field, y_mid, lam_mid, ~to_zero, t)
        # substep 2: from t to s with the combined prediction
        x0_d = jnp.where(to_zero, x0, (1.0 - fac) * x0 + fac * x0_mid)
        down, up = _ancestral(sig_t, sig_s, e, fin)
        y_new = _move(x, x0_d, a_t, s_t, down) + (s_noise * up).astype(y.dtype) * n2
        return State((a_s * y_new).astype(x.dtype))

    return Sampler(
        name=f"dpm_solver_sde(eta={eta}, r={r})",
        init=init,
        step=step,
        evals_per_step=2,
        stochastic=stochastic,
        grid=_grid,
        steps=10,
        denoise=True,
        reaches_zero=True,
    )
