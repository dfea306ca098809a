r"""``Field``: a network (or an exact oracle) bound to the target it predicts.

A field is what samplers, likelihoods, ELBOs, guidance and losses consume. It is three things:
``fn``, the pure function; ``target``, what ``fn``'s output means (``"score"``, ``"eps"``,
``"x0"``, ``"v"`` or ``"velocity"``, see :mod:`jaxdiff.conversions`); and ``params``, the pytree
``fn`` is called with (``None`` for a plain function of ``(x, t)``)::

    field(x, t, *args) = fn(x, t, *args)            if params is None
                       = fn(params, x, t, *args)    otherwise

The contract for ``t``: samplers and losses call a field with ``x`` of shape ``(batch, *event)``
and ``t`` of shape ``(batch,)``, one time per sample (``t = 0`` is data, ``t = 1`` the prior).
``evaluate(field, x, t)`` (which ``predict``, ``denoise``, ``predict_as`` and ``reverse_drift``
use) also takes several batch axes: ``t`` of shape ``x.shape[:k]``, one time per sample, is
flattened with ``x``'s ``k`` batch axes into the one axis ``fn`` sees, and the output is shaped
back, so ``fn`` is written for one batch axis only.

Any network library becomes a field in one line:

* Flax linen: ``Field(model.apply, "eps", params)``;
* Flax NNX: ``graphdef, state = nnx.split(model)``;
  ``Field(lambda s, x, t: nnx.merge(graphdef, s)(x, t), "eps", state)``;
* Equinox: ``params, static = eqx.partition(model, eqx.is_array)``;
  ``Field(lambda p, x, t: eqx.combine(p, static)(x, t), "eps", params)``;
* a plain function of a parameter pytree: ``Field(apply, "velocity", params)``;
* a function of ``(x, t)`` alone (an oracle, a closed form): ``Field(fn, "score")``.

A loss trains ``params``: ``loss(params, key, batch)`` calls ``field.apply(params, x, t)``, that is
``fn(params, x, t)`` whatever ``field.params`` holds; a sampler uses the field as it is. ``Field`` is an ``equinox.Module``: ``params`` are its pytree leaves,
``fn`` and ``target`` are static, so a field can be passed through ``jax.jit``, ``vmap`` and
``grad`` like any pytree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxdiff._checks import as_time, expand_like, wide_dtype
from jaxdiff.conversions import Target, _check_target, convert, from_x0_eps, to_x0_eps

if TYPE_CHECKING:
    from jaxdiff.paths import GaussianPath

Array = jax.Array

__all__ = ["Field", "as_field", "predict", "denoise", "batch_time", "evaluate", "reschedule"]


class Field(eqx.Module):
    """A function bound to the target it predicts, and optionally to its parameters.

    >>> import jax.numpy as jnp
    >>> f = Field(lambda p, x, t: p * x, "eps", 2.0)
    >>> f(jnp.ones((3, 2)), jnp.full(3, 0.5))[0].tolist(), f.target
    ([2.0, 2.0], 'eps')
    >>> f.bind(3.0)(jnp.ones((1, 2)), jnp.zeros(1)).tolist()
    [[3.0, 3.0]]
    """

    fn: Callable[..., Array] = eqx.field(static=True)
    target: Target = eqx.field(static=True)
    params: Any = None

    def __check_init__(self):
        if not callable(self.fn):
            raise TypeError(f"Field's fn must be callable; got {type(self.fn).__name__}")
        _check_target(self.target)

    def __call__(self, x: ArrayLike, t: ArrayLike, *args: Any, **kwargs: Any) -> Array:
        if self.params is None:
            return self.fn(x, t, *args, **kwargs)
        return self.fn(self.params, x, t, *args, **kwargs)

    def apply(self, params: Any, x: ArrayLike, t: ArrayLike, *args: Any, **kwargs: Any) -> Array:
        """``fn(params, x, t, *args)`` with the given ``params`` (what a loss differentiates)."""
        return self.fn(params, x, t, *args, **kwargs)

    def bind(self, params: Any) -> Field:
        """The same function and target with ``params`` (e.g. the EMA weights after training)."""
        return Field(self.fn, self.target, params)


def as_field(field: Any, name: str = "field") -> Field:
    """``field`` if it is a :class:`Field`; a clear error for a bare function (no silent target)."""
    if isinstance(field, Field):
        return field
    if callable(field):
        raise TypeError(
            f"{name} is a bare function, so what it predicts is unknown; bind its target once: "
            f"jd.Field(fn, 'eps') for fn(x, t), or jd.Field(model.apply, 'velocity', params) for "
            f"a network (targets: 'score', 'eps', 'x0', 'v', 'velocity')"
        )
    raise TypeError(f"{name} must be a jaxdiff.Field; got {type(field).__name__}")


class _CastIn(eqx.Module):
    """Call a field with ``x`` in ``dtype`` (the network's precision) from a wider state."""

    dtype: Any = eqx.field(static=True)

    def __call__(self, field, x, t, *args):
        return field(jnp.asarray(x).astype(self.dtype), t, *args)


def in_wide_precision(field: Field, x: Array) -> tuple[Field, Array]:
    """``(field, x)`` for a solve in float32 or wider: a half-precision ``x`` comes back widened,
    with a field that still sees ``x`` in its dtype (the network runs in half precision; a bfloat16
    state cannot hold an update below 1/256 of the sample). The caller casts the result back."""
    wide = wide_dtype(x.dtype)
    if wide == x.dtype:
        return field, x
    return Field(_CastIn(x.dtype), field.target, field), x.astype(wide)


def batch_time(t: Any, x: ArrayLike) -> Array:
    """``t`` as one time per sample, shape ``x.shape[:1]`` (the field contract); ``t`` is a
    scalar or already has that shape."""
    t = as_time(t)
    if jnp.ndim(x) == 0 or t.shape == x.shape[:1]:
        return t
    if t.ndim:
        raise ValueError(
            f"t has shape {t.shape}; expected a scalar or one time per sample, {x.shape[:1]} "
            f"(jd.evaluate(field, x, t) takes t of shape x.shape[:k] for k batch axes)"
        )
    return jnp.broadcast_to(t, x.shape[:1])


def evaluate(field: Field, x: ArrayLike, t: Any, *args: Any, **kwargs: Any) -> Array:
    """``field(x, t, *args, **kwargs)`` for any batch shape: ``t`` a scalar, or one time per sample
    of shape ``x.shape[:k]``.

    A scalar ``t`` passes ``x`` as it is, with ``t`` per entry of its first axis (the field
    contract's one batch axis): for several batch axes give ``t`` of shape ``x.shape[:k]``. For
    ``k >= 2`` the ``k`` batch axes of ``x`` (and of every array in ``args`` and ``kwargs``
    whose shape starts with ``t.shape``: labels, a second time) are flattened into the one batch
    axis of the field contract, and the output is reshaped to ``t.shape + event``; ``x`` keeps at
    least one event axis. ``k <= 1`` is ``field(x, batch_time(t, x), *args, **kwargs)``. A time
    shaped otherwise is refused, naming both shapes. Arrays a field closes over (labels bound by
    ``classifier_free_guidance``) are not reshaped: bind them per flattened sample.

    >>> import jax.numpy as jnp, jaxdiff as jd
    >>> f = jd.Field(lambda x, t: x * t[:, None], "eps")  # written for one batch axis
    >>> evaluate(f, jnp.ones((2, 3, 1)), jnp.arange(6.0).reshape(2, 3))[..., 0].tolist()
    [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    """
    x = jnp.asarray(x)
    t = as_time(t)
    if t.ndim <= 1:
        return field(x, batch_time(t, x), *args, **kwargs)
    k = t.ndim
    if x.shape[:k] != t.shape or x.ndim == k:
        raise ValueError(
            f"t has shape {t.shape}; expected a scalar or one time per sample, x.shape[:k] for "
            f"k batch axes before at least one event axis (x has shape {x.shape})"
        )
    n = math.prod(t.shape)

    def flat(a: Any) -> Any:
        if hasattr(a, "shape") and tuple(a.shape[:k]) == t.shape:
            return jnp.reshape(a, (n,) + tuple(a.shape[k:]))
        return a

    args, kwargs = jax.tree.map(flat, (args, kwargs))
    out = field(flat(x), t.reshape(n), *args, **kwargs)
    return out.reshape(t.shape + out.shape[1:])


def predict(path: GaussianPath, field: Field, x: ArrayLike, t: Any) -> tuple[Array, Array]:
    """The field's prediction at ``(x, t)`` as the hub pair ``(x0_hat, eps_hat)``.

    The field sees one time per sample (:func:`evaluate`: ``t`` a scalar or of shape
    ``x.shape[:k]``); the conversion uses ``t`` as given, so a scalar ``t`` costs one evaluation
    of the schedule, not one per sample.
    """
    return to_x0_eps(path, x, t, evaluate(field, x, t), field.target)


def denoise(path: GaussianPath, field: Field, x: ArrayLike, t: Any) -> Array:
    """Tweedie's denoiser ``x0_hat = E[x0 | x_t = x]`` from any target (Efron 2011; the final
    "denoising step" of Song & Ermon 2020, Jolicoeur-Martineau et al. 2021)."""
    if field.target == "x0":
        return evaluate(field, x, t)
    return predict(path, field, x, t)[0]


def predict_as(path: GaussianPath, field: Field, x: ArrayLike, t: Any, target: Target) -> Array:
    """The field's prediction at ``(x, t)`` converted to ``target``."""
    value = evaluate(field, x, t)
    return convert(path, x, t, value, src=field.target, dst=target)


def reschedule(
    field: Field, trained_path: GaussianPath, path: GaussianPath, target: Target | None = None
) -> Field:
    """A field trained on ``trained_path`` as a field on ``path`` (any two Gaussian paths).

    ``x_t = alpha_t x0 + sigma_t eps`` on ``path`` is, scaled by ``r = alpha'_u / alpha_t =
    sigma'_u / sigma_t``, a draw of ``trained_path`` at the time ``u`` of the same log-SNR
    (``u = trained_path.t_from_log_snr(path.log_snr(t))``) with the same ``x0`` and ``eps``: a
    diffusion model is its log-SNR schedule up to the scale of ``x`` (Kingma et al. 2021, VDM,
    Sec. 5). So the trained field's hub pair ``(x0_hat, eps_hat)`` at ``(r x_t, u)`` is the answer
    on ``path``, returned as ``target`` (default: the field's own). A VP-trained eps network
    samples on the linear path (or any schedule) with every sampler, as Meta flow_matching's
    ``ScheduleTransformedModel`` does (in its convention, ``t -> 1 - t``).

    ``r = sqrt((alpha'^2 + sigma'^2) / (alpha^2 + sigma^2))``: equal to both ratios where the
    log-SNRs match, and finite beyond the trained path's range, where ``u`` is its end (0 or 1)
    and the field answers at its own end (e.g. the linear path's ``t = 1``, log-SNR ``-inf``,
    maps to VP's ``t = 1``, log-SNR ``-10``). There, and where ``path``'s log-SNR is infinite
    (``t = 0``), the trained time does not move with ``t``: a derivative in ``t`` at such a ``t``
    lacks that term (the values and derivatives in ``x`` are right).

    >>> import jax, jax.numpy as jnp, jaxdiff as jd
    >>> data = jd.GaussianMixture.isotropic(jnp.array([[1.0, 0.0], [-1.0, 0.0]]), std=0.5)
    >>> vp, linear = jd.vp_path(), jd.linear_path()
    >>> moved = reschedule(data.field(vp, "eps"), vp, linear, "velocity")
    >>> x, t = jnp.ones((4, 2)), jnp.full((4,), 0.3)
    >>> bool(jnp.allclose(moved(x, t), data.field(linear, "velocity")(x, t), atol=1e-4))
    True
    """
    from jaxdiff._engine import require_gaussian_path  # a cycle at import time

    field = as_field(field)
    require_gaussian_path(trained_path, "reschedule's trained_path")
    require_gaussian_path(path, "reschedule's path")
    target = field.target if target is None else target
    _check_target(target)
    return Field(_Rescheduled(target), target, (field, trained_path, path))


class _Rescheduled(eqx.Module):
    """``(params, x, t)`` with ``params = (field, trained_path, path)``: the trained field's hub
    pair at ``(r x, u)``, as ``target`` on ``path`` (:func:`reschedule`)."""

    target: str = eqx.field(static=True)  # static: a Field stays a valid argument of jax.jit

    def __call__(self, params: Any, x: ArrayLike, t: ArrayLike, *args: Any, **kwargs: Any) -> Array:
        return _rescheduled(params, x, t, self.target, args, kwargs)


def _rescheduled(params: Any, x: ArrayLike, t: ArrayLike, target: Target, args, kwargs) -> Array:
    field, trained, path = params
    x = jnp.asarray(x)
    t = as_time(t, wide_dtype(x.dtype))
    u = trained.t_from_log_snr(path.log_snr(t)).astype(t.dtype)
    norm = lambda p, s: jnp.square(p.alpha(s)) + p.sigma_sq(s)  # noqa: E731
    r = expand_like(jnp.sqrt(norm(trained, u) / norm(path, t)), x).astype(x.dtype)
    x_trained = r * x
    value = evaluate(field, x_trained, u, *args, **kwargs)  # labels and the like pass through
    x0, eps = to_x0_eps(trained, x_trained, u, value, field.target)
    return from_x0_eps(path, x, t, x0, eps, target)
