r"""DPM-Solver++ multistep (Lu et al. 2022b): orders 1, 2 (2M) and 3 (3M), ODE and SDE.

In ``lambda = log(alpha / sigma)`` (``h = lambda_s - lambda_t`` per step) the reverse dynamics with
noise ``eta`` have the exact solution

    ``x_s = (sigma_s / sigma_t) e^{-eta h} x_t + alpha_s int_0^{h_eta} e^{-(h_eta - v)} x0_hat dv
    + sigma_s sqrt(1 - e^{-2 eta h}) z``,  ``h_eta = (1 + eta) h``,

(``eta = 0``: the probability-flow ODE; ``eta = 1``: the reverse SDE, diffusers'
``algorithm_type="sde-dpmsolver++"`` and k-diffusion's ``dpmpp_2m_sde`` / ``dpmpp_3m_sde``) and
the multistep solvers extrapolate ``x0_hat`` from the last 2 (2M) or 3 (3M) evaluations: one
network call per step, on any Gaussian path and any target through the ``(x0, eps)`` hub. With
``eta``, the Taylor weights are the ODE's at ``h_eta``.

**3M's coefficient.** ``d2`` estimates ``h^2 x0''/2``, so the exact Taylor integral weighs it by
``2 phi3``; DPM-Solver's reference code, diffusers and k-diffusion use ``phi3``, which converges at
order 2 only (measured: ours ~3 on the mixture, ~4 on a Gaussian). At 5-20 evaluations on the
mixture neither wins throughout: theirs is closer at 5, 6, 10 and 20 (0.0011 against 0.0092 at
10) and ours at 8 (``benchmarks/results/cpu.json``, accuracy); ``exact_taylor=False`` reproduces
the reference code's and diffusers' numbers (k-diffusion's ``dpmpp_3m_sde`` also takes its order-2
warm-up step in the ``phi_2`` form, not the midpoint form: 1.9e-3 apart at 12 steps, README).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxdiff.field import predict
from jaxdiff.samplers.base import Sampler, normal
from jaxdiff.schedules import log_snr_grid
from jaxdiff.sde import Eta, _is_zero, check_eta, eta_at

Array = jax.Array

__all__ = ["dpm_solver_pp"]


class State(NamedTuple):
    x: Array
    m1: Array  # x0_hat one step back
    m2: Array  # two steps back
    h1: Array  # the last step in lambda / 2 ... (log-SNR half-differences)
    h2: Array
    eh1: Array  # the last step's noise exponent eta h (0: a noiseless step)
    i: Array  # index of the step about to be taken
    n: Array  # number of steps of the grid


def _log_snr_grid(path, steps, t_start, t_end):
    return log_snr_grid(path, steps, t_start, t_end)


def _phis(h):
    """``phi1 = 1 - e^{-h}``, ``phi2 = phi1 / h - 1``, ``phi3 = phi2 / h + 1/2``."""
    phi1 = -jnp.expm1(-h)
    phi2 = phi1 / h - 1.0
    return phi1, phi2, phi2 / h + 0.5


def _update(order, exact_taylor, x, m0, m1, m2, h, h1, h2, ratio, a_s, h_eta):
    """DPM-Solver++ multistep update of the given order (Lu et al. 2022b, Alg. 2); ``ratio``
    includes ``e^{-eta h}`` and the weights are taken at ``h_eta`` (the ODE: ``h_eta = h``)."""
    phi1, phi2, phi3 = _phis(h_eta)
    out = ratio * x + a_s * phi1 * m0
    if order == 1:
        return out
    # a step from alpha = 0 left h = inf in the history: its difference is 0 (as m / inf was),
    # with finite derivatives (0 * inf made the schedule's gradients NaN)
    fin1, fin2 = jnp.isfinite(h1), jnp.isfinite(h2)
    r0 = jnp.where(fin1, h1, h) / h
    d1_0 = jnp.where(fin1, (m0 - m1) / r0, jnp.zeros_like(m0))
    if order == 2:
        return out + 0.5 * a_s * phi1 * d1_0
    r1 = jnp.where(fin2, h2, h) / h
    d1_1 = jnp.where(fin2, (m1 - m2) / r1, jnp.zeros_like(m1))
    d1 = d1_0 + jnp.where(fin2, r0 / (r0 + r1), 0.0) * (d1_0 - d1_1)
    d2 = jnp.where(fin2, (d1_0 - d1_1) / (r0 + r1), jnp.zeros_like(d1_0))
    # d1 ~ h x0', d2 ~ h^2 x0'' / 2 at lambda_t; the integrals e^{-h} int_0^h e^u u^k du / h^k
    weight = 2.0 if exact_taylor else 1.0
    return out - a_s * phi2 * d1 + weight * a_s * phi3 * d2


def dpm_solver_pp(
    order: int = 2,
    *,
    eta: Eta = 0.0,
    lower_order_final: bool = True,
    exact_taylor: bool = True,
) -> Sampler:
    """DPM-Solver++ multistep of ``order`` 1, 2 (2M) or 3 (3M) (Lu et al. 2022b); ``eta > 0``
    gives the SDE variants 2M-SDE / 3M-SDE (``eta = 1``: diffusers' ``sde-dpmsolver++``; ``eta``
    may be a function of ``t``). This ``eta`` is k-diffusion's ``dpmpp_2m_sde`` one and scales the
    noise's *variance*: ``dpm_solver_pp(eta=e)`` is the reverse-SDE member of noise ``sqrt(e) g``
    (``sde(eta=sqrt(e))``), where ``ddim``'s, ``sde``'s and 2S's ``eta`` scale the standard
    deviation; they agree at 0 and 1. 2M uses the midpoint form of the second-order term (the
    reference code's and diffusers' default ``solver_type``).

    The first steps use lower orders (no history yet), and so do the last ones with
    ``lower_order_final`` (for stability with few steps: the last step first order, the one before
    at most second, at every step count; diffusers does so below 15 steps only, so from 15 steps
    on its ``lower_order_final=True`` matches this sampler's ``False``, to 8e-7 on an exact
    denoiser); a step to ``sigma = 0`` is first order (it returns ``x0_hat``). A step from
    ``alpha = 0`` (``t = 1`` on the linear path) is DDIM's, and without noise it is corrected at
    the next evaluation by the trapezoid in ``u = alpha / sigma`` (second order; first order, it
    was a floor at ~128 steps: ``jaxdiff.log_snr_grid``). Order 1 is DDIM
    with ``eta = 0``. Default grid: 10 steps uniform in log-SNR to ``1e-3``
    (``jaxdiff.log_snr_grid``), then the denoising step: 11 evaluations.
    ``exact_taylor=False``: 3M with the reference code's coefficient (see the module).

    >>> import jax, jax.numpy as jnp, jaxdiff as jd
    >>> data = jd.GaussianMixture.isotropic(jnp.array([[2.0, 0.0], [-2.0, 0.0]]), std=0.3)
    >>> path = jd.linear_path()
    >>> sol = jd.sample(jax.random.key(0), path, data.field(path, "velocity"), (4096, 2),
    ...                 sampler=dpm_solver_pp(3), steps=19)
    >>> round(float(jnp.abs(sol.x[:, 0]).mean()), 1), int(sol.nfe)
    (2.0, 20)
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3; got {order}")
    eta = check_eta(eta)
    stochastic = not _is_zero(eta)

    def init(path, field, x, ts) -> State:
        dtype = jnp.result_type(x.dtype, jnp.float32)
        one = jnp.ones((), dtype)
        zeros = jnp.zeros_like(x)
        n = jnp.asarray(ts.shape[0] - 1, jnp.int32)
        return State(x, zeros, zeros, one, one, 0 * one, jnp.zeros((), jnp.int32), n)

    def step(key, path, field, state: State, t, s) -> State:
        x, m1, m2, h1, h2, eh1, i, n = state
        m0, _ = predict(path, field, x, t)
        # a noiseless step from alpha = 0 (h = inf: t = 1 on the linear path) was DDIM's, first
        # order in u = alpha / sigma, along which x / sigma moves by int x0_hat du; its trapezoid
        # with this evaluation (UniPC's corrector in the limit, no extra call) makes it second
        # order. Uncorrected it left a floor no step count removed (2.3e-4 on the tests' mixture
        # from 128 steps). A step with noise keeps its first-order start
        if order > 1:  # order 1 stays DDIM
            after_inf = (i > 0) & ~jnp.isfinite(h1) & (eh1 == 0)
            fix = jnp.where(after_inf, 0.5 * path.alpha(t), 0.0).astype(x.dtype)
            x = x + fix * (m0 - m1)
        h = 0.5 * (path.log_snr(s) - path.log_snr(t))
        o = jnp.minimum(order, i + 1)
        if lower_order_final:
            o = jnp.minimum(o, n - i)
        to_zero = path.sigma(s) == 0
        o = jnp.where(to_zero, 1, o)
        ratio, a_s = path.sigma(s) / path.sigma(t), path.alpha(s)
        h_eta, eh = h, jnp.zeros_like(h)
        if stochastic:
            e = jnp.where(to_zero, 0.0, eta_at(eta, t))  # no noise on a step to sigma = 0
            # h = inf on a step to sigma = 0, and from alpha_t = 0 (t = 1 on the linear path):
            # e h would be 0 * inf = NaN there where eta(t) = 0
            eh = jnp.where(to_zero | (e == 0), 0.0, e * jnp.where(to_zero, 0.0, h))
            ratio, h_eta = ratio * jnp.exp(-eh), h + eh
        args = (x, m0, m1, m2, h, h1, h2, ratio, a_s, h_eta)
        branches = [lambda a, q=q: _update(q, exact_taylor, *a) for q in range(1, order + 1)]
        x_s = jax.lax.switch(o - 1, branches, args) if order > 1 else branches[0](args)
        if stochastic:
            std = path.sigma(s) * jnp.sqrt(-jnp.expm1(-2.0 * eh))
            x_s = x_s + std.astype(x.dtype) * normal(key, x)
        return State(x_s.astype(x.dtype), m0, m1, h.astype(h1.dtype), h1, eh.astype(h1.dtype),
                     i + 1, n)  # fmt: skip

    return Sampler(
        name=f"dpm_solver_pp(order={order}, eta={eta})",
        init=init,
        step=step,
        evals_per_step=1,
        stochastic=stochastic,
        grid=_log_snr_grid,
        steps=10,
        denoise=True,
        reaches_zero=True,
    )
