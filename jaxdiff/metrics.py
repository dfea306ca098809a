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
import numpy as np
from jax.typing import ArrayLike

from jaxdiff._checks import (
    check_count,
    check_finite,
    check_positive,
    concrete,
    data_dtype,
    error_if,
    safe_sqrt,
    value_check,
    wide_dtype,
)

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
    return check_count(block, "block")


def _pair_mean(
    fn: Callable[[Array], Array],
    x: ArrayLike,
    y: ArrayLike,
    block: int,
    skip_diag: bool,
    near_slope: bool = True,
):
    """Mean of ``fn(|x_i - y_j|^2)`` over all pairs (``i != j`` if ``skip_diag``), in blocks.

    ``|x|^2 + |y|^2 - 2 x.y`` holds the squared distance to a few ulps of ``|x|^2 + |y|^2``
    only; ``near_slope=False`` takes no derivative through pairs closer than that (their
    ``d2`` is rounding noise: ``sqrt``'s slope there made the energy distance's gradient ~1e9
    for points 1e-4 apart, where each pair's true slope is a unit vector)."""
    x, y = jnp.asarray(x), jnp.asarray(y)
    n, m = x.shape[0], y.shape[0]
    pad = -n % block
    xb = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, block, x.shape[1])
    valid = (jnp.arange(n + pad) < n).reshape(-1, block)
    y_sq = jnp.sum(y**2, axis=1)

    def one(args):
        xs, ok, start = args
        scale = jnp.sum(xs**2, 1)[:, None] + y_sq[None, :]
        d2 = jnp.maximum(scale - 2.0 * xs @ y.T, 0.0)
        if not near_slope:
            near = d2 <= 0.5 * jnp.finfo(d2.dtype).eps * scale  # ~ an ulp of scale
            d2 = jnp.where(near, jax.lax.stop_gradient(d2), d2)
        vals = fn(d2)
        mask = ok[:, None]
        if skip_diag:
            mask = mask & ((start + jnp.arange(block))[:, None] != jnp.arange(m)[None, :])
        return jnp.sum(jnp.where(mask, vals, 0.0))

    starts = jnp.arange(xb.shape[0]) * block
    total = jnp.sum(jax.lax.map(one, (xb, valid, starts)))
    return total / (n * (m - 1) if skip_diag else n * m)


def energy_distance(x: ArrayLike, y: ArrayLike, *, block: int = 1024) -> Array:
    """Energy distance ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` (Székely & Rizzo 2013), Euclidean norm.

    Zero iff the distributions are equal; the within-set terms exclude ``i = j`` (U-statistics),
    so the estimate is unbiased for independent sets and can be negative: it is not 0 for the
    same set passed twice (``energy_distance(x, x) < 0``), pass independent samples.

    >>> import jax
    >>> x = jax.random.normal(jax.random.key(0), (2000, 2))
    >>> float(energy_distance(x, x + 3.0)) > 1.0
    True
    """
    return _energy_distance(*_two_sets(x, y, 2), _block(block))


@functools.partial(jax.jit, static_argnums=2)  # one compile per shape: repeated calls are fast
def _energy_distance(x: Array, y: Array, block: int) -> Array:
    dist = lambda d2: jnp.sqrt(d2 + 1e-30)  # noqa: E731
    xy = _pair_mean(dist, x, y, block, False, near_slope=False)
    xx = _pair_mean(dist, x, x, block, True, near_slope=False)
    yy = _pair_mean(dist, y, y, block, True, near_slope=False)
    return 2.0 * xy - xx - yy


def mmd(
    x: ArrayLike, y: ArrayLike, bandwidths: float | Sequence[float] = 1.0, *, block: int = 1024
) -> Array:
    """Unbiased squared MMD (Gretton et al. 2012) with the kernel ``sum_h exp(-|a - b|^2 / (2 h^2))``.

    ``bandwidths`` is one length scale ``h`` or several (their kernels are summed), each > 0.
    Unbiased for independent sets, so it can be negative (and is for the same set passed twice).
    """
    x, y = _two_sets(x, y, 2)
    hs = jnp.atleast_1d(jnp.asarray(check_positive(bandwidths, "bandwidths"), x.dtype))
    if hs.ndim != 1 or not hs.size:  # no bandwidth summed no kernel: MMD 0 whatever x and y
        raise ValueError(f"bandwidths must be one length scale or a list of them; got {bandwidths}")
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
    FID formula); the matrix square roots come from symmetric eigendecompositions and the cross
    term is the sum of the singular values of ``C_x^(1/2) C_y^(1/2)``, so the result is real
    and keeps float32's accuracy where it is a small difference of large traces. Computed in the inputs' dtype, float32 at least (bfloat16, float16 and integer
    features are widened); pass float64 features for tight comparisons.

    >>> import jax
    >>> x = jax.random.normal(jax.random.key(0), (4000, 3))
    >>> round(float(frechet_distance(x, x + 1.0)), 3)  # |shift|^2 = 3
    3.0
    """
    return _frechet_distance(*_two_sets(x, y, 2))


@jax.jit  # one program per shape (eagerly, the moments and roots would compile op by op)
def _frechet_distance(x: Array, y: Array) -> Array:
    (n, d), m = x.shape, y.shape[0]
    mx, my = jnp.mean(x, 0), jnp.mean(y, 0)
    if min(n, m) > d:  # jnp.cov of one feature is a scalar (d = 1 raised a TypeError in eigh)
        cx, cy = (jnp.cov(a, rowvar=False).reshape(d, d) for a in (x, y))
        return _from_stats(mx, cx, my, cy, False)
    # Rank-deficient covariances (n <= d): their roots' eigenvectors are not unique, and the
    # gradient through them was NaN. With C_x = A^T A, C_y = B^T B (A = (x - mx) / sqrt(n - 1)),
    # the cross term tr (C_x^(1/2) C_y C_x^(1/2))^(1/2) is the nuclear norm of A B^T (n x m).
    a, b = (x - mx[None]) / jnp.sqrt(n - 1.0), (y - my[None]) / jnp.sqrt(m - 1.0)
    tr_cross = jnp.sum(jnp.linalg.svd(a @ b.T, compute_uv=False))
    value = jnp.sum((mx - my) ** 2) + jnp.sum(a**2) + jnp.sum(b**2) - 2.0 * tr_cross
    return jnp.maximum(value, 0.0)


def _root_eigh(c: Array) -> tuple[Array, Array, Array, Array]:
    w, v = jnp.linalg.eigh(0.5 * (c + c.T))
    s = safe_sqrt(w)
    return (v * s[None, :]) @ v.T, w, v, s


@jax.custom_jvp
def _sqrtm_psd(c: Array) -> tuple[Array, Array]:
    """The root of a symmetric PSD matrix, and its eigenvalues.

    Differentiated by the Daleckii-Krein formula ``d root = V ((V^T dC V) / (s_i + s_j)) V^T``
    (``s = sqrt(w)``; 0 where ``s_i + s_j = 0``), finite for repeated eigenvalues: through
    ``eigh``'s eigenvectors the gradient was NaN there (``cov_x = I``; a constant feature)."""
    root, w, _, _ = _root_eigh(c)
    return root, w


@_sqrtm_psd.defjvp
def _sqrtm_psd_jvp(primals: tuple, tangents: tuple) -> tuple:
    (c,), (dc,) = primals, tangents
    root, w, v, s = _root_eigh(c)
    a = v.T @ (0.5 * (dc + dc.T)) @ v
    denom = s[:, None] + s[None, :]
    pos = denom > 0
    inv = jnp.where(pos, 1.0 / jnp.where(pos, denom, 1.0), 0.0)
    return (root, w), (v @ (a * inv) @ v.T, jnp.diagonal(a))


def _psd_check(c: Array, w: Array, name: str) -> Array:
    """Tie ``c`` to a check that it is symmetric with eigenvalues ``w >= 0`` up to rounding."""
    msg = f"{name} must be a symmetric positive semi-definite matrix"

    def bad(xp, c, w):
        tol = 100 * xp.finfo(w.dtype).eps * c.shape[0] * xp.maximum(xp.max(xp.abs(w)), 1e-30)
        ok = xp.isfinite(c).all() & (xp.min(w) >= -tol) & xp.allclose(c, c.T, rtol=1e-4)
        return ~ok

    cv, wv = concrete(c), concrete(w)
    if cv is None or wv is None:
        return error_if(c, bad(jnp, c, w), msg)
    if bad(np, cv, wv):
        raise ValueError(f"{msg}; got smallest eigenvalue {float(np.min(wv)):.4g}")
    return c


def frechet_distance_from_stats(
    mu_x: ArrayLike, cov_x: ArrayLike, mu_y: ArrayLike, cov_y: ArrayLike
) -> Array:
    """The Fréchet (2-Wasserstein) distance squared between ``N(mu_x, cov_x)`` and ``N(mu_y, cov_y)``.

    ``mu (d,)`` and ``cov (d, d)``; a covariance that is not symmetric positive semi-definite
    (up to rounding) is an error, eagerly and under ``jit``."""
    mu_x, cov_x, mu_y, cov_y = (jnp.asarray(a) for a in (mu_x, cov_x, mu_y, cov_y))
    d = mu_x.shape[0] if mu_x.ndim == 1 else -1
    if d < 0 or mu_y.shape != (d,) or cov_x.shape != (d, d) or cov_y.shape != (d, d):
        raise ValueError(
            "expected mu_x, mu_y of shape (d,) and cov_x, cov_y of shape (d, d); got shapes "
            f"{mu_x.shape}, {mu_y.shape}, {cov_x.shape}, {cov_y.shape}"
        )
    mu_x, mu_y = check_finite(mu_x, "mu_x"), check_finite(mu_y, "mu_y")  # NaN gave NaN
    return _from_stats(mu_x, cov_x, mu_y, cov_y, True)


def _from_stats(mu_x: Array, cov_x: Array, mu_y: Array, cov_y: Array, check: bool) -> Array:
    root_x, wx = _sqrtm_psd(cov_x)
    root_y, wy = _sqrtm_psd(cov_y)
    if check:
        cov_x = _psd_check(cov_x, wx, "cov_x")
        cov_y = _psd_check(cov_y, wy, "cov_y")
    # tr (C_x^(1/2) C_y C_x^(1/2))^(1/2) is the sum of the singular values of C_x^(1/2) C_y^(1/2),
    # which come to eps times the largest; the square roots of the eigenvalues of the former
    # lost sqrt(eps * largest) each (0.6% of the digits' distance in float32)
    tr_cross = jnp.sum(jnp.linalg.svd(root_x @ root_y, compute_uv=False))
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
        # the expansion finds the nearest row; its distance is taken from the difference (the
        # expansion's rounding at the points' scale gave 0 or 5x too much below ~5e-3, and no
        # slope). At a copy of a reference point sqrt's infinite slope times 0 made the
        # gradient NaN: there it is 0 (a subgradient of |x - r| at x = r)
        nearest = ref[jnp.argmin(d2, axis=1)]
        return safe_sqrt(jnp.sum((xs - nearest) ** 2, axis=1))

    return jax.lax.map(one, xb).reshape(-1)[:n]


def memorization_ratio(samples: ArrayLike, train: ArrayLike, held_out: ArrayLike) -> Array:
    """Median nearest-training-neighbour distance of ``samples`` over that of ``held_out`` data.

    About 1 for a model that generalises like fresh data; well below 1 (samples sitting on
    training points) signals memorisation. Samples and held-out data must be equally many-ish.
    """
    d_samples = nearest_neighbour_distance(samples, train)
    held = jnp.median(nearest_neighbour_distance(held_out, train))
    msg = (
        "held_out's median distance to its nearest training point must be > 0 (the ratio "
        "divides by it): half or more of held_out are copies of training points"
    )
    held = value_check(held, lambda xp, v: ~(v > 0), msg, lambda v: str(float(v)))
    return jnp.median(d_samples) / held
