"""The loader part of the ``images`` benchmark: ``jaxdiff.loader`` against Google's ``grain``
running the same pipelines (per-epoch shuffle, random flips, batches put on the devices sharded
over the data mesh), first alone (images/s delivered), then feeding small_unet's training step
through ``make_feed_chunk`` (images/s trained, fraction of the time spent waiting for data, and
the same chunks on device-resident data).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import jax
import numpy as np


class Timed:
    """``it`` with ``wait_s``: the seconds ``next`` spent (the consumer's data-starved time), the
    definition of :class:`jaxdiff.loader.Prefetcher`'s ``wait_s``, for any iterator."""

    def __init__(self, it: Iterator):
        self._it, self.wait_s, self.count = iter(it), 0.0, 0

    def __iter__(self) -> Timed:
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self._it)
        finally:
            self.wait_s += time.perf_counter() - start
            self.count += 1

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


def grain_batches(
    source,
    batch: int,
    *,
    threads: int,
    sharding=None,
    per_image: bool = False,
    labels: bool = False,
    buffer: int = 4,
    seed: int = 0,
) -> Iterator:
    """jaxdiff's pipeline in grain: shuffle per epoch, flip each image with probability 1/2,
    batch, then (with ``sharding``) ``grain.experimental.device_put`` with ``buffer`` batches
    prefetched on the host. ``per_image``: read one image per element (grain's threads decode in
    parallel; for folders), else gather whole batches (arrays in memory). Yields ``images`` or
    ``(images, labels)``, ``uint8`` ``(batch, H, W, C)``."""
    import grain

    ds = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat()
    if per_image:

        def load(i, rng):
            x, y = source.read(np.array([i]))
            x = x[0, :, ::-1] if rng.random() < 0.5 else x[0]
            return (x, y[0]) if labels else x

        ds = ds.random_map(load, seed=seed + 1).batch(batch, drop_remainder=True)
    else:

        def load(idx, rng):
            x, y = source.read(np.asarray(idx))
            flip = rng.random(len(idx)) < 0.5
            x = np.where(flip[:, None, None, None], x[:, :, ::-1], x)
            return (x, y) if labels else x

        ds = ds.batch(batch, drop_remainder=True).random_map(load, seed=seed + 1)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer))
    if sharding is not None:
        it = grain.experimental.device_put(
            it, sharding, cpu_buffer_size=buffer, device_buffer_size=2
        )
    return iter(it)


def delivered(it: Iterator, batches: int) -> float:
    """Images/s that ``it`` delivers (device batches ready), after 2 warm-up batches."""
    for _ in range(2):
        jax.block_until_ready(next(it))
    start = time.perf_counter()
    for _ in range(batches):
        x = jax.block_until_ready(next(it))
    return batches * jax.tree.leaves(x)[0].shape[0] / (time.perf_counter() - start)


def timed_chunks(chunk, state, chunks: int, it=None):
    """Run ``chunk`` once (compiles), then ``chunks`` times as ``jaxdiff.train.train`` does (each
    chunk's losses read back before the next). Returns (state, seconds, waited seconds)."""
    state, losses = chunk(state)
    jax.block_until_ready(losses)
    wait0 = 0.0 if it is None else it.wait_s
    start = time.perf_counter()
    for _ in range(chunks):
        state, losses = chunk(state)
        float(losses.mean())
    seconds = time.perf_counter() - start
    return state, seconds, (0.0 if it is None else it.wait_s - wait0)
