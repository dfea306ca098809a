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

:func:`conv2d` is ``lax.conv_general_dilated`` as a bilinear primitive of its own whose transposes
write both gradients as canonical convolutions on explicitly transposed operands (what the pass
would have done), so a training step runs as fast in a scan as in a plain ``jit``. The gradients
equal JAX's own (the same sums, same order: bit for bit in the tests). A primitive rather than a
``custom_vjp``: forward mode (``jax.jvp``, ``jax.linearize``: the likelihood's divergence,
MeanFlow), ``vmap`` and higher derivatives work through it as through ``lax``'s convolution. On
other backends the transposes are JAX's own (``lax.platform_dependent``): cuDNN and TPU handle
every layout natively.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jaxdiff._checks import check_count

Array = jax.Array
Pads = tuple[tuple[int, int], tuple[int, int]]

__all__ = ["Conv", "conv2d"]

_DN = ("NHWC", "HWIO", "NHWC")


def _conv(x: Array, w: Array, strides, padding, lhs_dilation=(1, 1), rhs_dilation=(1, 1)):
    return lax.conv_general_dilated(
        x, w, strides, padding, lhs_dilation, rhs_dilation, dimension_numbers=_DN
    )


def _dx_canonical(strides, padding, shape, w: Array, g: Array) -> Array:
    """The input gradient as an ``NHWC x HWIO`` convolution: ``g`` (dilated by the stride) against
    the flipped kernel with its I/O swapped (the padding of JAX's transpose rule)."""
    k, out = w.shape[:2], g.shape[1:3]
    w_t = jnp.transpose(jnp.flip(w, (0, 1)), (0, 1, 3, 2))
    pads = []
    for d in range(2):
        before = k[d] - padding[d][0] - 1
        pads.append((before, shape[1 + d] + k[d] - 1 - ((out[d] - 1) * strides[d] + 1) - before))
    return _conv(g, w_t, (1, 1), pads, lhs_dilation=strides)


def _dw_canonical(strides, padding, shape, x: Array, g: Array) -> Array:
    """The kernel gradient as an ``NHWC x HWIO`` convolution: the channels of ``x`` as the batch,
    the batch as features, ``g`` (dilated by the stride) as the kernel."""
    k, size, out = shape[:2], x.shape[1:3], g.shape[1:3]
    x_t = jnp.transpose(x, (3, 1, 2, 0))
    g_t = jnp.transpose(g, (1, 2, 0, 3))
    pads = []
    for d in range(2):
        lo = padding[d][0]
        pads.append((lo, (out[d] - 1) * strides[d] + 1 - size[d] + k[d] - lo - 1))
    return jnp.transpose(_conv(x_t, g_t, (1, 1), pads, rhs_dilation=strides), (1, 2, 0, 3))


def _dx_lax(strides, padding, shape, w, g):
    return jax.linear_transpose(
        lambda a: _conv(a, w, strides, padding), jax.ShapeDtypeStruct(shape, g.dtype)
    )(g)[0]


def _dw_lax(strides, padding, shape, x, g):
    return jax.linear_transpose(
        lambda b: _conv(x, b, strides, padding), jax.ShapeDtypeStruct(shape, g.dtype)
    )(g)[0]


# The convolution as a primitive of its own, so that its transposes (the two gradients) are ours
# while forward mode, vmap and higher derivatives still work (a ``custom_vjp`` forbids ``jax.jvp``
# and ``jax.linearize``, which the likelihood's divergence and MeanFlow apply to the network). It
# is bilinear: its JVP is two more of itself, its transposes are the canonical convolutions above
# on CPU and JAX's own rules elsewhere (``lax.platform_dependent``: cuDNN and TPU take any layout).
conv2d_p = Primitive("jaxdiff_conv2d")


def _impl(x, w, *, strides, padding):
    return _conv(x, w, strides, padding)


def _abstract(x, w, *, strides, padding):
    out = [(x.shape[1 + d] + sum(padding[d]) - w.shape[d]) // strides[d] + 1 for d in range(2)]
    return x.update(shape=(x.shape[0], *out, w.shape[3]), weak_type=False)


def _transpose(canonical, lax_rule, aval, other, g, strides, padding):
    rule = lambda f: partial(f, strides, padding, aval.shape)
    out = lax.platform_dependent(other, g, cpu=rule(canonical), default=rule(lax_rule))
    return out.astype(aval.dtype)


def _lhs_rule(g, x, w, *, strides, padding):
    return _transpose(_dx_canonical, _dx_lax, x.aval, w, g, strides, padding)


def _rhs_rule(g, x, w, *, strides, padding):
    return _transpose(_dw_canonical, _dw_lax, w.aval, x, g, strides, padding)


def _batch(args, dims, *, strides, padding):
    (x, w), (bx, bw) = args, dims
    if bw is None:  # a batch of images: fold the mapped axis into the image batch
        x = jnp.moveaxis(x, bx, 0)
        y = conv2d_p.bind(x.reshape(-1, *x.shape[2:]), w, strides=strides, padding=padding)
        return y.reshape(*x.shape[:2], *y.shape[1:]), 0
    # per-example kernels: lax's own batching (feature groups), gradients by JAX's rules
    return jax.vmap(partial(_impl, strides=strides, padding=padding), (bx, bw))(x, w), 0


conv2d_p.def_impl(_impl)
conv2d_p.def_abstract_eval(_abstract)
ad.defbilinear(conv2d_p, _lhs_rule, _rhs_rule)
batching.primitive_batchers[conv2d_p] = _batch
mlir.register_lowering(conv2d_p, mlir.lower_fun(_impl, multiple_results=False))


def _conv2d(x: Array, w: Array, strides: tuple[int, int], padding: Pads) -> Array:
    return conv2d_p.bind(x, w, strides=strides, padding=padding)


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
    strides = (strides, strides) if np.ndim(strides) == 0 else tuple(strides)
    if len(strides) != 2:
        raise ValueError(f"strides must be an integer >= 1 or a pair of them; got {strides}")
    strides = tuple(check_count(s, "strides", what="or a pair of them") for s in strides)
    if not isinstance(padding, str) and not isinstance(padding, int) and len(padding) != 2:
        raise ValueError(
            f"padding must be 'SAME', 'VALID', an int or two (lo, hi) pairs; got {padding}"
        )
    pads = _pads(padding, x.shape, kernel.shape[:2], strides)
    out = [(x.shape[1 + d] + sum(pads[d]) - kernel.shape[d]) // strides[d] + 1 for d in range(2)]
    if any(p < 0 for pair in pads for p in pair) or min(out) < 1:
        raise ValueError(
            f"padding {padding} of an image {x.shape[1:3]} with a kernel {kernel.shape[:2]}: "
            f"padding must be >= 0 and leave an output of at least 1 x 1 (got {tuple(out)})"
        )
    return _conv2d(x, kernel, strides, pads)


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
