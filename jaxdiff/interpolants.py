r"""Stochastic interpolants and bridges: ``x_t = a_t x0 + b_t x1 + gamma_t z`` between any two laws.

Albergo, Boffi & Vanden-Eijnden (2023), "Stochastic interpolants: a unifying framework for flows
and diffusions", with ``t = 0`` the data ``x0`` and ``t = 1`` the source ``x1`` (their ``t -> 1 - t``
and ``x0 <-> x1`` relabelled to this package's convention): ``a_0 = b_1 = 1``, ``a_1 = b_0 = 0``,
``gamma_0 = gamma_1 = 0``, ``z ~ N(0, I)`` independent of the pair ``(x0, x1)``, which may come
from any coupling (:mod:`jaxdiff.couplings`). ``brownian_bridge(sigma)`` is ``a = 1 - t``,
``b = t``, ``gamma = sigma sqrt(t (1 - t))``: Tong et al. (2024)'s Schrödinger-bridge CFM when the
pairs come from the entropic OT plan with ``reg = 2 sigma^2``.

Conditional fields, for a pair ``(x0, x1)`` and latent ``z``:

* velocity ``d x_t / dt = a_t' x0 + b_t' x1 + gamma_t' z``; its posterior mean
  ``b(x, t) = E[d x_t / dt | x_t = x]`` transports the marginals (the ODE ``dx = b dt``);
* score ``grad_x log p_t(x | x0, x1) = -(x - a_t x0 - b_t x1) / gamma_t^2 = -z / gamma_t``; the
  marginal score is ``s(x, t) = -E[z | x_t = x] / gamma_t``.

A network predicts ``"velocity"`` (``b``), ``"eps"`` (``E[z | x_t]``, the latent's denoiser) or
``"score"``; ``interpolant_loss`` regresses it on the conditional value. Sampling is
``jd.sample(key, interpolant, b, shape, source=source,
sampler=jd.samplers.interpolant_sde(eps_t, noise=eta))``: the backward SDE ``dx = [b - eps_t s]
dt + sqrt(2 eps_t) dW`` from ``t = 1`` to ``0`` (``eps_t = 0``: the ODE ``dx = b dt``; every
``eps_t >= 0`` keeps the marginals of ``x_t``, Albergo, Boffi & Vanden-Eijnden 2023, Thm 2.8). The
interpolant takes the place of the path: a ``GaussianPath`` is its case ``gamma = 0`` with
Gaussian ``x1``. The forward SDE (data to source, drift ``b + eps_t s``) is ``jd.integrate``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxdiff._checks import (
    check_known_time,
    check_positive,
    coef_time,
    concrete,
    data_dtype,
    error_if,
    expand_like,
    refuse_known_time,
    wide_dtype,
    widen,
)
from jaxdiff._schedule_fns import Affine as _Affine
from jaxdiff.field import Field, as_field
from jaxdiff.losses import TimeSampler, draw_times, importance_weights, uniform_time
from jaxdiff.paths import _call, _derivative
from jaxdiff.sources import draw_pairs, normal_like

Array = jax.Array

__all__ = [
    "StochasticInterpolant",
    "brownian_bridge",
    "linear_interpolant",
    "interpolant_loss",
]


class _BridgeGamma(eqx.Module):
    """``sigma sqrt(t (1 - t))``."""

    sigma: ArrayLike

    def __call__(self, t):
        return self.sigma * jnp.sqrt(jnp.maximum(t * (1.0 - t), 0.0))


class _NoGamma(eqx.Module):
    """``gamma = 0``: a deterministic interpolant (the bridge's ``sqrt`` has a NaN slope at the
    ends, 0 * inf)."""

    def __call__(self, t):
        return jnp.zeros_like(t)


class StochasticInterpolant(eqx.Module):
    """``x_t = a(t) x0 + b(t) x1 + gamma(t) z``; derivatives in ``t`` by ``jax.jvp``.

    >>> import jax.numpy as jnp
    >>> si = brownian_bridge(0.5)
    >>> float(si.gamma(0.5)), float(si.d_b(0.3))
    (0.25, 1.0)
    """

    a_fn: Callable[[Array], Array]
    b_fn: Callable[[Array], Array]
    gamma_fn: Callable[[Array], Array]

    def __check_init__(self):
        ends = np.array([0.0, 1.0])
        try:
            vals = [concrete(_call(f, jnp.asarray(ends), n)) for f, n in self._fns()]
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerBoolConversionError):
            return
        if any(v is None for v in vals):
            return
        a, b, g = vals
        if not np.allclose(a, [1, 0], atol=1e-6) or not np.allclose(b, [0, 1], atol=1e-6):
            raise ValueError(
                f"an interpolant needs a(0) = 1, a(1) = 0, b(0) = 0, b(1) = 1 (t = 0 data, t = 1 "
                f"source); got a = {a.tolist()}, b = {b.tolist()}"
            )
        if not np.allclose(g, 0, atol=1e-6):
            raise ValueError(f"gamma must vanish at t = 0 and 1; got {g.tolist()}")

    def _fns(self):
        return ((self.a_fn, "a_fn"), (self.b_fn, "b_fn"), (self.gamma_fn, "gamma_fn"))

    def a(self, t: ArrayLike) -> Array:
        """``a_t``, the weight of ``x0`` (data at ``t = 0``)."""
        check_known_time(t)
        return _call(self.a_fn, coef_time(t), "a_fn")

    def b(self, t: ArrayLike) -> Array:
        """``b_t``, the weight of ``x1`` (the source at ``t = 1``)."""
        check_known_time(t)
        return _call(self.b_fn, coef_time(t), "b_fn")

    def gamma(self, t: ArrayLike) -> Array:
        """``gamma_t``, the scale of the latent noise ``z`` (0 at both ends)."""
        check_known_time(t)
        return _call(self.gamma_fn, coef_time(t), "gamma_fn")

    def d_a(self, t: ArrayLike) -> Array:
        """``a_t'`` (by forward-mode autodiff of ``a``)."""
        check_known_time(t)  # the derivative traces a: a known t = 1.5 went through
        return _derivative(self.a, coef_time(t))[1]

    def d_b(self, t: ArrayLike) -> Array:
        """``b_t'`` (by forward-mode autodiff of ``b``)."""
        check_known_time(t)  # the derivative traces b: a known t = 1.5 went through
        return _derivative(self.b, coef_time(t))[1]

    def d_gamma(self, t: ArrayLike) -> Array:
        """``gamma'``: infinite at the ends for the Brownian bridge; draw ``t`` inside ``(0, 1)``."""
        check_known_time(t)  # the derivative traces gamma: a known t = 1.5 went through
        return _derivative(self.gamma, coef_time(t))[1]

    def interpolate(self, x0: ArrayLike, x1: ArrayLike, z: ArrayLike, t: ArrayLike) -> Array:
        """``a_t x0 + b_t x1 + gamma_t z``: coefficients in ``max(float32, dtype of t)``, the
        arithmetic in ``max(float32, dtype of the points)``, the result in the points' dtype."""
        check_known_time(t)  # once, not in each of a, b and gamma
        t = coef_time(t)
        out, x0, x1, z = widen(x0, x1, z, out=data_dtype(jnp.result_type(x0, x1, z)))
        c = [expand_like(_call(fn, t, name), x0).astype(x0.dtype) for fn, name in self._fns()]
        return (c[0] * x0 + c[1] * x1 + c[2] * z).astype(out)

    def sample(self, key: Array, x0: ArrayLike, x1: ArrayLike, t: ArrayLike) -> tuple[Array, Array]:
        """Draw ``z ~ N(0, I)`` and return ``(x_t, z)``."""
        z = normal_like(key, jnp.asarray(x0))  # in x0's float dtype, drawn in float32 or wider
        return self.interpolate(x0, x1, z, t), z

    def conditional_velocity(
        self, x0: ArrayLike, x1: ArrayLike, z: ArrayLike, t: ArrayLike
    ) -> Array:
        """``d x_t / dt = a_t' x0 + b_t' x1 + gamma_t' z`` at fixed ``(x0, x1, z)``.

        Where ``gamma_t'`` is infinite (the ends of the bridge) it is an error: a known ``t`` at
        trace time, a traced one when the program runs (never a silent inf or NaN)."""
        return self._velocity(x0, x1, z, t, check=True)

    def _velocity(self, x0: Any, x1: Any, z: Any, t: Any, check: bool) -> Array:
        """The conditional velocity; ``check=False`` skips the run-time check (the loss checks its
        times once)."""
        stochastic = not isinstance(self.gamma_fn, _NoGamma)
        what = "the conditional velocity multiplies z by gamma_t', which is not finite"
        if stochastic:  # the bridge's gamma' is infinite at the ends
            refuse_known_time(t, self.d_gamma, lambda dg: ~np.isfinite(dg), what)
        out, x0, x1, z = widen(x0, x1, z, out=data_dtype(jnp.result_type(x0, x1, z)))
        c = [expand_like(f(t), x0).astype(x0.dtype) for f in (self.d_a, self.d_b, self.d_gamma)]
        value = (c[0] * x0 + c[1] * x1 + c[2] * z).astype(out)
        if stochastic and check and concrete(t) is None:
            value = error_if(value, ~jnp.isfinite(c[2]), f"{what}; take t inside (0, 1)")
        return value

    def conditional_score(self, x: ArrayLike, x0: ArrayLike, x1: ArrayLike, t: ArrayLike) -> Array:
        """``grad_x log N(x; a_t x0 + b_t x1, gamma_t^2 I) = -(x - a_t x0 - b_t x1) / gamma_t^2``.

        Where ``gamma_t = 0`` (the ends) it is an error: a known ``t`` at trace time, a traced
        one when the program runs."""
        if isinstance(self.gamma_fn, _NoGamma):
            raise ValueError("a deterministic interpolant (gamma = 0) has no conditional score")
        what = "the conditional score divides by gamma_t^2, which is 0"
        refuse_known_time(t, self.gamma, lambda g: g == 0, what)  # gave NaN or inf silently
        out, x, x0, x1 = widen(x, x0, x1, out=data_dtype(jnp.result_type(x, x0, x1)))
        mean = self.interpolate(x0, x1, jnp.zeros_like(x), t)
        var = expand_like(jnp.square(self.gamma(t)), x).astype(x.dtype)
        diff = x - mean
        value = (-diff / var).astype(out)  # checked in the output's dtype (float16 overflows)
        small = (var == 0) | (~jnp.isfinite(value) & jnp.isfinite(diff))  # 0, or overflowing
        message = f"{what} or so small that the score overflows; take t inside (0, 1)"
        return error_if(value, small, message)


def brownian_bridge(sigma: ArrayLike = 1.0) -> StochasticInterpolant:
    """``x_t = (1 - t) x0 + t x1 + sigma sqrt(t (1 - t)) z`` (Tong et al. 2024, SB-CFM)."""
    s = concrete(sigma)
    if s is not None and not (np.all(np.isfinite(s)) and np.all(s >= 0)):
        raise ValueError(f"sigma must be >= 0; got {s.tolist()}")
    if s is None:  # traced: checked when the program runs (NaN or -1 went through)
        sigma = check_positive(sigma, "sigma", strict=False)
    gamma = _NoGamma() if s is not None and np.all(s == 0) else _BridgeGamma(sigma)
    return StochasticInterpolant(_Affine(1.0, -1.0), _Affine(0.0, 1.0), gamma)


def linear_interpolant() -> StochasticInterpolant:
    """``x_t = (1 - t) x0 + t x1``: rectified flow between any two laws (no latent noise)."""
    return brownian_bridge(0.0)


# --- training ----------------------------------------------------------------------------------


def interpolant_loss(
    net: Field,
    interpolant: StochasticInterpolant,
    *,
    time_sampler: TimeSampler | None = None,
    source: Any = None,
    coupling: Any = None,
) -> Callable[[Any, Array, Any], Array]:
    """``(params, key, batch) -> scalar``: regress ``net`` on the interpolant's conditional field.

    ``net.target``: ``"velocity"``, ``|b_hat - (a' x0 + b' x1 + gamma' z)|^2`` (Albergo, Boffi &
    Vanden-Eijnden 2023, eq. 2.13; Tong et al. 2024); ``"eps"``, ``|eta_hat - z|^2`` (the latent's
    denoiser, eq. 2.18; the score is ``-eta / gamma_t``); ``"score"``, ``|gamma_t s_hat + z|^2``
    (the score loss weighted by ``gamma_t^2``). Batches, ``source`` and ``coupling`` as in
    :func:`jaxdiff.diffusion_loss` (``x0``, ``(x0, labels)`` or a dict with ``x1``). ``t`` defaults
    to ``U[1e-3, 1 - 1e-3]`` (``gamma'`` is infinite at the ends of the bridge): a sampler that
    reaches an end there is refused, where its range is known (``uniform_time(0, 1)``: ``t = 0``
    once in 2^23 draws gave an inf loss), and checked at run time otherwise; an
    :func:`~jaxdiff.importance_time` sampler's draws are reweighted by its ``correction(t)``
    (the uniform-time loss, unbiased).
    """
    net = as_field(net, "net")
    if net.target not in ("velocity", "eps", "score"):
        raise ValueError(
            f"an interpolant network predicts 'velocity', 'eps' (E[z | x_t]) or 'score'; got "
            f"{net.target!r}"
        )
    target = net.target
    stochastic = not isinstance(interpolant.gamma_fn, _NoGamma)
    if not stochastic and target != "velocity":  # z does not enter x_t: the loss is E|z|^2
        raise ValueError(
            f"target {target!r} regresses the latent z, but a deterministic interpolant (gamma = "
            "0) has none in x_t (the loss would not depend on the network); use 'velocity', or "
            "brownian_bridge(sigma > 0)"
        )
    time_sampler = uniform_time(1e-3, 1.0 - 1e-3) if time_sampler is None else time_sampler
    ends = [getattr(time_sampler, name, None) for name in ("t_min", "t_max")]
    known = stochastic and target == "velocity" and all(isinstance(e, float) for e in ends)
    if known:  # uniform_time, logit_normal_time, importance_time: their range, at build time
        refuse_known_time(
            np.asarray(ends, np.float32),
            interpolant.d_gamma,
            lambda dg: ~np.isfinite(dg),
            f"the velocity target multiplies z by gamma_t', which is not finite where the "
            f"time_sampler's range [{ends[0]}, {ends[1]}] ends",
        )
    check_ends = stochastic and target == "velocity" and not known

    def loss(params: Any, key: Array, batch: Any) -> Array:
        pair_key, t_key, z_key = jax.random.split(key, 3)
        x0, x1, labels = draw_pairs(pair_key, batch, source, coupling)
        # times in float32 or wider, whatever x0's dtype: cast to bfloat16, 1 - 1e-3 rounded to 1,
        # where the bridge's gamma' is infinite (an inf loss)
        t = draw_times(time_sampler, t_key, x0.shape[0])
        if check_ends:  # a sampler of unknown range: gamma' at its draws, at run time
            t = error_if(
                t,
                ~jnp.isfinite(interpolant.d_gamma(t)),
                "the time_sampler drew a t where the interpolant's gamma_t' is not finite (the "
                "ends of the bridge): the velocity target would be inf; draw t inside (0, 1)",
            )
        x_t, z = interpolant.sample(z_key, x0, x1, t)
        args = () if labels is None else (labels,)
        pred = net.apply(params, x_t, t, *args)
        wide = wide_dtype(data_dtype(jnp.result_type(pred, x0)))  # the error in float32 or wider
        pred, x0, x1, z = (a.astype(wide) for a in (pred, x0, x1, z))
        if target == "velocity":
            err = pred - interpolant._velocity(x0, x1, z, t, check=False)  # t checked
        elif target == "eps":
            err = pred - z
        else:
            err = expand_like(interpolant.gamma(t), x0) * pred + z
        per_example = jnp.mean(jnp.square(err).reshape(err.shape[0], -1), axis=1)
        return jnp.mean(per_example * importance_weights(time_sampler, t))

    return loss
