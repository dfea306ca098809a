r"""DDPM's ancestral sampler and DDIM, on any Gaussian path and any target.

* ``ancestral`` (Ho et al. 2020, Alg. 2): ``x_s ~ p(x_s | x_t)``, the posterior
  ``q(x_s | x_t, x0)`` at the network's ``x0_hat`` (:func:`jaxdiff.reverse_mean_var`).
* ``ddim(eta)`` (Song, Meng & Ermon 2021): ``x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat
  + c z`` with ``c = eta`` times the posterior's std. ``eta = 1`` is the ancestral step (the same
  draw gives the same sample), ``eta = 0`` the deterministic DDIM = DPM-Solver-1 = Euler in
  ``(x / alpha, sigma / alpha)``. k-diffusion's ``sample_euler_ancestral`` is ``ddim(eta)``.

Both step exactly to ``t = 0`` (the step there returns ``x0_hat`` and adds no noise), so their
default grid is ``steps`` uniform steps from 1 to 0, and any subset of a discrete model's times
works (``jaxdiff.trailing_timesteps`` and the other spacings).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxdiff._checks import check_positive, expand_like
from jaxdiff.ddim import ddim_step
from jaxdiff.ddpm import _reverse_mean_var
from jaxdiff.field import predict
from jaxdiff.samplers.base import Sampler, normal
from jaxdiff.schedules import uniform_grid
from jaxdiff.sde import Eta, _is_zero, check_eta, eta_at

Array = jax.Array

__all__ = ["ancestral", "ddim"]


class State(NamedTuple):
    x: Array


def _to_zero(path, steps, t_start, t_end):
    return uniform_grid(steps, t_start, t_end)


def ancestral(*, var_weight: ArrayLike = 0.0) -> Sampler:
    """DDPM's ancestral sampler: ``x_s ~ N(mean, var)`` of the reverse model (Ho et al. 2020).

    ``var_weight`` picks the reverse variance ``beta~^(1 - w) beta^w`` (``0``: the posterior's,
    Ho's "fixed small"; ``1``: the forward ``beta``, "fixed large"; Nichol & Dhariwal 2021
    between). A step that ends at ``sigma_s = 0`` adds no noise: it returns ``x0_hat``. Default
    grid: 1000 uniform steps from 1 to 0 (DDPM's chain).

    >>> import jax, jax.numpy as jnp, jaxdiff as jd
    >>> data = jd.GaussianMixture.isotropic(jnp.array([[2.0, 0.0], [-2.0, 0.0]]), std=0.3)
    >>> path = jd.vp_path()
    >>> sol = jd.sample(jax.random.key(0), path, data.field(path, "eps"), (4096, 2),
    ...                 sampler=ancestral(), steps=200)
    >>> round(float(jnp.abs(sol.x[:, 0]).mean()), 1), int(sol.nfe)
    (2.0, 200)
    """
    check_positive(var_weight, "var_weight", strict=False)

    def init(path, field, x, ts) -> State:
        return State(x)

    def step(key, path, field, state: State, t, s) -> State:
        x = state.x
        x0, _ = predict(path, field, x, t)
        mean, var = _reverse_mean_var(path, x, x0, t, s, var_weight)
        std = jnp.where(path.sigma(s) > 0, jnp.sqrt(var), 0.0)
        return State(mean + expand_like(std, x).astype(x.dtype) * normal(key, x))

    return Sampler(
        name=f"ancestral(var_weight={var_weight})",
        init=init,
        step=step,
        evals_per_step=1,
        stochastic=True,
        grid=_to_zero,
        steps=1000,
        t_end=0.0,
        reaches_zero=True,
    )


def ddim(eta: Eta = 0.0) -> Sampler:
    """DDIM steps (Song, Meng & Ermon 2021) with noise ``eta`` in ``[0, 1]`` (or a function of t).

    ``eta = 0``: deterministic (first-order exponential integrator of the PF-ODE); ``eta = 1``:
    DDPM's ancestral step with the posterior variance. Default grid: 50 uniform steps from 1 to 0.

    >>> import jax, jax.numpy as jnp, jaxdiff as jd
    >>> data = jd.GaussianMixture.isotropic(jnp.array([[2.0, 0.0], [-2.0, 0.0]]), std=0.3)
    >>> path = jd.vp_path()
    >>> sol = jd.sample(jax.random.key(0), path, data.field(path, "eps"), (4096, 2),
    ...                 sampler=ddim(), steps=20)
    >>> round(float(jnp.abs(sol.x[:, 0]).mean()), 1), int(sol.nfe)
    (2.0, 20)
    """
    check_eta(eta, hi=1.0)
    stochastic = not _is_zero(eta)

    def init(path, field, x, ts) -> State:
        return State(x)

    def step(key, path, field, state: State, t, s) -> State:
        x0, eps = predict(path, field, state.x, t)
        if not stochastic:
            return State(ddim_step(path, x0, eps, t, s))
        e = jnp.where(path.sigma(s) > 0, eta_at(eta, t), 0.0)
        return State(ddim_step(path, x0, eps, t, s, eta=e, noise=normal(key, state.x)))

    return Sampler(
        name=f"ddim(eta={eta})",
        init=init,
        step=step,
        evals_per_step=1,
        stochastic=stochastic,
        grid=_to_zero,
        steps=50,
        t_end=0.0,
        reaches_zero=True,
    )
