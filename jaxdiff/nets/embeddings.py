"""Time and label embeddings for Flax networks.

Networks take continuous ``t`` in ``[0, 1]`` (``t = 0`` data, ``t = 1`` prior), a scalar or one time
per sample; ``batch_times`` broadcasts a scalar to the batch.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxdiff._checks import check_count, value_check

Array = jax.Array

__all__ = [
    "batch_times",
    "sinusoidal_embedding",
    "fourier_embedding",
    "TimeEmbedding",
    "LabelEmbedding",
]


def batch_times(t: ArrayLike, batch: int, dtype: Any = jnp.float32) -> Array:
    """``t`` (a scalar or shape ``(batch,)``) as shape ``(batch,)``."""
    t = jnp.asarray(t, dtype)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, batch)):
        raise ValueError(f"t must be a scalar or have shape ({batch},); got shape {t.shape}")
    return jnp.broadcast_to(t.reshape(-1), (batch,))


def sinusoidal_embedding(
    t: Array, dim: int, scale: float = 1000.0, max_period: float = 1e4, shift: float = 0.0
) -> Array:
    """Transformer features ``[sin(s t w_k), cos(s t w_k)]``, ``w_k = max_period^(-k / (dim/2 -
    shift))``, ``k = 0 .. dim/2 - 1``.

    ``scale = 1000`` maps ``t in [0, 1]`` to DDPM's step index (Ho et al. 2020; Vaswani et al. 2017).
    ``shift = 1`` is DDPM's own ``half - 1`` (diffusers' ``freq_shift=1``, as in
    ``google/ddpm-cifar10-32``); ``0`` is diffusers' default.

    An odd ``dim`` ends with a zero feature (diffusers' ``get_timestep_embedding``).

    >>> sinusoidal_embedding(jnp.zeros(3), 8).shape
    (3, 8)
    """
    half = check_count(dim, "dim", minimum=2, what="the number of time features") // 2
    if not half - shift > 0:  # half = shift divided 0 by 0: NaN features
        raise ValueError(
            f"sinusoidal features need dim // 2 > shift; got dim = {dim}, shift = {shift}"
        )
    freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=t.dtype) / (half - shift))
    args = scale * t[:, None] * freqs[None, :]
    return _pad_odd(jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1), dim)


def _pad_odd(h: Array, dim: int) -> Array:
    """``h`` of ``2 (dim // 2)`` features with a zero feature appended when ``dim`` is odd (an odd
    ``dim`` once gave ``dim - 1`` features, and the next layer ``dim - 1`` inputs)."""
    return jnp.pad(h, ((0, 0), (0, dim % 2))) if dim % 2 else h


def fourier_embedding(t: Array, dim: int, scale: float = 16.0, seed: int = 0) -> Array:
    """Gaussian Fourier features ``[sin(2 pi t w), cos(2 pi t w)]``, ``w ~ N(0, scale^2)`` fixed.

    The frequencies are drawn from ``seed`` at trace time: constants, not parameters (so weight
    decay cannot shrink them). Tancik et al. (2020); score_sde's ``GaussianFourierProjection``.
    An odd ``dim`` ends with a zero feature.
    """
    half = check_count(dim, "dim", minimum=2, what="the number of time features") // 2
    # drawn in float32 whatever t's dtype: the same constants for bfloat16, float32 and float64
    w = (scale * jax.random.normal(jax.random.key(seed), (half,), jnp.float32)).astype(t.dtype)
    args = 2.0 * jnp.pi * t[:, None] * w[None, :]
    return _pad_odd(jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1), dim)


class TimeEmbedding(nn.Module):
    """Features of ``t`` (``"fourier"`` or ``"sinusoidal"``, ``features`` of them, default ``dim``)
    followed by a two-layer SiLU MLP to ``dim`` (DDPM: ``features = ch``, ``dim = 4 ch``).

    ``scale`` multiplies ``t`` in the features (None: 16 for Fourier, 1000 for sinusoidal). The
    features are computed in ``t``'s dtype (float32: ``sin(1000 t)`` in bfloat16 would be off by
    whole periods); the MLP runs in ``dtype`` (None: ``t``'s).
    """

    dim: int
    kind: str = "fourier"
    features: int | None = None
    dtype: Any = None
    scale: float | None = None
    shift: float = 0.0  # sinusoidal only: see sinusoidal_embedding

    @nn.compact
    def __call__(self, t: Array) -> Array:
        features = self.features or self.dim
        if self.kind == "fourier":
            h = fourier_embedding(t, features, scale=16.0 if self.scale is None else self.scale)
        elif self.kind == "sinusoidal":
            scale = 1000.0 if self.scale is None else self.scale
            h = sinusoidal_embedding(t, features, scale, shift=self.shift)
        else:
            raise ValueError(f"time embedding must be 'fourier' or 'sinusoidal'; got {self.kind!r}")
        h = nn.silu(nn.Dense(self.dim, dtype=self.dtype)(h))
        return nn.Dense(self.dim, dtype=self.dtype)(h)


class LabelEmbedding(nn.Module):
    """Class labels ``0 .. num_classes - 1`` plus a learned "null" label ``num_classes``.

    The null label is the unconditional model of classifier-free guidance (Ho & Salimans 2022):
    ``labels = None`` means every sample gets it.
    """

    num_classes: int
    dim: int
    dtype: Any = None

    @nn.compact
    def __call__(self, labels: Array | None, batch: int) -> Array:
        if labels is None:
            labels = jnp.full((batch,), self.num_classes, jnp.int32)
        labels = jnp.asarray(labels)
        if not jnp.issubdtype(labels.dtype, jnp.integer):  # flax's error did not name labels
            raise ValueError(f"labels must be integer class indices; got dtype {labels.dtype}")
        if labels.shape != (batch,):
            raise ValueError(f"labels must have shape ({batch},); got {labels.shape}")
        # out of range, nn.Embed gave NaN (a label past the null one) or, for -1, the null label
        n = self.num_classes
        labels = value_check(
            labels,
            lambda xp, v: xp.any((v < 0) | (v > n)),
            f"labels must lie in [0, {n}] ({n}: the null label; the null_label of a loss or of "
            f"classifier_free_guidance must be {n})",
            # the values out of range (the first 8 labels were shown: a dropped label's
            # null_label = 7 was named by [2, 2, 2, 0, ...], all valid; the stop-53 review)
            lambda v: f"{sorted(set(v[(v < 0) | (v > n)].tolist()))[:8]} out of range",
        )
        return nn.Embed(self.num_classes + 1, self.dim, dtype=self.dtype)(labels)


def conditioning(
    t: ArrayLike,
    labels: Array | None,
    batch: int,
    dtype,
    dim: int,
    kind: str,
    num_classes,
    *,
    features: int | None = None,
    compute_dtype: Any = None,
    gap: ArrayLike | None = None,
    scale: float | None = None,
    shift: float = 0.0,
) -> Array:
    """``silu(TimeEmbedding(t) + LabelEmbedding(labels))``: what every block is conditioned on.

    ``t`` is taken in ``dtype``, the layers run in ``compute_dtype`` (None: ``dtype``). Call it
    inside a network's ``nn.compact`` method: the embeddings become its submodules. ``gap`` (a
    second time such as MeanFlow's ``t - r``) adds an embedding of its own, of the same kind;
    ``scale`` and ``shift`` are the features' (:class:`TimeEmbedding`).
    """
    embedding = partial(TimeEmbedding, dim, kind, features, compute_dtype, scale, shift)
    cond = embedding()(batch_times(t, batch, dtype))
    if gap is not None:
        embed = embedding(name="gap_embedding")
        cond = cond + embed(batch_times(gap, batch, dtype))
    if num_classes is not None:
        cond = cond + LabelEmbedding(num_classes, dim, compute_dtype)(labels, batch)
    elif labels is not None:
        raise ValueError(
            "labels given to a model built without num_classes (or a second time, such as "
            "MeanFlow's r, given to a one-time network: MeanFlow's loss and sampler call "
            "field(x, t, r) and need a two-time network, TwoTimeMLP or TwoTimeUNet)"
        )
    return nn.silu(cond)


def init_params(model: nn.Module, key: Array, *args: Any, **kwargs: Any) -> dict:
    """``model.init(key, *args)`` jitted with XLA's backend optimisations off.

    Initialisers draw one truncated normal per kernel; optimising that graph takes XLA seconds
    (tens of seconds for a U-Net on a loaded CPU) for a function that runs once. Values are the
    same as ``model.init``'s up to float rounding.
    """
    init = jax.jit(model.init, compiler_options={"xla_backend_optimization_level": 0})
    return init(key, *args, **kwargs)
