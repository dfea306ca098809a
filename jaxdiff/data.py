"""Data without downloads: 2-D toy sets generated in JAX, Gaussian mixtures, 8x8 digits, and
``uint8`` images for the image loader (procedural shapes, the digits upsampled).

Every toy set is a function ``(key, n) -> (n, 2)`` drawing fresh samples (an infinite training
set), scaled to roughly ``[-2.5, 2.5]``. ``load_digits`` reads scikit-learn's bundled 8x8 digits
(1,797 images, 10 classes; the ``data`` extra) scaled to ``[-1, 1]``, as ``(n, 8, 8, 1)`` images.
``shapes`` draws labelled RGB images of disks, squares and triangles and ``digits_images`` gives
the digits as ``uint8`` images of any size: data for :mod:`jaxdiff.loader` (its tests, the
benchmarks, and a stand-in for CIFAR-10 where nothing can be downloaded).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff._checks import check_count, check_positive
from jaxdiff.oracles import GaussianMixture

Array = jax.Array

__all__ = [
    "checkerboard",
    "moons",
    "eight_gaussians",
    "eight_gaussians_mixture",
    "spirals",
    "rings",
    "TOY_DATASETS",
    "load_digits",
    "shapes",
    "digits_images",
]


def _count(n: int) -> int:
    """``n`` as a Python int >= 0 (a number of points: static, a shape)."""
    return check_count(n, "n", minimum=0, what="a number of points")


def _noise(noise: float) -> Any:
    return check_positive(noise, "noise", strict=False)


def checkerboard(key: Array, n: int) -> Array:
    """Uniform on the 8 black squares of a 4x4 checkerboard on ``[-2, 2]^2`` (Grathwohl et al. 2019).

    >>> x = checkerboard(jax.random.key(0), 1000)
    >>> bool(((jnp.floor(x[:, 0]) + jnp.floor(x[:, 1])) % 2 == 0).all())
    True
    """
    n = _count(n)
    k1, k2, k3 = jax.random.split(key, 3)
    x1 = jax.random.uniform(k1, (n,), minval=-2.0, maxval=2.0)
    x2 = jax.random.uniform(k2, (n,)) - 2.0 * jax.random.randint(k3, (n,), 0, 2).astype(x1.dtype)
    x2 = x2 + jnp.mod(jnp.floor(x1), 2.0)  # rows shifted so the squares alternate
    return jnp.stack([x1, x2], axis=1)


def moons(key: Array, n: int, noise: float = 0.1) -> Array:
    """Two interleaved half circles (scikit-learn's ``make_moons``), centred and scaled by 1.5."""
    n, noise = _count(n), _noise(noise)
    k1, k2, k3 = jax.random.split(key, 3)
    theta = jnp.pi * jax.random.uniform(k1, (n,))
    upper = jax.random.bernoulli(k2, 0.5, (n,))
    x = jnp.where(upper, jnp.cos(theta), 1.0 - jnp.cos(theta))
    y = jnp.where(upper, jnp.sin(theta), 0.5 - jnp.sin(theta))
    pts = jnp.stack([x - 0.5, y - 0.25], axis=1) + noise * jax.random.normal(k3, (n, 2))
    return 1.5 * pts


def eight_gaussians_mixture(radius: float = 2.0, std: float = 0.25) -> GaussianMixture:
    """Eight equal isotropic Gaussians on a circle: exact scores and fields from the oracle."""
    angles = 2.0 * jnp.pi * jnp.arange(8) / 8
    means = radius * jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=1)
    return GaussianMixture.isotropic(means, std=std)


def eight_gaussians(key: Array, n: int) -> Array:
    """Samples of ``eight_gaussians_mixture()``: radius 2, std 0.25."""
    return eight_gaussians_mixture().sample(key, _count(n))


def spirals(key: Array, n: int, noise: float = 0.1) -> Array:
    """Two interleaved spirals (Grathwohl et al. 2019's ``2spirals``), scaled by 1/4."""
    n, noise = _count(n), _noise(noise)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    r = jnp.sqrt(jax.random.uniform(k1, (n,))) * 3.0 * jnp.pi
    pts = jnp.stack([-jnp.cos(r) * r, jnp.sin(r) * r], axis=1)
    pts = pts + 0.5 * jax.random.uniform(k2, (n, 2))
    sign = jnp.where(jax.random.bernoulli(k3, 0.5, (n,)), 1.0, -1.0)[:, None]
    return (sign * pts) / 4.0 + noise * jax.random.normal(k4, (n, 2))


def rings(key: Array, n: int, noise: float = 0.08) -> Array:
    """Three concentric rings of radii 0.7, 1.4, 2.1, points in proportion to the circumference."""
    n, noise = _count(n), _noise(noise)
    k1, k2, k3 = jax.random.split(key, 3)
    radii = jnp.array([0.7, 1.4, 2.1])
    r = radii[jax.random.choice(k1, 3, (n,), p=radii / radii.sum())]
    theta = 2.0 * jnp.pi * jax.random.uniform(k2, (n,))
    pts = r[:, None] * jnp.stack([jnp.cos(theta), jnp.sin(theta)], axis=1)
    return pts + noise * jax.random.normal(k3, (n, 2))


TOY_DATASETS: dict[str, Callable[[Array, int], Array]] = {
    "checkerboard": checkerboard,
    "moons": moons,
    "8gaussians": eight_gaussians,
    "spirals": spirals,
    "rings": rings,
}


def load_digits(split: str = "train", *, test_size: int = 297) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as ``(images (n, 8, 8, 1) in [-1, 1], labels (n,))``.

    ``split`` is ``"train"`` (1,500 images), ``"test"`` (297) or ``"all"`` (1,797); the split is a
    fixed permutation (seed 0), the same on every machine. Pixels ``0..16`` map to ``p / 8 - 1``.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all'; got {split!r}")
    test_size = check_count(test_size, "test_size", minimum=0)  # -3 swapped the two sizes
    if test_size > 1797:
        raise ValueError(f"test_size must be at most the 1,797 digits; got {test_size}")
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(
            "the digits data set needs scikit-learn: pip install 'jaxdiff[data]'"
        ) from err
    bunch = _load()
    images = (bunch.images.astype(np.float32) / 8.0 - 1.0)[..., None]
    labels = bunch.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(labels))
    if split == "train":
        order = order[test_size:]
    elif split == "test":
        order = order[:test_size]
    return images[order], labels[order]


def shapes(
    n: int, size: int = 32, *, seed: int = 0, noise: float = 8.0
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` RGB images ``uint8 (n, size, size, 3)`` of one shape each, and its class ``(n,)``:
    0 disk, 1 square, 2 triangle (pointing up), with random centre, size and colours, plus
    Gaussian pixel noise of std ``noise`` (8 makes PNGs of ~2.3 KB at 32x32, CIFAR-10's size).
    Not mirror-symmetric in general (the centre is off the middle), so horizontal flips show.

    >>> x, y = shapes(4, 16)
    >>> x.shape, x.dtype, y.tolist()
    ((4, 16, 16, 3), dtype('uint8'), [2, 1, 1, 0])
    """
    n = _count(n)
    size = check_count(size, "size")
    if not (np.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be finite and >= 0 (a pixel std); got {noise!r}")
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    cx, cy = (rng.uniform(0.3, 0.7, (2, n, 1, 1)) * size).astype(np.float32)
    r = (rng.uniform(0.15, 0.3, (n, 1, 1)) * size).astype(np.float32)
    dx, dy = xx - cx, yy - cy
    disk = dx**2 + dy**2 <= r**2
    square = (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    triangle = (dy <= 0.7 * r) & (dy >= -r) & (np.abs(dx) <= 0.6 * (dy + r))
    cls = labels[:, None, None]
    mask = np.where(cls == 0, disk, np.where(cls == 1, square, triangle))
    background = rng.integers(0, 100, (n, 1, 1, 3))
    foreground = rng.integers(120, 256, (n, 1, 1, 3))
    img = np.where(mask[..., None], foreground, background).astype(np.float32)
    if noise:
        img = img + rng.normal(0.0, noise, img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), labels.astype(np.int32)


def digits_images(
    split: str = "train", size: int = 32, channels: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """The digits of :func:`load_digits` as ``uint8`` images ``(n, size, size, channels)``
    (pixels ``0..16`` to ``0..255``, bilinear upsampling; ``channels = 3`` repeats the gray) and
    their labels."""
    channels = check_count(channels, "channels")  # 0 gave images without a channel
    size = check_count(size, "size")  # 0 gave (297, 0, 0, 1)
    images, labels = load_digits(split)
    x = jax.image.resize(jnp.asarray(images), (images.shape[0], size, size, 1), "linear")
    x = np.clip(np.rint((np.asarray(x) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return np.repeat(x, channels, axis=-1), labels
