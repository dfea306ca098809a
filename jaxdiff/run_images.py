"""Training runs on image data a user has: ``python -m jaxdiff train --images folder:PATH``.

A config with ``images`` (``folder:PATH``, ``folder-memory:PATH`` or ``npz:PATH``, see
:func:`jaxdiff.loader.open_images`) and ``flip`` trains on those images through
:class:`jaxdiff.loader.ImageLoader` (seeded by the run's ``seed``) and a prefetching thread
feeding :func:`jaxdiff.train.make_feed_chunk`; the config's ``data`` reads ``"images"``. Every
other option is checked and built as for the digits (the other image data set: U-Net by default,
``conditional`` allowed), so the whole recipe of :mod:`jaxdiff.experiment` applies unchanged.

Resumes: batch ``n`` of the loader is a pure function of ``(seed, n)`` and the run resumes at the
checkpoint's step, so a resumed run trains on the same batches as an uninterrupted one. Each
checkpoint's metadata records the loader's state (``loader``: seed, position, batch size, number
and shape of the images); a resume refuses data of another size or shape. ``images`` may change
on resume (the data moved), the rest may not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxdiff import experiment as E
from jaxdiff import loader as LD

IMAGE_DEFAULTS: dict[str, Any] = {"images": None, "flip": True}
KEYS = (*E.DEFAULTS, *IMAGE_DEFAULTS)
MAX_CLASSES = 10  # the run modules' label embedding (experiment.build) has 10 classes


def is_images(c: dict) -> bool:
    return c.get("images") is not None or c.get("data") == "images"


def normalize(given: dict) -> dict:
    """``given`` with ``images``' path made absolute (as :func:`resolve` stores it)."""
    spec = given.get("images")
    kind, sep, where = str(spec).partition(":")
    if spec is None or not sep or not where:
        return given
    return {**given, "images": f"{kind}:{Path(where).expanduser().resolve()}"}


def resolve(config: dict) -> dict:
    """``experiment.resolve``, extended by ``images`` and ``flip`` (``ValueError`` on bad values)."""
    config = {k: v for k, v in config.items() if v is not None}
    if not is_images(config):
        if "flip" in config:
            raise ValueError("flip applies to image data: pass images folder:PATH or npz:PATH")
        return E.resolve(config)
    if config.get("data", "images") != "images":
        raise ValueError(
            f"pass either data {config['data']!r} or images {config.get('images')!r}, not both"
        )
    spec = config.get("images")
    if not spec:
        raise ValueError("data 'images' needs images folder:PATH, folder-memory:PATH or npz:PATH")
    kind, sep, where = str(spec).partition(":")
    if not sep or kind not in ("folder", "folder-memory", "npz") or not where:
        raise ValueError(
            f"images must be folder:PATH, folder-memory:PATH or npz:PATH; got {spec!r}"
        )
    spec = f"{kind}:{Path(where).expanduser().resolve()}"  # a resume may run elsewhere
    if not isinstance(config.get("flip", True), bool):
        raise ValueError(f"flip must be true or false; got {config['flip']!r}")
    rest = {k: v for k, v in config.items() if k not in ("data", *IMAGE_DEFAULTS)}
    c = E.resolve({**rest, "data": "digits"})  # image data: the digits' rules
    return {**c, "data": "images", "images": str(spec), "flip": config.get("flip", True)}


def check_images(c: dict):
    """An image run's source, opened (a ``folder-memory`` one as the lazy folder: its headers,
    not its pixels), with the labels a conditional run needs (``None`` for built-in data)."""
    if not is_images(c):
        return None
    kind, _, where = c["images"].partition(":")  # a folder's labels and shape need no decoding:
    source = LD.open_images(f"folder:{where}" if kind == "folder-memory" else c["images"])
    if c["conditional"] and source.num_classes is None:
        what = "class folders" if kind != "npz" else "labels array ('labels', 'y', 'label', ...)"
        raise ValueError(f"conditional training needs labels: {c['images']} has no {what}")
    if c["conditional"] and source.num_classes > MAX_CLASSES:
        raise ValueError(
            f"{c['images']} has {source.num_classes} classes; the command line trains up to "
            f"{MAX_CLASSES} (from Python, any number: jaxdiff.loader with your own model)"
        )
    return source


def build(c: dict, source=None) -> E.Setup:
    """``experiment.build``; for image data its U-Net sized to the images (``sample_batch`` is
    ``None``: batches come from :func:`make_chunks`) and the source opened once for the command
    (``setup.images``; ``source``: one :func:`check_images` already opened)."""
    if not is_images(c):
        return E.build(c)
    source = check_images(c) if source is None else source
    base = {k: v for k, v in c.items() if k not in IMAGE_DEFAULTS}
    try:
        setup = E.build({**base, "data": "digits"})
    except ImportError as err:
        raise ImportError(f"{err} (image runs build on the digits' setup for now)") from None
    example = jnp.zeros((1, *source.shape), jnp.float32)
    return setup._replace(sample_batch=None, example=example, images=source)


def loader(c: dict, source=None) -> LD.ImageLoader:
    """The run's loader: batch ``c['batch']``, seed ``c['seed']``, labels when conditional."""
    source = LD.open_images(c["images"]) if source is None else source
    return LD.ImageLoader(
        source, int(c["batch"]), seed=int(c["seed"]), flip=c["flip"], labels=c["conditional"]
    )


def check_loader_state(saved: dict | None, current: LD.ImageLoader) -> None:
    """``ValueError`` when a resumed run's data differ in size or shape from the saved loader's."""
    if not saved:
        return
    now = current.state(saved.get("position", 0))
    for key in ("num_images", "shape", "batch_size"):
        if key in saved and list(np.atleast_1d(saved[key])) != list(np.atleast_1d(now[key])):
            raise ValueError(
                f"the image data changed since the checkpoint: {key} was {saved[key]}, "
                f"is {now[key]}; resume with the same data (or start a new run)"
            )


def make_chunks(c: dict, step_fn, mesh, first: int, saved_loader: dict | None = None, source=None):
    """``(make_chunk, prefetcher, loader)``: chunks that train on the loader's batches from
    ``first`` on, fed by a prefetching thread (close it when done). ``source``: the run's opened
    source (``setup.images``); a ``folder-memory`` run's is the lazy folder of
    :func:`check_images`, so its images are decoded here, once."""
    from jaxdiff.train import make_feed_chunk

    in_memory = c["images"].startswith("folder-memory:")
    data = loader(c, None if source is None or in_memory else source)
    check_loader_state(saved_loader, data)
    feed = LD.prefetch(data.iterate(first), mesh)

    def make_chunk(k):
        return make_feed_chunk(step_fn, feed, k, mesh=mesh, preprocess=LD.to_float)

    return make_chunk, feed, data


def eval_labels(c: dict, n: int, source=None) -> np.ndarray | None:
    """Labels of evaluation samples: the data's classes in turn (``None``: not an image run).
    ``source``: the run's opened source (``setup.images``; ``None``: opened here)."""
    if not is_images(c):
        return None
    classes = _opened(c, source).num_classes if c["conditional"] else None
    return np.arange(n) % (classes or MAX_CLASSES)


def _opened(c: dict, source):
    return check_images(c) if source is None else source


def reference(c: dict, n: int, source=None) -> np.ndarray:
    """Up to ``min(n, 1000)`` real images in ``[-1, 1]``, a fixed random subset (``source``: the
    run's opened source, ``setup.images``; ``None``: opened here)."""
    source = _opened(c, source)
    idx = np.random.default_rng(int(c["seed"]) + 1).permutation(len(source))[: min(n, 1000)]
    return np.asarray(LD.to_float(source.read(idx)[0]))


def measure(c: dict, x: np.ndarray, source=None) -> tuple[dict, np.ndarray]:
    """Pixel statistics of samples ``x`` next to the data's (no feature network for any data)."""
    ref = reference(c, x.shape[0], source)
    out = {
        "pixel_mean": float(x.mean()),
        "pixel_std": float(x.std()),
        "data_pixel_mean": float(ref.mean()),
        "data_pixel_std": float(ref.std()),
        "out_of_range_fraction": float(np.mean(np.abs(x) > 1.0)),
        "n": int(x.shape[0]),
    }
    return out, ref


def save_plot(samples, reference, file, title: str) -> None:
    """Grids of 8x8 real images and samples (RGB or gray; other channel counts show channel 0 in
    gray), pixels clipped to ``[-1, 1]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 5.3))
    for ax, imgs, name in ((axes[0], reference, "data"), (axes[1], samples, "samples")):
        imgs = np.clip((np.asarray(imgs[:64], np.float32) + 1.0) / 2.0, 0.0, 1.0)
        k = int(np.ceil(np.sqrt(imgs.shape[0])))
        imgs = np.concatenate([imgs, np.ones((k * k - imgs.shape[0], *imgs.shape[1:]))])
        h, w, ch = imgs.shape[1:]
        grid = imgs.reshape(k, k, h, w, ch).transpose(0, 2, 1, 3, 4).reshape(k * h, k * w, ch)
        color = ch in (3, 4)  # 2 channels (or 5+) have no colour reading: channel 0 in gray
        ax.imshow(grid[..., :3] if color else grid[..., 0], cmap=None if color else "gray")
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title)
    file.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(file, dpi=100, bbox_inches="tight")
    plt.close(fig)
