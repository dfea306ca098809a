r"""EDM preconditioning (Karras et al. 2022, Table 1) for any Gaussian path, as a field transform.

On ``x_t = alpha_t x0 + sigma_t eps`` with data of standard deviation ``sigma_data = s`` the
denoiser is written ``D(x, t) = c_skip x + c_out F(c_in x, c_noise)``, with

    ``c_in    = 1 / sqrt(alpha^2 s^2 + sigma^2)``              (the network input has unit variance)
    ``c_skip  = alpha s^2 / (alpha^2 s^2 + sigma^2)``          (minimises the variance of F's target)
    ``c_out   = sigma s / sqrt(alpha^2 s^2 + sigma^2)``        (F's target has unit variance)
    ``c_noise = log(sigma / alpha) / 4 = -lambda_t / 8``       (EDM's noise conditioning)

These are EDM's formulas in the scaled variable ``x / alpha`` with noise level ``sigma / alpha``
(EDM's ``s(t)``), so the VE path ``sigma = t``, ``alpha = 1`` gives EDM's ``c_skip = s^2 / (sigma^2
+ s^2)``, ``c_out = sigma s / sqrt(sigma^2 + s^2)``, ``c_in = 1 / sqrt(sigma^2 + s^2)`` exactly; the
VP, cosine and flow-matching (linear) paths get the same unit-variance guarantees. The regression
target of ``F`` is ``(x0 - c_skip x_t) / c_out``, of variance
``((1 - alpha c_skip)^2 s^2 + c_skip^2 sigma^2) / c_out^2 = 1`` at every ``t`` for data of variance
``s^2``. Training ``D`` with :func:`jaxdiff.x0_loss` and ``jaxdiff.edm_weight(s) = 1 / c_out^2`` is
exactly the mean squared error of ``F`` on that target (EDM's loss).

``c_noise`` is clipped to ``[-L/4, L/4]`` with ``L = 10`` (``sigma / alpha`` from ``4.5e-5`` to
``2.2e4``), so the endpoints ``sigma = 0`` and ``alpha = 0`` stay finite; there ``c_out = 0``
(``D = x`` exactly) and ``c_skip = 0`` (``D = s F``). Time runs from data (``t = 0``) to noise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxdiff._checks import check_positive, check_time, coef_time, expand_like, widen
from jaxdiff.field import Field
from jaxdiff.paths import GaussianPath

Array = jax.Array

__all__ = ["EDMScalings", "edm_scalings", "edm_noise", "edm_precond"]

LOG_SIGMA_CLIP = 10.0


class EDMScalings(NamedTuple):
    """``c_skip, c_out, c_in, c_noise`` at ``t``, each shaped like ``t`` (float32 or wider)."""

    c_skip: Array
    c_out: Array
    c_in: Array
    c_noise: Array


def edm_noise(path: GaussianPath, t: ArrayLike) -> Array:
    """EDM's ``c_noise = log(sigma_t / alpha_t) / 4 = -lambda_t / 8``, clipped to ``[-2.5, 2.5]``."""
    return _edm_noise(path, check_time(coef_time(t)))


def _edm_noise(path: GaussianPath, t: Array) -> Array:
    log_sigma = -0.5 * path.log_snr(t)
    # a select, not clip: clip's derivative multiplies the infinite d log_sigma / dt at sigma = 0
    # or alpha = 0 by 0 (NaN under jax.jvp in t); where the clip holds the derivative is 0
    inside = jnp.abs(log_sigma) <= LOG_SIGMA_CLIP
    return 0.25 * jnp.where(inside, log_sigma, jnp.sign(log_sigma) * LOG_SIGMA_CLIP)


def edm_scalings(
    path: GaussianPath,
    t: ArrayLike,
    sigma_data: float = 0.5,
    noise_fn: Callable[[GaussianPath, Array], Array] = edm_noise,
) -> EDMScalings:
    """The four EDM coefficients on ``path`` at ``t`` (see the module docstring for the formulas).

    >>> import jaxdiff as jd
    >>> s = edm_scalings(jd.ve_path(), 0.5, sigma_data=0.5)  # VE: alpha = 1
    >>> sigma = float(jd.ve_path().sigma(0.5))
    >>> round(float(s.c_skip), 6) == round(0.25 / (sigma**2 + 0.25), 6)
    True
    """
    sigma_data = check_positive(sigma_data, "sigma_data")
    return _scalings(path, check_time(coef_time(t)), sigma_data, noise_fn)


def _scalings(path, t, sigma_data, noise_fn) -> EDMScalings:
    """:func:`edm_scalings` without the check of ``t`` (a network's call inside a loss or a
    sampler, whose times are checked there)."""
    noise_fn = _edm_noise if noise_fn is edm_noise else noise_fn
    t = coef_time(t)
    a, var = path.alpha(t), path.sigma_sq(t)
    sd = jnp.asarray(sigma_data, t.dtype)
    sd2 = jnp.square(sd)
    total = a * a * sd2 + var  # the variance of x_t
    c_in = jax.lax.rsqrt(total)
    # sigma * s, not sqrt(sigma^2 s^2): the sqrt's derivative at sigma = 0 gave NaN under jax.jvp
    c_out = path.sigma(t) * sd * c_in
    return EDMScalings(a * sd2 / total, c_out, c_in, noise_fn(path, t))


class _Preconditioned(eqx.Module):
    """``fn(params, x, t, *args) = c_skip x + c_out net(params, c_in x, c_noise, *args)``."""

    net: Callable[..., Array]
    path: GaussianPath
    sigma_data: float
    noise_fn: Callable[[GaussianPath, Array], Array]

    def __call__(self, params: Any, x: ArrayLike, t: ArrayLike, *args: Any, **kwargs: Any) -> Array:
        s = _scalings(self.path, t, self.sigma_data, self.noise_fn)
        out, xw = widen(x)
        x_in = (expand_like(s.c_in, xw).astype(xw.dtype) * xw).astype(out)
        f = self.net(params, x_in, s.c_noise, *args, **kwargs)
        _, _, f = widen(x, f)
        skip, c_out = (expand_like(c, xw).astype(xw.dtype) for c in (s.c_skip, s.c_out))
        return (skip * xw + c_out * f).astype(out)


def edm_precond(
    net: Callable[..., Array] | Field,
    path: GaussianPath,
    *,
    sigma_data: float = 0.5,
    params: Any = None,
    noise_fn: Callable[[GaussianPath, Array], Array] = edm_noise,
) -> Field:
    """The denoiser ``D(x, t) = c_skip x + c_out F(c_in x, c_noise)`` as a :class:`Field` ("x0").

    ``net(params, x, c_noise, *args)`` is the raw network ``F`` (e.g. ``model.apply``; extra
    arguments such as labels and keywords such as Flax's ``rngs`` pass through); a ``Field`` gives
    its function and params. The result's ``params`` are the raw network's, so losses train them
    (``jd.x0_loss(field, path, weighting=jd.edm_weight(sigma_data), time_sampler=jd.edm_time(
    path))`` is EDM's recipe), ``bind`` swaps them, and every sampler, guidance transform and
    likelihood takes the field. ``noise_fn(path, t)`` is what the network sees as its time
    (default :func:`edm_noise`; ``lambda path, t: t`` feeds the path's own time, as Table 1's VP
    and VE rows do). ``path``, ``sigma_data`` and ``noise_fn`` are static parts of the field.

    >>> import jax.numpy as jnp, jaxdiff as jd
    >>> f = edm_precond(lambda p, x, c: p * jnp.ones_like(x), jd.vp_path(), params=0.0)
    >>> f.target, f(jnp.ones((2, 3)), jnp.full(2, 0.5)).shape  # F = 0: D = c_skip x
    ('x0', (2, 3))
    """
    if isinstance(net, Field):
        params = net.params if params is None else params
        net = net.fn
    if not callable(net):
        raise TypeError(f"net must be callable (net(params, x, c_noise, ...)); got {type(net)}")
    check_positive(sigma_data, "sigma_data")
    return Field(_Preconditioned(net, path, float(sigma_data), noise_fn), "x0", params)
