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
from jax.typing import ArrayLike

from jaxdiff._checks import (
    as_time,
    check_finite,
    check_positive,
    check_time,
    concrete,
    data_dtype,
    expand_like,
    normal,
    wide_dtype,
)
from jaxdiff.conversions import Target, _check_target, from_x0_eps
from jaxdiff.field import Field
from jaxdiff.measurements import LinearOperator
from jaxdiff.paths import GaussianPath

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

    def __check_init__(self):
        w, m, c = (jnp.shape(v) for v in (self.weights, self.means, self.covs))
        if len(w) != 1 or len(m) != 2 or len(c) != 3 or not (w[0] == m[0] == c[0]):
            raise ValueError(
                f"expected weights (K,), means (K, d), covs (K, d, d); got shapes {w}, {m}, {c}"
            )
        if c[1:] != (m[1], m[1]):
            raise ValueError(f"covs must be (K, d, d) with d = {m[1]}; got {c}")
        weights, covs, means = concrete(self.weights), concrete(self.covs), concrete(self.means)
        if weights is not None and not (np.all(weights > 0) and abs(weights.sum() - 1) <= 1e-5):
            raise ValueError(f"weights must be > 0 and sum to 1; got {weights.tolist()}")  # NaN too
        if means is not None and not np.all(np.isfinite(means)):
            raise ValueError(f"means must be finite; got {means.tolist()}")
        if covs is not None:
            if not np.allclose(covs, np.swapaxes(covs, -1, -2), atol=1e-6):
                raise ValueError("covs must be symmetric")
            if np.any(np.linalg.eigvalsh(covs) <= 0):
                raise ValueError("covs must be positive definite")

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
        return x

    # --- marginals under a path ----------------------------------------------------------
    def marginal(self, path: GaussianPath, t: ArrayLike) -> GaussianMixture:
        """The mixture of ``x_t`` at a scalar ``t``: means ``alpha_t mu_k``, covs ``C_k``."""
        t = as_time(t, self.means.dtype)
        if t.ndim:
            raise ValueError(f"marginal takes a scalar t; got shape {t.shape}")
        a, var = path.alpha(t), path.sigma_sq(t)
        eye = jnp.eye(self.dim, dtype=self.means.dtype)[None]
        return GaussianMixture(self.weights, a * self.means, a**2 * self.covs + var * eye)

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

        The covariances do not depend on ``y``: one ``eigh`` of the K matrices ``G_k`` serves every
        measurement, so ``jax.vmap(lambda y: mix.posterior(A, y, s))(ys)`` batches only matrix
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
    mat, y = mat.astype(dtype), y.astype(dtype)
    m = mat.shape[0]
    sa = jnp.einsum("kij,mj->kim", cov, mat)  # S_k A^T: (K, d, m)
    noise = sigma_y.astype(dtype) ** 2 * jnp.eye(m, dtype=dtype)
    gram = jnp.einsum("li,kim->klm", mat, sa) + noise[None]
    lam, vecs = jnp.linalg.eigh(gram)  # (K, m), (K, m, m): independent of y
    resid = y[None] - mu @ mat.T  # (K, m)
    z = jnp.einsum("kji,kj->ki", vecs, resid)  # U_k^T (y - A mu_k)
    inv = jnp.einsum("kaj,kj,kbj->kab", vecs, 1.0 / lam, vecs)  # G_k^{-1}
    gain = sa @ inv  # S_k A^T G_k^{-1}: (K, d, m)
    means = mu + jnp.einsum("kim,km->ki", gain, resid)
    keep = (
        jnp.eye(mix.dim, dtype=dtype)[None] - gain @ mat
    )  # Joseph form: (I - K A) S (I - K A)^T + ...
    covs = keep @ cov @ jnp.swapaxes(keep, -1, -2)
    covs = covs + sigma_y.astype(dtype) ** 2 * gain @ jnp.swapaxes(gain, -1, -2)
    covs = 0.5 * (covs + jnp.swapaxes(covs, -1, -2))
    log_ev = -0.5 * (jnp.sum(z**2 / lam, -1) + jnp.sum(jnp.log(lam), -1) + m * jnp.log(2 * jnp.pi))
    weights = jnp.maximum(jax.nn.softmax(jnp.log(w) + log_ev), jnp.finfo(dtype).tiny)
    return GaussianMixture(weights / jnp.sum(weights), means, covs)  # no weight underflows to 0


@eqx.filter_jit  # one compiled program per shape: eager calls (notebooks) stay fast
def _posterior_terms(mix: GaussianMixture, path: GaussianPath, x: Array, t: Array):
    """Log-density, score and denoiser of the mixture of ``x_t`` at ``(x, t)``.

    With ``C_k = U_k diag(lam_k) U_k^T`` (one ``eigh`` of the K data covariances), the covariance
    of component k at time t, ``alpha_t^2 C_k + sigma_t^2 I``, has eigenvalues
    ``s = alpha_t^2 lam_k + sigma_t^2`` in the same basis: inverses and log-determinants are
    elementwise, and no LAPACK call is batched over the samples (two batched ``inv`` in one
    program hang on CPU with jaxlib 0.10).
    """
    lam, vecs = jnp.linalg.eigh(mix.covs)  # (K, d), (K, d, d)
    batch = x[..., 0]
    lead = (None,) * batch.ndim  # explicit broadcasting over the batch axes
    lam, means = lam[lead], mix.means[lead]  # (*1, K, d)
    a = expand_like(path.alpha(t), batch)[..., None, None]  # (*batch, 1, 1)
    var = expand_like(path.sigma_sq(t), batch)[..., None, None]
    diff = x[..., None, :] - a * means  # (*batch, K, d)
    s = a**2 * lam + var  # (*batch, K, d)
    log_comp, z = _components(mix.weights, vecs, diff, s)
    log_p = jax.nn.logsumexp(log_comp, axis=-1)
    resp = jnp.exp(log_comp - log_p[..., None])[..., None]  # (*batch, K, 1)
    pulled = jnp.einsum("kij,...kj->...ki", vecs, z / s)  # C_k(t)^{-1} (x - alpha mu_k)
    score = -jnp.sum(resp * pulled, axis=-2)
    x0_k = means + a * jnp.einsum("kij,...kj->...ki", vecs, lam * z / s)  # + alpha C_k pulled
    return log_p, score, jnp.sum(resp * x0_k, axis=-2)


def _components(weights, vecs, diff, s):
    """``log w_k + log N(diff_k; 0, U_k diag(s_k) U_k^T)`` and ``z = U_k^T diff_k``."""
    z = jnp.einsum("kji,...kj->...ki", vecs, diff)
    maha = jnp.sum(z**2 / s, axis=-1)
    logdet = jnp.sum(jnp.log(s), axis=-1)
    log_w = jnp.log(weights)[(None,) * (maha.ndim - 1)]
    return log_w - 0.5 * (maha + logdet + diff.shape[-1] * jnp.log(2 * jnp.pi)), z


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
