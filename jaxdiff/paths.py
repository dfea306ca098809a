r"""Gaussian probability paths and their forward SDEs.

A path is two scalar functions of time, ``x_t = alpha(t) x0 + sigma(t) eps`` with ``eps ~ N(0, I)``,
so ``p_t(x | x0) = N(alpha_t x0, sigma_t^2 I)``. Time runs from data (``t = 0``) to the prior
(``t = 1``), as in Song et al. (2021) and score_sde. Code written with ``t = 0`` as noise (Lipman et
al. 2023, Meta's ``flow_matching``, the MIT course notes) maps by ``t -> 1 - t``, and its velocity
by ``u -> -u``.

Every path is also a forward SDE ``dx = f(t) x dt + g(t) dw`` whose marginals are the path's:
``f = d log(alpha)/dt`` and ``g^2 = d(sigma^2)/dt - 2 f sigma^2`` (Kingma et al. 2021; Song et al.
2021, App. B). Time derivatives come from ``jax.jvp``, so a new schedule is two lines::

    path = GaussianPath(lambda t: jnp.cos(0.5 * jnp.pi * t), lambda t: jnp.sin(0.5 * jnp.pi * t))

The constructors ``vp_path``, ``subvp_path``, ``ve_path``, ``linear_path`` and ``cosine_path`` return
paths whose hyperparameters are pytree leaves (you can ``jit``, ``vmap`` and ``grad`` through them);
they check them once, when the path is built (a Python error, or under ``jit`` an ``error_if``).

Precision policy: schedules and time arithmetic run in float32 or wider whatever the data's dtype
-- ``t`` and the coefficients ``alpha_t``, ``sigma_t``, ... have dtype ``max(float32, dtype of t)``
and never take ``x``'s -- and the state keeps the user's dtype: outputs shaped like ``x`` (samples,
targets, conversions) are computed in ``max(float32, dtype of x)`` and returned in ``x``'s dtype
(integers become the default float). So a bfloat16 batch at ``t = 1e-3`` gets the float32
``sigma_t = 0.0105``, not bfloat16's 0. The built-in schedules compute ``sigma_t`` without
cancellation (``-expm1(2 log alpha_t)`` for VP, a product of sines for cosine): relative error a
few float32 ulps from ``t = 1e-7`` to ``1 - 1e-3`` (tests/test_precision.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxdiff._checks import (
    check_known_time,
    check_order,
    check_positive,
    check_time,
    coef_time,
    concrete,
    data_dtype,
    expand_like,
    normal,
    normal_like,
    refuse_known_time,
    safe_sqrt,
    widen,
)
from jaxdiff._schedule_fns import Affine, CosineAlpha, Geometric, LinearBetaAlpha, OneMinusSquare

Array = jax.Array
ScalarFn = Callable[[Array], Array]

__all__ = [
    "GaussianPath",
    "vp_path",
    "subvp_path",
    "ve_path",
    "linear_path",
    "cosine_path",
]


def _call(fn: ScalarFn, t: Array, name: str) -> Array:
    """``fn(t)`` broadcast to ``t``'s shape (a constant such as ``lambda t: 1.0`` is fine)."""
    out = jnp.asarray(fn(t))
    if out.shape == t.shape:
        return out
    try:
        return jnp.broadcast_to(out, t.shape)
    except ValueError:
        raise ValueError(
            f"{name} must map times of shape {t.shape} to an array of that shape (or a scalar); "
            f"got shape {out.shape}"
        ) from None


def _time(t: ArrayLike) -> Array:
    """``coef_time(t)`` after :func:`check_known_time`."""
    check_known_time(t)
    return coef_time(t)


def _derivative(fn: ScalarFn, t: Array) -> tuple[Array, Array]:
    """Value and elementwise time derivative of ``fn`` at ``t`` by forward-mode AD."""
    return jax.jvp(fn, (t,), (jnp.ones_like(t),))


_ENDPOINT_ULPS = 8  # alpha_1, sigma_0 within 8 ulps below 0 are rounding (cos(f32(pi/2)) = -4.4e-8)


def _endpoint_tol(dtype) -> float:
    return _ENDPOINT_ULPS * float(jnp.finfo(dtype).eps)


def _clamp_rounding(value: Array) -> Array:
    """Set values in ``[-tol, 0)`` to 0 (``tol`` = 8 ulps of 1); derivatives pass through."""
    if not jnp.issubdtype(value.dtype, jnp.inexact):
        return value
    tiny = (value < 0) & (value >= -_endpoint_tol(value.dtype))
    return value - jax.lax.stop_gradient(jnp.where(tiny, value, jnp.zeros_like(value)))


@eqx.filter_jit
def _bisect_log_snr(path: GaussianPath, lam: Array, iters: int) -> Array:
    """``t`` with ``path.log_snr(t) = lam`` by ``iters`` bisection steps on ``[0, 1]``.

    One compiled program per path structure, grid shape and ``iters`` (``filter_jit``: the
    path's Python numbers stay constants): the grids call this eagerly, where a fresh
    ``fori_loop`` would compile anew on every call."""
    lo, hi = jnp.zeros_like(lam), jnp.ones_like(lam)

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        above = path.log_snr(mid) > lam  # lambda decreases: the root lies later
        return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iters, body, (lo, hi))
    t = jax.lax.stop_gradient(0.5 * (lo + hi))
    # Bisection has zero derivative: the root's comes from the implicit function theorem,
    # lambda(t; theta) = lam  =>  dt = (dlam - d_theta lambda) / lambda'(t), added as a
    # zero-valued term (t itself is unchanged); ends where lambda or its slope is infinite get 0,
    # and so does a lam outside the path's range, clamped to t = 0 or 1 (a constant there)
    lam_t, slope = jax.jvp(path.log_snr, (t,), (jnp.ones_like(t),))
    slope = jax.lax.stop_gradient(slope)
    first, last = jax.lax.stop_gradient(path.log_snr(jnp.array([0.0, 1.0], t.dtype)))
    # a lam at or beyond an end's log-SNR is that end exactly (bisection stopped 4e-19 short)
    t = jnp.where(lam >= first, 0.0, jnp.where(lam <= last, 1.0, t)).astype(t.dtype)
    ok = jnp.isfinite(lam) & jnp.isfinite(lam_t) & jnp.isfinite(slope) & (slope != 0)
    ok = ok & (lam < first) & (lam > last)
    step = (jnp.where(ok, lam, 0.0) - jnp.where(ok, lam_t, 0.0)) / jnp.where(ok, slope, 1.0)
    return t + (step - jax.lax.stop_gradient(step)).astype(t.dtype)


def _safe_log(value: Array) -> Array:
    """``log(value)``, ``-inf`` at 0 with a zero derivative there (not ``inf * 0 = NaN``)."""
    zero = value == 0
    return jnp.where(zero, -jnp.inf, jnp.log(jnp.where(zero, 1.0, value)))


def _scale(coef: Array, x: Array) -> Array:
    """``coef`` (shaped like ``t``) padded to broadcast against ``x``, in ``x``'s dtype."""
    return expand_like(coef, x).astype(x.dtype)


class GaussianPath(eqx.Module):
    r"""The affine Gaussian path ``x_t = alpha(t) x0 + sigma(t) eps`` and its forward SDE.

    ``alpha_fn`` and ``sigma_fn`` map an array of times to an array of the same shape. Leave
    ``sigma_fn`` as ``None`` for a variance-preserving path, ``sigma = sqrt(1 - alpha^2)``; its
    ``g^2 = -2 d log(alpha)/dt`` is then computed without the ``0 * inf`` of ``sigma'`` at ``t = 0``.
    Near ``t = 0``, where ``alpha`` rounds to 1, ``1 - alpha^2`` cancels: an ``alpha_fn`` with a
    method ``one_minus_square(t)`` returning ``1 - alpha_t^2`` computed without cancellation (the
    built-in VP and cosine schedules have one) gives ``sigma`` to a few ulps there.

    Methods take ``t`` as a scalar or with a shape that broadcasts to a prefix of ``x``'s shape, and
    follow the module's precision policy. ``alpha_1`` and ``sigma_0`` that round to within 8 ulps
    below 0 (a float32 ``cos(pi/2)``) are read as 0.

    >>> import jax.numpy as jnp
    >>> path = GaussianPath(lambda t: 1 - t, lambda t: t)  # the linear (rectified-flow) path
    >>> float(path.alpha(0.25)), float(path.d_sigma(0.25))
    (0.75, 1.0)
    """

    alpha_fn: ScalarFn
    sigma_fn: ScalarFn | None = None

    def __check_init__(self):
        _validate_path(self)

    # --- schedule -------------------------------------------------------------------------
    def alpha(self, t: ArrayLike) -> Array:
        """Signal scale ``alpha_t``."""
        t = _time(t)
        return _clamp_rounding(_call(self.alpha_fn, t, "alpha_fn"))

    def sigma_sq(self, t: ArrayLike) -> Array:
        """Noise variance ``sigma_t^2``."""
        t = _time(t)
        if self.sigma_fn is None:
            complement = getattr(self.alpha_fn, "one_minus_square", None)
            if complement is not None:
                return _call(complement, t, "alpha_fn.one_minus_square")
            a = self.alpha(t)
            return (1.0 - a) * (1.0 + a)
        return jnp.square(self.sigma(t))

    def sigma(self, t: ArrayLike) -> Array:
        """Noise scale ``sigma_t``."""
        t = _time(t)
        if self.sigma_fn is None:
            return safe_sqrt(self.sigma_sq(t))  # sigma_0 = 0: a finite derivative in the parameters
        return _clamp_rounding(_call(self.sigma_fn, t, "sigma_fn"))

    def d_alpha(self, t: ArrayLike) -> Array:
        """``d alpha / dt`` by ``jax.jvp``."""
        return _derivative(self.alpha, _time(t))[1]

    def d_sigma(self, t: ArrayLike) -> Array:
        """``d sigma / dt`` by ``jax.jvp`` (for a VP path, ``-alpha alpha' / sigma``)."""
        t = _time(t)
        if self.sigma_fn is None:
            a, da = _derivative(self.alpha, t)
            return -a * da / self.sigma(t)
        return _derivative(self.sigma, t)[1]

    def log_snr(self, t: ArrayLike) -> Array:
        """``lambda_t = log(alpha_t^2 / sigma_t^2)``, decreasing in ``t``."""
        t = _time(t)
        a, var = self.alpha(t), self.sigma_sq(t)
        # alpha_1 = 0 or sigma_0^2 = 0 whatever the parameters: lambda = -inf or +inf there, with a
        # zero derivative in them (log's infinite slope times 0 was NaN in every gradient)
        return 2.0 * _safe_log(a) - _safe_log(var)

    def t_from_log_snr(self, log_snr: ArrayLike, *, iters: int = 60) -> Array:
        """Inverse of ``log_snr`` on ``[0, 1]`` by bisection (any monotone path, any shape)."""
        value = concrete(log_snr)
        if value is not None and np.any(np.isnan(value)):  # bisection read NaN as t = 0
            raise ValueError(f"log_snr must not be NaN; got {np.ravel(value)[:4].tolist()}")
        lam = jnp.asarray(log_snr, dtype=jnp.result_type(float))
        t = _bisect_log_snr(self, lam, iters)
        return jnp.where(jnp.isnan(lam), jnp.nan, t)  # traced: NaN stays NaN, not t = 0

    # --- conditional path -----------------------------------------------------------------
    def marginal(self, x0: ArrayLike, t: ArrayLike) -> tuple[Array, Array]:
        """Mean ``alpha_t x0`` and std ``sigma_t`` of ``p_t(x | x0)`` (std shaped like ``t``)."""
        t = _time(t)
        out, x0 = widen(x0)
        return (_scale(self.alpha(t), x0) * x0).astype(out), self.sigma(t)

    def sample(self, key: Array, x0: ArrayLike, t: ArrayLike) -> tuple[Array, Array]:
        """Draw ``x_t = alpha_t x0 + sigma_t eps``; returns ``(x_t, eps)``.

        >>> import jax, jax.numpy as jnp
        >>> xt, eps = linear_path().sample(jax.random.key(0), jnp.zeros((4, 2)), 1.0)
        >>> bool(jnp.allclose(xt, eps))
        True
        """
        t = check_time(t)
        eps = normal_like(key, x0)  # half precision: drawn in float32, rounded once
        return self.interpolate(x0, eps, t), eps

    def interpolate(self, x0: ArrayLike, eps: ArrayLike, t: ArrayLike) -> Array:
        """``alpha_t x0 + sigma_t eps`` (in the promoted dtype of ``x0`` and ``eps``)."""
        t = _time(t)
        out, x0, eps = widen(x0, eps, out=data_dtype(jnp.result_type(x0, eps)))
        return (_scale(self.alpha(t), x0) * x0 + _scale(self.sigma(t), eps) * eps).astype(out)

    def conditional_velocity(self, x: ArrayLike, x0: ArrayLike, t: ArrayLike) -> Array:
        """``u_t(x | x0) = alpha_t' x0 + sigma_t' (x - alpha_t x0) / sigma_t`` (Lipman et al. 2023).

        It points from data towards noise (``t`` increasing); with ``t = 0`` as noise it is ``-u``.
        """
        self._refuse_known_zero_sigma(t, "the conditional velocity")
        t = _time(t)
        out, x, x0 = widen(x, x0)
        a, s = _scale(self.alpha(t), x), _scale(self.sigma(t), x)
        da, ds = _scale(self.d_alpha(t), x), _scale(self.d_sigma(t), x)
        return (da * x0 + ds * (x - a * x0) / s).astype(out)

    def conditional_score(self, x: ArrayLike, x0: ArrayLike, t: ArrayLike) -> Array:
        """``grad_x log p_t(x | x0) = -(x - alpha_t x0) / sigma_t^2``."""
        self._refuse_known_zero_sigma(t, "the conditional score")
        t = _time(t)
        out, x, x0 = widen(x, x0)
        return (-(x - _scale(self.alpha(t), x) * x0) / _scale(self.sigma_sq(t), x)).astype(out)

    def _refuse_known_zero_sigma(self, t: ArrayLike, what: str) -> None:
        """A ``t`` known at trace time where ``sigma_t = 0`` (``t = 0``): NaN or ``-inf`` came
        back silently, where ``convert`` names the same division."""
        refuse_known_time(
            t, lambda tc: self.sigma(coef_time(tc)), lambda s: s == 0,
            f"{what} divides by sigma_t, which is 0",
        )  # fmt: skip

    # --- forward SDE ----------------------------------------------------------------------
    def drift_coef(self, t: ArrayLike) -> Array:
        """``f(t) = d log(alpha_t) / dt``: the forward SDE's drift is ``f(t) x``."""
        t = _time(t)
        a, da = _derivative(self.alpha, t)
        return da / a

    def diffusion_sq(self, t: ArrayLike) -> Array:
        """``g(t)^2 = d(sigma_t^2)/dt - 2 f(t) sigma_t^2``."""
        t = _time(t)
        f = self.drift_coef(t)
        if self.sigma_fn is None:  # d(1 - alpha^2)/dt - 2 f (1 - alpha^2) = -2 f
            return -2.0 * f
        _, dvar = _derivative(self.sigma_sq, t)
        return jnp.maximum(dvar - 2.0 * f * self.sigma_sq(t), 0.0)

    def diffusion(self, t: ArrayLike) -> Array:
        """``g(t)``."""
        return safe_sqrt(self.diffusion_sq(t))  # g^2 = 0 (sub-VP at 0): a finite gradient

    def drift(self, x: ArrayLike, t: ArrayLike) -> Array:
        """Forward drift ``f(t) x``."""
        out, x = widen(x)
        return (_scale(self.drift_coef(t), x) * x).astype(out)

    def transition(self, x_s: ArrayLike, s: ArrayLike, t: ArrayLike) -> tuple[Array, Array]:
        """Mean and std of the SDE's kernel ``p(x_t | x_s)`` for ``s <= t``.

        ``mean = (alpha_t / alpha_s) x_s``, ``var = sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2``.
        From ``s = 0`` it is the path itself when ``sigma_0 = 0`` (VP, sub-VP, linear, cosine);
        for VE, whose ``sigma_0 = sigma_min > 0``, the variance is ``sigma_t^2 - sigma_min^2``.
        """
        s, t = _time(s), _time(t)
        s, t = check_order(s, t, "s", "t", strict=False)  # the kernel runs forward in time
        out, x_s = widen(x_s)
        # s = t: the identity kernel (s = t = 1 on a path with alpha_1 = 0 gave 0 / 0 = NaN)
        same = s == t
        ratio = jnp.where(same, 1.0, self.alpha(t) / jnp.where(same, 1.0, self.alpha(s)))
        var = self.sigma_sq(t) - ratio**2 * self.sigma_sq(s)
        return (_scale(ratio, x_s) * x_s).astype(out), safe_sqrt(var)

    def prior_sample(self, key: Array, shape: tuple[int, ...], dtype: Any = None) -> Array:
        """Sample the prior ``N(0, sigma_1^2 I)`` at ``t = 1``, in ``dtype`` (default float)."""
        dtype = dtype or jnp.result_type(float)
        _, noise = widen(normal(key, shape, dtype))
        return (self.sigma(jnp.ones(())).astype(noise.dtype) * noise).astype(dtype)

    def prior_logp(self, x: ArrayLike, event_ndim: int = 1, t: ArrayLike = 1.0) -> Array:
        """Log-density of ``N(0, sigma_t^2 I)`` (default ``t = 1``: the prior), summed over the
        last ``event_ndim`` axes; ``t`` a scalar or one time per sample (the leading axes).

        A reduction, so it accumulates and returns in ``max(float32, dtype of x)``."""
        _, x = widen(x)
        if not 0 <= int(event_ndim) <= x.ndim:
            raise ValueError(f"event_ndim must lie in [0, x.ndim = {x.ndim}]; got {event_ndim}")
        t = jnp.asarray(t, x.dtype)
        batch = x.shape[: x.ndim - event_ndim]
        if t.shape != batch[: t.ndim]:  # per-sample t along the batch's leading axes
            raise ValueError(f"t has shape {t.shape}; expected a scalar or the batch's {batch}")
        var = self.sigma_sq(t).astype(x.dtype)
        known = concrete(var)
        if known is not None and np.any(known <= 0):  # a density at sigma_t = 0 is NaN
            raise ValueError(
                f"prior_logp needs sigma_t > 0; got sigma_t = 0 at t = {np.ravel(concrete(t))[:4].tolist()}"
            )
        var = var.reshape(t.shape + (1,) * (len(batch) - t.ndim))  # broadcast on the leading axes
        axes = tuple(range(x.ndim - event_ndim, x.ndim))
        d = math.prod(x.shape[x.ndim - event_ndim :])
        return -0.5 * jnp.sum(x**2, axis=axes) / var - 0.5 * d * jnp.log(2 * jnp.pi * var)


def _validate_path(path: GaussianPath) -> None:
    """Check a path on a grid of concrete times: finite, ``alpha > 0`` before 1, ``sigma > 0`` after 0.

    ``alpha_1`` and ``sigma_0`` may round to within 8 ulps below 0 (read as 0 by the methods)."""
    t = coef_time(np.linspace(0.0, 1.0, 33))
    try:
        a = concrete(_call(path.alpha_fn, t, "alpha_fn"))
        raw_s = path.sigma(t) if path.sigma_fn is None else _call(path.sigma_fn, t, "sigma_fn")
        s = concrete(raw_s)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerBoolConversionError):
        return
    if a is None or s is None:
        return
    grid = np.asarray(t)
    for name, v in (("alpha", a), ("sigma", s)):
        if not np.all(np.isfinite(v)):
            raise ValueError(
                f"the path's {name}(t) must be finite on [0, 1]; it is not at t = "
                f"{grid[~np.isfinite(v)][:4].tolist()}"
            )
    tol_a, tol_s = _tolerance(a), _tolerance(s)
    # an alpha that is 0 before t = 1 is most often float underflow (vp_path: alpha_1 =
    # exp(-(beta_min + beta_max) / 4) is 0 in float32 beyond beta_min + beta_max ~ 410)
    underflow = f" ({a.dtype} underflow?)" if np.any(a[:-1] == 0) else ""
    if np.any(a[:-1] <= 0) or a[-1] < -tol_a:
        raise ValueError(
            f"alpha(t) must be > 0 on [0, 1) and >= 0 at 1 (to within {tol_a:.1e}, "
            f"{_ENDPOINT_ULPS} ulps); got min {a.min()}, <= 0 from t = "
            f"{grid[:-1][a[:-1] <= 0][:1].tolist() or [1.0]}{underflow}"
        )
    if np.any(s[1:] <= 0) or s[0] < -tol_s:
        raise ValueError(
            f"sigma(t) must be > 0 on (0, 1] and >= 0 at 0 (to within {tol_s:.1e}, "
            f"{_ENDPOINT_ULPS} ulps); got min {s.min()} at t = {grid[np.argmin(s)]}"
        )
    with np.errstate(divide="ignore"):  # the ends: log 0
        lam = 2.0 * (np.log(np.abs(a)) - np.log(np.abs(s)))
    rise = np.diff(lam)
    both = np.isfinite(lam[1:]) & np.isfinite(lam[:-1])
    bad = both & (rise > 1e-4 * (1.0 + np.abs(lam[1:])))
    if np.any(bad):  # then g(t)^2 = -sigma_t^2 d(lambda)/dt < 0: no forward SDE
        raise ValueError(
            "the path's log-SNR log(alpha_t^2 / sigma_t^2) must not rise with t (then g(t)^2 = "
            "d(sigma_t^2)/dt - 2 f(t) sigma_t^2 >= 0 and the forward SDE exists; the methods "
            "read a negative g^2 as 0, and t_from_log_snr needs one root); it rises after t = "
            f"{np.asarray(t)[:-1][bad][:4].tolist()}"
        )


def _tolerance(values: np.ndarray) -> float:
    return _endpoint_tol(values.dtype) if np.issubdtype(values.dtype, np.inexact) else 0.0


# --- built-in schedules (their functions are in _schedule_fns; hyperparameters are leaves) ----
# Each constructor checks its hyperparameters once: a ValueError when they are concrete, else an
# error_if tied to the leaves it stores, so the check fires under jit and cannot be dropped.


def _check_betas(beta_min: ArrayLike, beta_max: ArrayLike):
    beta_min = check_positive(beta_min, "beta_min", strict=False)
    beta_max = check_positive(beta_max, "beta_max", strict=False)  # inf: named
    return check_order(beta_min, beta_max, "beta_min", "beta_max", strict=False)


def vp_path(beta_min: ArrayLike = 0.1, beta_max: ArrayLike = 20.0) -> GaussianPath:
    """Variance-preserving path of the VP SDE / DDPM (Ho et al. 2020; Song et al. 2021).

    ``dx = -beta(t)/2 x dt + sqrt(beta(t)) dw`` with ``beta(t) = beta_min + t (beta_max - beta_min)``;
    ``alpha_t = exp(-int_0^t beta / 2)``, ``sigma_t = sqrt(-expm1(2 log alpha_t))``. DDPM's 1000
    linear betas from 1e-4 to 0.02 are this path with the defaults, ``beta_i ~ beta(i / 1000) / 1000``.

    >>> path = vp_path()
    >>> float(path.diffusion_sq(0.5))  # beta(0.5)
    10.05...
    """
    return GaussianPath(LinearBetaAlpha(*_check_betas(beta_min, beta_max)))


def subvp_path(beta_min: ArrayLike = 0.1, beta_max: ArrayLike = 20.0) -> GaussianPath:
    """Sub-VP path (Song et al. 2021): ``alpha_t`` of VP and ``sigma_t = 1 - alpha_t^2``.

    Its SDE is ``dx = -beta/2 x dt + sqrt(beta (1 - alpha_t^4)) dw``, with variance below VP's.
    """
    alpha = LinearBetaAlpha(*_check_betas(beta_min, beta_max))
    return GaussianPath(alpha, OneMinusSquare(alpha))


def ve_path(sigma_min: ArrayLike = 0.01, sigma_max: ArrayLike = 50.0) -> GaussianPath:
    """Variance-exploding path of SMLD / the VE SDE (Song & Ermon 2019; Song et al. 2021).

    ``alpha_t = 1``, ``sigma_t = sigma_min (sigma_max / sigma_min)^t``; the SDE is
    ``dx = sigma_t sqrt(2 log(sigma_max / sigma_min)) dw``. Note ``sigma_0 = sigma_min > 0``.
    """
    sigma_min = check_positive(sigma_min, "sigma_min")
    sigma_max = check_positive(sigma_max, "sigma_max")  # inf: named, not "sigma(t) not finite"
    sigma_min, sigma_max = check_order(sigma_min, sigma_max, "sigma_min", "sigma_max")
    return GaussianPath(Affine(1.0, 0.0), Geometric(sigma_min, sigma_max))


def linear_path(sigma_min: ArrayLike = 0.0) -> GaussianPath:
    """Linear path of flow matching / rectified flow: ``alpha_t = 1 - t``, ``sigma_t = s + (1 - s) t``.

    Lipman et al. (2023)'s conditional-OT path with ``s = sigma_min``, and Liu et al. (2023)'s
    rectified flow with ``s = 0``. Their time ``tau`` is ``1 - t`` here, their velocity ``-u``.
    """
    sigma_min = check_positive(sigma_min, "sigma_min", strict=False)
    sigma_min, _ = check_order(sigma_min, 1.0, "sigma_min", "1")
    return GaussianPath(Affine(1.0, -1.0), Affine(sigma_min, 1.0 - sigma_min))


def cosine_path(s: ArrayLike = 0.008) -> GaussianPath:
    """Cosine VP path (Nichol & Dhariwal 2021): ``alpha_t = cos(pi/2 (t+s)/(1+s)) / cos(pi/2 s/(1+s))``.

    Computed as ``sin(pi/2 (1-t)/(1+s)) / cos(pi/2 s/(1+s))`` (exactly 0 at ``t = 1``) with
    ``1 - alpha_t^2`` as a product of sines (exact near ``t = 0``). With ``s = 0`` it is the
    trigonometric path ``alpha = cos(pi t / 2)``, ``sigma = sin(pi t / 2)``.
    """
    return GaussianPath(CosineAlpha(check_positive(s, "s", strict=False)))
