r"""Field transforms: classifier-free guidance (Ho & Salimans 2022), classifier guidance (Dhariwal &
Nichol 2021), and clipping / dynamic thresholding of the data estimate (Ho et al. 2020; Saharia
et al. 2022). Each takes a :class:`~jaxdiff.Field` and returns one, so it works with every sampler,
likelihood and ELBO.

Every target is affine in the prediction at fixed ``(x, t)`` (``jaxdiff.conversions``), so a
combination whose weights sum to one means the same thing for ``eps``, ``x0``, ``score``, ``v`` and
``velocity``: guidance works for any target.

Conventions for the classifier-free weight. We use ``scale`` with
``guided = u + scale (c - u) = (1 - scale) u + scale c`` (``c`` conditional, ``u`` unconditional;
``scale = 1`` is plain conditional sampling, as in diffusers' ``guidance_scale``). Ho & Salimans
write ``(1 + w) c - w u``: their ``w`` is ``scale - 1``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxdiff._checks import (
    as_time,
    check_finite,
    check_positive,
    check_same_shape,
    coef_time,
    error_if,
    expand_like,
    widen,
)
from jaxdiff.conversions import _add_to_score, _alpha_times_slope, convert, to_x0_eps
from jaxdiff.field import Field, as_field
from jaxdiff.paths import GaussianPath

Array = jax.Array

__all__ = [
    "classifier_free_guidance",
    "autoguidance",
    "classifier_guidance",
    "clip_x0",
    "dynamic_thresholding",
]


def _cfg(params: Any, x: ArrayLike, t: ArrayLike, *more: Any) -> Array:
    """``more``: the field's other arguments before the labels (``r`` of the ``meanflow()``
    sampler's ``field(x, t, r)``), passed through."""
    field, labels, null, scale, interval = params
    x = jnp.asarray(x)
    n = x.shape[0]
    if labels.ndim == 0:  # one label for the whole batch ("sample class 7")
        labels, null = jnp.broadcast_to(labels, (n,)), jnp.broadcast_to(null, (n,))
    if labels.shape[:1] != (n,):
        raise ValueError(f"labels have shape {labels.shape}; expected ({n}, ...) to match x")

    def doubled(a):  # a time of shape (1,) broadcasts to the n rows, not to 2 of the 2n
        a = jnp.broadcast_to(a, (n, *jnp.shape(a)[1:])) if jnp.shape(a)[:1] == (1,) else a
        return jnp.concatenate([a, a], axis=0)

    def guided(inside=None):
        twice = [doubled(a) if jnp.ndim(a) else a for a in (t, *more)]
        out = field(jnp.concatenate([x, x], axis=0), *twice, jnp.concatenate([labels, null], 0))
        c, u = out[:n], out[n:]
        check_same_shape(c, x, "the conditional prediction")
        # in float32 or wider: a bfloat16 scale of 1.3 was 1.296875
        dtype, cw, uw = widen(c, u, out=jnp.result_type(c, u, x.dtype))
        g = (uw + expand_like(jnp.asarray(scale, cw.dtype), x) * (cw - uw)).astype(dtype)
        return g if inside is None else jnp.where(expand_like(inside, x), g, c)

    if interval is None:
        return guided()
    t_arr = as_time(t)
    inside = (t_arr >= interval[0]) & (t_arr <= interval[1])

    def conditional_only():  # one network call on n rows instead of 2n
        c = field(x, t, *more, labels)
        check_same_shape(c, x, "the conditional prediction")
        return c.astype(jnp.result_type(c, x))  # the guided branch's dtype

    # With no time inside only the conditional half runs (under vmap with a batched predicate
    # lax.cond computes both branches, as the where would).
    return jax.lax.cond(jnp.any(inside), lambda: guided(inside), conditional_only)


def classifier_free_guidance(
    field: Field,
    labels: ArrayLike,
    null_label: ArrayLike,
    scale: ArrayLike,
    *,
    interval: tuple[float, float] | None = None,
) -> Field:
    """The guided field ``(x, t) -> u + scale (c - u)`` from a conditional ``field(x, t, labels)``.

    ``c = field(x, t, labels)`` and ``u = field(x, t, null_label)`` come from one call on the
    doubled batch; ``labels`` has one label per sample (``(batch, ...)``) or is a scalar, the
    label of every sample (a shared label that is not a scalar, e.g. one one-hot vector, must be
    broadcast to ``(batch, ...)`` by the caller: a ``(C,)`` vector is read as ``C`` labels when
    the batch has ``C`` samples). ``interval = (t_lo, t_hi)`` guides only for ``t_lo <= t <= t_hi`` and returns
    ``c`` elsewhere (Kynkäänniemi et al. 2024); a call with no time inside evaluates only ``c``
    (half the network rows). ``scale = 1`` is plain conditional sampling. The labels are the
    field's third argument: a two-time network (``TwoTimeMLP``, ``TwoTimeUNet``: ``apply(params,
    x, t, r, labels)``) needs ``Field(lambda p, x, t, y: model.apply(p, x, t, None, y), ...)``,
    or the labels land in ``r``. The ``meanflow()`` sampler calls ``field(x, t, r)``, and the
    guided field passes ``r`` on before the labels: for guided one-step MeanFlow the network takes
    both forms, ``Field(lambda p, x, t, *a: model.apply(p, x, t, *(a[:-1] or (None,)), a[-1]),
    ...)`` (``r`` when given, then the labels; ``jd.sample`` first calls it without ``r``).

    >>> import jax.numpy as jnp, jaxdiff as jd
    >>> f = jd.Field(lambda x, t, y: x * y[:, None], "eps")   # a toy "network"
    >>> g = classifier_free_guidance(f, jnp.array([2.0]), 0.0, scale=3.0)
    >>> g(jnp.ones((1, 2)), jnp.full(1, 0.5))                # 0 + 3 (2 - 0)
    Array([[6., 6.]], dtype=float32)
    """
    field = as_field(field)
    if interval is not None:
        interval = check_interval(interval)
    labels = jnp.asarray(labels)
    null = jnp.broadcast_to(jnp.asarray(null_label, labels.dtype), labels.shape)
    scale = check_finite(jnp.asarray(scale), "scale")  # NaN or inf gave NaN or inf silently
    return Field(_cfg, field.target, (field, labels, null, scale, interval))


def autoguidance(
    field: Field,
    weak: Field,
    scale: ArrayLike,
    *,
    path: GaussianPath | None = None,
    interval: tuple[float, float] | None = None,
) -> Field:
    """Autoguidance ``(x, t) -> w + scale (f - w)`` (Karras et al. 2024, "Guiding a diffusion
    model with a bad version of itself"): ``f = field(x, t, ...)`` guided away from ``w =
    weak(x, t, ...)``, a weaker model of the same task (fewer training steps, a smaller network),
    both conditioned alike (extra arguments such as labels pass to both).

    ``scale = 1`` is ``field``, ``0`` is ``weak``. The combination is affine, so it is the same in
    every target; a ``weak`` of another target is converted to ``field``'s, which needs ``path``.
    ``interval = (t_lo, t_hi)`` guides only there and returns ``f`` elsewhere (a call with no time
    inside evaluates ``field`` alone), as in :func:`classifier_free_guidance`.

    >>> import jax.numpy as jnp, jaxdiff as jd
    >>> f, w = jd.Field(lambda x, t: 2.0 * x, "eps"), jd.Field(lambda x, t: x, "eps")
    >>> autoguidance(f, w, 3.0)(jnp.ones((1, 2)), jnp.full(1, 0.5))  # 1 + 3 (2 - 1)
    Array([[4., 4.]], dtype=float32)
    """
    field, weak = as_field(field), as_field(weak, "weak")
    if weak.target != field.target and path is None:
        raise ValueError(
            f"weak predicts {weak.target!r} and field {field.target!r}: pass path= to convert "
            "weak's prediction (or build both with one target)"
        )
    if interval is not None:
        interval = check_interval(interval)
    scale = check_finite(jnp.asarray(scale), "scale")
    return Field(_autoguided, field.target, (field, weak, scale, interval, path))


def _autoguided(params: Any, x: ArrayLike, t: ArrayLike, *more: Any) -> Array:
    field, weak, scale, interval, path = params
    x = jnp.asarray(x)

    def guided(inside=None):
        f = field(x, t, *more)
        w = weak(x, t, *more)
        check_same_shape(f, x, f"field's {field.target!r} prediction")
        check_same_shape(w, x, f"weak's {weak.target!r} prediction")
        if weak.target != field.target:
            w = convert(path, x, t, w, src=weak.target, dst=field.target)
        dtype, fw, ww = widen(f, w, out=jnp.result_type(f, w, x.dtype))
        g = (ww + expand_like(jnp.asarray(scale, fw.dtype), x) * (fw - ww)).astype(dtype)
        return g if inside is None else jnp.where(expand_like(inside, x), g, f.astype(dtype))

    if interval is None:
        return guided()
    t_arr = as_time(t)
    inside = (t_arr >= interval[0]) & (t_arr <= interval[1])

    dtype = jax.eval_shape(guided, inside).dtype  # the guided branch's (weak's too)

    def field_only():  # one network call instead of two
        return field(x, t, *more).astype(dtype)

    return jax.lax.cond(jnp.any(inside), lambda: guided(inside), field_only)


def check_interval(interval: Any) -> tuple[float, float]:
    """``(t_lo, t_hi)`` as two floats with ``0 <= t_lo < t_hi``, else a ValueError."""
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(
            f"interval must be two static numbers (t_lo, t_hi); got {interval!r}"
        ) from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi):
        raise ValueError(f"interval must satisfy 0 <= t_lo < t_hi (finite); got ({lo}, {hi})")
    return lo, hi


class _ClassifierGuided(eqx.Module):
    log_prob_fn: Callable[[Array, Array], Array] = eqx.field(static=True)
    adds_score = True  # a score term: Tweedie's formula for N(0, I) noise (jd.sample's source=)

    def __call__(self, params: Any, x: ArrayLike, t: ArrayLike) -> Array:
        path, field, scale = params
        x = jnp.asarray(x)
        pred = field(x, t)
        check_same_shape(pred, x, f"the {field.target!r} prediction")
        t = as_time(t)

        def grad_fn(s):
            return jax.grad(lambda z: jnp.sum(self.log_prob_fn(z, s)))(x)

        if field.target in ("score", "eps"):  # B_t = 1 or -sigma_t: finite where alpha_t = 0 too
            return _add_to_score(path, x, t, pred, field.target, grad_fn(t), scale)
        tc = coef_time(t)
        a_slope, a = _alpha_times_slope(path, tc, field.target)
        zero = a == 0

        def interior():
            grad = grad_fn(t)
            return grad, jnp.zeros_like(grad)

        def limit():  # where alpha_t = 0, grad log p(y | x_t) = 0 and the slope is infinite:
            # grad ~ alpha (d grad / dt) / alpha' as alpha -> 0 (l'Hopital)
            return jax.jvp(grad_fn, (t,), (jnp.ones_like(t),))

        grad, d_grad = jax.lax.cond(jnp.any(zero), limit, interior)
        out, _, pred_w, grad, d_grad = widen(x, pred, grad, d_grad)  # x's dtype, as convert
        da = path.d_alpha(tc)
        slope = expand_like(a_slope / jnp.where(zero, 1.0, a), pred_w).astype(pred_w.dtype)
        slope_limit = expand_like(a_slope / jnp.where(zero, da, 1.0), pred_w).astype(pred_w.dtype)
        increment = jnp.where(expand_like(zero, pred_w), slope_limit * d_grad, slope * grad)
        scale = expand_like(jnp.asarray(scale), pred_w).astype(pred_w.dtype)
        # the limit divides by alpha_t': a path with alpha_t = alpha_t' = 0 gave inf or NaN silently
        out = error_if(
            (pred_w + scale * increment).astype(out),
            zero & (da == 0),
            "classifier_guidance: alpha_t = 0 and alpha_t' = 0 at some t on this path, where the "
            "move's limit alpha (d grad / dt) / alpha' is undefined; sample from t_start < 1",
        )
        bad = expand_like(zero, d_grad) & ~jnp.isfinite(d_grad)  # a NaN from log_prob_fn's d/dt
        return error_if(
            out,
            jnp.any(bad),
            "classifier_guidance: at alpha_t = 0 the move needs d/dt of grad_x log_prob_fn(x, t), "
            "which is not finite here (a log_prob_fn not differentiable in t: e.g. one through "
            "eigh at repeated eigenvalues); make it differentiable in t or sample from t_start < 1",
        )


def classifier_guidance(
    field: Field,
    path: GaussianPath,
    log_prob_fn: Callable[[Array, Array], Array],
    scale: ArrayLike,
) -> Field:
    """Add ``scale * grad_x log p(y | x_t, t)`` to the score of ``field`` (Dhariwal & Nichol 2021).

    The arguments come in the order of the other field transforms (``clip_x0(field, path)``,
    ``jd.dps(field, path, ...)``). The old order ``(path, field, ...)`` still works, with a
    ``DeprecationWarning``.

    ``log_prob_fn(x, t)`` returns the per-sample log-probability of the wanted labels, shape
    ``x.shape[:1]``. The result predicts the field's target again: every target is affine in the
    score at fixed ``(x, t)``, so the prediction moves by ``scale * (d target / d score) * grad``
    (for ``x0``, ``sigma_t^2 / alpha_t * grad``; for ``velocity``, ``-g(t)^2 / 2 * grad``).

    Where ``alpha_t = 0`` (``t = 1`` on the linear and cosine paths, where samplers of ``x0``,
    ``v`` and ``velocity`` fields start), ``x_t`` says nothing of ``y``, so the gradient is 0
    while ``d target / d score`` is infinite; the move is their limit, with the gradient read as
    ``alpha_t (d grad / dt) / alpha_t'`` -- which needs ``log_prob_fn`` differentiable in ``t``
    (one more forward-mode pass, only at such times). With the exact ``log p(y | x_t)`` of a
    mixture this is the class's own prediction there too.
    """
    if isinstance(field, GaussianPath) and isinstance(path, Field):  # the old order
        warnings.warn(
            "classifier_guidance(path, field, ...) is the old order: call "
            "classifier_guidance(field, path, log_prob_fn, scale), as clip_x0 and jd.dps take them",
            DeprecationWarning,
            stacklevel=2,
        )
        field, path = path, field
    field = as_field(field)
    scale = check_finite(jnp.asarray(scale), "scale")  # NaN or inf gave NaN or inf silently
    return Field(_ClassifierGuided(log_prob_fn), field.target, (path, field, scale))


def _threshold(params: Any, x: ArrayLike, t: ArrayLike) -> Array:
    path, field, value, percentile = params
    x0, _ = to_x0_eps(path, x, t, field(x, t), field.target)
    if field.target in ("eps", "score"):  # x0 = (x - sigma eps) / alpha: clipping made the inf
        # of alpha_t = 0 under jit a finite, wrong +-1 (the conversion checks a known t only)
        x0 = error_if(
            x0,
            path.alpha(coef_time(t)) == 0,
            f"the data estimate x0_hat to clip is infinite where alpha_t = 0 (an {field.target!r} "
            "field at t = 1 on the linear and cosine paths): start below t = 1",
        )
    if percentile is None:
        return jnp.clip(x0, -value, value)
    axes = tuple(range(1, x0.ndim))
    flat = jnp.abs(x0).reshape(x0.shape[0], math.prod(x0.shape[1:]))  # -1: an empty batch failed
    s = jnp.maximum(jnp.quantile(flat, percentile, axis=1), value)  # per sample, >= value
    s = s.reshape((-1,) + (1,) * len(axes)).astype(x0.dtype)
    return jnp.clip(x0, -s, s) / s * value


def clip_x0(field: Field, path: GaussianPath, value: ArrayLike = 1.0) -> Field:
    """The field with its data estimate clipped to ``[-value, value]`` (Ho et al. 2020 clip DDPM's
    ``x0_hat`` to ``[-1, 1]``). It predicts ``"x0"``; samplers recompute ``eps`` from it, so
    ``x = alpha x0 + sigma eps`` still holds."""
    value = check_positive(value, "value")
    field = as_field(field)
    return Field(_threshold, "x0", (path, field, jnp.asarray(value), None))


def dynamic_thresholding(
    field: Field, path: GaussianPath, percentile: float = 0.995, value: ArrayLike = 1.0
) -> Field:
    """Imagen's dynamic thresholding (Saharia et al. 2022, Sec. 2.3) of the data estimate.

    Per sample, ``s`` is the ``percentile`` quantile of ``|x0_hat|`` (at least ``value``); the
    estimate is clipped to ``[-s, s]`` and divided by ``s`` (then scaled to ``value``), pushing
    saturated pixels inwards at high guidance. Predicts ``"x0"``.
    """
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"percentile must lie in (0, 1]; got {percentile}")
    value = check_positive(value, "value")
    field = as_field(field)
    return Field(_threshold, "x0", (path, field, jnp.asarray(value), float(percentile)))
