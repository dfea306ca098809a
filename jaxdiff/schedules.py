"""Discrete DDPM beta schedules and sampling time grids.

Continuous schedules are paths (``jaxdiff.paths``). Here: the discrete betas of DDPM, and grids of
times for samplers. Grids run from ``t_start`` (default 1, the prior) down to ``t_end`` (default
``1e-3``), have ``steps + 1`` points, and are decreasing.

Every check here (betas in range, times in ``[0, 1]``) raises a ``ValueError`` for concrete values
and, for traced ones, an ``error_if`` tied to the returned array, so it also fires under ``jit``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxdiff._checks import (
    check_count,
    check_order,
    check_positive,
    check_time,
    coef_time,
    concrete,
    cut,
    tie_check,
    vector_length,
)
from jaxdiff.paths import GaussianPath

Array = jax.Array

__all__ = [
    "linear_betas",
    "cosine_betas",
    "alpha_bars",
    "uniform_grid",
    "quadratic_grid",
    "log_snr_grid",
    "karras_grid",
    "default_grid",
    "shift_time",
]


def linear_betas(
    num_steps: int = 1000, beta_start: ArrayLike = 1e-4, beta_end: ArrayLike = 0.02
) -> Array:
    """DDPM's linear betas ``beta_i``, ``i = 1..T`` (Ho et al. 2020): shape ``(T,)``.

    >>> b = linear_betas(1000)
    >>> float(b[0]), round(float(b[-1]), 4)
    (0.0001, 0.02)
    """
    num_steps = check_count(num_steps, "num_steps")
    beta_start = check_positive(beta_start, "beta_start")
    beta_start, beta_end = check_order(beta_start, beta_end, "beta_start", "beta_end", strict=False)
    beta_end, _ = check_order(beta_end, 1.0, "beta_end", "1")
    return jnp.linspace(beta_start, beta_end, num_steps)


def cosine_betas(num_steps: int = 1000, s: ArrayLike = 0.008, max_beta: ArrayLike = 0.999) -> Array:
    """Cosine betas (Nichol & Dhariwal 2021): ``beta_i = 1 - abar(i/T) / abar((i-1)/T)``, clipped.

    ``abar(u) = cos^2(theta_u) / cos^2(theta_0)``, ``theta_u = phi (u + s)``, ``phi = pi/2 / (1 + s)``.
    Computed as ``sin(theta_i + theta_{i-1}) sin(phi / T) / cos^2(theta_{i-1})`` with each sine and
    cosine taken at its small argument (``cos theta_u = sin(phi (1 - u))``): float32 betas to a few
    ulps at both ends, where ``1 - ratio`` loses 3 of float32's 7 digits.
    """
    num_steps = check_count(num_steps, "num_steps")
    s = check_positive(s, "s", strict=False)
    max_beta = check_positive(max_beta, "max_beta")
    max_beta, _ = check_order(max_beta, 1.0, "max_beta", "1", strict=False)
    phi = 0.5 * jnp.pi / (1.0 + s)
    i = jnp.arange(1, num_steps + 1, dtype=jnp.result_type(float))
    u, u_prev = i / num_steps, (i - 1.0) / num_steps
    v, v_prev = (num_steps - i) / num_steps, (num_steps - i + 1.0) / num_steps  # 1 - u
    total = phi * (u + u_prev + 2.0 * s)  # theta_i + theta_{i-1}; sin(total) = sin(pi - total)
    sin_total = jnp.where(total < 0.5 * jnp.pi, jnp.sin(total), jnp.sin(phi * (v + v_prev)))
    cos_prev = jnp.where(u_prev < 0.5, jnp.cos(phi * (u_prev + s)), jnp.sin(phi * v_prev))
    betas = sin_total * jnp.sin(phi / num_steps) / cos_prev**2
    return jnp.clip(betas, 0.0, max_beta)


def alpha_bars(betas: ArrayLike) -> Array:
    """``abar_i = prod_{j <= i} (1 - beta_j)``: ``q(x_i | x_0) = N(sqrt(abar_i) x_0, (1 - abar_i) I)``.

    ``betas`` must lie in ``[0, 1]`` (``beta = 1`` gives ``abar = 0``, a zero terminal SNR; a
    negative one gave ``abar > 1``, a negative variance)."""
    betas = jnp.asarray(betas)
    if betas.ndim != 1:  # cumsum flattened a (2, 2) array silently
        raise ValueError(f"betas must be 1-D (one per step); got shape {betas.shape}")
    value = concrete(betas)
    if value is not None and not np.all((value >= 0) & (value <= 1)):
        raise ValueError(
            f"betas must lie in [0, 1] (and not NaN); got min {np.min(value)}, max {np.max(value)}"
        )
    if value is None:
        betas = tie_check(
            betas, ~((betas >= 0) & (betas <= 1)), "betas must lie in [0, 1] (and not NaN)"
        )
    return jnp.exp(jnp.cumsum(jnp.log1p(-betas)))


def _check_ends(t_start, t_end):
    """``(t_start, t_end)`` in ``[0, 1]`` with ``t_end < t_start``: grids run from noise to data."""
    # in float32 or wider: bfloat16 ends made a bfloat16 grid (spacing 2^-8 near t = 1: 225
    # distinct times of 301, or a silently rounded grid)
    t_start = coef_time(check_time(t_start, "t_start"))  # checked first: under a trace a
    t_end = coef_time(check_time(t_end, "t_end"))  # constant converted by jnp is traced
    t_end, t_start = check_order(t_end, t_start, "t_end", "t_start")
    return t_start, t_end


def uniform_grid(steps: int, t_start: ArrayLike = 1.0, t_end: ArrayLike = 1e-3) -> Array:
    """``steps + 1`` equally spaced times from ``t_start`` to ``t_end``."""
    steps = check_count(steps, "steps")
    t_start, t_end = _check_ends(t_start, t_end)
    return jnp.linspace(t_start, t_end, steps + 1)


def shift_time(t: ArrayLike, shift: ArrayLike) -> Array:
    """SD3's time shift ``t' = s t / (1 + (s - 1) t)`` (Esser et al. 2024, Sec. 5.3.2; diffusers'
    ``FlowMatchEulerDiscreteScheduler(shift=s)``, whose sigma is our ``t``: no ``1 - t``).

    A monotone map of ``[0, 1]`` onto itself; ``s > 1`` moves times towards the noise. On the
    linear path it lowers the log-SNR by exactly ``2 log s`` (the SNR divided by ``s^2``: the
    shift SD3 gives images of ``s^2`` times the pixels, ``s = sqrt(m / n)``); on other paths it is
    the same warp of ``t``. For a sampler's grid, ``ts=jd.shift_time(jd.uniform_grid(N), 3.0)``;
    for training times, :func:`~jaxdiff.shifted_time`.

    >>> [round(float(v), 4) for v in shift_time(jnp.array([0.0, 0.25, 0.5, 1.0]), 3.0)]
    [0.0, 0.5, 0.75, 1.0]
    """
    t = coef_time(check_time(t))
    return shifted(t, check_positive(jnp.asarray(shift, t.dtype), "shift"))


def shifted(t: Array, s: ArrayLike) -> Array:
    """``s t / (1 + (s - 1) t)`` unchecked (:func:`shift_time`; the shifted time samplers)."""
    return s * t / (1.0 + (s - 1.0) * t)


def quadratic_grid(steps: int, t_start: ArrayLike = 1.0, t_end: ArrayLike = 1e-3) -> Array:
    """Times ``t_end + (t_start - t_end) u^2`` for ``u`` uniform: denser near the data (Song et al. 2021a, DDIM)."""
    t_start, t_end = _check_ends(t_start, t_end)
    u = uniform_grid(steps, 1.0, 0.0)
    return t_end + (t_start - t_end) * u**2


def log_snr_grid(
    path: GaussianPath, steps: int, t_start: ArrayLike = 1.0, t_end: ArrayLike = 1e-3
) -> Array:
    """Times equally spaced in log-SNR ``lambda_t`` between ``t_start`` and ``t_end`` (Lu et al. 2022).

    Where ``alpha(t_start) = 0`` (``t = 1`` on the linear and cosine paths) ``lambda`` is ``-inf``:
    the grid keeps ``t_start`` as its first point and spaces the other ``steps`` points uniformly
    from ``lambda = -2 log 80`` (EDM's ``sigma_max = 80``) to ``lambda(t_end)``. Likewise at
    ``t_end = 0`` (``lambda = inf``) it keeps 0 as its last point and the others end at
    ``lambda = -2 log 0.002`` (EDM's ``sigma_min``). The first step, from pure noise to
    ``sigma / alpha = 80``, keeps its length at every step count: taken at first order its error
    (~``alpha^2`` at its end) would be a floor (2.3e-4 on a test mixture), so ``unipc``,
    ``dpm_solver_pp``, ``dpm_solver_2s`` and ``dpm_solver_sde`` take it at second order in ``u =
    alpha / sigma``, which leaves a smaller floor (~9e-7 there: the third-order samplers reach it
    from ~512 steps; README: "Discrete DDPM, DDIM, likelihoods").

    >>> from jaxdiff import linear_path
    >>> [round(t, 3) for t in log_snr_grid(linear_path(), 3).tolist()]
    [1.0, 0.988, 0.221, 0.001]
    """
    steps = check_count(steps, "steps")
    t_start, t_end = _check_ends(t_start, t_end)
    lam = _spaced(path, steps, t_start, t_end, lambda u, lo, hi: lo + u * (hi - lo), cap_end=True)
    return _to_times(path, lam, steps, t_start, t_end)


def karras_grid(
    path: GaussianPath,
    steps: int,
    t_start: ArrayLike = 1.0,
    t_end: ArrayLike = 1e-3,
    rho: ArrayLike = 7.0,
) -> Array:
    """EDM's grid (Karras et al. 2022, eq. 5) in ``s = sigma_t / alpha_t``, mapped back to ``t``.

    ``s_i^(1/rho)`` is uniform between ``s(t_start)^(1/rho)`` and ``s(t_end)^(1/rho)``; ``rho = 7``.
    Where ``s(t_end) = 0`` (``t_end = 0`` on VP, linear, cosine paths) the last point stays
    ``t_end`` and the others end at EDM's ``sigma_min = 0.002``, as EDM's grid does (spaced down
    to ``s = 0`` its last points crowded at ~1e-19 and every gradient was NaN); where
    ``alpha(t_start) = 0`` the first stays ``t_start`` and the others start at ``s = 80``.
    """
    steps = check_count(steps, "steps")
    t_start, t_end = _check_ends(t_start, t_end)
    rho = check_positive(rho, "rho")

    def spacing(u, lam_hi, lam_lo):  # uniform in s^(1/rho), s = exp(-lambda / 2)
        lo, hi = jnp.exp(-lam_hi / (2 * rho)), jnp.exp(-lam_lo / (2 * rho))
        return -2.0 * rho * jnp.log(lo + u * (hi - lo))

    lam = _spaced(path, steps, t_start, t_end, spacing, cap_end=True)
    return _to_times(path, lam, steps, t_start, t_end)


_LOG_SNR_CAP = -2.0 * math.log(80.0)  # EDM's sigma_max = 80, for starts where alpha = 0
_LOG_SNR_CAP_END = -2.0 * math.log(0.002)  # EDM's sigma_min = 0.002, for ends where sigma = 0


def _spaced(path: GaussianPath, steps: int, t_start, t_end, spacing, cap_end=False) -> Array:
    """``steps + 1`` log-SNRs from ``lambda(t_start)`` to ``lambda(t_end)`` by ``spacing(u, hi, lo)``,
    padded to ``vector_length(steps + 1)`` (eager ops then compile once per length bucket, not
    per step count; :func:`_to_times` cuts).

    Where ``lambda(t_start) = -inf`` (``alpha = 0``) the first point stays ``-inf`` and the other
    points are spaced from ``_LOG_SNR_CAP``: the first step is then the step from pure noise
    (DDIM / DPM-Solver handle ``h = inf``; the same length at every step count, so the samplers
    take it at second order in ``u = alpha / sigma``).
    With ``cap_end``, where ``lambda(t_end) = inf`` (``sigma = 0``: ``t_end = 0``) the last point
    stays ``inf`` and the others end at ``_LOG_SNR_CAP_END`` (a spacing uniform in ``lambda`` cannot reach ``inf``).
    A cap beyond the other end moves to one unit of log-SNR before it: the grid stays decreasing."""
    dtype = jnp.result_type(float)
    lam_start = path.log_snr(jnp.asarray(t_start, dtype))
    lam_end = path.log_snr(jnp.asarray(t_end, dtype))
    open_start = jnp.isfinite(lam_start)
    open_end = jnp.isfinite(lam_end) | (not cap_end)
    # a cap past the other end (t_end = 0.99 on the linear path: lambda = -9.19 < -8.76) ran the
    # grid backwards in time; it stays one unit of log-SNR short of that end
    lo = jnp.where(open_end, lam_end, _LOG_SNR_CAP_END)
    hi = jnp.where(open_start, lam_start, _LOG_SNR_CAP)
    lam_hi = jnp.where(open_start, lam_start, jnp.minimum(_LOG_SNR_CAP, lo - 1.0))
    lam_lo = jnp.where(open_end, lam_end, jnp.maximum(_LOG_SNR_CAP_END, hi + 1.0))
    i = jnp.arange(vector_length(steps + 1), dtype=dtype)

    def grid(capped_start: bool, capped_end: bool) -> Array:
        # jnp.linspace(0, 1, n)'s points, i / (n - 1), shifted past a capped first point
        n = steps + 1 - capped_start - capped_end
        inner = spacing(jnp.clip((i - capped_start) / max(n - 1, 1), 0.0, 1.0), lam_hi, lam_lo)
        inner = jnp.where(i < capped_start, -jnp.inf, inner)
        return jnp.where(i > steps - capped_end, jnp.inf, inner) if capped_end else inner

    if steps == 1:
        return grid(False, False)
    out = jnp.where(open_start, grid(False, False), grid(True, False))
    if cap_end:
        ends = jnp.where(open_start, grid(False, True), grid(True, True))
        out = jnp.where(open_end, out, ends)
    return out


def _to_times(path: GaussianPath, lam: Array, steps: int, t_start, t_end) -> Array:
    """The times of the padded log-SNRs ``lam``, the end points set exactly (bisection leaves
    ~1e-7 errors), cut to ``steps + 1``."""
    i = jnp.arange(lam.shape[0])
    ts = path.t_from_log_snr(lam)
    ts = jnp.where(i == 0, jnp.asarray(t_start, ts.dtype), ts)
    ts = jnp.where(i == steps, jnp.asarray(t_end, ts.dtype), ts)
    return cut(ts, steps + 1)


def default_grid(
    path: GaussianPath, steps: int, t_start: ArrayLike = 1.0, t_end: ArrayLike = 1e-3
) -> Array:
    """The default sampling grid of a path: uniform in ``t``, or Karras' where ``alpha`` is constant.

    VP, sub-VP, linear and cosine schedules were designed for uniform times, and uniform is the
    best of uniform / Karras / log-SNR for Euler at 10-50 steps on VP and linear (energy distance
    on the 3-component mixture at 10 steps: VP 4.8e-3 vs 1.7e-2 and 2.3e-2; linear 7.7e-3 vs 3.3e-2
    and 5.2e-2). A variance-exploding path (``alpha = 1``: VE, EDM's ``sigma = t``) gets the
    Karras grid (rho = 7): with ``sigma = 80 t`` the uniform grid gives 1.24 at 10 Euler steps and
    Karras 1.6e-2. A path whose parameters are traced (unknown at trace time) gets the uniform grid.

    >>> from jaxdiff import ve_path, vp_path
    >>> default_grid(vp_path(), 2).tolist()
    [1.0, 0.5005000233650208, 0.0010000000474974513]
    >>> [round(t, 3) for t in default_grid(ve_path(), 2).tolist()]
    [1.0, 0.644, 0.001]
    """
    steps = check_count(steps, "steps")
    with jax.ensure_compile_time_eval():
        alpha = concrete(path.alpha(jnp.linspace(0.0, 1.0, 9)))
    if alpha is not None and bool(np.all(alpha == alpha[0])):
        return karras_grid(path, steps, t_start, t_end)
    return uniform_grid(steps, t_start, t_end)
