"""A compact U-Net for images ``(batch, height, width, channels)`` (Ho et al. 2020, smaller).

Residual blocks with group norm, time (and label) conditioning by scale-and-shift
(``h = norm(h) (1 + scale) + shift``, Dhariwal & Nichol 2021), self-attention at the lowest
resolution, and one width per resolution in ``channels``. Sized by default to train on 8x8 digits
and 28x28 images on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxdiff.nets.embeddings import conditioning

Array = jax.Array

__all__ = ["UNet", "ResBlock", "SelfAttention"]


def _norm(channels: int) -> nn.GroupNorm:
    groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(num_groups=groups)


class ResBlock(nn.Module):
    """``x + conv(silu(norm(conv(silu(norm(x)))) (1 + scale) + shift))``, 1x1 skip if widths differ."""

    channels: int

    @nn.compact
    def __call__(self, x: Array, cond: Array) -> Array:
        h = nn.Conv(self.channels, (3, 3))(nn.silu(_norm(x.shape[-1])(x)))
        scale, shift = jnp.split(nn.Dense(2 * self.channels)(cond)[:, None, None, :], 2, axis=-1)
        h = _norm(self.channels)(h) * (1.0 + scale) + shift
        h = nn.Conv(self.channels, (3, 3), kernel_init=nn.initializers.zeros)(nn.silu(h))
        if x.shape[-1] != self.channels:
            x = nn.Conv(self.channels, (1, 1))(x)
        return x + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels, with a residual connection."""

    heads: int = 4

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, hh, ww, c = x.shape
        h = _norm(c)(x).reshape(b, hh * ww, c)
        heads = self.heads if c % self.heads == 0 else 1
        h = nn.MultiHeadDotProductAttention(num_heads=heads, out_kernel_init=nn.initializers.zeros)(
            h, h
        )
        return x + h.reshape(b, hh, ww, c)


class UNet(nn.Module):
    """U-Net ``(x, t, labels) -> output shaped like x`` for ``x`` of shape ``(batch, H, W, C)``.

    ``channels[i]`` is the width at resolution ``H / 2^i``; ``num_res_blocks`` residual blocks per
    resolution on each side; attention at the lowest resolution when ``attention``. ``t`` is a
    scalar or ``(batch,)`` in ``[0, 1]``; ``num_classes`` adds labels with a null label.

    >>> import jax, jax.numpy as jnp
    >>> model = UNet(channels=(16, 32))  # jaxdiff.nets.init_params(model, key, x, t) for weights
    >>> x = jnp.zeros((2, 28, 28, 1))
    >>> params = jax.eval_shape(model.init, jax.random.key(0), x, 0.5)
    >>> jax.eval_shape(model.apply, params, x, 0.5).shape
    (2, 28, 28, 1)
    """

    channels: Sequence[int] = (32, 64)
    num_res_blocks: int = 1
    attention: bool = True
    num_classes: int | None = None
    time_embedding: str = "sinusoidal"
    emb_dim: int = 128

    @nn.compact
    def __call__(self, x: Array, t: ArrayLike, labels: Array | None = None) -> Array:
        if x.ndim != 4:
            raise ValueError(f"UNet takes images (batch, height, width, channels); got {x.shape}")
        batch = x.shape[0]
        cond = conditioning(
            t, labels, batch, x.dtype, self.emb_dim, self.time_embedding, self.num_classes
        )

        h = nn.Conv(self.channels[0], (3, 3))(x)
        skips = [h]
        for level, ch in enumerate(self.channels):
            for _ in range(self.num_res_blocks):
                h = ResBlock(ch)(h, cond)
                skips.append(h)
            if level < len(self.channels) - 1:
                h = nn.Conv(ch, (3, 3), strides=(2, 2))(h)
                skips.append(h)
        h = ResBlock(self.channels[-1])(h, cond)
        if self.attention:
            h = SelfAttention()(h)
        h = ResBlock(self.channels[-1])(h, cond)
        for level, ch in reversed(list(enumerate(self.channels))):
            for _ in range(self.num_res_blocks + 1):
                h = ResBlock(ch)(jnp.concatenate([h, skips.pop()], axis=-1), cond)
            if level > 0:
                skip_shape = skips[-1].shape
                h = jax.image.resize(h, (batch, *skip_shape[1:3], h.shape[-1]), "nearest")
                h = nn.Conv(ch, (3, 3))(h)
        h = nn.silu(_norm(h.shape[-1])(h))
        return nn.Conv(x.shape[-1], (3, 3), kernel_init=nn.initializers.zeros)(h)
