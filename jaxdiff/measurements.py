r"""Linear measurement models ``y = A x0 + sigma_y n``, ``n ~ N(0, I)``, for inverse problems.

A :class:`LinearOperator` maps an event of shape ``in_shape`` (a vector, an image ``(H, W)`` or
``(H, W, C)``) to ``R^m``; it knows its transpose and how to solve ``(r2 A A^T + s2 I) c = v``,
the one linear solve that posterior samplers need (``jaxdiff.inverse``). Operators act on any
leading batch axes: ``A.forward(x)`` takes ``(*batch, *in_shape)`` and returns ``(*batch, m)``.

=====================================  ==========================================================
constructor                            ``A``
=====================================  ==========================================================
``matrix_operator(M, in_shape)``       a dense ``(m, d)`` matrix on the flattened event
``mask_operator(mask)``                the entries where ``mask`` is true (inpainting); ``A A^T = I``
``subsample_operator(in_shape, f)``    ``f x f`` average pooling (super-resolution); ``A A^T = I/f^2``
``blur_operator(in_shape, std)``       a Gaussian blur with zero padding (deblurring); ``m = d``
``linear_operator(fn, in_shape)``      any linear function; its transpose by ``jax.linear_transpose``
=====================================  ==========================================================

A :class:`Measurement` is an operator, an observation ``y`` (``(m,)`` shared by every sample, or
``(batch, m)``, one per sample) and the noise level ``sigma_y >= 0``; every piece is an
``equinox.Module``, so measurements pass through ``jit`` and ``vmap``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxdiff._checks import check_count, check_finite, check_positive, concrete, normal_like

Array = jax.Array

__all__ = [
    "LinearOperator",
    "Measurement",
    "measure",
    "matrix_operator",
    "mask_operator",
    "subsample_operator",
    "blur_operator",
    "linear_operator",
]


class LinearOperator(eqx.Module):
    """A linear map ``A`` from events of shape ``in_shape`` to ``R^out_dim``, with ``A^T``.

    Subclasses define ``_forward(x)`` and ``_transpose(y)`` on one event; ``forward``,
    ``transpose`` and the solves handle the batch axes. ``gram_solve`` defaults to one ``eigh`` of
    the dense ``A A^T`` (an ``(m, m)`` matrix shared by the batch); operators with a closed form
    override it.
    """

    in_shape: tuple[int, ...] = eqx.field(static=True)
    out_dim: int = eqx.field(static=True)

    def _forward(self, x: Array) -> Array:
        raise NotImplementedError

    def _transpose(self, y: Array) -> Array:
        raise NotImplementedError

    @property
    def in_dim(self) -> int:
        return math.prod(self.in_shape)

    def forward(self, x: ArrayLike) -> Array:
        """``A x``: ``(*batch, *in_shape) -> (*batch, m)``."""
        x = jnp.asarray(x)
        k = len(self.in_shape)
        if x.shape[x.ndim - k :] != self.in_shape or x.ndim < k:
            raise ValueError(f"A takes x of shape (..., *{self.in_shape}); got {x.shape}")
        batch = x.shape[: x.ndim - k]
        out = jax.vmap(self._forward)(x.reshape((-1, *self.in_shape)))
        return out.reshape((*batch, self.out_dim))

    __call__ = forward

    def transpose(self, y: ArrayLike) -> Array:
        """``A^T y``: ``(*batch, m) -> (*batch, *in_shape)``."""
        y = jnp.asarray(y)
        if y.shape[-1:] != (self.out_dim,):
            raise ValueError(f"A^T takes y of shape (..., {self.out_dim}); got {y.shape}")
        out = jax.vmap(self._transpose)(y.reshape(-1, self.out_dim))
        return out.reshape((*y.shape[:-1], *self.in_shape))

    def matrix(self) -> Array:
        """The dense ``(m, d)`` matrix of ``A`` on the flattened event."""
        eye = jnp.eye(self.in_dim, dtype=jnp.result_type(float)).reshape(-1, *self.in_shape)
        return jax.vmap(self._forward)(eye).T

    def gram_solve(self, v: ArrayLike, r2: ArrayLike, s2: ArrayLike) -> Array:
        """``(r2 A A^T + s2 I)^{-1} v`` for ``v (*batch, m)``; ``r2``, ``s2`` scalars or ``batch``."""
        mat = self.matrix()
        lam, vecs = jnp.linalg.eigh(mat @ mat.T)  # one (m, m) eigh, shared by the batch
        v = jnp.asarray(v)
        z = v @ vecs.astype(v.dtype)
        return (z / _diag(r2, s2, lam, v)) @ vecs.T.astype(v.dtype)

    def pinv(self, v: ArrayLike) -> Array:
        """The pseudo-inverse ``A^+ v = A^T (A A^T)^{-1} v`` (``A`` of full row rank)."""
        return self.transpose(self.gram_solve(v, 1.0, 0.0))


def _diag(r2, s2, lam, v) -> Array:
    """``r2 lam + s2`` shaped to divide ``v (*batch, m)``; ``r2``/``s2`` scalars or ``(*batch,)``."""
    r2, s2 = jnp.asarray(r2, v.dtype), jnp.asarray(s2, v.dtype)
    pad = lambda c: c.reshape(c.shape + (1,) * (v.ndim - c.ndim))  # noqa: E731
    return pad(r2) * jnp.broadcast_to(lam, v.shape).astype(v.dtype) + pad(s2)


class _Matrix(LinearOperator):
    mat: Array

    def _forward(self, x):
        return self.mat.astype(x.dtype) @ x.reshape(-1)

    def _transpose(self, y):
        return (self.mat.T.astype(y.dtype) @ y).reshape(self.in_shape)

    def matrix(self) -> Array:
        return self.mat


def matrix_operator(matrix: ArrayLike, in_shape: tuple[int, ...] | None = None) -> LinearOperator:
    """``A x = M x.ravel()`` for a dense ``M`` of shape ``(m, d)``; ``in_shape`` defaults to ``(d,)``.

    >>> import jax.numpy as jnp
    >>> A = matrix_operator(jnp.array([[1.0, 2.0]]))
    >>> A.forward(jnp.ones((3, 2))).tolist(), A.transpose(jnp.ones((1,))).tolist()
    ([[3.0], [3.0], [3.0]], [1.0, 2.0])
    """
    mat = jnp.asarray(matrix)
    if mat.ndim != 2:
        raise ValueError(f"matrix must be (m, d); got shape {mat.shape}")
    in_shape = (mat.shape[1],) if in_shape is None else tuple(in_shape)
    if math.prod(in_shape) != mat.shape[1]:
        raise ValueError(
            f"in_shape {in_shape} has {math.prod(in_shape)} entries; M has {mat.shape[1]} columns"
        )
    return _Matrix(in_shape, mat.shape[0], check_finite(mat, "matrix"))


class _Mask(LinearOperator):
    index: tuple[int, ...] = eqx.field(static=True, converter=lambda v: tuple(int(i) for i in v))

    def _forward(self, x):
        return x.reshape(-1)[jnp.asarray(self.index, jnp.int32)]

    def _transpose(self, y):
        flat = jnp.zeros((self.in_dim,), y.dtype).at[jnp.asarray(self.index, jnp.int32)].set(y)
        return flat.reshape(self.in_shape)

    def gram_solve(self, v, r2, s2):  # A A^T = I
        v = jnp.asarray(v)
        return v / _diag(r2, s2, jnp.ones((), v.dtype), v)


def mask_operator(mask: ArrayLike) -> LinearOperator:
    """The entries of the event where ``mask`` is true, in row-major order (inpainting).

    ``mask`` has the event's shape and must be concrete (its count is the output size ``m``).
    ``A A^T = I``, so ``A^+ = A^T`` and replacement equals projection.
    """
    value = concrete(mask)
    if value is None:
        raise ValueError("mask must be concrete (not traced): its count sets the output size")
    if value.dtype != bool and not np.isin(value, (0, 1)).all():
        raise ValueError(
            f"mask must be boolean (or 0/1); got values such as {value.ravel()[:4].tolist()}"
        )
    value = np.asarray(value, bool)
    index = np.flatnonzero(value)
    if index.size == 0:
        raise ValueError("mask selects no entry")
    return _Mask(tuple(value.shape), int(index.size), index)


class _Subsample(LinearOperator):
    factor: int = eqx.field(static=True)

    def _forward(self, x):
        h, w, *c = self.in_shape
        f = self.factor
        return x.reshape(h // f, f, w // f, f, *c).mean(axis=(1, 3)).reshape(-1)

    def _transpose(self, y):
        h, w, *c = self.in_shape
        f = self.factor
        low = y.reshape(h // f, 1, w // f, 1, *c) / f**2
        return jnp.broadcast_to(low, (h // f, f, w // f, f, *c)).reshape(self.in_shape)

    def gram_solve(self, v, r2, s2):  # A A^T = I / f^2
        v = jnp.asarray(v)
        return v / _diag(r2, s2, jnp.asarray(1.0 / self.factor**2, v.dtype), v)


def subsample_operator(in_shape: tuple[int, ...], factor: int = 2) -> LinearOperator:
    """Average pooling over ``factor x factor`` blocks of an image ``(H, W[, C])`` (super-resolution).

    ``m = H W C / factor^2``; ``A A^T = I / factor^2``, so ``A^+ y`` repeats each low-resolution
    pixel over its block.
    """
    in_shape = tuple(int(n) for n in in_shape)
    factor = check_count(factor, "factor")
    if len(in_shape) not in (2, 3) or in_shape[0] % factor or in_shape[1] % factor:
        raise ValueError(
            f"subsample_operator needs an image (H, W[, C]) with H and W divisible by "
            f"factor = {factor}; got in_shape {in_shape}"
        )
    out = math.prod(in_shape) // factor**2
    return _Subsample(in_shape, out, int(factor))


class _Linear(LinearOperator):
    fn: Callable[[Array], Array] = eqx.field(static=True)
    fn_t: Callable[[Array], Array] | None = eqx.field(static=True)

    def _forward(self, x):
        return self.fn(x).reshape(-1)

    def _transpose(self, y):
        if self.fn_t is not None:
            return self.fn_t(y).reshape(self.in_shape)
        fn = lambda x: self.fn(x).reshape(-1)  # noqa: E731
        primal = jax.ShapeDtypeStruct(self.in_shape, y.dtype)
        return jax.linear_transpose(fn, primal)(y)[0]


def linear_operator(
    fn: Callable[[Array], Array],
    in_shape: tuple[int, ...],
    transpose: Callable[[Array], Array] | None = None,
) -> LinearOperator:
    """The operator of a linear function ``fn`` of one event of shape ``in_shape``.

    ``transpose`` (``(m,) -> in_shape``) defaults to ``jax.linear_transpose(fn)``; ``fn`` must be
    linear (not affine) for either to be right. ``gram_solve`` uses the dense ``A A^T``.
    """
    in_shape = tuple(int(n) for n in in_shape)
    out = jax.eval_shape(fn, jax.ShapeDtypeStruct(in_shape, jnp.float32))
    at_zero = concrete(fn(jnp.zeros(in_shape, jnp.float32)))
    if at_zero is not None and np.any(at_zero != 0):  # an affine fn: A^T and the solves were wrong
        raise ValueError(
            f"fn must be linear: fn(0) must be 0; got fn(0) with entries {at_zero.ravel()[:4].tolist()}"
        )
    return _Linear(in_shape, math.prod(out.shape), fn, transpose)


def blur_operator(in_shape: tuple[int, ...], std: float, size: int | None = None) -> LinearOperator:
    """A Gaussian blur of an image ``(H, W[, C])`` with a ``size x size`` kernel (default
    ``2 ceil(2 std) + 1``) and zero padding, each channel alone; the transpose is the correlation
    with the same kernel (``jax.linear_transpose``)."""
    check_positive(std, "std")
    size = 2 * math.ceil(2 * std) + 1 if size is None else check_count(size, "size")
    grid = np.arange(size) - (size - 1) / 2
    k1 = np.exp(-0.5 * (grid / std) ** 2)
    kernel = np.outer(k1, k1) / np.sum(k1) ** 2
    in_shape = tuple(int(n) for n in in_shape)
    if len(in_shape) not in (2, 3):
        raise ValueError(f"blur_operator needs an image (H, W[, C]); got in_shape {in_shape}")

    def blur(x):
        img = x.reshape(*in_shape[:2], -1)
        img = jnp.moveaxis(img, -1, 0)[:, None]  # (C, 1, H, W)
        k = jnp.asarray(kernel, x.dtype)[None, None]
        out = jax.lax.conv_general_dilated(img, k, (1, 1), "SAME")
        return jnp.moveaxis(out[:, 0], 0, -1).reshape(in_shape)

    return _Linear(in_shape, math.prod(in_shape), blur, None)


class Measurement(eqx.Module):
    """An observation ``y = A x0 + sigma_y n`` of unknown data ``x0``.

    ``y`` is ``(m,)`` (one measurement for every sample) or ``(batch, m)`` (one per sample);
    ``sigma_y >= 0`` is a scalar (``0``: noiseless).
    """

    operator: LinearOperator
    y: Array
    sigma_y: Array

    def __init__(self, operator: LinearOperator, y: ArrayLike, sigma_y: ArrayLike):
        if not isinstance(operator, LinearOperator):
            raise TypeError(
                f"operator must be a jaxdiff LinearOperator (e.g. jd.matrix_operator(M)); got "
                f"{type(operator).__name__}"
            )
        y = jnp.asarray(y)
        if y.ndim not in (1, 2) or y.shape[-1] != operator.out_dim:
            raise ValueError(
                f"y must have shape ({operator.out_dim},) or (batch, {operator.out_dim}); got {y.shape}"
            )
        if jnp.ndim(sigma_y) != 0:
            raise ValueError(f"sigma_y must be a scalar; got shape {jnp.shape(sigma_y)}")
        self.operator = operator
        self.y = check_finite(y, "y")
        self.sigma_y = jnp.asarray(check_positive(sigma_y, "sigma_y", strict=False))

    def residual(self, x0: ArrayLike) -> Array:
        """``y - A x0`` for ``x0 (batch, *in_shape)``: ``(batch, m)``."""
        ax = self.operator.forward(self.check_batch(x0))
        return self.y_for(ax.shape[0]).astype(ax.dtype) - ax

    def check_batch(self, x: ArrayLike) -> Array:
        """``x`` if it is ``(batch, *in_shape)``: one batch axis, then the operator's event (``A``
        takes any leading axes, so several batch axes or a smaller event paired ``y`` with the
        wrong samples)."""
        x, in_shape = jnp.asarray(x), self.operator.in_shape
        if x.shape[1:] != in_shape:
            raise ValueError(
                f"the measured samples must have shape (batch, *{in_shape}), one batch axis "
                f"then the operator's in_shape; got {x.shape} (several batch axes: "
                "jd.evaluate(field, x, t) with t of shape x.shape[:k] flattens them)"
            )
        return x

    def y_for(self, batch: int) -> Array:
        """``y`` broadcast to ``(batch, m)``: one measurement for all samples, or one each."""
        if self.y.ndim == 2 and self.y.shape[0] != batch:
            raise ValueError(
                f"y holds {self.y.shape[0]} measurements but x has {batch} samples; give "
                "one measurement (y of shape (m,)) or one per sample"
            )
        return jnp.broadcast_to(self.y, (batch, self.operator.out_dim))


def measure(key: Array, operator: LinearOperator, x0: ArrayLike, sigma_y: ArrayLike) -> Measurement:
    """Simulate ``y = A x0 + sigma_y n`` for a batch ``x0 (batch, *in_shape)``."""
    clean = operator.forward(x0)
    noise = normal_like(key, clean)
    return Measurement(operator, clean + jnp.asarray(sigma_y, clean.dtype) * noise, sigma_y)
