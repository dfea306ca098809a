r"""The negative ELBO of a discrete-time diffusion model, in nats and bits per dimension.

For the chain of :mod:`jaxdiff.ddpm` with steps ``t_i = i / T`` (Ho et al. 2020, eq. 5; Sohl-
Dickstein et al. 2015; Kingma et al. 2021):

    ``-log p(x0) <= KL(q(x_T | x0) || p(x_T))``                        (prior matching)
    ``+ sum_{i=2}^T E_q KL(q(x_{i-1} | x_i, x0) || p(x_{i-1} | x_i))``   (denoising matching)
    ``- E_q log p(x0 | x_1)``                                          (reconstruction)

Every term is a KL between Gaussians, computed in closed form given ``x_i``. With the reverse
variance equal to the posterior's, the denoising term is a weighted squared error of the network's
prediction (:func:`denoising_weight`): ``(SNR_s - SNR_t) / 2 |x0_hat - x0|^2`` for Design I and
``(SNR_s / SNR_t - 1) / 2 |eps_hat - eps|^2`` for Design II. The decoder ``p(x0 | x_1)`` is
``N(x0_hat, sigma^2 I)``, ``sigma = sigma_{t_1} / alpha_{t_1}`` (~ ``sqrt(beta_1)``), as a density
for continuous data or discretized into ``num_bins`` bins on ``[-1, 1]`` for 8-bit data (Ho et
al. 2020, eq. 13), whose negative log-likelihood is a probability: bits/dim need no offset.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr
from jax.typing import ArrayLike

from jaxdiff import _engine
from jaxdiff._checks import (
    check_count,
    check_finite,
    check_positive,
    check_time,
    concrete,
    data_dtype,
    expand_like,
    renamed,
    value_check,
    wide_dtype,
)
from jaxdiff._programs import run_jit
from jaxdiff.conversions import Target, _check_target, to_x0_eps
from jaxdiff.ddpm import _check_var_weight, _posterior, _reverse_mean_var, _reverse_times
from jaxdiff.field import Field, as_field, predict
from jaxdiff.paths import GaussianPath

Array = jax.Array

__all__ = ["NELBO", "nelbo", "denoising_weight", "discretized_gaussian_log_prob", "bits_per_dim"]


class NELBO(NamedTuple):
    """Terms of the negative ELBO per sample, in nats: ``total = prior + diffusion + reconstruction``."""

    prior: Array
    diffusion: Array
    reconstruction: Array

    @property
    def total(self) -> Array:
        return self.prior + self.diffusion + self.reconstruction


def bits_per_dim(nats: ArrayLike, dim: int) -> Array:
    """``nats / (dim log 2)``: a negative log-likelihood of ``dim`` numbers in bits per number."""
    return jnp.asarray(nats) / (check_count(dim, "dim") * math.log(2.0))


def denoising_weight(path: GaussianPath, t: ArrayLike, s: ArrayLike, target: Target) -> Array:
    """The weight ``w`` with ``KL(q(x_s | x_t, x0) || p(x_s | x_t)) = w |pred - true|^2``, ``s < t``.

    ``w = (SNR_s - SNR_t) / 2 * (d x0 / d pred)^2`` for the reverse model with the posterior's
    variance, where ``d x0 / d pred`` is ``1`` for ``x0``, ``-sigma_t / alpha_t`` for ``eps``,
    ``sigma_t^2 / alpha_t`` for ``score``, ``-sigma_t / (alpha_t^2 + sigma_t^2)`` for ``v``.
    For DDPM's step ``t`` and ``x0``: ``abar_{t-1} beta_t^2 / (2 beta~_t (1 - abar_t)^2)``.
    """
    _check_target(target)
    t, s = _reverse_times(check_time(t, "t"), check_time(s, "s"))
    lam_s, lam_t = path.log_snr(s), path.log_snr(t)
    half_gap = 0.5 * jnp.exp(lam_s) * -jnp.expm1(lam_t - lam_s)
    zero, one = jnp.zeros_like(t), jnp.ones_like(t)
    slope = to_x0_eps(path, zero, t, one, target)[0] - to_x0_eps(path, zero, t, zero, target)[0]
    return half_gap * slope**2


def discretized_gaussian_log_prob(
    x: ArrayLike, mean: ArrayLike, std: ArrayLike, num_bins: int = 256
) -> Array:
    """``log P(bin of x)`` under ``N(mean, std^2)``, per element, for ``num_bins`` bins on ``[-1, 1]``.

    Bin centres ``-1 + 2k / (num_bins - 1)``, half-width ``1 / (num_bins - 1)``; the end bins reach
    to ``-inf`` and ``+inf`` (Ho et al. 2020, eq. 13). Stable in the tails (``log_ndtr``); computed
    and returned in float32 at least (bfloat16 pixels give float32 log-probabilities).

    >>> import jax.numpy as jnp
    >>> p = jnp.exp(discretized_gaussian_log_prob(jnp.linspace(-1, 1, 256), 0.1, 0.5))
    >>> round(float(p.sum()), 5)
    1.0
    """
    x = jnp.asarray(x)
    try:  # a mismatch was a raw broadcasting TypeError (one x against a batch of means is fine)
        shape = jnp.broadcast_shapes(x.shape, jnp.shape(mean), jnp.shape(std))
    except ValueError:
        raise ValueError(
            f"x (shape {x.shape}), mean (shape {jnp.shape(mean)}) and std (shape "
            f"{jnp.shape(std)}) must broadcast together"
        ) from None
    if check_count(num_bins, "num_bins") < 2:
        raise ValueError(f"num_bins must be >= 2 (bin centres -1 and 1 at least); got {num_bins}")
    std = check_positive(std, "std")  # a negative std flipped the bins' edges
    # in float32 at least (bfloat16 x raised log_ndtr's bare "x.dtype=bfloat16 is not supported")
    wide = wide_dtype(jnp.result_type(x, mean, std))
    x, mean = jnp.broadcast_to(x, shape), jnp.broadcast_to(mean, shape)  # deliberate, any ranks
    x, mean, std = x.astype(wide), mean.astype(wide), jnp.broadcast_to(std, shape).astype(wide)
    half = 1.0 / (num_bins - 1)
    lo = jnp.where(x < -1.0 + half, -jnp.inf, (x - half - mean) / std)
    hi = jnp.where(x > 1.0 - half, jnp.inf, (x + half - mean) / std)
    flip = lo > 0  # both edges in the upper tail: use the mirror image
    lo, hi = jnp.where(flip, -hi, lo), jnp.where(flip, -lo, hi)
    log_hi, log_lo = log_ndtr(hi), log_ndtr(lo)
    return log_hi + jnp.log(-jnp.expm1(jnp.minimum(log_lo - log_hi, -1e-30)))


def _gaussian_kl(mean_q, var_q, mean_p, var_p, axes):
    """``KL(N(mean_q, var_q I) || N(mean_p, var_p I))`` summed over ``axes``; variances ``(batch,)``."""
    sq = jnp.sum(jnp.square(mean_q - mean_p), axis=axes)
    d = math.prod(mean_q.shape[a] for a in axes)
    return 0.5 * ((sq + d * var_q) / var_p - d + d * (jnp.log(var_p) - jnp.log(var_q)))


def nelbo(
    key: Array,
    path: GaussianPath,
    field: Field,
    x0: ArrayLike,
    *,
    steps: int | None = None,
    num_terms: int | None = None,
    var_weight: ArrayLike = 0.0,
    num_bins: int | None = None,
    decoder_std: ArrayLike | None = None,
    ts: ArrayLike | None = None,
    num_steps: int | None = None,
) -> NELBO:
    """The negative ELBO of each sample of ``x0`` (shape ``(batch, *event)``), in nats.

    ``field`` is a :class:`~jaxdiff.Field`; step ``i`` of ``steps = T`` (default 1000) is
    ``t = i / T``, or ``ts[i - 1]`` for an increasing grid ``ts`` of ``T`` times in ``(0, 1]``
    ending at 1. The
    denoising sum runs over all ``T - 1`` terms (one network call per term on the whole batch) or,
    with ``num_terms = K``, is estimated without bias by ``K`` steps drawn uniformly per sample
    (Ho et al.'s ``L_simple`` sampling, times ``T - 1``). ``var_weight`` chooses the reverse
    variance as in :func:`~jaxdiff.ddpm.reverse_mean_var`; ``num_bins`` (e.g. 256) discretizes the
    decoder for data on ``[-1, 1]``. The decoder's std is ``sigma / alpha`` at ``t = ts[0]`` (``1 /
    T``), or
    ``decoder_std``: a scalar or, like ``t``, a shape that broadcasts to a prefix of ``x0``'s
    (per sample ``(batch,)``, per pixel ``x0.shape``). Divide ``total`` by ``dim log 2``
    (:func:`bits_per_dim`).

    On the uniform grid the bound does not close as ``T`` grows where the SNR diverges at ``t = 0``
    (linear, cosine, VP paths): consecutive steps near the data differ in SNR by a factor
    ``(i / (i - 1))^2`` (``i / (i - 1)`` on VP) whatever ``T`` is, and even the exact model keeps
    ~1.40 (linear, at every ``T``) or ~0.29 (VP, as ``T`` grows; 0.44 at ``T = 1000``, 0.31 at
    ``10^4``) nats per dimension above ``-log p``. A grid uniform in log-SNR
    from a small ``t_min`` (Kingma et al. 2021's fixed SNR range) closes it:
    ``ts=jnp.flip(jd.log_snr_grid(path, T - 1, 1.0, t_min))``.

    >>> import jax, jax.numpy as jnp, jaxdiff as jd
    >>> data = jd.GaussianMixture(jnp.ones(1), jnp.zeros((1, 2)), 0.25 * jnp.eye(2)[None])
    >>> path = jd.vp_path()
    >>> x = data.sample(jax.random.key(0), 2000)
    >>> terms = nelbo(jax.random.key(1), path, data.field(path, "eps"), x, steps=200)
    >>> float(terms.total.mean()) > float(-data.log_prob(x).mean())  # a bound
    True
    """
    steps = renamed(steps, num_steps, "steps", "num_steps", "nelbo")
    field = as_field(field)
    x0 = check_finite(jnp.asarray(x0), "x0")
    x0 = x0.astype(wide_dtype(data_dtype(x0)))  # nats in float32 or wider, whatever x0's dtype
    if x0.ndim < 2:
        raise ValueError(f"x0 must be (batch, *event); got shape {x0.shape}")
    axes = tuple(range(1, x0.ndim))
    batch, dtype = x0.shape[0], x0.dtype
    if ts is None:
        T = 1000 if steps is None else check_count(steps, "steps")
        # i / T, clipped: XLA may compute it as i * (1 / T), a rounding error past t = 1
        grid = jnp.minimum(jnp.arange(1, T + 1).astype(dtype) / T, 1.0)
    else:
        if steps is not None:
            raise ValueError("give either steps or ts, not both")
        grid = _engine.check_grid(
            jnp.asarray(ts), "ts (ending at t = 1)", increasing=True, unit=True
        )
        grid = _engine.grid_check(
            grid, lambda g: (g[0] >= g[-1]) | (g[0] <= 0) | (g[-1] != 1),
            "ts must increase from a time above 0 to t = 1 (the ELBO's steps, the first the "
            "decoder's)",
        ).astype(dtype)  # fmt: skip
        T = grid.shape[0]
    if T < 2:
        raise ValueError(f"steps must be >= 2 (ts at least 2 times); got {T}")
    if num_terms is not None:
        num_terms = check_count(num_terms, "num_terms")
    var_weight = _check_var_weight(var_weight)
    if decoder_std is not None:
        decoder_std = check_positive(jnp.asarray(decoder_std, dtype), "decoder_std")
    one = jnp.ones((), dtype)
    zero_terminal_snr = None  # a traced path (its parameters learned): checked at run time
    if field.target in ("eps", "score"):  # the term at t = 1 was a silent NaN where alpha_1 = 0
        zero_terminal_snr = (
            f"alpha_1 = 0 (a zero terminal SNR), where an {field.target!r} prediction says "
            "nothing about x0: the ELBO's last term is undefined; train the 'x0', 'v' or "
            "'velocity' target"
        )
        with jax.ensure_compile_time_eval():  # the path's own numbers: known at trace time
            alpha_1 = concrete(path.alpha(jnp.ones((), jnp.float32)))
        if alpha_1 is not None:
            if np.any(alpha_1 == 0):  # under jit too: not an opaque run-time callback error
                raise ValueError(zero_terminal_snr)
            zero_terminal_snr = None
    field_arrays, field_static = eqx.partition(field, eqx.is_array)

    def compute(field_arrays, x0, key, grid, decoder_std):
        # the bound after the checks, in one program: called eagerly, each term's ops had
        # dispatched one by one and the scan compiled anew on every call (2.8 s a repeat)
        field = eqx.combine(field_arrays, field_static)
        k_rec, k_terms = jax.random.split(key)
        # prior matching: KL(N(alpha_1 x0, sigma_1^2) || N(0, sigma_1^2)) per prior_logp's prior
        var_1 = path.sigma_sq(one)
        prior = _gaussian_kl(path.alpha(one) * x0, var_1, jnp.zeros_like(x0), var_1, axes)
        if zero_terminal_snr is not None:
            prior = value_check(
                prior, lambda xp, _: path.alpha(one) == 0, zero_terminal_snr,
                lambda _: "alpha_1 = 0",
            )  # fmt: skip

        def term(k, s, t):  # E over x_t of KL(q(x_s | x_t, x0) || p(x_s | x_t)); t (batch,)
            x_t, _ = path.sample(k, x0, t)
            x0_hat, _ = predict(path, field, x_t, t)
            mean_q, var_q = _posterior(path, x_t, x0, t, s)
            mean_p, var_p = _reverse_mean_var(path, x_t, x0_hat, t, s, var_weight)
            return _gaussian_kl(mean_q, var_q, mean_p, var_p, axes)

        if num_terms is None:  # the pairs (s, t) = (grid[j - 1], grid[j]), j = 1 .. T - 1
            keys = jax.random.split(k_terms, T - 1)
            body = lambda acc, inp: (acc + term(*inp), None)  # noqa: E731
            pairs = (keys, grid[:-1], grid[1:])
            diffusion = jax.lax.scan(body, jnp.zeros((batch,), dtype), pairs)[0]
        else:
            k_idx, k_noise = jax.random.split(k_terms)
            idx = jax.random.randint(k_idx, (num_terms, batch), 1, T)
            keys = jax.random.split(k_noise, num_terms)
            pick = lambda inp: term(inp[0], grid[inp[1] - 1], grid[inp[1]])  # noqa: E731
            diffusion = (T - 1) * jnp.mean(jax.lax.map(pick, (keys, idx)), axis=0)

        # reconstruction: -log p(x0 | x_1) with the decoder N(x0_hat(x_1), std^2)
        t1 = jnp.full((batch,), grid[0], dtype)
        x_1, _ = path.sample(k_rec, x0, t1)
        mean, _ = predict(path, field, x_1, t1)
        if decoder_std is None:
            std = expand_like(path.sigma(t1) / path.alpha(t1), x0)
        else:  # (batch,) once met the last event axis
            std = expand_like(decoder_std, x0, "decoder_std")
        if num_bins is None:
            logp = -0.5 * (jnp.square((x0 - mean) / std) + jnp.log(2 * jnp.pi * std**2))
        else:
            logp = discretized_gaussian_log_prob(x0, mean, std, int(num_bins))
        reconstruction = -jnp.sum(jnp.broadcast_to(logp, x0.shape), axis=axes)
        return NELBO(prior, diffusion, reconstruction)

    # an eager repeat reuses the program
    return run_jit(compute, field_arrays, x0, key, grid, decoder_std)
