"""Two-sample statistics between sets of vectors, Fréchet distance and a memorisation check.

``energy_distance`` and ``mmd`` take ``x (n, d)`` and ``y (m, d)`` and work blockwise, so memory
stays ``O(block^2)``. ``frechet_distance`` compares Gaussians fitted to features (FID's formula);
``nearest_neighbour_distance`` and ``memorization_ratio`` check that samples are not copies of
the training set.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxdiff._checks import check_finite, check_positive, data_dtype, wide_dtype

Array = jax.Array

__all__ = [
    "energy_distance",
    "mmd",
    "frechet_distance",
    "frechet_distance_from_stats",
    "nearest_neighbour_distance",
    "memorization_ratio",
]


def _two_sets(
    x: ArrayLike, y: ArrayLike, min_rows: int, names: tuple[str, str] = ("x", "y")
) -> tuple[Array, Array]:
    """``x (n, d)`` and ``y (m, d)`` as floating arrays (integers such as uint8 pixels overflowed
    in ``|x|^2``), each with at least ``min_rows`` finite rows, both shifted by their common mean:
    every statistic here is translation invariant, and ``|x|^2 + |y|^2 - 2 x.y`` loses the
    distances of points far from the origin (float32 at an offset of 1e4: 0.0206 for -0.0041)."""
    dtype = wide_dtype(data_dtype(jnp.result_type(x, y)))
    x, y = jnp.asarray(x).astype(dtype), jnp.asarray(y).astype(dtype)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"expected x (n, d) and y (m, d); got shapes {x.shape} and {y.shape}")
    if x.shape[0] < min_rows or y.shape[0] < min_rows:
        raise ValueError(
            f"this statistic needs at least {min_rows} samples in each set (its within-set terms "
            f"average over pairs i != j); got {x.shape[0]} and {y.shape[0]}"
        )
    x, y = check_finite(x, names[0]), check_finite(y, names[1])
    centre = (jnp.sum(x, 0, keepdims=True) + jnp.sum(y, 0, keepdims=True)) / (
        x.shape[0] + y.shape[0]
    )
    return x - centre, y - centre


def _block(block: int) -> int:
    if isinstance(block, bool) or int(block) < 1:
        raise ValueError(f"block must be an integer >= 1; got {block!r}")
    return int(block)


def _pair_mean(
    fn: Callable[[Array], Array], x: ArrayLike, y: ArrayLike, block: int, skip_diag: bool
):
    """Mean of ``fn(|x_i - y_j|^2)`` over all pairs (``i != j`` if ``skip_diag``), in blocks."""
    x, y = jnp.asarray(x), jnp.asarray(y)
    n, m = x.shape[0], y.shape[0]
    pad = -n % block
    xb = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, block, x.shape[1])
    valid = (jnp.arange(n + pad) < n).reshape(-1, block)
    y_sq = jnp.sum(y**2, axis=1)

    def one(args):
        xs, ok, start = args
        d2 = jnp.sum(xs**2, 1)[:, None] + y_sq[None, :] - 2.0 * xs @ y.T
        vals = fn(jnp.maximum(d2, 0.0))
        mask = ok[:, None]
        if skip_diag:
            mask = mask & ((start + jnp.arange(block))[:, None] != jnp.arange(m)[None, :])
        return jnp.sum(jnp.where(mask, vals, 0.0))

    starts = jnp.arange(xb.shape[0]) * block
    total = jnp.sum(jax.lax.map(one, (xb, valid, starts)))
    return total / (n * (m - 1) if skip_diag else n * m)


def energy_distance(x: ArrayLike, y: ArrayLike, *, block: int = 1024) -> Array:
    """Energy distance ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` (Székely & Rizzo 2013), Euclidean norm.

    Zero iff the distributions are equal; the within-set terms exclude ``i = j`` (U-statistics).

    >>> import jax
    >>> x = jax.random.normal(jax.random.key(0), (2000, 2))
    >>> float(energy_distance(x, x + 3.0)) > 1.0
    True
    """
    return _energy_distance(*_two_sets(x, y, 2), _block(block))


@functools.partial(jax.jit, static_argnums=2)  # one compile per shape: repeated calls are fast
def _energy_distance(x: Array, y: Array, block: int) -> Array:
    dist = lambda d2: jnp.sqrt(d2 + 1e-30)  # noqa: E731
    xy = _pair_mean(dist, x, y, block, False)
    xx = _pair_mean(dist, x, x, block, True)
    yy = _pair_mean(dist, y, y, block, True)
    return 2.0 * xy - xx - yy


def mmd(
    x: ArrayLike, y: ArrayLike, bandwidths: float | Sequence[float] = 1.0, *, block: int = 1024
) -> Array:
    """Unbiased squared MMD (Gretton et al. 2012) with the kernel ``sum_h exp(-|a - b|^2 / (2 h^2))``.

    ``bandwidths`` is one length scale ``h`` or several (their kernels are summed), each > 0.
    """
    x, y = _two_sets(x, y, 2)
    hs = jnp.atleast_1d(jnp.asarray(check_positive(bandwidths, "bandwidths"), x.dtype))
    return _mmd(x, y, hs, _block(block))


@functools.partial(jax.jit, static_argnums=3)
def _mmd(x: Array, y: Array, hs: Array, block: int) -> Array:

    def kernel(d2):
        scale = (2 * hs**2).reshape((1,) * d2.ndim + hs.shape)
        return jnp.sum(jnp.exp(-d2[..., None] / scale), axis=-1)

    xy = _pair_mean(kernel, x, y, block, False)
    xx = _pair_mean(kernel, x, x, block, True)
    yy = _pair_mean(kernel, y, y, block, True)
    return xx + yy - 2.0 * xy


def frechet_distance(x: ArrayLike, y: ArrayLike) -> Array:
    """Fréchet distance between Gaussians fitted to features ``x (n, d)`` and ``y (m, d)``.

    ``|mu_x - mu_y|^2 + tr(C_x + C_y - 2 (C_x^(1/2) C_y C_x^(1/2))^(1/2))`` (Heusel et al. 2017, the
    FID formula); the matrix square roots come from symmetric eigendecompositions, so the result
    is real. Computed in the inputs' dtype; pass float64 features for tight comparisons.

    >>> import jax
    >>> x = jax.random.normal(jax.random.key(0), (4000, 3))
    >>> round(float(frechet_distance(x, x + 1.0)), 3)  # |shift|^2 = 3
    3.0
    """
    return _frechet_distance(*_two_sets(x, y, 2))


@jax.jit  # one program per shape (eagerly, the moments and roots would compile op by op)
def _frechet_distance(x: Array, y: Array) -> Array:
    mx, my = jnp.mean(x, 0), jnp.mean(y, 0)
    cx, cy = jnp.cov(x, rowvar=False), jnp.cov(y, rowvar=False)
    return frechet_distance_from_stats(mx, cx, my, cy)


def _sqrtm_psd(c: Array) -> Array:
    w, v = jnp.linalg.eigh(0.5 * (c + c.T))
    return (v * jnp.sqrt(jnp.maximum(w, 0.0))[None, :]) @ v.T


def frechet_distance_from_stats(mu_x: Array, cov_x: Array, mu_y: Array, cov_y: Array) -> Array:
    """The Fréchet (2-Wasserstein) distance squared between ``N(mu_x, cov_x)`` and ``N(mu_y, cov_y)``."""
    root = _sqrtm_psd(cov_x)
    cross = jnp.linalg.eigvalsh(root @ cov_y @ root)
    tr_cross = jnp.sum(jnp.sqrt(jnp.maximum(cross, 0.0)))
    value = jnp.sum((mu_x - mu_y) ** 2) + jnp.trace(cov_x) + jnp.trace(cov_y) - 2.0 * tr_cross
    return jnp.maximum(value, 0.0)  # a squared distance: rounding gave -0.18 for x against x


def nearest_neighbour_distance(x: ArrayLike, reference: ArrayLike, *, block: int = 1024) -> Array:
    """Euclidean distance from each row of ``x (n, ...)`` to its nearest row of ``reference``."""
    if not (jnp.ndim(x) and jnp.ndim(reference)) or not (
        jnp.shape(x)[0] and jnp.shape(reference)[0]
    ):
        raise ValueError(
            f"x and reference must be (n, ...) with n >= 1; got shapes {jnp.shape(x)} and "
            f"{jnp.shape(reference)}"
        )
    x = jnp.asarray(x).reshape(jnp.shape(x)[0], -1)
    ref = jnp.asarray(reference).reshape(jnp.shape(reference)[0], -1)
    if x.shape[1] != ref.shape[1]:
        raise ValueError(f"x and reference have rows of sizes {x.shape[1]} and {ref.shape[1]}")
    x, ref = _two_sets(x, ref, 1, ("x", "reference"))
    return _nearest(x, ref, _block(block))


@functools.partial(jax.jit, static_argnums=2)  # a fresh lax.map body would compile every call
def _nearest(x: Array, ref: Array, block: int) -> Array:
    n = x.shape[0]
    pad = -n % block
    xb = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, block, x.shape[1])
    r_sq = jnp.sum(ref**2, axis=1)

    def one(xs):
        d2 = jnp.sum(xs**2, 1)[:, None] + r_sq[None, :] - 2.0 * xs @ ref.T
        return jnp.sqrt(jnp.maximum(jnp.min(d2, axis=1), 0.0))

    return jax.lax.map(one, xb).reshape(-1)[:n]


def memorization_ratio(samples: ArrayLike, train: ArrayLike, held_out: ArrayLike) -> Array:
    """Median nearest-training-neighbour distance of ``samples`` over that of ``held_out`` data.

    About 1 for a model that generalises like fresh data; well below 1 (samples sitting on
    training points) signals memorisation. Samples and held-out data must be equally many-ish.
    """
    d_samples = nearest_neighbour_distance(samples, train)
    d_held = nearest_neighbour_distance(held_out, train)
    return jnp.median(d_samples) / jnp.median(d_held)
