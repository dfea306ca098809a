r"""Guidance: classifier-free (Ho & Salimans 2022) and classifier guidance (Dhariwal & Nichol 2021).

Every target is affine in the prediction at fixed ``(x, t)`` (``jaxdiff.conversions``), so a
combination whose weights sum to one means the same thing for ``eps``, ``x0``, ``score``, ``v`` and
``velocity``: guidance works for any target and any sampler.

Conventions for the classifier-free weight. We use ``scale`` with
``guided = u + scale (c - u) = (1 - scale) u + scale c`` (``c`` conditional, ``u`` unconditional;
``scale = 1`` is plain conditional sampling, as in diffusers' ``guidance_scale``). Ho & Salimans
write ``(1 + w) c - w u``: their ``w`` is ``scale - 1``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxdiff._checks import as_time, check_same_shape, expand_like
from jaxdiff.conversions import Target, convert
from jaxdiff.paths import GaussianPath

Array = jax.Array
Field = Callable[[Array, Array], Array]

__all__ = ["classifier_free_guidance", "classifier_guidance"]


def classifier_free_guidance(
    field: Callable[[Array, Array, Array], Array],
    labels: ArrayLike,
    null_label: ArrayLike,
    scale: ArrayLike,
    *,
    interval: tuple[float, float] | None = None,
) -> Field:
    """The guided field ``(x, t) -> u + scale (c - u)`` from a conditional ``field(x, t, labels)``.

    ``c = field(x, t, labels)`` and ``u = field(x, t, null_label)`` come from one call on the
    doubled batch. ``interval = (t_lo, t_hi)`` guides only for ``t_lo <= t <= t_hi`` and returns
    ``c`` elsewhere (Kynkäänniemi et al. 2024).

    >>> import jax.numpy as jnp
    >>> f = lambda x, t, y: x * y[:, None]        # a toy "network"
    >>> g = classifier_free_guidance(f, jnp.array([2.0]), 0.0, scale=3.0)
    >>> g(jnp.ones((1, 2)), 0.5)                  # 0 + 3 (2 - 0)
    Array([[6., 6.]], dtype=float32)
    """
    labels = jnp.asarray(labels)
    null = jnp.broadcast_to(jnp.asarray(null_label, labels.dtype), labels.shape)
    both = jnp.concatenate([labels, null], axis=0)

    def guided(x: Array, t: ArrayLike) -> Array:
        n = x.shape[0]
        if labels.shape[:1] != (n,):
            raise ValueError(f"labels have shape {labels.shape}; expected ({n}, ...) to match x")
        t2 = jnp.concatenate([t, t], axis=0) if jnp.ndim(t) else t
        out = field(jnp.concatenate([x, x], axis=0), t2, both)
        c, u = out[:n], out[n:]
        check_same_shape(c, x, "the conditional prediction")
        g = u + expand_like(jnp.asarray(scale, x.dtype), x) * (c - u)
        if interval is None:
            return g
        t_arr = as_time(t, x.dtype)
        inside = (t_arr >= interval[0]) & (t_arr <= interval[1])
        return jnp.where(expand_like(inside, x), g, c)

    return guided


def classifier_guidance(
    path: GaussianPath,
    field: Field,
    log_prob_fn: Callable[[Array, Array], Array],
    scale: ArrayLike,
    *,
    target: Target = "score",
) -> Field:
    """Add ``scale * grad_x log p(y | x_t, t)`` to the score of ``field`` (which predicts ``target``).

    ``log_prob_fn(x, t)`` returns the per-sample log-probability of the wanted labels, shape
    ``x.shape[:1]``. The result predicts ``target`` again (Dhariwal & Nichol 2021, Sec. 4).
    """

    def guided(x: Array, t: ArrayLike) -> Array:
        pred = field(x, t)
        grad = jax.grad(lambda z: jnp.sum(log_prob_fn(z, t)))(x)
        score = convert(path, x, t, pred, src=target, dst="score")
        score = score + expand_like(jnp.asarray(scale, x.dtype), x) * grad
        return convert(path, x, t, score, src="score", dst=target)

    return guided
