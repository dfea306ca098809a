"""A 2-D convolution whose gradients stay fast inside ``lax.scan`` on XLA:CPU, and its Flax layer.

Why: XLA:CPU runs a convolution through Eigen (or XNNPACK/YNNPACK) only when its dimension numbers
are canonical, ``NHWC x HWIO -> NHWC``; other layouts fall back to a naive loop nest emitted by
the elemental IR emitter. JAX's transpose rules give the two gradients of an ``NHWC x HWIO``
convolution non-canonical dimension numbers (the kernel gradient ``f01b x i01o -> 01bf``, the
input gradient ``b01f x 01oi -> b01f``). XLA:CPU's ``ConvCanonicalization`` pass rewrites such
convolutions into transposes around a canonical one, but it only visits the *entry* computation
(``module->entry_computation()`` in ``xla/service/cpu/conv_canonicalization.cc``): inside the body
of a ``while`` loop, which is what ``lax.scan`` and ``fori_loop`` lower to, both gradients stay on
the naive path, 50-100x slower (jaxlib 0.10.2: 10 steps of a 3x3 conv on 64x16x16x32, 3.2 s in a
scan against 41 ms unrolled). Forward convolutions are canonical already. Upstream: jax-ml/jax#12868
(a channels-first forward convolution in a loop, open since 2022); not the thunk runtime's
per-op overhead of jax-ml/jax#40150.

:func:`conv2d` is ``lax.conv_general_dilated`` with a custom VJP that writes both gradients as
canonical convolutions on explicitly transposed operands (what the pass would have done), so a
training step runs as fast in a scan as in a plain ``jit``. The gradients equal JAX's own (the
same sums, same order: bit for bit in the tests). On other backends the custom VJP is not used
(``lax.platform_dependent``): cuDNN and TPU handle every layout natively.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Pads = tuple[tuple[int, int], tuple[int, int]]

__all__ = ["Conv", "conv2d"]

_DN = ("NHWC", "HWIO", "NHWC")


def _conv(x: Array, w: Array, strides, padding, lhs_dilation=(1, 1), rhs_dilation=(1, 1)):
    return lax.conv_general_dilated(
        x, w, strides, padding, lhs_dilation, rhs_dilation, dimension_numbers=_DN
    )


def _canonical_grads(strides: tuple[int, int], padding: Pads, x: Array, w: Array, g: Array):
    """Both gradients as ``NHWC x HWIO`` convolutions (the padding of JAX's transpose rules)."""
    k, size, out = w.shape[:2], x.shape[1:3], g.shape[1:3]
    # input: g (dilated by the stride) against the flipped kernel with its I/O swapped
    w_t = jnp.transpose(jnp.flip(w, (0, 1)), (0, 1, 3, 2))
    pads = []
    for d in range(2):
        before = k[d] - padding[d][0] - 1
        pads.append((before, size[d] + k[d] - 1 - ((out[d] - 1) * strides[d] + 1) - before))
    dx = _conv(g, w_t, (1, 1), pads, lhs_dilation=strides)
    # kernel: channels of x as the batch, the batch as features; g as the kernel, dilated
    x_t = jnp.transpose(x, (3, 1, 2, 0))
    g_t = jnp.transpose(g, (1, 2, 0, 3))
    pads = []
    for d in range(2):
        lo = padding[d][0]
        pads.append((lo, (out[d] - 1) * strides[d] + 1 - size[d] + k[d] - lo - 1))
    dw = jnp.transpose(_conv(x_t, g_t, (1, 1), pads, rhs_dilation=strides), (1, 2, 0, 3))
    return dx.astype(x.dtype), dw.astype(w.dtype)


def _jax_grads(strides, padding, x, w, g):
    _, vjp = jax.vjp(lambda a, b: _conv(a, b, strides, padding), x, w)
    return vjp(g)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv2d(x: Array, w: Array, strides: tuple[int, int], padding: Pads) -> Array:
    return _conv(x, w, strides, padding)


def _fwd(x, w, strides, padding):
    return _conv(x, w, strides, padding), (x, w)


def _bwd(strides, padding, res, g):
    x, w = res
    return lax.platform_dependent(
        x,
        w,
        g,
        cpu=partial(_canonical_grads, strides, padding),
        default=partial(_jax_grads, strides, padding),
    )


_conv2d.defvjp(_fwd, _bwd)


def _pads(padding: str | int | Sequence, x_shape, k, strides) -> Pads:
    if isinstance(padding, str):
        return tuple(tuple(int(p) for p in pair) for pair in lax.padtype_to_pads(
            x_shape[1:3], k, strides, padding
        ))  # fmt: skip
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def conv2d(
    x: Array,
    kernel: Array,
    strides: int | tuple[int, int] = 1,
    padding: str | int | Sequence[tuple[int, int]] = "SAME",
) -> Array:
    """``NHWC x HWIO -> NHWC`` convolution, gradients canonical on CPU (see the module note).

    ``padding``: ``"SAME"``/``"VALID"`` (TensorFlow's rule: a stride-2 ``"SAME"`` on an even size
    pads ``(0, 1)``), an int for both sides, or ``((lo, hi), (lo, hi))``.
    """
    if x.ndim != 4 or kernel.ndim != 4 or x.shape[-1] != kernel.shape[2]:
        raise ValueError(
            f"conv2d takes x (batch, H, W, C) and kernel (kh, kw, C, out); got {x.shape}, "
            f"{kernel.shape}"
        )
    strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
    return _conv2d(x, kernel, strides, _pads(padding, x.shape, kernel.shape[:2], strides))


class Conv(nn.Module):
    """``nn.Conv`` for 2-D images through :func:`conv2d` (same parameters: ``kernel``, ``bias``).

    ``dtype`` is the computation dtype (inputs and kernel are cast to it), ``param_dtype`` the
    stored one: ``dtype=jnp.bfloat16`` with float32 params is mixed precision.
    """

    features: int
    kernel_size: int = 3
    strides: int = 1
    padding: str | int = "SAME"
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k = self.kernel_size
        kernel = self.param(
            "kernel", self.kernel_init, (k, k, x.shape[-1], self.features), self.param_dtype
        )
        dtype = self.dtype or x.dtype
        y = conv2d(x.astype(dtype), kernel.astype(dtype), self.strides, self.padding)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            y = y + bias.astype(dtype).reshape(1, 1, 1, -1)
        return y
