r"""Predictor-corrector sampling and annealed Langevin dynamics.

**Predictor-corrector** (Song et al. 2021, Alg. 1-5): at each time ``t`` of the grid, a
*corrector* of ``corrector_steps`` Langevin steps at fixed ``t`` pulls ``x`` towards ``p_t``,
then a *predictor* moves it to the next time ``s``. Predictors are plain functions
``predictor(key, path, x, t, s, x0, eps) -> x_s`` given the network's prediction as the hub pair:
:func:`euler_maruyama_predictor`, :func:`reverse_diffusion_predictor`,
:func:`ancestral_predictor`, or ``None`` (corrector only).

The corrector's step follows the **signal-to-noise rule**: ``step = 2 a (snr |z| / |score|)^2``
with ``|.|`` the per-sample norm averaged over the batch (as score_sde; ``a = (alpha_t /
alpha_s)^2``, DDPM's ``1 - beta_i``, and ``1`` on VE). ``snr`` is the ratio of the norm of the
drift ``step * score`` to that of the noise ``sqrt(2 step) z``, divided by ``sqrt(a)`` (``0.16``
for CIFAR-10 in Song et al.). The batch average couples the samples through one scalar step size
per time; a per-sample ratio would not, but it explodes where a sample's score is near 0 (at the
modes) and is wrong in low dimension.

**Annealed Langevin** (Song & Ermon 2019, Alg. 1): down a ladder of noise levels, run
``steps_per_level`` steps of ``x <- x + (a / 2) score + sqrt(a) z`` at each, with ``a = step_size
sigma^2 / sigma_L^2`` (``sigma_L`` the smallest level).

Both default to the denoising step at the end (``x <- x0_hat``; Song & Ermon 2020).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxdiff._checks import check_count, check_positive, concrete, expand_like, safe_sqrt
from jaxdiff.conversions import from_x0_eps
from jaxdiff.ddpm import _posterior, _ratio
from jaxdiff.field import predict
from jaxdiff.paths import GaussianPath
from jaxdiff.samplers.base import Sampler, grid_check, normal
from jaxdiff.schedules import uniform_grid

Array = jax.Array
Predictor = Callable[..., Array]

__all__ = [
    "pc",
    "annealed_langevin",
    "euler_maruyama_predictor",
    "reverse_diffusion_predictor",
    "ancestral_predictor",
]


def euler_maruyama_predictor(
    key: Array, path: GaussianPath, x: Array, t: ArrayLike, s: ArrayLike, x0: Array, eps: Array
) -> Array:
    """Euler--Maruyama step of the reverse SDE ``dx = (f x - g^2 score) dt + g dw`` from ``t`` to ``s``.

    The drift is the probability-flow velocity ``f x - g^2 score / 2`` minus another
    ``g^2 score / 2``.
    """
    dt = expand_like(jnp.asarray(s - t), x)  # t and s scalars or per sample
    velocity = from_x0_eps(path, x, t, x0, eps, "velocity")
    score = from_x0_eps(path, x, t, x0, eps, "score")
    g2 = expand_like(path.diffusion_sq(t), x)
    drift = velocity - 0.5 * g2 * score
    g = expand_like(path.diffusion(t), x)
    return x + dt * drift + g * jnp.sqrt(-dt) * normal(key, x)


def reverse_diffusion_predictor(
    key: Array, path: GaussianPath, x: Array, t: ArrayLike, s: ArrayLike, x0: Array, eps: Array
) -> Array:
    """The reverse of the forward step ``x_t = a x_s + G z`` (Song et al. 2021, eq. 46):
    ``x_s = (2 - a) x_t + G^2 score + G z`` with ``a = alpha_t / alpha_s``,
    ``G^2 = sigma_t^2 (1 - SNR_t / SNR_s)`` (SMLD's ancestral step on VE)."""
    a = expand_like(path.alpha(t) / path.alpha(s), x)
    g2 = expand_like(path.sigma_sq(t) * _ratio(path, s, t), x)
    score = from_x0_eps(path, x, t, x0, eps, "score")
    return (2.0 - a) * x + g2 * score + jnp.sqrt(g2) * normal(key, x)


def ancestral_predictor(
    key: Array, path: GaussianPath, x: Array, t: ArrayLike, s: ArrayLike, x0: Array, eps: Array
) -> Array:
    """DDPM's step: a draw of the posterior ``q(x_s | x_t, x0_hat)``."""
    mean, var = _posterior(path, x, x0, t, s)
    return mean + safe_sqrt(expand_like(var, x)) * normal(key, x)  # var = 0 at s = 0: no NaN slope


class State(NamedTuple):
    x: Array


def _mean_norm(v):
    """Mean over the batch of the per-sample norms (score_sde's rule); a norm of 0 has gradient 0
    (``sqrt``'s is infinite there, and 0 * inf made the gradient NaN)."""
    sq = jnp.sum(jnp.square(v), axis=tuple(range(1, v.ndim)))
    return jnp.mean(jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0))


def _check_batched(x: Array, name: str) -> None:
    if x.ndim < 2:
        raise ValueError(f"{name} needs x of shape (batch, *event); got {x.shape}")


def _uniform(path, steps, t_start, t_end):
    return uniform_grid(steps, t_start, t_end)


def pc(
    predictor: Predictor | None = reverse_diffusion_predictor,
    *,
    corrector_steps: int = 1,
    snr: ArrayLike = 0.16,
) -> Sampler:
    """Predictor-corrector sampling (Song et al. 2021, Alg. 1): at each grid time
    ``corrector_steps`` Langevin steps (signal-to-noise rule), then ``predictor`` to the next time.

    ``x`` needs a leading batch axis (the step rule takes norms per sample); a score of norm 0
    (an untrained network whose output layer starts at zero) takes no corrector step, where the
    rule's step is infinite (only an exact 0: a score of norm 1e-12 takes the rule's huge step,
    as in score_sde). Evaluations per step:
    ``corrector_steps + 1`` (``corrector_steps`` with ``predictor=None``). Default grid: 100
    uniform steps to ``1e-3`` (score_sde's), then the denoising step. The corrector alone
    (``predictor=None``) needs many more steps than that on VE's wide ladder: on ``ve_path(0.01,
    50)`` with 2 corrector steps per time, 100 steps left the samples at the prior's scale and 400
    reached the data (score_sde's corrector-only runs take ~2,000).

    >>> import jax, jax.numpy as jnp, jaxdiff as jd
    >>> data = jd.GaussianMixture.isotropic(jnp.array([[2.0, 0.0], [-2.0, 0.0]]), std=0.3)
    >>> path = jd.ve_path(0.01, 10.0)
    >>> sol = jd.sample(jax.random.key(0), path, data.field(path, "score"), (4096, 2),
    ...                 sampler=pc(), steps=200)
    >>> round(float(jnp.abs(sol.x[:, 0]).mean()), 1), int(sol.nfe)
    (2.0, 401)
    """
    snr = check_positive(snr, "snr")
    n_corr = check_count(corrector_steps, "corrector_steps", minimum=0)
    if predictor is None and n_corr < 1:
        raise ValueError("with predictor=None, corrector_steps must be >= 1")

    def init(path, field, x, ts) -> State:
        _check_batched(x, "pc")
        return State(x)

    def corrector(key, path, field, x, t, s):
        a = jnp.square(path.alpha(t) / path.alpha(s))

        def one(x, k):
            _, eps = predict(path, field, x, t)
            score = -eps / path.sigma(t)
            z = normal(k, x)
            norm = _mean_norm(score)  # 0: no signal to correct with (a zero-initialised output)
            ratio = snr * _mean_norm(z) / jnp.where(norm > 0, norm, 1.0)
            size = jnp.where(norm > 0, 2.0 * a * jnp.square(ratio), 0.0)
            return (x + size * score + jnp.sqrt(2.0 * size) * z).astype(x.dtype), None

        return jax.lax.scan(one, x, jax.random.split(key, n_corr))[0]

    def step(key, path, field, state: State, t, s) -> State:
        x = state.x
        k_corr, k_pred = jax.random.split(key)
        if n_corr:
            x = corrector(k_corr, path, field, x, t, s)
        if predictor is not None:
            x0, eps = predict(path, field, x, t)
            x = predictor(k_pred, path, x, t, s, x0, eps)
        return State(x)

    def check(path: GaussianPath, field, ts: Array) -> Array:  # Euler-Maruyama reads g(t)
        return grid_check(
            ts,
            lambda g: ~jnp.isfinite(path.diffusion_sq(g[0])),
            "euler_maruyama_predictor steps with g(t)^2, which is not finite at the grid's first "
            "time on this path (alpha_1 = 0: linear, cosine): start inside, e.g. t_start=1 - 1e-3 "
            "(the default grid does), or use reverse_diffusion_predictor",
        )

    # the closed-form predictors step from t = 1; Euler-Maruyama, and a predictor of the user's
    # own (which may read g(t) too), start inside where g(1) is infinite
    base = predictor
    while isinstance(base, functools.partial):
        base = base.func
    closed = predictor is None or base in (reverse_diffusion_predictor, ancestral_predictor)
    em = base is euler_maruyama_predictor
    name = getattr(base, "__name__", str(predictor))
    return Sampler(
        name=f"pc({name}, corrector_steps={n_corr}, snr={snr})",
        init=init,
        step=step,
        evals_per_step=n_corr + (predictor is not None),
        stochastic=True,
        grid=_uniform,
        steps=100,
        denoise=True,
        check=check if em else None,
        singular_start=None if closed else _infinite_diffusion_at_one,
    )


def _infinite_diffusion_at_one(path: GaussianPath) -> Array:
    return ~jnp.isfinite(path.diffusion_sq(jnp.ones((), jnp.float32)))


class LangevinState(NamedTuple):
    x: Array
    var_last: Array


def annealed_langevin(*, steps_per_level: int = 100, step_size: ArrayLike = 2e-5) -> Sampler:
    """Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1) over the noise levels of the grid.

    The step from ``t`` to ``s`` runs ``steps_per_level`` Langevin steps at level ``s`` with
    ``a = step_size sigma_s^2 / sigma_L^2`` (``sigma_L``: the smallest level of the grid). The
    start is the prior at the first time. On a VE path a uniform grid is NCSN's geometric sigma
    ladder. Evaluations per step: ``steps_per_level``; then the denoising step.

    A step on a Gaussian of variance ``v`` contracts only if ``a < 4 v``. NCSN's rule suits VE,
    whose ``p_s`` grows with ``sigma_s``; on VP, linear and cosine paths ``p_s`` keeps unit
    variance (for unit-variance data) while ``a_s`` grows as ``sigma_s^2 / sigma_L^2``, so a grid
    whose ``a_s >= 4 (alpha_s^2 + sigma_s^2)`` at some level is refused with the largest stable
    ``step_size`` (on the linear path to ``t_end = 1e-3``: 4e-6, where 2e-5 diverged).

    On those paths the levels near the data take steps too small to carry the samples from one
    level's ``p_s`` to the next, so they keep the shrink ``alpha_s`` of the last level where
    Langevin still mixes: with the exact field of a 2-D mixture on VP, the default 10 levels left
    the means ~5% short (mean error 0.32; 40 levels: 0.12; 300 steps per level did not help).
    Annealed Langevin is NCSN's sampler for VE, where it reaches the noise floor; on the other
    paths prefer ``pc``, ``sde`` or an ODE.
    """
    step_size = check_positive(step_size, "step_size")
    n = check_count(steps_per_level, "steps_per_level")

    def check(path, field, ts):
        with jax.ensure_compile_time_eval():
            bound = _stable_step_size(path, ts)
        value = concrete(bound)
        if value is None or concrete(step_size) is None:
            return grid_check(
                ts,
                lambda g: step_size >= _stable_step_size(path, g),
                "annealed_langevin: step_size is too large for this grid (Langevin diverges at "
                "some level; see the docstring)",
            )
        if float(concrete(step_size)) >= float(value):
            raise ValueError(
                f"annealed_langevin: step_size = {float(concrete(step_size)):.3g} diverges on this "
                f"grid: at level s the step a_s = step_size sigma_s^2 / sigma_L^2 must stay below "
                f"4 (alpha_s^2 + sigma_s^2), four times the variance of p_s for unit-variance "
                f"data, so step_size < {float(value):.3g} (sigma_L = "
                f"{float(jnp.sqrt(_smallest_level(path, ts))):.3g}). NCSN's ladder (VE, "
                "sigma_L = 0.01) takes 2e-5; on VP, linear and cosine paths, whose p_s do not "
                "grow with sigma_s, take a smaller step_size or end the grid at a larger t_end"
            )
        return ts

    def init(path, field, x, ts) -> LangevinState:
        last = _smallest_level(path, ts)
        return LangevinState(x, last.astype(jnp.result_type(x.dtype, jnp.float32)))

    def step(key, path, field, state: LangevinState, t, s) -> LangevinState:
        a = step_size * path.sigma_sq(s) / state.var_last

        def one(x, k):
            _, eps = predict(path, field, x, s)
            score = -eps / path.sigma(s)
            return (x + 0.5 * a * score + jnp.sqrt(a) * normal(k, x)).astype(x.dtype), None

        x = jax.lax.scan(one, state.x, jax.random.split(key, n))[0]
        return LangevinState(x, state.var_last)

    return Sampler(
        name=f"annealed_langevin(steps_per_level={n}, step_size={step_size})",
        init=init,
        step=step,
        evals_per_step=n,
        stochastic=True,
        grid=_uniform,
        steps=10,
        denoise=True,
        check=check,
    )


def _smallest_level(path: GaussianPath, ts: Array) -> Array:
    var = path.sigma_sq(ts)
    return jnp.min(jnp.where(var > 0, var, jnp.inf))  # the smallest level (not a final 0)


def _stable_step_size(path: GaussianPath, ts: Array) -> Array:
    """The ``step_size`` above which a level of the grid diverges: Langevin's ``x <- x + (a / 2)
    score + sqrt(a) z`` on a Gaussian of variance ``v`` contracts by ``1 - a / (2 v)``, so needs
    ``a < 4 v``; with ``a_s = step_size sigma_s^2 / sigma_L^2`` and ``v_s = alpha_s^2 + sigma_s^2``
    (unit-variance data), ``step_size < min_s 4 v_s sigma_L^2 / sigma_s^2``."""
    levels = ts[1:]
    var = path.sigma_sq(levels)
    v = path.alpha(levels) ** 2 + var
    return jnp.min(4.0 * v * _smallest_level(path, ts) / jnp.where(var > 0, var, jnp.inf))
