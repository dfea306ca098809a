r"""Annealed Langevin dynamics (SMLD / NCSN) and predictor-corrector sampling.

**Annealed Langevin** (Song & Ermon 2019, Alg. 1): down a ladder of noise levels ``sigma_i``, run
``n`` steps of ``x <- x + (a_i / 2) score + sqrt(a_i) z`` with ``a_i = step_size sigma_i^2 /
sigma_L^2`` (``sigma_L`` the last, smallest level).

**Predictor-corrector** (Song et al. 2021, Alg. 1-5): at each time ``t`` of the grid, a
*corrector* of ``corrector_steps`` Langevin steps at fixed ``t`` pulls ``x`` towards ``p_t``,
then a *predictor* moves it to the next time ``s``. Predictors are plain functions
``predictor(key, path, x, t, s, x0, eps) -> x_s`` (the network's prediction comes as the hub
pair): :func:`euler_maruyama_predictor`, :func:`reverse_diffusion_predictor`,
:func:`ancestral_predictor`, or ``None`` (corrector only).

The corrector's step follows the **signal-to-noise rule**: ``step = 2 a (snr |z| / |score|)^2``
per sample (norms over each sample's coordinates; ``a = (alpha_s / alpha_t)^2``, DDPM's
``1 - beta_i``, and ``1`` on VE). ``snr`` is the ratio of the norm of the drift ``step * score``
to that of the noise ``sqrt(2 step) z``, divided by ``sqrt(a)``: the size of the pull towards
higher density relative to the injected noise (``0.16`` for CIFAR-10 in Song et al.; score_sde
averages the two norms over the batch, we keep samples independent).

Both end with an optional **denoising step** to ``t = 0``: ``x <- E[x0 | x_t]`` (Tweedie; Song &
Ermon 2020), one network call.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxdiff import _loop
from jaxdiff._checks import as_time, check_positive, expand_like
from jaxdiff.conversions import Target, from_x0_eps
from jaxdiff.ddpm import posterior
from jaxdiff.paths import GaussianPath
from jaxdiff.integrate import Solution

Array = jax.Array
Field = Callable[[Array, Array], Array]
Predictor = Callable[..., Array]

__all__ = [
    "euler_maruyama_predictor",
    "reverse_diffusion_predictor",
    "ancestral_predictor",
    "pc_sample",
    "annealed_langevin",
]


def _normal(key, x):
    return jax.random.normal(key, x.shape, x.dtype)


def euler_maruyama_predictor(
    key: Array, path: GaussianPath, x: Array, t: ArrayLike, s: ArrayLike, x0: Array, eps: Array
) -> Array:
    """Euler-Maruyama step of the reverse SDE ``dx = (f x - g^2 score) dt + g dw``."""
    dt = s - t
    drift = from_x0_eps(path, x, t, x0, eps, "velocity") - expand_like(
        path.diffusion_sq(t), x
    ) * from_x0_eps(path, x, t, x0, eps, "score")
    return x + dt * drift + path.diffusion(t) * jnp.sqrt(-dt) * _normal(key, x)


def reverse_diffusion_predictor(
    key: Array, path: GaussianPath, x: Array, t: ArrayLike, s: ArrayLike, x0: Array, eps: Array
) -> Array:
    """The reverse of the forward step ``x_t = a x_s + G z`` (Song et al. 2021, eq. 46):
    ``x_s = (2 - a) x_t + G^2 score + G z`` with ``a = alpha_t / alpha_s``,
    ``G^2 = sigma_t^2 (1 - SNR_t / SNR_s)`` (SMLD's ancestral step on VE)."""
    a = path.alpha(t) / path.alpha(s)
    g2 = path.sigma_sq(t) * -jnp.expm1(path.log_snr(t) - path.log_snr(s))
    score = from_x0_eps(path, x, t, x0, eps, "score")
    return (2.0 - a) * x + g2 * score + jnp.sqrt(g2) * _normal(key, x)


def ancestral_predictor(
    key: Array, path: GaussianPath, x: Array, t: ArrayLike, s: ArrayLike, x0: Array, eps: Array
) -> Array:
    """DDPM's step: a draw of the posterior ``q(x_s | x_t, x0_hat)``."""
    mean, var = posterior(path, x, x0, s, t)
    return mean + jnp.sqrt(var) * _normal(key, x)


def _sample_norm(v):
    return jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(range(1, v.ndim)), keepdims=True))


def _corrector(key, path, field, x, t, s, target, snr, n_steps):
    """``n_steps`` Langevin steps at time ``t`` with the signal-to-noise step rule."""
    a = jnp.square(path.alpha(t) / path.alpha(s))

    def one(x, k):
        _, eps = _loop.predict(path, field, x, t, target)
        score = -eps / path.sigma(t)
        z = _normal(k, x)
        step = 2.0 * a * jnp.square(snr * _sample_norm(z) / _sample_norm(score))
        return x + step * score + jnp.sqrt(2.0 * step) * z, None

    return jax.lax.scan(one, x, jax.random.split(key, n_steps))[0]


def _denoise(path, field, target):
    return lambda x, t, key: _loop.predict(path, field, x, t, target)[0]


def pc_sample(
    key: Array,
    path: GaussianPath,
    field: Field,
    shape: tuple[int, ...] | None = None,
    *,
    target: Target = "score",
    predictor: Predictor | None = reverse_diffusion_predictor,
    corrector_steps: int = 1,
    snr: ArrayLike = 0.16,
    steps: int = 100,
    ts: ArrayLike | None = None,
    t_end: ArrayLike = 1e-3,
    denoise: bool = True,
    x_init: ArrayLike | None = None,
    save_ts: ArrayLike | None = None,
) -> Solution:
    """Predictor-corrector sampling (Song et al. 2021, Alg. 1): at each grid time, Langevin
    corrector steps, then the predictor to the next time; then the denoising step.

    The grid is ``ts`` or ``steps`` uniform steps from 1 to ``t_end``. ``x`` needs a leading batch
    axis (the step rule takes norms per sample). NFE = ``steps (1 + corrector_steps) + denoise``
    (with ``predictor=None``, ``steps corrector_steps + denoise``).

    >>> import jax, jax.numpy as jnp, jaxdiff as jd
    >>> data = jd.GaussianMixture.isotropic(jnp.array([[2.0, 0.0], [-2.0, 0.0]]), std=0.3)
    >>> path = jd.ve_path(0.01, 10.0)
    >>> sol = pc_sample(jax.random.key(0), path, data.field(path, "score"), (4096, 2), steps=200)
    >>> round(float(jnp.abs(sol.x[:, 0]).mean()), 1), int(sol.nfe)
    (2.0, 401)
    """
    check_positive(snr, "snr")
    if predictor is None and int(corrector_steps) < 1:
        raise ValueError("with predictor=None, corrector_steps must be >= 1")
    grid = ts if ts is not None else jnp.linspace(1.0, as_time(t_end), int(steps) + 1)
    grid = _loop.decreasing_grid(grid)
    prior_key, key = jax.random.split(key)
    x = _loop.initial_state(prior_key, path, field, shape, x_init, grid[0])
    if x.ndim < 2:
        raise ValueError(f"pc_sample needs x of shape (batch, *event); got {x.shape}")
    grid = grid.astype(x.dtype)
    n_corr = int(corrector_steps)

    def step(carry, t, s, k, i):
        (x,) = carry
        k_corr, k_pred = jax.random.split(k)
        if n_corr:
            x = _corrector(k_corr, path, field, x, t, s, target, snr, n_corr)
        if predictor is not None:
            x0, eps = _loop.predict(path, field, x, t, target)
            x = predictor(k_pred, path, x, t, s, x0, eps)
        return (x,)

    final = _denoise(path, field, target) if denoise else None
    x, save_ts, xs = _loop.run_grid(step, (x,), grid, key, save_ts=save_ts, final=final)
    n = grid.shape[0] - 1
    nfe = n * (n_corr + (predictor is not None)) + int(denoise)
    return Solution(x, save_ts, xs, jnp.asarray(nfe), jnp.asarray(n))


def annealed_langevin(
    key: Array,
    path: GaussianPath,
    field: Field,
    shape: tuple[int, ...] | None = None,
    *,
    target: Target = "score",
    levels: int = 10,
    ts: ArrayLike | None = None,
    t_end: ArrayLike = 1e-3,
    steps_per_level: int = 100,
    step_size: ArrayLike = 2e-5,
    denoise: bool = True,
    x_init: ArrayLike | None = None,
) -> Solution:
    """Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1) over the noise levels of ``ts``.

    ``ts`` (decreasing) or ``levels`` times from 1 to ``t_end``; on a VE path they are the
    geometric sigma ladder of NCSN. Level ``i`` runs ``steps_per_level`` steps with
    ``a_i = step_size sigma_i^2 / sigma_L^2``. Starts from ``N(0, sigma_1^2 I)``.
    NFE = ``levels steps_per_level + denoise``.
    """
    check_positive(step_size, "step_size")
    grid = ts if ts is not None else jnp.linspace(1.0, as_time(t_end), int(levels))
    grid = _loop.decreasing_grid(grid)
    prior_key, key = jax.random.split(key)
    x = _loop.initial_state(prior_key, path, field, shape, x_init, grid[0])
    grid = grid.astype(x.dtype)
    var_last = path.sigma_sq(grid[-1])
    n = int(steps_per_level)

    def level(x, inputs):
        t, k = inputs
        a = step_size * path.sigma_sq(t) / var_last

        def one(x, kk):
            _, eps = _loop.predict(path, field, x, t, target)
            score = -eps / path.sigma(t)
            return x + 0.5 * a * score + jnp.sqrt(a) * _normal(kk, x), None

        return jax.lax.scan(one, x, jax.random.split(k, n))[0], None

    keys = jax.random.split(key, grid.shape[0])
    x = jax.lax.scan(level, x, (grid, keys))[0]
    if denoise:
        x = _loop.predict(path, field, x, grid[-1], target)[0]
    nfe = grid.shape[0] * n + int(denoise)
    return Solution(x, None, None, jnp.asarray(nfe), jnp.asarray(grid.shape[0] * n))
