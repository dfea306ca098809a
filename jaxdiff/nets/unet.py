"""The U-Net of DDPM for images ``(batch, height, width, channels)`` (Ho et al. 2020), any size.

The layout is the official one (``diffusion_tf/models/unet.py``, equal parameter for parameter to
diffusers' ``UNet2DModel``): a 3x3 input conv; per resolution ``num_res_blocks`` residual blocks
(each followed by self-attention where the image size is in ``attention_resolutions``) and a
stride-2 conv; a middle of block, attention, block; the mirror path with one more block per
resolution, each taking a skip connection, nearest upsampling and a 3x3 conv; group norm, SiLU and
a zero-initialised 3x3 output conv. Time (and label) conditioning enters every block, added after
its first conv (DDPM) or as scale-and-shift of its second norm (``scale_shift``, Dhariwal & Nichol
2021). Convolutions go through :func:`jaxdiff.nets.conv.conv2d` (fast gradients in a scan on CPU).

Configs: :func:`ddpm_cifar10` (35.7M parameters) and :func:`small_unet` (CPU tests).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jaxdiff._checks import wide_dtype
from jaxdiff.nets.conv import Conv
from jaxdiff.nets.embeddings import conditioning

Array = jax.Array

__all__ = ["UNet", "ResBlock", "SelfAttention", "GroupNorm", "ddpm_cifar10", "small_unet"]


class GroupNorm(nn.Module):
    """Group norm (Wu & He 2018) of ``(batch, ..., channels)`` inputs: flax's ``nn.GroupNorm``
    (``scale`` and ``bias`` per channel, statistics in float32 or wider, the same parameters),
    computed from per-channel sums over the spatial axes, then per group.

    ``y = (x - mean_g) rsqrt(var_g + epsilon) scale + bias``, ``var_g = E[(x - mean_g)^2]``: two
    passes (Flax's one-pass ``E[x^2] - mean_g^2`` loses the variance far from zero: outputs 0.86
    off at an offset of 1e3 in float32; two passes cost 0.5 ms more forward at 32x32x64, batch
    32, and 1.3 ms less forward and backward). Flax
    reduces the ``(batch, h, w, groups, channels / groups)`` reshape over three scattered axes,
    a slow XLA:CPU path (32x32x64 at batch 32: 7.7 ms forward, here 0.8-1.3 ms; forward and
    backward 5.9 ms against 1.7 ms); the sums over ``h, w`` first are contiguous reductions.
    """

    num_groups: int
    epsilon: float = 1e-6
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, c = x.shape[0], x.shape[-1]
        g = self.num_groups
        if c % g:
            raise ValueError(f"{g} groups do not divide the {c} channels")
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        x32 = x.astype(wide_dtype(x.dtype))  # float64 stays float64
        flat = x32.reshape(b, -1, c)
        count = flat.shape[1] * (c // g)

        def group_mean(v):  # (batch, spatial, channels) -> (batch, channels), per group
            per_group = jnp.sum(v, axis=1).reshape(b, g, c // g).sum(-1) / count
            return jnp.repeat(per_group, c // g, axis=-1)

        shape = (b,) + (1,) * (x.ndim - 2) + (c,)
        centred = x32 - group_mean(flat).reshape(shape)
        var = group_mean((centred * centred).reshape(b, -1, c))  # two passes (see above)
        mul = jax.lax.rsqrt(var + self.epsilon) * scale[None]
        y = centred * mul.reshape(shape) + bias.reshape((1,) * (x.ndim - 1) + (c,))
        return y.astype(self.dtype or x.dtype)


def _norm(channels: int, groups: int, dtype) -> GroupNorm:
    """Group norm with ``gcd(groups, channels)`` groups; statistics in float32 at least."""
    return GroupNorm(num_groups=math.gcd(groups, channels), epsilon=1e-6, dtype=dtype)


class ResBlock(nn.Module):
    """``skip(x) + conv(dropout(silu(norm(conv(silu(norm(x))) + Dense(c)))))`` (DDPM), or with
    ``scale_shift`` the second norm as ``norm(h) (1 + scale) + shift``; ``skip`` a 1x1 conv when
    the widths differ, the identity otherwise."""

    channels: int
    dropout: float = 0.0
    scale_shift: bool = True
    groups: int = 32
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, cond: Array, deterministic: bool = True) -> Array:
        ch, dtype = self.channels, self.dtype
        h = Conv(ch, dtype=dtype)(nn.silu(_norm(x.shape[-1], self.groups, dtype)(x)))
        emb = nn.Dense((2 if self.scale_shift else 1) * ch, dtype=dtype)(cond)[:, None, None, :]
        if self.scale_shift:
            scale, shift = jnp.split(emb, 2, axis=-1)
            h = _norm(ch, self.groups, dtype)(h) * (1.0 + scale) + shift
        else:
            h = _norm(ch, self.groups, dtype)(h + emb)
        h = nn.Dropout(self.dropout, deterministic=deterministic)(nn.silu(h))
        h = Conv(ch, dtype=dtype, kernel_init=nn.initializers.zeros)(h)
        if x.shape[-1] != ch:
            x = Conv(ch, kernel_size=1, dtype=dtype)(x)
        return x + h


def _attention_math(query: Array, key: Array, value: Array, dtype: Any = None) -> Array:
    """``softmax(q k^T / sqrt(d)) v`` for ``(batch, length, heads, d)`` inputs (flax's layout),
    computed with the heads as a leading batch axis; softmax in float32 or wider.

    The same function as ``flax.linen.dot_product_attention``, 4.6x faster on XLA:CPU (batch 32,
    256 tokens, 4 heads of 16: 24 ms against 112 ms), whose ``bqhd,bkhd->bhqk`` contraction has
    its batch axes apart and runs on a slow path there; on GPUs the transposes cost ~nothing.
    """
    dtype = dtype or query.dtype
    q, k, v = (jnp.swapaxes(a, 1, 2).astype(dtype) for a in (query, key, value))
    q = q / jnp.sqrt(q.shape[-1]).astype(dtype)
    weights = jnp.einsum("bhqd,bhkd->bhqk", q, k)
    wide = jnp.promote_types(dtype, jnp.float32)  # float32 for bfloat16, float64 stays
    weights = jax.nn.softmax(weights.astype(wide), axis=-1).astype(dtype)
    return jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", weights, v), 1, 2)


def _attention_chunked(
    query: Array, key: Array, value: Array, dtype: Any = None, chunk_bytes: int = 4 << 20
) -> Array:
    """:func:`_attention_math` over the batch in chunks whose float32 scores take at most
    ``chunk_bytes`` (one sample at least; the last chunk zero-padded), one chunk at a time
    (``lax.map``), each recomputed in the backward pass (``jax.checkpoint``).

    Why: on XLA:CPU the softmax makes several passes over the ``(batch, heads, q, k)`` scores,
    each from memory when they outgrow the cache (33 MB at batch 32, 256 tokens, 4 heads). In
    chunks of ~4 MB (2-core CPU, that size: forward 22 -> 7-8 ms, forward + backward 68-80 ->
    38-46 ms; PyTorch's fused CPU attention 7 / 24 ms; small_unet at batch 32: forward 197-220 ->
    158-172 ms, a training step 810-868 -> 759-785 ms). Plain JAX, no custom VJP: ``jvp``,
    ``linearize`` (the likelihood's divergence), ``grad`` and ``vmap`` all apply; the numbers are
    the unchunked ones to rounding. A hand-written flash-style VJP reached 22 ms forward +
    backward but would forbid forward-mode differentiation.
    """
    b, length, heads, _ = query.shape
    n = max(1, chunk_bytes // (4 * heads * length * key.shape[1]))
    if n >= b:
        return _attention_math(query, key, value, dtype)
    chunks = -(-b // n)

    def split(a: Array) -> Array:
        a = jnp.pad(a, ((0, chunks * n - b),) + ((0, 0),) * (a.ndim - 1))
        return a.reshape(chunks, n, *a.shape[1:])

    one = jax.checkpoint(partial(_attention_math, dtype=dtype))
    out = lax.map(lambda qkv: one(*qkv), (split(query), split(key), split(value)))
    return out.reshape(chunks * n, *out.shape[2:])[:b]


def _attention(query: Array, key: Array, value: Array, dtype: Any = None) -> Array:
    """The U-Net's ``attention_fn``: chunked on CPU (:func:`_attention_chunked`), whole elsewhere
    (GPUs and TPUs keep the batch in one kernel launch)."""
    return lax.platform_dependent(
        query,
        key,
        value,
        cpu=partial(_attention_chunked, dtype=dtype),
        default=partial(_attention_math, dtype=dtype),
    )


class SelfAttention(nn.Module):
    """``x + proj(softmax(q k^T / sqrt(d)) v)`` over the pixels of ``norm(x)``; softmax in float32
    or wider."""

    heads: int = 1
    groups: int = 32
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, hh, ww, c = x.shape
        h = _norm(c, self.groups, self.dtype)(x).reshape(b, hh * ww, c)
        if c % self.heads:  # silently fell back to one head
            raise ValueError(f"heads = {self.heads} must divide the {c} channels of attention")
        h = nn.MultiHeadDotProductAttention(
            num_heads=self.heads,
            dtype=self.dtype,
            attention_fn=_attention,
            out_kernel_init=nn.initializers.zeros,
        )(h, h)
        return x + h.reshape(b, hh, ww, c)


class UNet(nn.Module):
    """U-Net ``(x, t, labels) -> output shaped like x`` for ``x`` of shape ``(batch, H, W, C)``.

       ``channels[i]`` is the width at resolution ``H / 2^i``; ``num_res_blocks`` residual blocks per
       resolution down (one more up); attention after each block at the image sizes in
       ``attention_resolutions`` and, when ``attention``, in the middle. ``t`` is a scalar or
       ``(batch,)`` in ``[0, 1]`` (``t = 0`` data), embedded by ``time_features`` features (default
       ``channels[0]``) of ``time_scale t`` (sinusoids of ``1000 t``, DDPM's step index, by default;
       ``freq_shift`` as diffusers') and an MLP to ``emb_dim`` (default ``4 channels[0]``);
       ``num_classes`` adds labels with a null label ``num_classes`` for classifier-free guidance.
       :func:`jaxdiff.nets.from_diffusers` loads a diffusers ``UNet2DModel``'s weights.

       Dropout (``dropout > 0``) runs only when a ``"dropout"`` rng is given:
       ``model.apply(params, x, t)`` is deterministic (sampling, evaluation), training passes
       ``model.apply(params, x, t, labels, rngs={"dropout": key})``; ``deterministic=True/False``
       overrides. A loss with dropout names the stream; it passes a fresh key per step::

           loss = jd.eps_loss(jd.Field(model.apply, "eps"), path, rngs="dropout")

    Mixed precision: ``dtype=jnp.bfloat16`` computes in bfloat16 with float32 params
       (norm statistics and softmax in float32); the output is cast back to ``x``'s dtype.

       >>> import jax, jax.numpy as jnp
       >>> model = UNet(channels=(16, 32))  # jaxdiff.nets.init_params(model, key, x, t) for weights
       >>> x = jnp.zeros((2, 28, 28, 1))
       >>> params = jax.eval_shape(model.init, jax.random.key(0), x, 0.5)
       >>> jax.eval_shape(model.apply, params, x, 0.5).shape
       (2, 28, 28, 1)
    """

    channels: Sequence[int] = (32, 64)
    num_res_blocks: int = 1
    attention_resolutions: Sequence[int] = ()
    attention: bool = True
    heads: int = 4
    dropout: float = 0.0
    scale_shift: bool = True
    norm_groups: int = 8
    num_classes: int | None = None
    time_embedding: str = "sinusoidal"
    time_features: int | None = None
    time_scale: float | None = None
    freq_shift: float = 0.0
    emb_dim: int | None = None
    dtype: Any = None

    @nn.compact
    def __call__(
        self,
        x: Array,
        t: ArrayLike,
        labels: Array | None = None,
        *,
        deterministic: bool | None = None,
    ) -> Array:
        return self._forward(x, t, None, labels, deterministic)

    def _forward(
        self, x: Array, t: ArrayLike, gap: Array | None, labels: Array | None, deterministic
    ) -> Array:
        """The network, its conditioning on ``t`` (and on ``gap``, when given)."""
        if x.ndim != 4:
            raise ValueError(f"UNet takes images (batch, height, width, channels); got {x.shape}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1); got {self.dropout}")
        if deterministic is None:
            deterministic = self.dropout == 0.0 or not self.has_rng("dropout")
        batch, dtype = x.shape[0], self.dtype or x.dtype
        cond = conditioning(  # times in float32 or wider, never in x's dtype
            t, labels, batch, wide_dtype(x.dtype),
            self.emb_dim or 4 * self.channels[0], self.time_embedding,
            self.num_classes, features=self.time_features or self.channels[0], compute_dtype=dtype,
            gap=gap, scale=self.time_scale, shift=self.freq_shift,
        )  # fmt: skip
        block = partial(
            ResBlock, dropout=self.dropout, scale_shift=self.scale_shift,
            groups=self.norm_groups, dtype=dtype
        )  # fmt: skip
        attend = partial(SelfAttention, self.heads, self.norm_groups, dtype)

        def res(ch, h):
            h = block(ch)(h, cond, deterministic)
            return attend()(h) if h.shape[1] in self.attention_resolutions else h

        h = Conv(self.channels[0], dtype=dtype)(x.astype(dtype))
        skips = [h]
        for level, ch in enumerate(self.channels):
            for _ in range(self.num_res_blocks):
                h = res(ch, h)
                skips.append(h)
            if level < len(self.channels) - 1:
                h = Conv(ch, strides=2, dtype=dtype)(h)
                skips.append(h)
        h = block(self.channels[-1])(h, cond, deterministic)
        if self.attention:
            h = attend()(h)
        h = block(self.channels[-1])(h, cond, deterministic)
        for level, ch in reversed(list(enumerate(self.channels))):
            for _ in range(self.num_res_blocks + 1):
                h = res(ch, jnp.concatenate([h, skips.pop()], axis=-1))
            if level > 0:
                size = skips[-1].shape[1:3]
                h = jax.image.resize(h, (batch, *size, h.shape[-1]), "nearest")
                h = Conv(ch, dtype=dtype)(h)
        h = nn.silu(_norm(h.shape[-1], self.norm_groups, dtype)(h))
        out = Conv(x.shape[-1], dtype=dtype, kernel_init=nn.initializers.zeros)(h)
        return out.astype(x.dtype)


def ddpm_cifar10(**overrides) -> UNet:
    """DDPM's CIFAR-10 network (Ho et al. 2020, App. B): base 128 channels, multipliers
    (1, 2, 2, 2), 2 residual blocks per resolution, attention at 16x16 and in the middle, additive
    time embedding, 32 norm groups, dropout 0.1: 35,746,307 parameters at 32x32x3 (the paper's
    "35.7M").

    Equal parameter for parameter (same layers, same shapes) to diffusers'
    ``google/ddpm-cifar10-32``, i.e. ``diffusers.UNet2DModel(sample_size=32, in_channels=3,
    out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6, downsample_padding=0,
    flip_sin_to_cos=False, freq_shift=1, dropout=0.1)`` (35,746,307 parameters, diffusers 0.42;
    ``downsample_padding=0`` pads (0, 1) like TensorFlow's and our stride-2 ``"SAME"``): the same
    function too, so :func:`jaxdiff.nets.from_diffusers` loads that checkpoint (its network takes
    the step index ``n = 0 .. 999``; ``t = n / 1000`` here).
    ``overrides`` replace fields: ``num_classes=10`` adds a label embedding
    (diffusers: ``num_class_embeds=11``), ``dtype=jnp.bfloat16`` mixed precision.
    """
    config = dict(
        channels=(128, 256, 256, 256),
        num_res_blocks=2,
        attention_resolutions=(16,),
        heads=1,
        dropout=0.1,
        scale_shift=False,
        norm_groups=32,
        freq_shift=1.0,
    )
    return UNet(**{**config, **overrides})


def small_unet(**overrides) -> UNet:
    """A U-Net for CPU tests and the digits: widths (32, 64, 64), one block per resolution,
    attention at 16x16 (on 32x32 images) and in the middle, scale-and-shift conditioning,
    8 norm groups: 1,192,387 parameters at 32x32x3 (unconditional; 1,140,929 at 8x8x1).

    Equal parameter for parameter to ``diffusers.UNet2DModel(sample_size=32, in_channels=3,
    out_channels=3, layers_per_block=1, block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=16,
    norm_num_groups=8, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=0,
    resnet_time_scale_shift="scale_shift", attn_norm_num_groups=8)`` (1,192,387 parameters,
    diffusers 0.42; without ``attn_norm_num_groups`` diffusers drops the middle attention's group
    norm under scale-shift, 128 parameters fewer).
    """
    config = dict(
        channels=(32, 64, 64),
        num_res_blocks=1,
        attention_resolutions=(16,),
        heads=4,
        scale_shift=True,
        norm_groups=8,
    )
    return UNet(**{**config, **overrides})
