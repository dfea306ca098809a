"""Image data a user has, fed to the accelerator: a folder of PNGs, an ``.npz``, arrays, or any
iterable of batches; random horizontal flips; a background thread that keeps the devices fed.

Sources hold ``uint8`` images ``(n, H, W, C)`` and optional integer labels: :class:`ArraySource`
(arrays in memory, e.g. CIFAR-10's ``(50000, 32, 32, 3)``), :func:`load_npz`, and
:class:`ImageFolder` (``ROOT/<class>/*.png`` with the sorted class folders as labels, or
``ROOT/*.png`` without labels; decoded on demand, or once with ``in_memory=True``).

:class:`ImageLoader` makes batch ``n`` a pure function of ``(seed, n)``: the stream of sample
positions ``n B ... (n + 1) B - 1`` runs through one permutation per epoch
(``default_rng([seed, 0, epoch])``) and flips each image with probability 1/2
(``default_rng([seed, 1, n])``). Its iterator's whole state is the next batch's number, which is
the train state's ``step``: a run resumed from a checkpoint at step ``s`` reads
``loader.iterate(s)`` and sees exactly the batches of an uninterrupted run.

:func:`prefetch` runs any iterable of host batches in a thread that ``device_put``s each batch,
sharded over the mesh's ``"data"`` axis (``NamedSharding(mesh, P("data"))``), into a queue, so
reading, decoding and the host-to-device copy overlap the training step; it counts the seconds
the consumer waited. Batches stay ``uint8`` until the jitted step (:func:`to_float`: ``x / 127.5
- 1``), a quarter of float32's transfer. :func:`jaxdiff.train.make_feed_chunk` trains on them.

Measured on 2 shared CPU cores (32x32x3, batch 128): ~80k images/s from an ``.npz``, ~12k from a
folder of PNGs decoded on the fly (~56 us per image per core with Pillow); Google's ``grain``
(0.2.18) ran the same pipelines at ~59k and ~12k (``python -m benchmarks --only images``).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ArraySource",
    "ImageFolder",
    "ImageLoader",
    "Prefetcher",
    "load_npz",
    "open_images",
    "prefetch",
    "save_image_folder",
    "to_float",
]

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _labels(labels, n: int) -> np.ndarray | None:
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:  # Keras' CIFAR-10 labels are (n, 1)
        labels = labels[:, 0]
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be {n} integers, shape ({n},); got {labels.dtype} {labels.shape}"
        )
    if n and labels.min() < 0:
        raise ValueError(f"labels must be >= 0; got {labels.min()}")
    return labels.astype(np.int32)


class ArraySource:
    """``uint8`` images ``(n, H, W, C)`` (``(n, H, W)`` gets ``C = 1``) and optional labels ``(n,)``
    (or ``(n, 1)``); ``read(indices) -> (images, labels or None)``."""

    def __init__(self, images, labels=None, classes: list[str] | None = None):
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4:
            raise ValueError(
                f"images must be (n, height, width, channels); got shape {images.shape}"
            )
        if images.shape[-1] not in (1, 3, 4) and images.shape[1] in (1, 3, 4):
            raise ValueError(
                f"images of shape {images.shape} look channels-first; pass "
                "images.transpose(0, 2, 3, 1) (jaxdiff takes (n, height, width, channels))"
            )
        if images.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 pixels in 0..255; got {images.dtype} (scale and round: "
                "np.clip(np.rint(x * 255), 0, 255).astype(np.uint8) for x in [0, 1])"
            )
        self.images, self.labels = images, _labels(labels, images.shape[0])
        n_cls = 0 if self.labels is None or not len(self.labels) else int(self.labels.max()) + 1
        self.classes = classes or [str(i) for i in range(n_cls)]

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    @property
    def num_classes(self) -> int | None:
        return None if self.labels is None else len(self.classes)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        labels = None if self.labels is None else self.labels[indices]
        return self.images[indices], labels


def load_npz(path: str | Path, images: str | None = None, labels: str | None = None) -> ArraySource:
    """An :class:`ArraySource` from ``np.savez(path, images=..., labels=...)``; the keys default
    to the first of ``images, x, data, arr_0`` and ``labels, y, label, targets`` present."""
    with np.load(path) as f:
        keys = list(f.keys())
        img_key = images or next((k for k in ("images", "x", "data", "arr_0") if k in keys), None)
        if img_key not in keys:
            raise ValueError(f"{path} has no images array {images or 'images'!r}; it holds {keys}")
        lab_key = labels or next(
            (k for k in ("labels", "y", "label", "targets") if k in keys), None
        )
        if labels is not None and labels not in keys:
            raise ValueError(f"{path} has no labels array {labels!r}; it holds {keys}")
        return ArraySource(f[img_key], None if lab_key is None else f[lab_key])


def _decode(file: Path, mode: str) -> np.ndarray:
    from PIL import Image

    with Image.open(file) as img:
        arr = np.asarray(img.convert(mode))
    return arr[..., None] if arr.ndim == 2 else arr


class ImageFolder:
    """Images under ``root``: ``root/<class>/<file>`` (labels: the class folders in sorted order,
    ``classes``) or ``root/<file>`` (no labels), files with an image extension, sorted. Decoded
    with Pillow on each ``read`` (``threads`` at a time); grayscale files give ``C = 1``, the
    others RGB (alpha dropped). Every image must have the first one's size."""

    def __init__(self, root: str | Path, *, threads: int = 4):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")

        def images(folder: Path) -> list[Path]:
            found = (p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
            return sorted(p for p in found if p.suffix.lower() in EXTENSIONS)

        dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        per_class = [images(d) for d in dirs]
        top = images(root)
        if top and any(per_class):
            raise ValueError(
                f"{root} holds both image files and class folders; put every image in a class "
                "folder (labelled) or none (unlabelled)"
            )
        if any(per_class):
            kept = [(d.name, fs) for d, fs in zip(dirs, per_class, strict=True) if fs]
            self.classes = [name for name, _ in kept]
            self.files = [f for _, fs in kept for f in fs]
            self.labels = np.concatenate(
                [np.full(len(fs), i, np.int32) for i, (_, fs) in enumerate(kept)]
            )
        else:
            self.classes, self.files, self.labels = [], top, None
        if not self.files:
            raise ValueError(f"no images ({', '.join(EXTENSIONS)}) in {root} or its subfolders")
        self.root, self.threads = root, threads
        from PIL import Image

        with Image.open(self.files[0]) as img:
            self._mode = "L" if img.mode in ("1", "L", "I", "I;16", "F") else "RGB"
        self._shape = _decode(self.files[0], self._mode).shape
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self._shape)

    @property
    def num_classes(self) -> int | None:
        return None if self.labels is None else len(self.classes)

    def _one(self, i: int) -> np.ndarray:
        arr = _decode(self.files[i], self._mode)
        if arr.shape != self._shape:
            raise ValueError(
                f"{self.files[i]} is {arr.shape[1]}x{arr.shape[0]}, not {self._shape[1]}x"
                f"{self._shape[0]} like {self.files[0].name}; resize the folder to one size"
            )
        return arr

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if self.threads > 1 and len(indices) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="jaxdiff-decode")
            images = np.stack(list(self._pool.map(self._one, indices)))
        else:
            images = np.stack([self._one(i) for i in indices])
        return images, None if self.labels is None else self.labels[indices]

    def load(self) -> ArraySource:
        """Decode every image once: an :class:`ArraySource` in memory (CIFAR-10: 150 MB)."""
        images, labels = self.read(np.arange(len(self)))
        return ArraySource(images, labels, list(self.classes) or None)


def open_images(spec: str) -> ArraySource | ImageFolder:
    """The source named by ``folder:PATH`` (decoded on demand), ``folder-memory:PATH`` (decoded
    once into memory) or ``npz:PATH`` (the command line's ``--images``)."""
    kind, sep, where = str(spec).partition(":")
    if not sep or kind not in ("folder", "folder-memory", "npz") or not where:
        raise ValueError(
            f"image data must be folder:PATH, folder-memory:PATH or npz:PATH; got {spec!r}"
        )
    if kind == "npz":
        if not Path(where).is_file():
            raise FileNotFoundError(f"npz file {where} does not exist")
        return load_npz(where)
    folder = ImageFolder(where)
    return folder.load() if kind == "folder-memory" else folder


class ImageLoader:
    """Batches of ``batch_size`` images from ``source``, batch ``n`` a pure function of ``(seed, n)``.

    ``batch(n)`` is ``images`` (``uint8``, ``(B, H, W, C)``) or ``(images, labels)`` (``labels``:
    default ``True`` where the source has them). Every epoch visits each image once in the order of
    its own permutation; a batch may straddle two epochs. ``flip`` reverses the width axis of each
    image with probability 1/2. ``process_count > 1`` (multi-host): this process reads its own
    contiguous share of every global batch (``batch_size`` is the global size).
    """

    def __init__(
        self,
        source: ArraySource | ImageFolder,
        batch_size: int,
        *,
        seed: int = 0,
        flip: bool = True,
        labels: bool | None = None,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if batch_size < 1 or batch_size % process_count:
            raise ValueError(
                f"batch_size must be a positive multiple of process_count {process_count}; "
                f"got {batch_size}"
            )
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed must be an integer in [0, 2**32); got {seed}")
        if labels and source.num_classes is None:
            raise ValueError(
                "labels=True needs labelled data (class folders or an npz with labels)"
            )
        if len(source) < 1:
            raise ValueError("the image source is empty")
        self.source, self.batch_size, self.seed, self.flip = source, batch_size, seed, flip
        self.labels = source.num_classes is not None if labels is None else labels
        per = batch_size // process_count
        self._share = slice(process_index * per, (process_index + 1) * per)
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, 0, epoch]).permutation(
                len(self.source)
            )
        return self._perms[epoch]

    def indices(self, n: int) -> np.ndarray:
        """The source indices of (this process's share of) batch ``n``."""
        if n < 0:
            raise ValueError(f"batch number must be >= 0; got {n}")
        pos = np.arange(n * self.batch_size, (n + 1) * self.batch_size)[self._share]
        epoch, within = np.divmod(pos, len(self.source))
        out = np.empty(pos.shape, np.int64)
        for e in np.unique(epoch):
            at = epoch == e
            out[at] = self._perm(int(e))[within[at]]
        return out

    def flips(self, n: int) -> np.ndarray:
        """Which images of batch ``n`` are flipped (all ``False`` without ``flip``)."""
        if not self.flip:
            return np.zeros(self.batch_size, bool)[self._share]
        return (np.random.default_rng([self.seed, 1, n]).random(self.batch_size) < 0.5)[self._share]

    def batch(self, n: int) -> Any:
        """Batch ``n`` on the host: ``images`` or ``(images, labels)``."""
        images, labels = self.source.read(self.indices(n))
        images = np.where(self.flips(n)[:, None, None, None], images[:, :, ::-1], images)
        return (images, labels) if self.labels else images

    def iterate(self, start: int = 0) -> Iterator:
        """Batches ``start, start + 1, ...`` without end (resume at the train state's step)."""
        n = start
        while True:
            yield self.batch(n)
            n += 1

    def state(self, position: int) -> dict:
        """What a checkpoint records of the loader at ``position`` (JSON-able)."""
        return {
            "seed": self.seed,
            "position": int(position),
            "batch_size": self.batch_size,
            "num_images": len(self.source),
            "shape": list(self.source.shape),
            "flip": self.flip,
        }


class Prefetcher:
    """An iterator over ``batches`` put on the devices by a background thread, ``size`` ahead.

    ``wait_s`` is the time ``next`` spent waiting for the thread (data-starved time), ``count`` the
    batches delivered. An error in the thread is raised by ``next``. ``close()`` (or leaving a
    ``with`` block) stops the thread; the host iterator is not advanced further than ``size + 1``
    batches beyond what was delivered.
    """

    _END = object()

    def __init__(self, batches: Iterable, sharding=None, *, size: int = 2):
        if size < 1:
            raise ValueError(f"size must be >= 1; got {size}")
        self._queue: queue.Queue = queue.Queue(size)
        self._stop = threading.Event()
        self._sharding = sharding
        self.wait_s, self.count = 0.0, 0
        self._thread = threading.Thread(
            target=self._work, args=(iter(batches),), daemon=True, name="jaxdiff-prefetch"
        )
        self._thread.start()

    def _put(self, batch):
        if self._sharding is None:
            return jax.device_put(batch)
        if jax.process_count() > 1:  # each host holds its own share of the global batch
            return jax.tree.map(
                lambda x: jax.make_array_from_process_local_data(self._sharding, x), batch
            )
        return jax.device_put(batch, self._sharding)

    def _offer(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self, it: Iterator) -> None:
        try:
            for batch in it:
                if not self._offer(self._put(batch)):
                    return
            self._offer(self._END)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            self._offer(err)

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self):
        start = time.perf_counter()
        item = self._queue.get()
        self.wait_s += time.perf_counter() - start
        if item is self._END:
            self._queue.put(item)
            raise StopIteration
        if isinstance(item, BaseException):
            self._queue.put(item)
            raise item
        self.count += 1
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def prefetch(batches: Iterable, mesh=None, *, size: int = 2) -> Prefetcher:
    """``batches`` (any iterable of host batches: arrays or pytrees of them) put on the devices by
    a background thread, ``size`` batches ahead; with ``mesh`` each leaf is sharded over its
    ``"data"`` axis (:func:`jaxdiff.train.data_mesh`; the batch size must divide evenly)."""
    sharding = None
    if mesh is not None:
        from jax.sharding import NamedSharding, PartitionSpec

        sharding = NamedSharding(mesh, PartitionSpec("data"))
    return Prefetcher(batches, sharding, size=size)


def to_float(batch: Any, dtype=jnp.float32) -> Any:
    """``uint8`` leaves of ``batch`` to ``x / 127.5 - 1`` in ``[-1, 1]``; other leaves (labels)
    unchanged. Call it inside the jitted step (``make_feed_chunk(..., preprocess=to_float)``)."""

    def one(x):
        return (x.astype(dtype) / 127.5 - 1.0).astype(dtype) if x.dtype == jnp.uint8 else x

    return jax.tree.map(one, batch)


def save_image_folder(root: str | Path, images, labels=None, classes=None) -> Path:
    """Write ``uint8`` images as PNGs: ``root/<class>/<i>.png`` with labels, else ``root/<i>.png``."""
    from PIL import Image

    root = Path(root)
    src = ArraySource(images, labels)
    names = classes or src.classes
    for i in range(len(src)):
        folder = root if src.labels is None else root / names[src.labels[i]]
        folder.mkdir(parents=True, exist_ok=True)
        img = src.images[i]
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(folder / f"{i:06d}.png")
    return root
