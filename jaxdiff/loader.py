"""Image data a user has, fed to the accelerator: a folder of PNGs, an ``.npz``, arrays, or any
iterable of batches; random horizontal flips; a background thread that keeps the devices fed.

Sources hold ``uint8`` images ``(n, H, W, C)`` and optional integer labels: :class:`ArraySource`
(arrays in memory, e.g. CIFAR-10's ``(50000, 32, 32, 3)``), :func:`load_npz`, and
:class:`ImageFolder` (``ROOT/<class>/*.png`` with the sorted class folders as labels, or
``ROOT/*.png`` without labels; decoded on demand, or once with ``.load()``).

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

The sources live in :mod:`jaxdiff.image_sources` and are re-exported here. Measured on 2 shared
CPU cores (32x32x3, batches of 128; ``python -m benchmarks --only images``, the latest run):
77.7k images/s from an ``.npz``, 4.4k from a folder of PNGs decoded on the fly, 60.4k from the
folder decoded into memory; Google's ``grain`` ran the same pipelines at 48.5k, 3.2k and 43.3k.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff._checks import check_count
from jaxdiff.image_sources import (
    ArraySource,
    ImageFolder,
    load_npz,
    open_images,
    save_image_folder,
)

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


class ImageLoader:
    """Batches of ``batch_size`` images from ``source``, batch ``n`` a pure function of ``(seed, n)``.

    ``batch(n)`` is ``images`` (``uint8``, ``(B, H, W, C)``) or ``(images, labels)`` (``labels``:
    default ``True`` where the source has them). Every epoch visits each image once in the order of
    its own permutation; a batch may straddle two epochs. ``flip`` reverses the width axis of each
    image with probability 1/2. Multi-host: ``batch_size`` is the global size, and this process
    reads its own contiguous share of every batch, ``process_index`` of ``process_count`` (default
    ``jax.process_index()`` and ``jax.process_count()``: the share :func:`prefetch` puts on this
    host's devices; on one host, the whole batch).
    """

    def __init__(
        self,
        source: ArraySource | ImageFolder,
        batch_size: int,
        *,
        seed: int = 0,
        flip: bool = True,
        labels: bool | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
        # 4.0 failed later as "slice indices must be integers", seed True ran as seed 1
        batch_size = check_count(batch_size, "batch_size")
        process_count = check_count(process_count, "process_count")
        seed = check_count(seed, "seed", minimum=0)
        if not 0 <= process_index < process_count:  # else its share of every batch is empty
            raise ValueError(
                f"process_index must lie in [0, process_count = {process_count}); "
                f"got {process_index}"
            )
        process_index = check_count(process_index, "process_index", minimum=0)
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
        self._lock = threading.Lock()  # prefetch's thread and the caller may both ask for batches

    def _perm(self, epoch: int) -> np.ndarray:
        with self._lock:  # unlocked, one thread could evict the epoch another had just added
            perm = self._perms.get(epoch)
            if perm is None:
                if len(self._perms) > 2:
                    self._perms.pop(min(self._perms))
                perm = np.random.default_rng([self.seed, 0, epoch]).permutation(len(self.source))
                self._perms[epoch] = perm
            return perm

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
    ``with`` block) stops the thread and drops the batches not yet delivered (``next`` raises
    ``RuntimeError`` after it); the host iterator is not advanced further than ``size + 1``
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
        if self._stop.is_set():  # the batches still queued were returned after close()
            raise RuntimeError("next() on a closed Prefetcher")
        start = time.perf_counter()
        while True:  # poll: after close() the thread puts nothing more, and get() would hang
            try:
                item = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if self._stop.is_set() and not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("next() on a closed Prefetcher") from None
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
        """Stop the background thread (it exits after its current batch)."""
        self._stop.set()
        self._thread.join(timeout=10)
        while not self._queue.empty():  # release the device buffers of batches never delivered
            self._queue.get_nowait()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def prefetch(batches: Iterable, mesh: Any = None, *, size: int = 2) -> Prefetcher:
    """``batches`` (any iterable of host batches: arrays or pytrees of them) put on the devices by
    a background thread, ``size`` batches ahead; with ``mesh`` each leaf is sharded over its
    ``"data"`` axis (:func:`jaxdiff.train.data_mesh`; the batch size must divide evenly)."""
    sharding = None
    if mesh is not None:
        from jax.sharding import NamedSharding, PartitionSpec

        sharding = NamedSharding(mesh, PartitionSpec("data"))
    return Prefetcher(batches, sharding, size=size)


def to_float(batch: Any, dtype: Any = jnp.float32) -> Any:
    """``uint8`` leaves of ``batch`` to ``(x - 127.5) / 127.5`` in ``[-1, 1]`` (0 and 255 to -1
    and 1 exactly, in float32 then ``dtype``); other leaves (labels) unchanged. Call it inside the
    jitted step (``make_feed_chunk(..., preprocess=to_float)``)."""

    def one(x):  # x / 127.5 - 1 gave 1.0000001 for 255 under jit (a multiply by 1 / 127.5),
        if x.dtype != jnp.uint8:  # and in bfloat16 a mean bias of +1e-3
            return x
        return ((x.astype(jnp.float32) - 127.5) / 127.5).astype(dtype)

    return jax.tree.map(one, batch)
