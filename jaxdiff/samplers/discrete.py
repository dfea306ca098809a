r"""DDPM's ancestral sampler and DDIM, on any Gaussian path and any target.

* ``ancestral`` (Ho et al. 2020, Alg. 2): ``x_s ~ p(x_s | x_t)``, the posterior
  ``q(x_s | x_t, x0)`` at the network's ``x0_hat`` (:func:`jaxdiff.reverse_mean_var`).
* ``ddim(eta)`` (Song, Meng & Ermon 2021): ``x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat
  + c z`` with ``c = eta`` times the posterior's std. ``eta = 1`` is the ancestral step (the same
  draw gives the same sample), ``eta = 0`` the deterministic DDIM = DPM-Solver-1 = Euler in
  ``(x / alpha, sigma / alpha)``. k-diffusion's ``sample_euler_ancestral`` is ``ddim(eta)``.

Both step exactly to ``t = 0`` (the step there returns ``x0_hat`` and adds no noise), so their
default grid is :func:`jaxdiff.default_grid` from 1 to 0 (``steps`` uniform steps; Karras' where
``alpha`` is constant, as for every sampler: with EDM's ``sigma = 80 t``, 40 uniform DDIM steps
ended at an energy distance of 0.24 from the data, Karras' at the noise floor), and any subset of a discrete model's
times works (``jaxdiff.trailing_timesteps`` and the other spacings).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxdiff._checks import safe_sqrt
from jaxdiff.conversions import hub_matrix
from jaxdiff.ddim import ddim_coefs
from jaxdiff.ddpm import _check_var_weight, _posterior_coefs, _reverse_var
from jaxdiff.field import batch_time
from jaxdiff.samplers.base import Sampler, between, combine, normal
from jaxdiff.schedules import default_grid
from jaxdiff.sde import Eta, _is_zero, check_eta, eta_at

Array = jax.Array

__all__ = ["ancestral", "ddim"]


class State(NamedTuple):
    x: Array


def _to_zero(path, steps, t_start, t_end):
    return default_grid(path, steps, t_start, t_end)


def ancestral(*, var_weight: ArrayLike = 0.0) -> Sampler:
    """DDPM's ancestral sampler: ``x_s ~ N(mean, var)`` of the reverse model (Ho et al. 2020).

    ``var_weight`` picks the reverse variance ``beta~^(1 - w) beta^w`` (``0``: the posterior's,
    Ho's "fixed small"; ``1``: the forward ``beta``, "fixed large"; Nichol & Dhariwal 2021
    between). A step that ends at ``sigma_s = 0`` adds no noise: it returns ``x0_hat``. Default
    grid: 1000 steps from 1 to 0, uniform (DDPM's chain; Karras' where ``alpha`` is constant).

    >>> import jax, jax.numpy as jnp, jaxdiff as jd
    >>> data = jd.GaussianMixture.isotropic(jnp.array([[2.0, 0.0], [-2.0, 0.0]]), std=0.3)
    >>> path = jd.vp_path()
    >>> sol = jd.sample(jax.random.key(0), path, data.field(path, "eps"), (4096, 2),
    ...                 sampler=ancestral(), steps=200)
    >>> round(float(jnp.abs(sol.x[:, 0]).mean()), 1), int(sol.nfe)
    (2.0, 200)
    """
    var_weight = _check_var_weight(var_weight)

    def init(path, field, x, ts) -> State:
        return State(x)

    def coefficients(path, field, t, s):
        """``x_s = p x_t + q value + std z``: the posterior mean ``c_x x_t + c_0 x0_hat`` with
        ``x0_hat = h00 x_t + h01 value`` (the field's prediction ``value``)."""
        h00, h01, _, _ = hub_matrix(path, t, field.target)
        c_x, c_0, var_post = _posterior_coefs(path, t, s)
        var = _reverse_var(path, t, s, var_post, var_weight)
        return c_x + c_0 * h00, c_0 * h01, jnp.where(path.sigma(s) > 0, safe_sqrt(var), 0.0)

    def step(key, path, field, state: State, t, s, coefs=None) -> State:
        x = state.x
        p, q, std = coefficients(path, field, t, s) if coefs is None else coefs
        value = field(x, batch_time(t, x))
        return State(combine(x, (p, x), (q, value), (std, normal(key, x))))

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
        coefficients=between(coefficients),
    )


def ddim(eta: Eta = 0.0) -> Sampler:
    """DDIM steps (Song, Meng & Ermon 2021) with noise ``eta`` in ``[0, 1]`` (or a function of t).

    ``eta = 0``: deterministic (first-order exponential integrator of the PF-ODE); ``eta = 1``:
    DDPM's ancestral step with the posterior variance. Default grid: 50 steps from 1 to 0, uniform
    (Karras' where ``alpha`` is constant).

    >>> import jax, jax.numpy as jnp, jaxdiff as jd
    >>> data = jd.GaussianMixture.isotropic(jnp.array([[2.0, 0.0], [-2.0, 0.0]]), std=0.3)
    >>> path = jd.vp_path()
    >>> sol = jd.sample(jax.random.key(0), path, data.field(path, "eps"), (4096, 2),
    ...                 sampler=ddim(), steps=20)
    >>> round(float(jnp.abs(sol.x[:, 0]).mean()), 1), int(sol.nfe)
    (2.0, 20)
    """
    eta = check_eta(eta, hi=1.0)  # traced: checked at run time (eta = 2 ran, c^2 clipped)
    stochastic = not _is_zero(eta)

    def init(path, field, x, ts) -> State:
        return State(x)

    def coefficients(path, field, t, s):
        """``x_s = p x_t + q value + c z``: ``alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat``
        through the hub map of the field's prediction ``value`` (:func:`jaxdiff.ddim_step`)."""
        h00, h01, h10, h11 = hub_matrix(path, t, field.target)
        e = jnp.where(path.sigma(s) > 0, eta_at(eta, t), 0.0) if stochastic else None
        a_s, k, c = ddim_coefs(path, t, s, e)
        return a_s * h00 + k * h10, a_s * h01 + k * h11, c

    def step(key, path, field, state: State, t, s, coefs=None) -> State:
        x = state.x
        p, q, c = coefficients(path, field, t, s) if coefs is None else coefs
        value = field(x, batch_time(t, x))
        if not stochastic:
            return State(combine(x, (p, x), (q, value)))
        return State(combine(x, (p, x), (q, value), (c, normal(key, x))))

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
        coefficients=between(coefficients),
    )
