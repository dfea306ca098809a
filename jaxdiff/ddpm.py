r"""Discrete-time DDPM (Ho et al. 2020): the forward chain, its posterior, the reverse model and
ancestral sampling, on any Gaussian path.

DDPM is a Markovian hierarchical VAE over latents ``x_1, ..., x_T``. Step ``i`` of a chain of
``T`` steps is the time ``t_i = i / T`` of a path ``x_t = alpha_t x0 + sigma_t eps``, so the
networks of ``jaxdiff`` (continuous ``t`` in ``[0, 1]``) serve discrete and continuous models
alike. A discrete beta schedule is the path :func:`discrete_path` (exact at the grid points):

* chain ``q(x_t | x_s) = N(a x_s, sigma_t^2 (1 - SNR_t / SNR_s) I)``, ``a = alpha_t / alpha_s``
  (for DDPM's step ``i``: ``N(sqrt(1 - beta_i) x_{i-1}, beta_i I)``);
* marginal ``q(x_t | x0) = N(alpha_t x0, sigma_t^2 I)`` (``path.sample``; ``abar_i = alpha_{t_i}^2``);
* posterior ``q(x_s | x_t, x0) = N(c_x x_t + c_0 x0, sigma_s^2 (1 - SNR_t / SNR_s) I)`` for
  ``s < t`` (arguments in the order of the step, ``(t, s)``: from ``t`` to ``s``) with
  ``c_x = a sigma_s^2 / sigma_t^2`` and ``c_0 = alpha_s (1 - SNR_t / SNR_s)``;
* reverse ``p(x_s | x_t)``: the posterior with ``x0`` replaced by the network's estimate. Design I
  (the network predicts ``x0``), Design II (``eps``), ``v`` and the others all enter through the
  ``(x0, eps)`` hub, so one formula serves every target: for ``eps`` it is Ho's
  ``(x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(1 - beta_t)``.

The negative ELBO is in ``jaxdiff.elbo``; the ancestral sampler is ``jaxdiff.samplers.ancestral``.

Every function of two times takes them in the order of the move, ``(t, s)`` = (from, to): a
reverse step from ``t`` to ``s < t`` here, a forward step in ``GaussianPath.transition``; the
wrong order raises an error (it used to return a negative variance).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxdiff._checks import (
    as_time,
    check_count,
    check_same_shape,
    coef_time,
    concrete,
    error_if,
    expand_like,
    normal_like,
    value_check,
    widen,
)
from jaxdiff.paths import GaussianPath
from jaxdiff.schedules import alpha_bars

Array = jax.Array

__all__ = [
    "discrete_path",
    "rescale_zero_terminal_snr",
    "linspace_timesteps",
    "leading_timesteps",
    "trailing_timesteps",
    "forward_chain",
    "posterior",
    "reverse_mean_var",
]


class _DiscreteAlpha(eqx.Module):
    """``alpha_t = sqrt(abar(t))`` with ``abar`` linear between ``(i / T, abar_i)``, ``abar_0 = 1``.

    ``one_minus_square`` interpolates ``1 - abar_i = -expm1(sum_j log1p(-beta_j))``, computed
    without the cancellation of ``1 - abar`` near ``t = 0`` (1.4e-4 relative at ``t = 1e-3``)."""

    abar: Array  # (T + 1,)
    one_minus_abar: Array  # (T + 1,)

    def _grid(self):
        return jnp.linspace(0.0, 1.0, self.abar.shape[0], dtype=self.abar.dtype)

    def __call__(self, t):
        return jnp.sqrt(jnp.interp(t, self._grid(), self.abar))

    def one_minus_square(self, t):
        return jnp.interp(t, self._grid(), self.one_minus_abar)


def discrete_path(betas: ArrayLike) -> GaussianPath:
    """The VP path of a discrete schedule: ``alpha_{i/T}^2 = abar_i = prod_{j <= i} (1 - beta_j)``.

    Exact at the grid ``t_i = i / T``; ``abar`` is linear in ``t`` between grid points. A zero
    terminal SNR (``beta_T = 1``, see :func:`rescale_zero_terminal_snr`) gives ``alpha_1 = 0``.
    The probability-flow velocity then jumps at every grid point, so multi-stage ODE solvers lose
    their order (measured on a Gaussian, 10 to 80 steps: Heun's order 1.4-1.7 with linear betas
    and about 1 with cosine ones, against 2.0 on ``vp_path()``; Tsit5 stalls near 1e-3): sample a
    discrete schedule with the exponential integrators (``ddim``, ``dpm_solver_pp``, ``unipc``),
    which read the path only at the times of their grid.

    >>> from jaxdiff.schedules import linear_betas
    >>> path = discrete_path(linear_betas(1000))
    >>> round(float(path.alpha(1e-3) ** 2), 6)  # 1 - beta_1
    0.9999
    """
    betas = jnp.asarray(betas, dtype=jnp.result_type(betas, float))
    if betas.ndim != 1 or betas.shape[0] < 1:
        raise ValueError(f"betas must be a non-empty 1-D array; got shape {betas.shape}")
    value = concrete(betas)
    if value is not None and ((value <= 0).any() or (value > 1).any()):
        raise ValueError(f"betas must lie in (0, 1]; got min {value.min()}, max {value.max()}")
    if value is None:  # traced (a learned schedule): checked when the program runs
        betas = error_if(betas, ~jnp.all((betas > 0) & (betas <= 1)), "betas must lie in (0, 1]")
    abar = jnp.concatenate([jnp.ones((1,), betas.dtype), alpha_bars(betas)])
    complement = -jnp.expm1(jnp.cumsum(jnp.log1p(-betas)))
    complement = jnp.concatenate([jnp.zeros((1,), betas.dtype), complement])
    return GaussianPath(_DiscreteAlpha(abar, complement))


def rescale_zero_terminal_snr(betas: ArrayLike) -> Array:
    """Rescale betas so that ``abar_T = 0`` (Lin et al. 2024, Alg. 1): ``sqrt(abar)`` is shifted and
    scaled to keep ``abar_1`` and reach 0 at ``T``. Sample from pure noise; train ``v`` or ``x0``.

    >>> from jaxdiff.schedules import linear_betas
    >>> float(rescale_zero_terminal_snr(linear_betas(1000))[-1])
    1.0
    """
    betas = jnp.asarray(betas)
    if betas.ndim != 1 or betas.shape[0] < 2:  # T = 1 gave NaN (0 / 0); 2-D was flattened
        raise ValueError(f"betas must be a 1-D array of at least 2 steps; got shape {betas.shape}")
    betas = value_check(
        betas,
        lambda xp, b: xp.any(~((b > 0) & (b <= 1))) | ~(b[0] < 1),
        "betas must lie in (0, 1], the first below 1",
    )
    # Without cancellation (1 - abar_i / abar_{i-1} lost 3 digits in float32: beta_1 = 1.0014e-4
    # for 1e-4): with r = sqrt(abar), the new sqrt(alpha_i) is c_i / c_{i-1}, c_i = r_i - r_T,
    # so 1 - sqrt(alpha_i) = d_i = delta_i / c_{i-1}, delta_i = r_{i-1} - r_i =
    # r_{i-1} beta_i / (1 + sqrt(1 - beta_i)), c_{i-1} = sum_{j >= i} delta_j, and then
    # beta_i = d_i (2 - d_i). beta_1 is kept exactly (abar_1 is), beta_T = 1.
    root = jnp.sqrt(alpha_bars(betas))
    delta = root[:-1] * betas[1:] / (1.0 + jnp.sqrt(1.0 - betas[1:]))
    remaining = jnp.cumsum(delta[::-1])[::-1]
    d = delta / remaining
    return jnp.concatenate([betas[:1], d * (2.0 - d)])


# --- timestep spacings (the names of Lin et al. 2024 and diffusers) --------------------------


def _times(indices, num_train_steps: int) -> Array:
    """Diffusers' 0-based indices ``k`` (``abar[k]``) as times ``(k + 1) / T``, decreasing, then 0.

    The indices are NumPy (static), so the spacings work inside ``jit``."""
    t = (jnp.asarray(indices, dtype=jnp.result_type(float)) + 1.0) / num_train_steps
    return jnp.concatenate([t, jnp.zeros((1,), t.dtype)])


def _check_counts(num_train_steps: int, num_steps: int) -> None:
    total, n = check_count(num_train_steps, "num_train_steps"), check_count(num_steps, "num_steps")
    if total < n:
        raise ValueError(
            f"need 1 <= num_steps <= num_train_steps; got {num_steps} and {num_train_steps}"
        )


def linspace_timesteps(num_train_steps: int, num_steps: int) -> Array:
    """Sampling times for ``num_steps`` of a ``T``-step model, ``linspace`` spacing.

    Indices ``round(linspace(0, T - 1, n))``: the first step starts at ``t = 1`` (for ``n >= 2``;
    one step starts at ``t = 1 / T``, as in diffusers: use ``trailing_timesteps``). All three
    spacings return ``num_steps + 1`` decreasing times ``t = i / T`` and end at ``t = 0``.

    >>> linspace_timesteps(1000, 4).tolist()
    [1.0, 0.667, 0.334, 0.001, 0.0]
    """
    _check_counts(num_train_steps, num_steps)
    k = np.round(np.linspace(0, num_train_steps - 1, num_steps))[::-1]
    return _times(k, num_train_steps)


def leading_timesteps(num_train_steps: int, num_steps: int, offset: int = 0) -> Array:
    """``leading`` spacing (DDIM, Stable Diffusion): indices ``k r + offset``, ``r = T // n``.

    It never starts at ``t = 1`` (Lin et al. 2024 show the harm): ``[0.751, 0.501, 0.251, 0.001, 0]``
    for ``T = 1000``, ``n = 4``.
    """
    _check_counts(num_train_steps, num_steps)
    offset = check_count(offset, "offset", minimum=0)  # offset -1 gave the time 0 twice
    ratio = num_train_steps // num_steps
    k = (np.arange(num_steps) * ratio + offset)[::-1]
    if int(k[0]) > num_train_steps - 1:
        raise ValueError(f"offset {offset} moves the first index past T - 1")
    return _times(k, num_train_steps)


def trailing_timesteps(num_train_steps: int, num_steps: int) -> Array:
    """``trailing`` spacing (Lin et al. 2024): indices ``round(arange(T, 0, -T / n)) - 1``.

    It starts at ``t = 1`` and spaces the steps evenly: ``[1, 0.75, 0.5, 0.25, 0]`` for ``n = 4``.
    """
    _check_counts(num_train_steps, num_steps)
    k = np.round(np.arange(num_train_steps, 0, -num_train_steps / num_steps)) - 1
    return _times(k[:num_steps], num_train_steps)


# --- chain, posterior, reverse model -------------------------------------------------------


def _ratio(path: GaussianPath, s, t):
    """``1 - SNR_t / SNR_s``, exact where ``alpha_t = 0`` or ``sigma_s = 0``."""
    return -jnp.expm1(path.log_snr(t) - path.log_snr(s))


def forward_chain(key: Array, path: GaussianPath, x0: ArrayLike, ts: ArrayLike) -> Array:
    """Run the forward chain ``x_{t_k} ~ q(x_{t_k} | x_{t_{k-1}})`` from ``x0`` at ``t = 0``.

    ``ts`` increasing in ``(0, 1]``; returns shape ``(len(ts), *x0.shape)``. Its marginals are
    ``q(x_t | x0)`` (from ``t_0 = 0``; on VE the first step adds ``sigma_{t_1}^2 - 0``).
    """
    out, x0 = widen(x0)  # the chain runs in max(float32, data dtype), returns the data's
    ts = coef_time(ts)  # times never take the data's dtype (a bfloat16 grid has duplicates)
    msg = "ts must be a 1-D grid increasing strictly inside (0, 1]"
    if ts.ndim != 1 or ts.shape[0] == 0:  # an empty grid failed inside lax.scan
        raise ValueError(f"{msg}; got shape {ts.shape}")
    ts = value_check(
        ts,
        lambda xp, w: ~(xp.all(xp.isfinite(w) & (w > 0) & (w <= 1)) & xp.all(xp.diff(w) > 0)),
        msg,
    )
    prev = jnp.concatenate([jnp.zeros((1,), ts.dtype), ts[:-1]])

    def step(x, inputs):
        s, t, k = inputs
        first = s == 0  # from the data itself: the marginal q(x_t | x0)
        mean, std = path.transition(x, s, t)
        std = jnp.where(first, path.sigma(t), std)
        mean = jnp.where(first, path.alpha(t) * x, mean)
        x = (mean + std * normal_like(k, x)).astype(x.dtype)
        return x, x.astype(out)

    return jax.lax.scan(step, x0, (prev, ts, jax.random.split(key, ts.shape[0])))[1]


def posterior(
    path: GaussianPath, x_t: ArrayLike, x0: ArrayLike, t: ArrayLike, s: ArrayLike
) -> tuple[Array, Array]:
    """Mean and variance of ``q(x_s | x_t, x0)``: the step from ``t`` back to ``s < t``.

    ``mean = alpha_s r x0 + (alpha_t / alpha_s)(sigma_s^2 / sigma_t^2) x_t``, ``var = sigma_s^2 r``,
    ``r = 1 - SNR_t / SNR_s``; DDPM's ``mu~_t`` and ``beta~_t = (1 - abar_{t-1}) beta_t / (1 - abar_t)``.
    The variance is shaped like ``t``. ``s >= t`` raises an error.
    """
    x_t = jnp.asarray(x_t)
    check_same_shape(x0, x_t, "x0")  # a raw broadcasting TypeError, or a silent broadcast
    t, s = _reverse_times(t, s)
    return _posterior(path, x_t, jnp.asarray(x0), t, s)


def _reverse_times(t, s) -> tuple[Array, Array]:
    """``(t, s)`` as times after checking ``s < t`` (now when known, else at run time)."""
    t, s = as_time(t), as_time(s)
    bad = jnp.any(s >= t)
    value = concrete(bad)
    msg = "a reverse step goes from t to an earlier s: arguments are (t, s) with s < t"
    if value is not None:
        if bool(value):
            raise ValueError(f"{msg}; got t = {np.ravel(concrete(t))[:4].tolist()}, "
                             f"s = {np.ravel(concrete(s))[:4].tolist()}")  # fmt: skip
        return t, s
    return error_if(t, bad, msg), s


def _posterior_coefs(path: GaussianPath, t, s) -> tuple[Array, Array, Array]:
    """``(c_x, c_0, var)``: the posterior ``q(x_s | x_t, x0) = N(c_x x_t + c_0 x0, var)``."""
    r = _ratio(path, s, t)
    var_s, var_t = path.sigma_sq(s), path.sigma_sq(t)
    return path.alpha(t) / path.alpha(s) * var_s / var_t, path.alpha(s) * r, var_s * r


def _posterior(path: GaussianPath, x_t: Array, x0: Array, t, s) -> tuple[Array, Array]:
    c_x, c_0, var = _posterior_coefs(path, t, s)
    out, x_t, x0 = widen(x_t, x0)  # in x_t's dtype; integer x_t gives floats
    mean = (
        expand_like(c_x, x_t).astype(x_t.dtype) * x_t + expand_like(c_0, x_t).astype(x_t.dtype) * x0
    )
    return mean.astype(out), var


def reverse_mean_var(
    path: GaussianPath,
    x_t: ArrayLike,
    x0_hat: ArrayLike,
    t: ArrayLike,
    s: ArrayLike,
    *,
    var_weight: ArrayLike = 0.0,
) -> tuple[Array, Array]:
    """Mean and variance of the reverse model ``p(x_s | x_t)`` (``s < t``) given ``x0_hat``.

    The mean is the posterior's at ``x0 = x0_hat``. The variance is
    ``beta~^(1 - w) beta^w`` with ``w = var_weight``: ``0`` the posterior's ``beta~_t`` (Ho's
    "fixed small"), ``1`` the forward ``beta_t = sigma_t^2 r`` ("fixed large"), between them
    Nichol & Dhariwal (2021)'s log-linear interpolation with a fixed weight.
    """
    t, s = _reverse_times(t, s)
    var_weight = _check_var_weight(var_weight)
    return _reverse_mean_var(path, jnp.asarray(x_t), jnp.asarray(x0_hat), t, s, var_weight)


def _check_var_weight(var_weight: ArrayLike) -> ArrayLike:
    """Raise unless ``var_weight`` lies in ``[0, 1]`` (1.5 gave an infinite variance at ``s = 0``);
    return it. Traced, it comes back tied to a run-time check (use the result): a fixed weight
    passed through ``jit`` gave wrong variances silently."""
    var_weight = value_check(
        var_weight, lambda xp, v: ~xp.all(xp.isfinite(v)), "var_weight must be finite"
    )
    return value_check(
        var_weight,
        lambda xp, v: ~xp.all((v >= 0) & (v <= 1)),
        "var_weight must lie in [0, 1] (between the posterior's and the forward variance, in logs)",
    )


def _reverse_var(path, t, s, var_post, var_weight):
    var_fwd = path.sigma_sq(t) * _ratio(path, s, t)
    w = jnp.asarray(var_weight, var_post.dtype)
    # at s = 0 the posterior variance is 0, where 0^(1 - w) has an infinite slope: times the
    # zero derivative of var_post it made the path's gradients NaN (var_weight > 0); 0^0 = 1
    pos = var_post > 0
    mixed = jnp.power(jnp.where(pos, var_post, 1.0), 1.0 - w) * jnp.power(var_fwd, w)
    return jnp.where(pos, mixed, jnp.where(w == 1, var_fwd, jnp.zeros_like(var_fwd)))


def _reverse_mean_var(path, x_t, x0_hat, t, s, var_weight):
    mean, var_post = _posterior(path, x_t, x0_hat, t, s)
    return mean, _reverse_var(path, t, s, var_post, var_weight)
