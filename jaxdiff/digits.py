"""A small classifier of the 8x8 digits, for a Fréchet distance and class-conditional accuracy.

The classifier is an MLP ``64 -> 256 -> 64 -> 10`` (SiLU) trained on the training split of
``jaxdiff.data.load_digits`` with Gaussian pixel noise (std 0.2) as augmentation, so that it also
reads slightly imperfect samples. Its weights are shipped in ``jaxdiff/assets/digits_classifier.npz``
(retrain with ``python scripts/train_digits_classifier.py``); the 64 penultimate activations are the
features of ``digits_frechet_distance`` (a FID for digits).
"""

from __future__ import annotations

import math
import os
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from jaxdiff._checks import check_count
from jaxdiff.metrics import frechet_distance

Array = jax.Array

__all__ = [
    "init_classifier",
    "classifier_features",
    "classifier_logits",
    "train_classifier",
    "load_classifier",
    "save_classifier",
    "classifier_accuracy",
    "digits_frechet_distance",
    "tile",
]

SIZES = (64, 256, 64, 10)
ASSET = "digits_classifier.npz"


def init_classifier(key: Array) -> dict:
    """He-initialised weights of the ``64 -> 256 -> 64 -> 10`` MLP."""
    keys = jax.random.split(key, len(SIZES) - 1)
    return {
        f"l{i}": {"w": jax.random.normal(k, (a, b)) * np.sqrt(2.0 / a), "b": jnp.zeros((b,))}
        for i, (k, a, b) in enumerate(zip(keys, SIZES[:-1], SIZES[1:], strict=True))
    }


def _check_images(images: ArrayLike) -> None:
    shape = jnp.shape(images)
    if len(shape) < 2 or math.prod(shape[1:]) != SIZES[0]:
        raise ValueError(f"images must be (n, 8, 8), (n, 8, 8, 1) or (n, 64); got shape {shape}")


def classifier_features(params: dict, images: ArrayLike) -> Array:
    """Penultimate activations ``(n, 64)`` of images ``(n, 8, 8[, 1])`` in ``[-1, 1]``."""
    _check_images(images)
    return _features(params, images)


@jax.jit  # one program per shape, not one per primitive when called eagerly
def _features(params: dict, images: ArrayLike) -> Array:
    h = jnp.asarray(images).reshape(jnp.shape(images)[0], -1)
    for i in range(len(SIZES) - 2):
        h = jax.nn.silu(h @ params[f"l{i}"]["w"] + params[f"l{i}"]["b"][None])
    return h


def classifier_logits(params: dict, images: ArrayLike) -> Array:
    """Class logits ``(n, 10)``."""
    _check_images(images)
    return _logits(params, images)


@jax.jit  # one program per shape, not one per primitive when called eagerly
def _logits(params: dict, images: ArrayLike) -> Array:
    last = params[f"l{len(SIZES) - 2}"]
    return _features(params, images) @ last["w"] + last["b"][None]


def train_classifier(
    images: ArrayLike,
    labels: ArrayLike,
    *,
    key: Array,
    steps: int = 3000,
    batch: int = 128,
    noise: float = 0.2,
    learning_rate: float = 2e-3,
) -> dict:
    """Train the classifier with AdamW and cross-entropy on noisy copies of ``images``."""
    images = jnp.asarray(images).reshape(jnp.shape(images)[0], -1)
    labels = jnp.asarray(labels)
    opt = optax.adamw(optax.cosine_decay_schedule(learning_rate, steps), weight_decay=1e-4)
    init_key, key = jax.random.split(key)
    params = init_classifier(init_key)

    def loss(p, k):
        k1, k2 = jax.random.split(k)
        idx = jax.random.randint(k1, (batch,), 0, images.shape[0])
        x = images[idx] + noise * jax.random.normal(k2, (batch, images.shape[1]))
        return optax.softmax_cross_entropy_with_integer_labels(
            classifier_logits(p, x), labels[idx]
        ).mean()

    def body(carry, k):
        p, s = carry
        g = jax.grad(loss)(p, k)
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    run = jax.jit(lambda p, s, ks: jax.lax.scan(body, (p, s), ks)[0])
    params, _ = run(params, opt.init(params), jax.random.split(key, steps))
    return params


def save_classifier(params: dict, path: str | os.PathLike) -> None:
    """Save the weights as an ``.npz`` of float32 arrays."""
    flat = {
        f"{k}_{n}": np.asarray(v, np.float32)
        for k, layer in params.items()
        for n, v in layer.items()
    }
    np.savez(path, **flat)


def load_classifier(path: str | None = None) -> dict:
    """The shipped weights, or those saved in ``path``."""
    if path is None:
        with resources.as_file(resources.files("jaxdiff").joinpath("assets", ASSET)) as p:
            return _read(p)
    return _read(path)


def _read(path) -> dict:
    params: dict = {}
    with np.load(path) as data:
        for name in data.files:
            layer, leaf = name.split("_")
            params.setdefault(layer, {})[leaf] = jnp.asarray(data[name])
    return params


def classifier_accuracy(params: dict, images: ArrayLike, labels: ArrayLike) -> Array:
    """Fraction of ``images`` that the classifier labels as ``labels`` (``(n,)`` or ``(n, 1)``)."""
    _check_images(images)
    n, shape = jnp.shape(images)[0], jnp.shape(labels)
    if shape == (n, 1):  # Keras-style labels
        labels = jnp.reshape(labels, (n,))
    elif shape != (n,):  # else `pred == labels` broadcasts to an (n, n) or (n,) of wrong pairs
        raise ValueError(f"labels must be ({n},) (one per image) or ({n}, 1); got shape {shape}")
    return _accuracy(params, images, labels)


@jax.jit  # one program per shape, not one per primitive when called eagerly
def _accuracy(params: dict, images: ArrayLike, labels: ArrayLike) -> Array:
    pred = jnp.argmax(_logits(params, images), axis=-1)
    return jnp.mean(pred == jnp.asarray(labels))


def digits_frechet_distance(params: dict, x: ArrayLike, y: ArrayLike) -> Array:
    """Fréchet distance between the classifier features of two sets of digit images."""
    return frechet_distance(classifier_features(params, x), classifier_features(params, y))


def tile(images: ArrayLike, cols: int = 10, fill: float = np.nan) -> np.ndarray:
    """Images ``(n, h, w)`` or ``(n, h, w, 1)`` laid out row by row, ``cols`` per row, one
    ``fill`` pixel between neighbours (``nan`` shows as blank in ``imshow``), for plotting.

    >>> tile(np.zeros((3, 2, 2)), cols=2, fill=1.0)
    array([[0., 0., 1., 0., 0.],
           [0., 0., 1., 0., 0.],
           [1., 1., 1., 1., 1.],
           [0., 0., 1., 1., 1.],
           [0., 0., 1., 1., 1.]])
    """
    x = np.asarray(images, dtype=float)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim != 3:
        raise ValueError(f"images must be (n, h, w) or (n, h, w, 1); got shape {np.shape(images)}")
    cols = check_count(cols, "cols")
    n, h, w = x.shape
    if n == 0:  # the canvas would have -1 rows
        raise ValueError(f"images must hold at least one image; got shape {np.shape(images)}")
    rows = -(-n // cols)
    canvas = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1), fill)
    for k, img in enumerate(x):
        r, c = divmod(k, cols)
        canvas[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = img
    return canvas
