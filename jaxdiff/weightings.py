r"""Loss weightings and time samplers of modern diffusion training, and the ELBO view of them all.

A weighting is a function ``(path, t) -> w(t)`` multiplying a loss's squared error (as in
:mod:`jaxdiff.losses`). The squared errors of the targets differ by known factors at fixed
``x_t`` -- ``|x0_hat - x0|^2 = e^{-lambda} |eps_hat - eps|^2`` with ``lambda_t = log(alpha_t^2 /
sigma_t^2)`` -- so a weighting means something only together with the units of its error. A
:class:`Weight` names them (``units``, a target); the losses convert it to the error they take,
so ``jd.eps_loss(f, path, weighting=w)`` and ``jd.x0_loss(f, path, weighting=w)`` are the same
objective for a ``Weight`` (a plain function is taken in the loss's own units, as before).

=====================================  =====================================  =============
weighting                              ``w``                                  units
=====================================  =====================================  =============
:func:`edm_weight` (Karras et al.)     ``(sigma~^2 + s^2) / (sigma~ s)^2``    ``x0``
:func:`min_snr_weight` (Hang et al.)   ``min(SNR, gamma)``                    ``x0``
:func:`v_weight` (Salimans & Ho)       ``1`` (= ``SNR + 1`` in x0 on VP)     ``v``
:func:`log_snr_weight` (Kingma & Gao)  ``-dlambda/dt * W(lambda_t)``          ``eps``
:func:`elbo_weight`                    ``W = 1``: ``g^2 / sigma^2``           ``eps``
:func:`sigmoid_weight` (Kingma & Gao)  ``W = sigmoid(bias - lambda)``         ``eps``
=====================================  =====================================  =============

(``sigma~ = sigma_t / alpha_t = e^{-lambda/2}``, EDM's noise level; ``SNR = e^lambda``.)

**The ELBO view** (Kingma & Gao 2023). Every loss ``E_{t ~ p} [w(t) |err|^2]`` equals
``int W(lambda) E|eps_hat - eps|^2 d lambda`` with ``W(lambda) = p(t) w_eps(t) / (-dlambda/dt)``
(:func:`log_snr_weighting`), and the ELBO is ``W = 1``: with :func:`elbo_weight` (the likelihood
weighting ``g^2`` of :mod:`jaxdiff.losses`, in eps units) the loss is ``2 / D`` times Kingma et
al. (2021)'s continuous-time negative ELBO up to a constant (the losses average over the ``D``
data dimensions and drop the ``1/2``). Integrating by parts, with ``L(lambda) = 1/2 int_{-inf}^
{lambda} E|eps_hat - eps|^2`` the negative ELBO of the data noised to ``lambda`` (constants aside),

    ``int W e d lambda = int (-dW/dlambda) 2 L(lambda) d lambda + W(lambda_max) 2 L(lambda_max)``:

a loss whose ``W`` decreases in ``lambda`` (increases with noise) is a positive mixture of ELBOs of
noisy data -- for the sigmoid weighting the mixture density is the logistic density at ``bias``.

Time samplers ``(key, shape) -> t`` with a ``pdf(t)``: :func:`edm_time` draws EDM's log-normal
noise level ``log sigma~ ~ N(p_mean, p_std^2)`` on any path (truncated to ``[t_min, t_max]``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr, ndtr, ndtri
from jax.typing import ArrayLike

from jaxdiff._checks import (
    check_finite,
    check_positive,
    check_time,
    check_time_interval,
    coef_time,
)
from jaxdiff.conversions import Target, _check_target
from jaxdiff.paths import GaussianPath

Array = jax.Array

__all__ = [
    "Weight",
    "weight_as",
    "edm_weight",
    "min_snr_weight",
    "v_weight",
    "log_snr_weight",
    "elbo_weight",
    "sigmoid_weight",
    "edm_time",
    "log_snr_weighting",
]


class Weight(eqx.Module):
    """A weighting ``fn(path, t)`` of the squared error of ``units`` (a target: ``"eps"``,
    ``"x0"``, ``"v"``, ``"score"``, ``"velocity"``); a loss on another target converts it."""

    fn: Callable[[GaussianPath, Array], Array] = eqx.field(static=True)
    units: Target = eqx.field(static=True)

    def __check_init__(self):
        _check_target(self.units, "units")

    def __call__(self, path: GaussianPath, t: ArrayLike) -> Array:
        return self.at(path, check_time(coef_time(t)))

    def at(self, path: GaussianPath, t: Array) -> Array:
        """The weight at ``t`` (unchecked), evaluated inside the open interval: at ``t = 0`` or
        ``1`` exactly, where a weight or its conversion is ``0 * inf`` (``-dlambda/dt``,
        ``1 / sigma_t^2``), at the nearest time ``delta`` inside, ``delta`` the machine epsilon
        of ``t``'s dtype (the limit to that precision where it is finite; a large finite weight
        where it is not). A ``t = 0`` drawn by a uniform sampler made the loss NaN, silently."""
        return weight_in(self, path, t, self.units)


def _inside(t: Array) -> Array:
    delta = jnp.finfo(t.dtype).eps
    return jnp.clip(t, delta, 1 - delta)


def _alpha_gain(path: GaussianPath, t: Array, target: str) -> Array:
    """``alpha_t d(target)/d(eps)`` at fixed ``x_t``: the error scales of the targets, times alpha
    (so that ratios stay finite where ``alpha = 0``)."""
    a, s = path.alpha(t), path.sigma(t)
    if target == "eps":
        return a
    if target == "x0":
        return -s
    if target == "score":
        return -a / s
    if target == "v":
        return a * a + s * s
    return a * path.d_sigma(t) - s * path.d_alpha(t)  # velocity


def weight_as(weighting: Callable, path: GaussianPath, t: ArrayLike, regress: Target) -> Array:
    """``weighting``'s weight on the squared error of ``regress`` at ``t``: a :class:`Weight` (or
    any weighting with ``units``) is converted from its units by ``(d units / d regress)^2`` at
    fixed ``x_t``; a plain function is taken as it is (in ``regress``'s units). Every weighting
    is evaluated inside the open interval (see :meth:`Weight.at`: ``g(t)^2`` is infinite at
    ``t = 1`` on the linear path). ``t`` is checked to lie in ``[0, 1]``, eagerly or when a
    jitted call runs."""
    return weight_in(weighting, path, check_time(coef_time(t)), regress)


def weight_in(
    weighting: Callable, path: GaussianPath, t: Array, regress: Target, inside: bool = True
) -> Array:
    """:func:`weight_as` without the check of ``t`` (the losses' times are checked when drawn);
    ``inside=False`` evaluates the weighting at the ends themselves (``inf`` or ``NaN`` where it
    is singular: ``importance_time`` masks them)."""
    _check_target(regress, "regress")  # an unknown name fell through to the velocity's gain
    t = coef_time(t)
    t = _inside(t) if inside else t
    units = getattr(weighting, "units", regress)  # a plain function: in regress's units
    w = weighting.fn(path, t) if isinstance(weighting, Weight) else weighting(path, t)
    if units == regress:
        return w
    ratio = _alpha_gain(path, t, units) / _alpha_gain(path, t, regress)
    return w * jnp.square(ratio)


def edm_weight(sigma_data: float = 0.5) -> Weight:
    """EDM's ``lambda(sigma) = (sigma~^2 + s^2) / (sigma~ s)^2 = 1 / c_out^2`` on the x0 error
    (Karras et al. 2022, Table 1), ``sigma~ = sigma_t / alpha_t``: with :func:`jaxdiff.edm_precond`
    it makes the loss the plain squared error of the raw network ``F``."""
    sd2 = float(check_positive(sigma_data, "sigma_data")) ** 2

    def fn(path, t):  # (sigma^2 + alpha^2 s^2) / (sigma^2 s^2): finite where alpha = 0
        var = path.sigma_sq(t)
        return (var + jnp.square(path.alpha(t)) * sd2) / (var * sd2)

    return Weight(fn, "x0")


def min_snr_weight(gamma: float = 5.0) -> Weight:
    """Min-SNR-gamma: ``min(SNR_t, gamma)`` on the x0 error (Hang et al. 2023); on the eps error
    ``min(1, gamma / SNR)``, on the v error ``min(SNR, gamma) / (SNR + 1)`` (VP paths)."""
    gamma = float(check_positive(gamma, "gamma"))
    return Weight(lambda path, t: jnp.minimum(jnp.exp(path.log_snr(t)), gamma), "x0")


def v_weight() -> Weight:
    """v-prediction's implied weighting (Salimans & Ho 2022): weight 1 on the v error, i.e.
    ``((alpha^2 + sigma^2) / alpha)^2`` on the eps error: ``1 + 1 / SNR`` on eps and ``SNR + 1``
    on x0 for VP paths."""
    return Weight(lambda path, t: jnp.ones_like(t), "v")


def _neg_dlambda(path: GaussianPath, t: Array) -> Array:
    """``-d lambda / dt = g(t)^2 / sigma_t^2`` (from ``g^2 = 2 sigma sigma' - 2 alpha'/alpha sigma^2``)."""
    return path.diffusion_sq(t) / path.sigma_sq(t)


def log_snr_weight(fn: Callable[[Array], Array]) -> Weight:
    """Kingma & Gao (2023)'s weighting ``W(lambda) = fn(lambda)`` for uniform times: the eps error
    weighted by ``-dlambda/dt fn(lambda_t)``, so that ``E_t [w |eps_hat - eps|^2] = int fn(lambda)
    E|eps_hat - eps|^2 d lambda`` over the path's log-SNR range."""
    return Weight(lambda path, t: _neg_dlambda(path, t) * fn(path.log_snr(t)), "eps")


def elbo_weight() -> Weight:
    """The ELBO's weighting ``W = 1`` (Kingma et al. 2021): ``-dlambda/dt = g^2 / sigma^2`` on the
    eps error, i.e. the likelihood weighting ``g^2`` of the score error (Song et al. 2021b)."""
    return log_snr_weight(jnp.ones_like)


def sigmoid_weight(bias: float = 2.0) -> Weight:
    """Kingma & Gao (2023)'s sigmoid weighting ``W(lambda) = sigmoid(bias - lambda)``: a mixture
    of ELBOs of noisy data with the logistic density centred at ``lambda = bias``."""
    bias = float(bias)
    check_finite(bias, "bias")
    return log_snr_weight(lambda lam: jax.nn.sigmoid(bias - lam))


# --- time samplers ----------------------------------------------------------------------------


class _EDMTime(eqx.Module):
    path: GaussianPath
    p_mean: float
    p_std: float
    t_min: float
    t_max: float
    lo: Array  # the truncation of log sigma~ in standard units
    hi: Array
    in_range = True  # t_from_log_snr of a truncated normal: inside [t_min, t_max]

    def _tail(self) -> tuple[Array, Array, Array]:
        """``(flip, a, b)``: the truncation ``[lo, hi]``, mirrored to ``[-hi, -lo]`` when it lies
        above the mean (``lo > 0``), where ``ndtr`` keeps its relative precision
        (``jax.random.truncated_normal`` inverts ``erf``, which rounds to 1 beyond ~4 std:
        ``[6, 7]`` drew 7 every time, and ``ndtr(hi) - ndtr(lo)`` cancels)."""
        flip = self.lo > 0
        return flip, jnp.where(flip, -self.hi, self.lo), jnp.where(flip, -self.lo, self.hi)

    def __call__(self, key: Array, shape: tuple[int, ...]) -> Array:
        flip, a, b = self._tail()
        pa, pb = ndtr(a), ndtr(b)
        u = jax.random.uniform(key, shape, pa.dtype, minval=pa, maxval=pb)
        z = jnp.clip(ndtri(u), a, b)
        z = jnp.where(pb > pa, z, b)  # both ends past float's range: the end nearest the mean
        z = jnp.where(flip, -z, z)
        lam = -2.0 * (self.p_mean + self.p_std * z)
        t = self.path.t_from_log_snr(lam)
        return jnp.clip(t, self.t_min, self.t_max)

    def pdf(self, t: ArrayLike) -> Array:
        """The density of ``t``: the truncated normal of ``log sigma~`` times ``dlog sigma~/dt``
        on ``[t_min, t_max]``, 0 outside."""
        t = coef_time(t)
        inside = (t >= self.t_min) & (t <= self.t_max)
        ts = jnp.where(inside, t, 0.5 * (self.t_min + self.t_max))  # no inf * 0 outside
        z = (-0.5 * self.path.log_snr(ts) - self.p_mean) / self.p_std
        _, a, b = self._tail()
        mass = ndtr(b) - ndtr(a)
        normal = jnp.exp(-0.5 * z * z) / (self.p_std * jnp.sqrt(2 * jnp.pi))
        # a mass that underflows (the interval far in a tail): the ratio in logs
        log_b = log_ndtr(b)
        log_mass = log_b + jnp.log1p(-jnp.exp(log_ndtr(a) - log_b))
        log_normal = -0.5 * z * z - jnp.log(self.p_std * jnp.sqrt(2 * jnp.pi))
        ratio = jnp.where(
            mass > 0, normal / jnp.where(mass > 0, mass, 1.0), jnp.exp(log_normal - log_mass)
        )
        # where log sigma~ is infinite (t = 1 with alpha_1 = 0) the normal density is 0 and
        # -dlambda/dt infinite: the density's limit is 0 (the Gaussian tail wins), not NaN
        live = inside & (ratio > 0)
        return jnp.where(live, ratio * 0.5 * _neg_dlambda(self.path, ts), 0.0)


def edm_time(
    path: GaussianPath,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    t_min: float = 1e-3,
    t_max: float = 1.0,
) -> Callable[[Array, tuple[int, ...]], Array]:
    """EDM's training noise levels on any path: ``log(sigma_t / alpha_t) ~ N(p_mean, p_std^2)``
    (Karras et al. 2022: ``P_mean = -1.2``, ``P_std = 1.2``), i.e. ``lambda_t ~ N(-2 p_mean,
    (2 p_std)^2)``, truncated to ``t`` in ``[t_min, t_max]`` and mapped to ``t`` by
    ``path.t_from_log_snr``. Has ``pdf(t)``, the density of the drawn times."""
    check_positive(p_std, "p_std")
    check_finite(p_mean, "p_mean")
    check_time_interval(t_min, t_max)
    # in the default float: a float32 draw under x64 gave float32-accurate log-SNRs
    bounds = -0.5 * path.log_snr(jnp.asarray([t_min, t_max], jnp.result_type(float)))
    lo, hi = (bounds - p_mean) / p_std
    return _EDMTime(path, float(p_mean), float(p_std), float(t_min), float(t_max), lo, hi)


def log_snr_weighting(
    path: GaussianPath,
    weighting: Callable,
    *,
    regress: Target = "eps",
    time_sampler: Any = None,
) -> Callable[[ArrayLike], Array]:
    """The weighting over log-SNR ``W`` that a loss implies (Kingma & Gao 2023), as a function of ``t``.

    A loss ``E_{t ~ p}[w(t) |err_regress|^2]`` equals ``int W(lambda) E|eps_hat - eps|^2 d lambda``
    with ``W = p(t) w_eps(t) / (-dlambda/dt)`` at ``lambda = lambda_t``; ``W = 1`` is the ELBO.
    ``time_sampler`` needs a ``pdf(t)`` (``uniform_time``, ``logit_normal_time``, ``edm_time``);
    default uniform on ``[0, 1]``. Flow matching on the linear path gives ``W = e^{-lambda/2} /
    2``; v-prediction on the cosine path with ``s = 0`` (``cosine_path(0.0)``) ``e^{-lambda/2} /
    pi`` (the default ``s = 0.008`` is within 0.8% of it for ``t >= 0.1``; -10% at ``t = 0.01``,
    -54% at 1e-3); EDM ``N(lambda; 2.4, 2.4^2)
    (e^{-lambda} + s^2) / s^2``.
    """
    _check_target(regress, "regress")
    pdf = (lambda t: jnp.ones_like(t)) if time_sampler is None else time_sampler.pdf

    def big_w(t: ArrayLike) -> Array:
        t = _inside(check_time(coef_time(t)))
        w_eps = weight_in(weighting, path, t, regress) * jnp.square(
            _alpha_gain(path, t, regress) / path.alpha(t)
        )
        return pdf(t) * w_eps / _neg_dlambda(path, t)

    return big_w
