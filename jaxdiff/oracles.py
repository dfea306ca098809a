r"""Gaussian-mixture data with closed-form marginal fields under every Gaussian path.

If ``x0 ~ sum_k w_k N(mu_k, S_k)`` then on the path ``x_t = alpha_t x0 + sigma_t eps``

    ``p_t(x) = sum_k w_k N(x; alpha_t mu_k, C_k)``,  ``C_k = alpha_t^2 S_k + sigma_t^2 I``,

with responsibilities ``r_k(x) ∝ w_k N(x; alpha_t mu_k, C_k)``, the score
``sum_k r_k C_k^{-1} (alpha_t mu_k - x)`` and the denoiser (posterior mean)
``E[x0 | x_t = x] = sum_k r_k (mu_k + alpha_t S_k C_k^{-1} (x - alpha_t mu_k))``. The oracle
computes score and denoiser without dividing by ``alpha`` or ``sigma``, then any target through
the ``(x0, eps)`` hub with ``eps = -sigma score``: it is the perfect network for tests,
notebooks and benchmarks.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.typing import ArrayLike

from jaxdiff._checks import (
    _floating,
    as_time,
    check_count,
    check_finite,
    check_positive,
    check_time,
    coef_time,
    concrete,
    data_dtype,
    error_if,
    expand_like,
    normal,
    value_check,
    wide_dtype,
)
from jaxdiff.conversions import Target, _check_target, from_x0_eps
from jaxdiff.field import Field
from jaxdiff.measurements import LinearOperator
from jaxdiff.paths import GaussianPath, _derivative

Array = jax.Array

__all__ = ["GaussianMixture"]


class GaussianMixture(eqx.Module):
    """``sum_k weights[k] N(means[k], covs[k])`` in ``d`` dimensions; a single Gaussian is ``K = 1``.

    ``weights (K,)``, ``means (K, d)``, ``covs (K, d, d)``. Marginal quantities accept ``x`` of
    shape ``(*batch, d)`` and ``t`` a scalar or a prefix of ``batch``.

    >>> import jax.numpy as jnp
    >>> g = GaussianMixture(jnp.ones(1), jnp.zeros((1, 2)), jnp.eye(2)[None])
    >>> round(float(g.log_prob(jnp.zeros(2))), 4)  # -log(2 pi)
    -1.8379
    """

    weights: Array
    means: Array
    covs: Array

    def __init__(self, weights: ArrayLike, means: ArrayLike, covs: ArrayLike):
        # integer means drew the noise as integers too (N(0, 4 I) sampled with std 1.37, 9
        # distinct values in 100,000; the stop-53 review): floats, as isotropic makes them
        weights, means, covs = (_floating(a) for a in (weights, means, covs))
        w, m, c = weights.shape, means.shape, covs.shape
        if len(w) != 1 or len(m) != 2 or len(c) != 3 or not (w[0] == m[0] == c[0]):
            raise ValueError(
                f"expected weights (K,), means (K, d), covs (K, d, d); got shapes {w}, {m}, {c}"
            )
        if c[1:] != (m[1], m[1]):
            raise ValueError(f"covs must be (K, d, d) with d = {m[1]}; got {c}")
        # Known values are checked now; traced ones (a mixture built under jit) when the program
        # runs, each check tied to its array. Mixtures built from checked ones (``marginal``,
        # ``posterior``) skip them (``eqx.tree_at``).
        self.weights = value_check(
            weights, _bad_weights, "weights must be > 0 and sum to 1", lambda v: str(v.tolist())
        )
        self.means = value_check(
            means, lambda xp, v: ~xp.all(xp.isfinite(v)), "means must be finite", _bad_rows
        )
        known = concrete(covs)
        if known is None:
            self.covs = error_if(
                covs, _bad_covs(covs), "covs must be symmetric and positive definite"
            )
            return
        if not np.allclose(known, np.swapaxes(known, -1, -2), atol=1e-6):
            raise ValueError("covs must be symmetric")
        if np.any(np.linalg.eigvalsh(known) <= 0):  # NaN too
            raise ValueError("covs must be positive definite")
        self.covs = covs

    @classmethod
    def isotropic(
        cls, means: ArrayLike, std: ArrayLike = 1.0, weights: ArrayLike | None = None
    ) -> GaussianMixture:
        """Components ``N(means[k], std_k^2 I)`` (``std`` scalar or ``(K,)``), equal weights by default."""
        means = jnp.asarray(means, dtype=jnp.result_type(float))
        k, d = means.shape
        std = jnp.broadcast_to(jnp.asarray(check_positive(std, "std"), means.dtype), (k,))
        weights = jnp.full((k,), 1.0 / k, means.dtype) if weights is None else jnp.asarray(weights)
        return cls(weights, means, std[:, None, None] ** 2 * jnp.eye(d, dtype=means.dtype)[None])

    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    # --- the data distribution -----------------------------------------------------------
    def sample_labeled(self, key: Array, n: int) -> tuple[Array, Array]:
        """``n`` samples and the index of the component each came from."""
        n = check_count(n, "n", minimum=0, what="a number of samples")  # -1, 2.5: JAX's errors
        k_key, z_key = jax.random.split(key)
        labels = jax.random.choice(k_key, self.weights.shape[0], (n,), p=self.weights)
        chol = jnp.linalg.cholesky(self.covs)
        z = normal(z_key, (n, self.dim), self.means.dtype)
        return self.means[labels] + jnp.einsum("nij,nj->ni", chol[labels], z), labels

    def sample(self, key: Array, n: int) -> Array:
        """``n`` samples, shape ``(n, d)``."""
        return self.sample_labeled(key, n)[0]

    def log_prob(self, x: ArrayLike) -> Array:
        """Log-density of the data at ``x`` (``(*batch, d)`` -> ``batch``)."""
        return jax.nn.logsumexp(_log_comp(self.weights, self.means, self.covs, self._x(x)), -1)

    def responsibilities(self, x: ArrayLike) -> Array:
        """``p(k | x)``, the probability that ``x`` came from component ``k``: ``(*batch, d) ->
        (*batch, K)``. Averaged over exact samples it gives the weights back."""
        log_comp = _log_comp(self.weights, self.means, self.covs, self._x(x))
        return jax.nn.softmax(log_comp, axis=-1)

    def log_responsibilities(self, x: ArrayLike) -> Array:
        """``log p(k | x)`` (``(*batch, d) -> (*batch, K)``), by ``log_softmax``: finite where
        :meth:`responsibilities` rounds to 0 (far from a component). An exact classifier for
        ``jd.classifier_guidance`` (called with one time per sample; ``marginal`` takes a scalar)
        is ``jax.vmap(lambda x, t: mix.marginal(path, t).log_responsibilities(x)[y])``."""
        log_comp = _log_comp(self.weights, self.means, self.covs, self._x(x))
        return jax.nn.log_softmax(log_comp, axis=-1)

    def _x(self, x: ArrayLike) -> Array:
        x = jnp.asarray(x)
        if x.shape[-1:] != (self.dim,):
            raise ValueError(f"x must have shape (..., {self.dim}); got {x.shape}")
        return check_finite(x, "x")  # a NaN gave a NaN density silently, as the fields refuse it

    # --- marginals under a path ----------------------------------------------------------
    def marginal(self, path: GaussianPath, t: ArrayLike) -> GaussianMixture:
        """The mixture of ``x_t`` at a scalar ``t``: means ``alpha_t mu_k``, covs ``C_k``."""
        # checked, now or when it runs: under jit, t = -0.5 gave alpha 1.5 and sigma -0.5
        t = as_time(t, self.means.dtype)
        if t.ndim:
            raise ValueError(f"marginal takes a scalar t; got shape {t.shape}")
        t = check_time(t)
        a, var = path.alpha(t), path.sigma_sq(t)
        eye = jnp.eye(self.dim, dtype=self.means.dtype)[None]
        covs = a**2 * self.covs + var * eye
        return eqx.tree_at(lambda g: (g.means, g.covs), self, (a * self.means, covs))

    def marginal_log_prob(self, path: GaussianPath, x: ArrayLike, t: ArrayLike) -> Array:
        """``log p_t(x)``."""
        return self._posterior(path, x, t)[0]

    def score(self, path: GaussianPath, x: ArrayLike, t: ArrayLike) -> Array:
        """``grad_x log p_t(x)``."""
        return self._posterior(path, x, t)[1]

    def denoiser(self, path: GaussianPath, x: ArrayLike, t: ArrayLike) -> Array:
        """``E[x0 | x_t = x]``."""
        return self._posterior(path, x, t)[2]

    def predict(self, path: GaussianPath, x: ArrayLike, t: ArrayLike, target: Target) -> Array:
        """The exact value of ``target`` (``score``, ``eps``, ``x0``, ``v``, ``velocity``) at ``(x, t)``."""
        _check_target(target)
        _, score, x0 = self._posterior(path, x, t)
        if target in ("score", "x0"):  # in x's dtype, as the other targets (from_x0_eps)
            return (score if target == "score" else x0).astype(data_dtype(jnp.asarray(x)))
        t = as_time(t, x0.dtype)
        if target == "velocity":
            # alpha' x0 + sigma' eps with sigma' eps = -(sigma^2)'/2 score: finite at t = 0, where
            # VP's and the cosine path's sigma' is infinite (the hub's sigma' * eps is inf * 0)
            da = expand_like(path.d_alpha(t), x0).astype(x0.dtype)
            d_var = expand_like(_derivative(path.sigma_sq, coef_time(t))[1], x0).astype(x0.dtype)
            return (da * x0 - 0.5 * d_var * score).astype(data_dtype(jnp.asarray(x)))
        eps = -expand_like(path.sigma(t), x0) * score
        return from_x0_eps(path, x, t, x0, eps, target)

    def posterior(
        self, A: ArrayLike | LinearOperator, y: ArrayLike, sigma_y: ArrayLike
    ) -> GaussianMixture:
        """The exact posterior of ``x0`` given ``y = A x0 + sigma_y n``, ``n ~ N(0, I)``: a mixture.

        Bayes in each component: with ``G_k = A S_k A^T + sigma_y^2 I``, the component's mean is
        ``mu_k + S_k A^T G_k^{-1} (y - A mu_k)``, its covariance ``S_k - S_k A^T G_k^{-1} A S_k``
        (in Joseph's form, positive definite in floating point), and its weight is proportional to
        ``w_k N(y; A mu_k, G_k)``, the component's evidence. ``A`` is an ``(m, d)`` matrix or a
        :class:`~jaxdiff.LinearOperator` on ``d`` entries; ``y`` has shape ``(m,)``; ``sigma_y > 0``.

        The covariances do not depend on ``y``: one Cholesky factorisation of the K matrices
        ``G_k`` serves every measurement (and, unlike ``eigh``, has a derivative where ``G_k`` has
        repeated eigenvalues), so ``jax.vmap(lambda y: mix.posterior(A, y, s))(ys)`` batches only matrix
        products (no LAPACK call batched over measurements). Its exact fields on every path
        (:meth:`field`) make the oracle posterior sampler.

        >>> import jax.numpy as jnp
        >>> prior = GaussianMixture(jnp.ones(1), jnp.zeros((1, 2)), jnp.eye(2)[None])
        >>> post = prior.posterior(jnp.array([[1.0, 0.0]]), jnp.array([2.0]), 1.0)
        >>> post.means.tolist(), post.covs[0].tolist()
        ([[1.0, 0.0]], [[0.5, 0.0], [0.0, 1.0]])
        """
        mat = A.matrix() if isinstance(A, LinearOperator) else check_finite(jnp.asarray(A), "A")
        if mat.ndim != 2 or mat.shape[1] != self.dim:
            raise ValueError(
                f"A must be (m, {self.dim}) (or an operator on {self.dim} entries); got {mat.shape}"
            )
        y = check_finite(jnp.asarray(y), "y")
        if y.shape != mat.shape[:1]:
            raise ValueError(
                f"y must have shape ({mat.shape[0]},); got {y.shape} (vmap over a batch of measurements)"
            )
        if jnp.ndim(sigma_y) != 0:
            raise ValueError(f"sigma_y must be a scalar; got shape {jnp.shape(sigma_y)}")
        sigma_y = check_positive(sigma_y, "sigma_y")
        return _bayes(self, mat, y, jnp.asarray(sigma_y))

    def field(self, path: GaussianPath, target: Target) -> Field:
        """The exact field of ``target`` on ``path`` as a :class:`~jaxdiff.Field` (its params are
        the mixture and the path), ready for every sampler, likelihood and loss."""
        _check_target(target)
        return Field(_Oracle(target), target, (self, path))

    def _posterior(self, path: GaussianPath, x, t):
        x = check_finite(jnp.asarray(x), "x")
        if x.shape[-1:] != (self.dim,):
            raise ValueError(f"x must have shape (..., {self.dim}); got {x.shape}")
        x = x.astype(wide_dtype(data_dtype(x)))  # the oracle computes in float32 or wider
        t = check_time(as_time(t, x.dtype))  # outside [0, 1] or NaN: silently wrong fields
        expand_like(t, x[..., 0])  # checks t's shape now, with a clear message
        return _posterior_terms(self, path, x, t)


def _bad_rows(means: np.ndarray) -> str:
    rows = np.flatnonzero(~np.isfinite(means).all(axis=-1))
    return f"non-finite entries in the rows (components) {rows.tolist()}"


def _bad_weights(xp, w):
    return ~(xp.all(w > 0) & (xp.abs(xp.sum(w) - 1) <= 1e-5))  # NaN too


def _bad_covs(covs):
    """Traced covariances: not symmetric, or no Cholesky factor (not positive definite)."""
    symmetric = jnp.allclose(covs, jnp.swapaxes(covs, -1, -2), atol=1e-6)
    return ~symmetric | ~jnp.all(jnp.isfinite(jnp.linalg.cholesky(covs)))


class _Oracle(eqx.Module):
    """``(params, x, t) -> mixture.predict(path, x, t, target)`` with ``params = (mixture, path)``."""

    target: str = eqx.field(static=True)

    def __call__(self, params, x, t):
        mixture, path = params
        return mixture.predict(path, x, t, self.target)


@eqx.filter_jit  # one compiled program per shape
def _bayes(mix: GaussianMixture, mat: Array, y: Array, sigma_y: Array) -> GaussianMixture:
    """Bayes' rule in each component (see :meth:`GaussianMixture.posterior`)."""
    dtype = wide_dtype(jnp.result_type(mix.means.dtype, mat.dtype, y.dtype))
    mu, cov, w = (v.astype(dtype) for v in (mix.means, mix.covs, mix.weights))
    cov = _sym(cov)  # reads sym(C), as the fields: symmetric grads
    mat, y = mat.astype(dtype), y.astype(dtype)
    m = mat.shape[0]
    sa = jnp.einsum("kij,mj->kim", cov, mat)  # S_k A^T: (K, d, m)
    noise = sigma_y.astype(dtype) ** 2 * jnp.eye(m, dtype=dtype)
    gram = jnp.einsum("li,kim->klm", mat, sa) + noise[None]
    chol = jnp.linalg.cholesky(gram)  # (K, m, m): independent of y
    eye = jnp.broadcast_to(jnp.eye(m, dtype=dtype), gram.shape)
    inv_chol = jax.scipy.linalg.solve_triangular(chol, eye, lower=True)  # L_k^{-1}
    resid = y[None] - mu @ mat.T  # (K, m)
    z = jnp.einsum("kij,kj->ki", inv_chol, resid)  # L_k^{-1} (y - A mu_k)
    inv = jnp.swapaxes(inv_chol, -1, -2) @ inv_chol  # G_k^{-1}
    gain = sa @ inv  # S_k A^T G_k^{-1}: (K, d, m)
    means = mu + jnp.einsum("kim,km->ki", gain, resid)
    keep = (
        jnp.eye(mix.dim, dtype=dtype)[None] - gain @ mat
    )  # Joseph form: (I - K A) S (I - K A)^T + ...
    covs = keep @ cov @ jnp.swapaxes(keep, -1, -2)
    covs = covs + sigma_y.astype(dtype) ** 2 * gain @ jnp.swapaxes(gain, -1, -2)
    covs = _sym(covs)
    logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), -1)
    log_ev = -0.5 * (jnp.sum(z**2, -1) + logdet + m * jnp.log(2 * jnp.pi))
    weights = jnp.maximum(jax.nn.softmax(jnp.log(w) + log_ev), jnp.finfo(dtype).tiny)
    weights = weights / jnp.sum(weights)  # no weight underflows to 0
    return eqx.tree_at(lambda g: (g.weights, g.means, g.covs), mix, (weights, means, covs))


@eqx.filter_jit  # one compiled program per shape: eager calls (notebooks) stay fast
def _posterior_terms(mix: GaussianMixture, path: GaussianPath, x: Array, t: Array):
    """Log-density, score and denoiser of the mixture of ``x_t`` at ``(x, t)``.

    Component k of ``x_t`` is ``N(alpha_t mu_k, S_k(t))``, ``S_k(t) = alpha_t^2 C_k + sigma_t^2 I``
    (``C_k`` the data covariance); :func:`_resolvent` gives ``log det S_k(t)``, the Mahalanobis
    term, ``S_k(t)^{-1} (x - alpha_t mu_k)`` and ``C_k`` times it.
    """
    batch = x[..., 0]
    a = expand_like(path.alpha(t), batch)[..., None, None]  # (*batch, 1, 1)
    var = expand_like(path.sigma_sq(t), batch)[..., None, None]
    means = mix.means[(None,) * batch.ndim]  # (*1, K, d)
    diff = x[..., None, :] - a * means  # (*batch, K, d)
    logdet, maha, pulled, cov_pulled = _resolvent(mix.covs, a, var, diff)
    log_w = jnp.log(mix.weights)[(None,) * batch.ndim]
    log_comp = log_w - 0.5 * (maha + logdet + diff.shape[-1] * jnp.log(2 * jnp.pi))
    log_p = jax.nn.logsumexp(log_comp, axis=-1)
    resp = jnp.exp(log_comp - log_p[..., None])[..., None]  # (*batch, K, 1)
    score = -jnp.sum(resp * pulled, axis=-2)
    x0_k = means + a * cov_pulled  # mu_k + alpha_t C_k S_k(t)^{-1} (x - alpha_t mu_k)
    return log_p, score, jnp.sum(resp * x0_k, axis=-2)


@jax.custom_jvp
def _resolvent(covs, a, var, diff):
    """``log det S``, ``diff^T S^{-1} diff``, ``S^{-1} diff`` and ``C S^{-1} diff`` for each
    component, ``S = a^2 C + var I``: covs ``(K, d, d)``, ``a`` and ``var`` ``(*batch, 1, 1)``,
    ``diff (*batch, K, d)``.

    With ``C_k = U_k diag(lam_k) U_k^T`` (one ``eigh`` of the K data covariances), ``S`` has
    eigenvalues ``s = a^2 lam_k + var`` in the same basis: inverses and log-determinants are
    elementwise, and no LAPACK call is batched over the samples (two batched ``inv`` in one
    program hang on CPU with jaxlib 0.10). The derivative is written out (``d S^{-1} =
    -S^{-1} dS S^{-1}``, ``d log det S = tr(S^{-1} dS)``) rather than taken through ``eigh``, whose
    derivative is NaN at repeated eigenvalues (an isotropic component). First derivatives are
    exact there, and so are second derivatives through ``C`` whose inner derivatives are forward
    mode (``jax.jvp``, ``jacfwd``: the gradient in ``C`` of ``jd.likelihood.divergence``, hence
    of ``log_likelihood``, or of ``d/dt`` of the score). An inner ``vjp``, ``grad`` or
    ``linearize`` (``jax.hessian`` in ``C``, ``jacrev``, DPS's denoiser VJP) transposes the
    solves' own bodies, and a derivative in ``C`` of it meets ``eigh``'s again: NaN at repeated
    eigenvalues, inaccurate where rounding splits them. Third derivatives in ``C`` are NaN there
    too.
    """
    lam, vecs, s = _spectrum(covs, a, var)  # s: (*batch, K, d)
    z = jnp.einsum("kji,...kj->...ki", vecs, diff)  # U_k^T diff_k
    pulled = jnp.einsum("kij,...kj->...ki", vecs, z / s)
    cov_pulled = jnp.einsum("kij,...kj->...ki", vecs, lam * z / s)
    return jnp.sum(jnp.log(s), axis=-1), jnp.sum(z**2 / s, axis=-1), pulled, cov_pulled


def _spectrum(covs, a, var):
    """``lam (*1, K, d)``, ``U (K, d, d)`` of the data covariances and ``s = a^2 lam + var``."""
    lam, vecs = jnp.linalg.eigh(covs)
    lam = lam[(None,) * (a.ndim - 2)]  # explicit broadcasting over the batch
    return lam, vecs, a**2 * lam + var


def _resolvent_jvp(primals, tangents):
    """Tangents that are symbolic zeros (``x``'s alone under a divergence, say) cost nothing. The
    values come from :func:`_resolvent` and :func:`_traces` again, so derivatives of derivatives
    (``d/dC`` of a divergence or of ``d/dt`` of the score) take these rules too."""
    covs, a, var, diff = primals
    d_covs, d_a, d_var, d_diff = _live(tangents)
    if d_covs is not None:  # the value reads sym(C) only (eigh symmetrises its input): so does dC
        d_covs = _sym(d_covs)
    logdet, maha, pulled, cov_pulled = _resolvent(covs, a, var, diff)

    def by_d_covs(v):  # dC_k v_k
        return jnp.einsum("kij,...kj->...ki", d_covs, v)

    # dS S^{-1} diff, with dS = a^2 dC + 2 a da C + dvar I
    terms = [] if d_covs is None else [a**2 * by_d_covs(pulled)]
    terms += [] if d_a is None else [2 * a * d_a * cov_pulled]
    terms += [] if d_var is None else [d_var * pulled]
    ds_pulled = sum(terms[1:], terms[0]) if terms else jnp.zeros_like(pulled)
    change = -ds_pulled if d_diff is None else d_diff - ds_pulled
    # d(S^{-1} diff) = S^{-1} change; d(C S^{-1} diff) = C S^{-1} change + dC S^{-1} diff
    _, _, d_pulled, d_cov_pulled = _resolvent(covs, a, var, change)
    d_cov_pulled = d_cov_pulled if d_covs is None else d_cov_pulled + by_d_covs(pulled)
    d_logdet = jnp.zeros_like(logdet)  # tr(S^{-1} dS)
    if d_covs is not None:
        d_logdet += a[..., 0] ** 2 * _trace_with(covs, a, var, d_covs)
    if d_a is not None or d_var is not None:
        tr_inv, tr_cov_inv = _traces(covs, a, var)  # tr(S^{-1}), tr(C S^{-1})
        if d_a is not None:
            d_logdet += (2 * a * d_a)[..., 0] * tr_cov_inv
        if d_var is not None:
            d_logdet += d_var[..., 0] * tr_inv
    d_maha = jnp.sum((change if d_diff is None else change + d_diff) * pulled, axis=-1)
    return (logdet, maha, pulled, cov_pulled), (d_logdet, d_maha, d_pulled, d_cov_pulled)


@jax.custom_jvp
def _traces(covs, a, var):
    """``tr(S^{-1})`` and ``tr(C S^{-1})`` of each component, ``(*batch, K)``, with their
    derivative in ``C`` written out (as :func:`_resolvent`'s) where ``eigh``'s is NaN."""
    lam, s = _spectrum(covs, a, var)[::2]
    return jnp.sum(1 / s, axis=-1), jnp.sum(lam / s, axis=-1)


def _traces_jvp(primals, tangents):
    covs, a, var = primals
    d_covs, d_a, d_var = _live(tangents)
    lam, vecs, s = _spectrum(covs, a, var)
    tr_inv, tr_cov_inv = jnp.sum(1 / s, axis=-1), jnp.sum(lam / s, axis=-1)
    # diag(U_k^T dC_k U_k); the traces below are exact at first order
    m_diag = 0.0 if d_covs is None else _diag_in(vecs, _sym(d_covs), s)
    ds = a**2 * m_diag  # the diagonal of U^T dS U
    ds = ds if d_a is None else ds + 2 * a * d_a * lam
    ds = ds if d_var is None else ds + d_var
    ds = jnp.broadcast_to(ds, s.shape)
    d_tr_inv = -jnp.sum(ds / s**2, axis=-1)  # d S^{-1} = -S^{-1} dS S^{-1}
    d_tr_cov_inv = jnp.sum((m_diag - lam * ds / s) / s, axis=-1)  # dC S^{-1} - C S^{-1} dS S^{-1}
    return (tr_inv, tr_cov_inv), (d_tr_inv, d_tr_cov_inv)


_traces.defjvp(_traces_jvp, symbolic_zeros=True)


@jax.custom_jvp
def _trace_with(covs, a, var, m):
    """``tr(S^{-1} M)`` of each component, ``(*batch, K)``, for a symmetric ``M (K, d, d)``: the
    derivative of ``log det S`` along ``a^2 M``, and itself differentiable in ``C`` (a Hessian in
    the covariances) where ``eigh``'s derivative is NaN."""
    _, vecs, s = _spectrum(covs, a, var)
    return jnp.sum(_diag_in(vecs, m, s) / s, axis=-1)


def _sym(m):
    """``(M + M^T) / 2`` over the last two axes: ``eigh`` reads a matrix's symmetric part only."""
    return 0.5 * (m + jnp.swapaxes(m, -1, -2))


def _live(tangents):
    """A ``custom_jvp`` rule's tangents with symbolic zeros as ``None``."""
    return tuple(None if type(t) is SymbolicZero else t for t in tangents)


def _diag_in(vecs, m, s):
    """``diag(U_k^T M_k U_k)``, broadcast like ``s``."""
    diag = jnp.einsum("kji,kjl,kli->ki", vecs, m, vecs)
    return diag[(None,) * (s.ndim - 2)]


def _trace_with_jvp(primals, tangents):
    covs, a, var, m = primals
    d_covs, d_a, d_var, d_m = _live(tangents)
    lam, vecs, s = _spectrum(covs, a, var)
    m_diag = _diag_in(vecs, m, s)
    value = jnp.sum(m_diag / s, axis=-1)
    tangent = jnp.zeros_like(value)
    if d_m is not None:  # tr(S^{-1} dM)
        tangent += jnp.sum(_diag_in(vecs, _sym(d_m), s) / s, axis=-1)
    # - tr(S^{-1} dS S^{-1} M): the part of dS diagonal in C's basis (2 a da C + dvar I) ...
    ds = 0.0 if d_a is None else 2 * a * d_a * lam
    ds = ds if d_var is None else ds + d_var
    tangent -= jnp.sum(jnp.broadcast_to(ds, s.shape) * m_diag / s**2, axis=-1)
    if d_covs is not None:  # ... and a^2 dC: sum_ij (U^T dC U)_ij (U^T M U)_ji / (s_i s_j)
        dc_t = jnp.einsum("kji,kjl,klm->kim", vecs, _sym(d_covs), vecs)
        m_t = jnp.einsum("kji,kjl,klm->kim", vecs, m, vecs)
        inv = 1 / s
        tangent -= a[..., 0] ** 2 * jnp.einsum("kij,kji,...ki,...kj->...k", dc_t, m_t, inv, inv)
    return value, tangent


_trace_with.defjvp(_trace_with_jvp, symbolic_zeros=True)
_resolvent.defjvp(_resolvent_jvp, symbolic_zeros=True)


@jax.jit
def _log_comp(weights, means, covs, x):
    """``log w_k + log N(x; mu_k, S_k)``: ``(*batch, K)``. By Cholesky factors, not ``eigh``:
    the derivative of ``eigh`` is NaN at repeated eigenvalues (isotropic components), which made
    ``d/dt`` of a marginal's density NaN at every ``t`` (classifier guidance at ``alpha_t = 0``)."""
    x = jnp.asarray(x)
    chol = jnp.linalg.cholesky(covs)  # (K, d, d)
    eye = jnp.broadcast_to(jnp.eye(covs.shape[-1], dtype=covs.dtype), covs.shape)
    inv = jax.scipy.linalg.solve_triangular(chol, eye, lower=True)  # L_k^{-1}, once per component
    lead = (None,) * (x.ndim - 1)
    diff = x[..., None, :] - means[lead]
    z = jnp.einsum("kij,...kj->...ki", inv, diff)
    logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
    maha = jnp.sum(z**2, axis=-1)
    log_w = jnp.log(weights)[lead]
    return log_w - 0.5 * (maha + logdet[lead] + diff.shape[-1] * jnp.log(2 * jnp.pi))
