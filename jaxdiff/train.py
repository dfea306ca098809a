"""Training: state, optimizer, EMA, a jitted step, chunked loops with a progress bar, data parallelism.

A :class:`TrainState` (params, opt_state, ema, step, key, and the self-distilling losses'
optional target network) is all there is: ``make_train_step``
maps ``(state, batch) -> (state, loss)`` as a pure function, ``make_train_chunk`` scans ``K`` steps
whose batches are drawn from the state's key (the run is a pure function of the initial state, so
a resumed run repeats an uninterrupted one bit for bit), and ``train`` calls chunks, updating a
progress bar, evaluating and checkpointing between them (a callback per step would cost ~0.1 ms).

Data parallelism: pass ``mesh = data_mesh()`` (all local devices on one ``"data"`` axis). The batch
is sharded over it, params and optimizer state are replicated, and XLA inserts the gradient
all-reduce; the same code runs on one device or many. Batches are drawn inside the jitted chunk
from the replicated key, so each device computes only its own shard of them. Multi-host: call
``jax.distributed.initialize()`` on every host before anything else touches JAX, then the same
program: ``data_mesh()`` spans ``jax.devices()`` of all hosts, ``replicate`` puts the state there
(typed keys through their raw data), and every host runs the same chunks.

Data read on the host (a folder of PNGs, an ``.npz``: :mod:`jaxdiff.loader`) enters through
``make_feed_chunk``: each chunk takes its ``K`` batches from an iterator that a background thread
fills with device-put, sharded batches (``jaxdiff.loader.prefetch``) and scans over them. The
loader's batch ``n`` is a pure function of ``(seed, n)``, so resuming at ``state.step`` with
``loader.iterate(int(state.step))`` repeats an uninterrupted run bit for bit.

Conv nets in the scan: XLA:CPU runs a convolution fast only in the canonical layout
``NHWC x HWIO -> NHWC`` and canonicalises the others only outside loops, so the gradients of
``lax.conv`` inside the chunk's scan fell to a naive loop nest (the U-Net: 16 s/step against
0.15 s/step, see :mod:`jaxdiff.nets.conv`). The fix is in the op, not the loop: jaxdiff's nets
use :func:`jaxdiff.nets.conv2d`, whose gradients are canonical, and the chunk stays one
``lax.scan`` (as fast as a Python loop over a jitted step for the U-Net, 3x faster for the MLP;
an unrolled scan compiles 10-20x longer). A network of your own with ``flax.linen.Conv`` should
use :class:`jaxdiff.nets.Conv` (same parameters) to train at speed on CPU.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.typing import ArrayLike

from jaxdiff._checks import (
    _floating_leaf,
    check_count,
    check_finite,
    concrete,
    error_if,
    wide_dtype,
)

Array = jax.Array

__all__ = [
    "TrainState",
    "adamw_cosine",
    "ema_update",
    "init_train_state",
    "make_train_step",
    "make_train_chunk",
    "make_feed_chunk",
    "data_mesh",
    "replicate",
    "train",
]


class TrainState(NamedTuple):
    """Everything a run needs to continue: ``params``, ``opt_state``, ``ema`` (the EMA of the
    params), ``step`` (int32 scalar), ``key`` (a typed PRNG key) and ``target`` (a second EMA of
    the params, the self-distilling losses' target network; ``None`` unless
    ``init_train_state(..., target_ema=True)``)."""

    params: Any
    opt_state: Any
    ema: Any
    step: Array
    key: Array
    target: Any = None


def adamw_cosine(
    learning_rate: float = 1e-3,
    total_steps: int = 10_000,
    *,
    warmup_steps: int | None = None,
    end_factor: float = 0.05,
    weight_decay: float = 1e-4,
    clip_norm: float | None = 1.0,
) -> optax.GradientTransformation:
    """AdamW (Loshchilov & Hutter 2019) with linear warmup then cosine decay, after clipping the
    global gradient norm to ``clip_norm``. Warmup defaults to 5% of ``total_steps``; the rate ends
    at ``end_factor * learning_rate``."""
    total_steps = check_count(total_steps, "total_steps")  # 2.5 was truncated, True was 1
    if not 0 < learning_rate < float("inf"):  # inf gave NaN parameters after one step
        raise ValueError(f"learning_rate must be a finite number > 0; got {learning_rate}")
    if warmup_steps is not None:
        warmup_steps = check_count(warmup_steps, "warmup_steps", minimum=0)
    if warmup_steps is not None and not 0 <= warmup_steps < total_steps:
        # a warmup as long as the run never decays: the rate would end at its peak (or below it)
        raise ValueError(
            f"warmup_steps must lie in [0, total_steps = {total_steps}); got {warmup_steps}"
        )
    if not 0 <= end_factor <= 1:  # a negative end rate climbs the loss
        raise ValueError(f"end_factor must lie in [0, 1]; got {end_factor}")
    if not 0 <= weight_decay < float("inf"):  # inf decayed the parameters to NaN
        raise ValueError(f"weight_decay must be a finite number >= 0; got {weight_decay}")
    if clip_norm is not None and not clip_norm > 0:  # -1 reverses the gradient, 0 stops learning
        raise ValueError(f"clip_norm must be > 0 (or None: no clipping); got {clip_norm}")
    # one run step (total_steps = 1) gets no warmup: its only step would have the rate 0
    default = min(max(1, total_steps // 20), total_steps - 1)
    warmup = default if warmup_steps is None else warmup_steps
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup, max(total_steps, warmup + 1), learning_rate * end_factor
    )
    adamw = optax.adamw(schedule, weight_decay=weight_decay)
    return adamw if clip_norm is None else optax.chain(optax.clip_by_global_norm(clip_norm), adamw)


@jax.jit
def _all_finite(tree: Any) -> Array:
    """Whether every floating leaf of ``tree`` is finite (one program per tree structure)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if _floating_leaf(x)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def ema_update(ema: Any, params: Any, decay: Array | float) -> Any:
    """``ema <- decay * ema + (1 - decay) * params`` leaf by leaf, in each EMA leaf's dtype (a
    float32 ``decay`` would otherwise promote bfloat16 leaves: a scan's carry would change type).
    Leaves that are not floating (counters, masks) take the params' value: an average would be
    truncated (0.999 * 2 + 0.001 * 2 rounds down to 1)."""

    def update(e, p):
        dtype = jnp.result_type(e)
        if not jnp.issubdtype(dtype, jnp.inexact):
            return jnp.asarray(p, dtype)
        return (decay * e + (1.0 - decay) * jnp.asarray(p, dtype)).astype(dtype)  # not in bf16

    return jax.tree.map(update, ema, params)


def _ema_decay(decay: float, step: Array, warmup: bool) -> Array:
    """``min(decay, (1 + n) / (10 + n))`` at update ``n`` when ``warmup``: early params are not
    frozen into the average (TensorFlow's ``ExponentialMovingAverage(num_updates=n)``)."""
    if not warmup:
        return jnp.asarray(decay, jnp.float32)
    n = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def _at_least_float32(leaf: Any) -> Array:
    dtype = jnp.result_type(leaf)
    if jnp.issubdtype(dtype, jnp.floating):
        dtype = wide_dtype(dtype)
    return jnp.array(leaf, dtype=dtype, copy=True)


def init_train_state(
    params: Any, optimizer: optax.GradientTransformation, key: Array, *, target_ema: bool = False
) -> TrainState:
    """A fresh state at step 0 with ``ema = params``, kept in float32 at least; with
    ``target_ema`` also ``target = params`` (float32 at least), the target network that
    ``make_train_step(..., target_decay=mu)`` updates.

    A bfloat16 EMA stands still: at decay 0.999 each update moves a leaf by 0.001 of its gap to
    the params, below half of bfloat16's relative spacing 2^-8, so it rounds away. The state holds
    copies: the chunks of ``make_train_chunk`` donate their input state, which must never free the
    caller's ``params``.
    """
    params = jax.tree.map(jnp.copy, params)
    ema = jax.tree.map(_at_least_float32, params)
    opt_state = jax.tree.map(jnp.copy, optimizer.init(params))
    target = jax.tree.map(_at_least_float32, params) if target_ema else None
    return TrainState(params, opt_state, ema, jnp.zeros((), jnp.int32), jnp.copy(key), target)


def make_train_step(
    loss_fn: Callable[..., Array],
    optimizer: optax.GradientTransformation,
    *,
    ema_decay: float = 0.999,
    ema_warmup: bool = True,
    ema_targets: bool = False,
    target_decay: float | Callable[[Array], ArrayLike] | None = None,
) -> Callable[[TrainState, Any], tuple[TrainState, Array]]:
    """One optimizer step ``(state, batch) -> (state, loss)`` on ``loss_fn(params, key, batch)``.

    The loss's key is split off ``state.key``; the EMA is updated after the parameters, with
    ``ema_decay``, or with ``min(ema_decay, (1 + step) / (10 + step))`` while ``ema_warmup``
    (early EMA weights follow the parameters). Pure: wrap it in ``jax.jit`` or scan it
    (``make_train_chunk``). A batch holding a NaN or an infinity raises (at run time under
    ``jit``), where it gave a NaN loss and NaN parameters.

    ``ema_targets=True`` calls ``loss_fn(params, key, batch, target_params=state.ema)``: the
    self-distilling losses (``shortcut_loss``, the consistency losses) then take their targets
    from the EMA network (shortcut models' bootstrap targets, Frans et al. 2024; the original
    consistency models' ``theta^-`` with ``mu`` the EMA's decay once its warm-up has passed,
    ``(1 + n) / (10 + n) >= mu``, Song et al. 2023), not from the online one. The gradient is in
    ``params`` only.

    ``target_decay=mu`` (with ``ema_targets=True`` and a state from ``init_train_state(...,
    target_ema=True)``) takes the targets from a second EMA, ``state.target <- mu state.target +
    (1 - mu) params`` after each update, without warm-up, apart from the evaluation EMA: the
    consistency models' ``theta^- <- stopgrad(mu theta^- + (1 - mu) theta)`` with their own
    ``mu`` (0.95 for distillation on CIFAR-10, Song et al. 2023; ``mu = 0``, the online network
    itself under a stop-gradient, in improved consistency training, Song & Dhariwal 2023) while
    ``ema`` keeps the slow average that samples best. ``target_decay`` may be a function of the
    step (``jd.curriculum`` of ``jd.ct_target_decay``, the original paper's ``mu(N(k))``; its
    values checked here, another function's when it runs).

    A loss that requires a keyword-only ``step`` (``def loss(params, key, batch, *, step)``: the
    consistency losses built on a curriculum of ``num_scales``) is called with
    ``step=state.step``, the number of updates before this one.
    """
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must lie in [0, 1); got {ema_decay}")
    if target_decay is not None:
        _check_target_decay(target_decay)
        if not ema_targets:
            raise ValueError(
                f"target_decay {target_decay} is the decay of the target network that "
                "ema_targets=True passes to the loss; got ema_targets=False"
            )
    if ema_targets:
        _check_takes_target_params(loss_fn)
    takes_step = _needs_step(loss_fn)

    def step(state: TrainState, batch: Any) -> tuple[TrainState, Array]:
        _check_target_state(state, target_decay)
        key, loss_key = jax.random.split(state.key)
        targets = state.ema if target_decay is None else state.target
        extra = {"target_params": targets} if ema_targets else {}
        if takes_step:
            extra["step"] = state.step
        loss, grads = jax.value_and_grad(loss_fn)(state.params, loss_key, batch, **extra)
        # tied to the loss, which every caller reads: on the batch, a leaf the loss does not read
        # would take the check away with it under jit (and an integer batch its sharding)
        for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:  # names the leaf
            name = f"the training batch{jax.tree_util.keystr(path)}"
            loss = check_finite(leaf, name, into=loss)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = _ema_decay(ema_decay, state.step, ema_warmup)
        ema = ema_update(state.ema, params, decay)
        target = state.target
        if target_decay is not None:
            target = ema_update(target, params, _decay_at(target_decay, state.step))
        return TrainState(params, opt_state, ema, state.step + 1, key, target), loss

    return step


def _check_target_decay(target_decay: Any) -> None:
    """A number in ``[0, 1)``, or a function of the step (a ``Curriculum``'s values checked)."""
    from jaxdiff.consistency import Curriculum

    if isinstance(target_decay, Curriculum):
        values = target_decay.values
    else:
        values = [] if callable(target_decay) else [target_decay]
    for mu in values:
        if isinstance(mu, bool) or not 0.0 <= mu < 1.0:
            raise ValueError(f"target_decay must lie in [0, 1) (or None); got {mu!r}")


def _decay_at(target_decay: Any, step: Array) -> Array:
    from jaxdiff.consistency import Curriculum

    if not callable(target_decay):
        return jnp.asarray(target_decay, jnp.float32)
    mu = jnp.asarray(target_decay(step), jnp.float32)
    if isinstance(target_decay, Curriculum):
        return mu
    # a function of the user's own: a scalar, checked now if known, else when it runs
    if mu.ndim:
        raise ValueError(f"target_decay(step) must be a scalar; got shape {mu.shape}")
    known = concrete(mu)
    if known is not None and not 0.0 <= known < 1.0:
        raise ValueError(f"target_decay(step) must lie in [0, 1); got {known}")
    bad = (mu < 0) | (mu >= 1) | jnp.isnan(mu)
    return error_if(mu, bad, "target_decay(step) must lie in [0, 1)")


def _check_target_state(state: TrainState, target_decay: float | None) -> None:
    """At trace time: a target network exactly where a ``target_decay`` updates it (a target the
    step did not update would stand still at its initial value, silently)."""
    if target_decay is not None and state.target is None:
        raise ValueError(
            f"target_decay {target_decay} updates state.target, but this state has none: build "
            "it with init_train_state(..., target_ema=True)"
        )
    if target_decay is None and state.target is not None:
        raise ValueError(
            "this state has a target network (state.target) that the step would never update: "
            "pass make_train_step(..., ema_targets=True, target_decay=mu), or build the state "
            "without target_ema"
        )


def _needs_step(fn: Callable) -> bool:
    """Whether ``fn`` requires a keyword-only ``step`` (a ``step=0.1`` with a default, a
    positional ``step`` or ``**kwargs`` may mean something else: they get nothing)."""
    try:
        p = inspect.signature(fn).parameters.get("step")
    except (TypeError, ValueError):
        return False
    return p is not None and p.kind is p.KEYWORD_ONLY and p.default is p.empty


def _check_takes_target_params(loss_fn: Callable) -> None:
    try:
        params = inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):  # no signature to read: the call will tell
        return
    if "target_params" not in params and not any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    ):
        raise TypeError(
            "ema_targets=True calls loss_fn(params, key, batch, target_params=ema); this loss "
            "takes no target_params (jd.shortcut_loss and the consistency losses do)"
        )


def data_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh named ``"data"`` over ``devices`` (default: all devices), with Auto axes."""
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh(
        (len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )


def _data_size(mesh: Mesh) -> int:
    """The size of ``mesh``'s ``"data"`` axis, the one batches are split over."""
    if "data" not in mesh.shape:
        raise ValueError(
            f"the mesh needs an axis named 'data' to split batches over (jaxdiff.train.data_mesh "
            f"makes one); got axes {tuple(mesh.shape)}"
        )
    return mesh.shape["data"]


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Put every leaf of ``tree`` on all devices of ``mesh`` (replicated), on one host or many.

    ``device_put`` onto devices of other processes takes plain arrays only: there typed PRNG keys
    go through their raw ``key_data`` and are wrapped again."""
    sharding = NamedSharding(mesh, PartitionSpec())
    if sharding.is_fully_addressable:  # one host: a batched put (make_feed_chunk's every chunk)
        return jax.device_put(tree, sharding)
    raw = jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)
    put = jax.device_put(raw, sharding)
    return jax.tree.map(
        lambda x, p: jax.random.wrap_key_data(p, impl=jax.random.key_impl(x)) if _is_key(x) else p,
        tree,
        put,
    )


def make_train_chunk(
    step: Callable[[TrainState, Any], tuple[TrainState, Array]],
    sample_batch: Callable[[Array], Any],
    num_steps: int,
    *,
    mesh: Mesh | None = None,
) -> Callable[[TrainState], tuple[TrainState, Array]]:
    """A jitted ``state -> (state, losses)`` running ``num_steps`` steps in one ``lax.scan``.

    The input state is donated (its buffers are reused: do not touch it after the call). On CPU
    the bits do not depend on the chunk lengths (tested bit for bit: the MLP in chunks of 1, 2, 4,
    5 and 12 steps, resumed, and as a Python loop over the jitted step; the U-Net with dropout in
    chunks of 2 and 4, resumed); ``train`` makes the same calls from step 0 and from an aligned
    resume in any case.

    ``sample_batch(key)`` draws a batch (a toy sampler, or indices into an in-memory data set);
    its key is split off ``state.key`` before each step. With ``mesh`` the batch is sharded over
    its ``"data"`` axis (the batch size must be a multiple of the number of devices).
    """
    num_steps = check_count(num_steps, "num_steps")  # 2.5 ran 2 steps

    def one(state: TrainState, _) -> tuple[TrainState, Array]:
        key, batch_key = jax.random.split(state.key)
        batch = sample_batch(batch_key)
        if mesh is not None:
            sharding = NamedSharding(mesh, PartitionSpec("data"))
            batch = jax.lax.with_sharding_constraint(batch, sharding)
        return step(state._replace(key=key), batch)

    def chunk(state: TrainState) -> tuple[TrainState, Array]:
        return jax.lax.scan(one, state, None, length=num_steps)

    if mesh is not None:
        size = _data_size(mesh)
        shapes = jax.eval_shape(sample_batch, jax.random.key(0))
        for leaf in jax.tree.leaves(shapes):
            if leaf.ndim == 0:
                raise ValueError(
                    f"every leaf of the batch needs a batch axis to shard over the {size} devices; "
                    f"got a scalar {leaf.dtype} leaf"
                )
            if leaf.shape[0] % size:
                raise ValueError(
                    f"the batch size {leaf.shape[0]} must be a multiple of the {size} devices"
                )
    return jax.jit(chunk, donate_argnums=0)


def make_feed_chunk(
    step: Callable[[TrainState, Any], tuple[TrainState, Array]],
    batches: Iterator,
    num_steps: int,
    *,
    mesh: Mesh | None = None,
    preprocess: Callable[[Any], Any] | None = None,
) -> Callable[[TrainState], tuple[TrainState, Array]]:
    """``state -> (state, losses)``: ``num_steps`` steps on the next ``num_steps`` batches of
    ``batches``, stacked and scanned in one jitted call (the state is donated).

    ``batches`` yields batches (device arrays from ``jaxdiff.loader.prefetch``, or host arrays);
    ``preprocess`` runs on each inside the jit (``jaxdiff.loader.to_float`` turns ``uint8`` pixels
    into ``[-1, 1]``). With ``mesh`` each batch is sharded over its ``"data"`` axis. Use it as
    ``train(state, lambda k: make_feed_chunk(step, it, k, ...), n)``: the calls of ``train``
    take the batches in order, so step ``s`` trains on the ``s``-th batch of the iterator.
    """
    num_steps = check_count(num_steps, "num_steps")  # 2.5 ran 2 steps
    if mesh is not None:
        _data_size(mesh)  # a mesh without a "data" axis is refused by name
    sharding = None if mesh is None else NamedSharding(mesh, PartitionSpec("data"))

    def chunk(state: TrainState) -> tuple[TrainState, Array]:
        block = []
        for _ in range(num_steps):
            try:
                block.append(next(batches))
            except StopIteration:
                raise ValueError(
                    f"the data ran out: a chunk of {num_steps} steps got {len(block)} batches"
                ) from None
        if mesh is not None:  # a state not yet on the mesh would compile the chunk twice
            state = replicate(state, mesh)
        return _feed_scan(step, preprocess, sharding, state, block)

    return chunk


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=3)
def _feed_scan(step, preprocess, sharding, state: TrainState, block: list):
    """The steps of ``make_feed_chunk`` over the stacked ``block`` (compiled once per ``step``,
    ``preprocess``, sharding and block length, whichever chunk asks)."""

    def one(state: TrainState, batch) -> tuple[TrainState, Array]:
        batch = batch if preprocess is None else preprocess(batch)
        if sharding is not None:
            batch = jax.lax.with_sharding_constraint(batch, sharding)
        return step(state, batch)

    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *block)
    return jax.lax.scan(one, state, stacked)


def train(
    state: TrainState,
    make_chunk: Callable[[int], Callable[[TrainState], tuple[TrainState, Array]]],
    num_steps: int,
    *,
    chunk_size: int = 100,
    on_chunk: Callable[[TrainState, Array], None] | None = None,
    every: int | Sequence[int] | None = None,
    on_every: Callable[[TrainState], None] | None = None,
    progress: bool = True,
    desc: str = "train",
) -> tuple[TrainState, list[float]]:
    """Run ``state`` up to step ``num_steps`` in chunks aligned to multiples of ``chunk_size``.

    ``make_chunk(k)`` returns the function running ``k`` steps (``make_train_chunk``), cached per
    ``k``: a run from step 0 and one resumed from an aligned step make the same calls, hence the
    same bits. ``on_every(state)`` runs whenever the step reaches a multiple of ``every`` (and at
    the end): evaluation, plots, checkpoints; ``every`` may be several periods (evaluation every
    333 steps, checkpoints every 1000), and chunks end at each of their multiples. Returns the
    final state and the mean loss of every chunk. The progress bar shows the loss, steps/s and
    the time left.

    The chunks donate their input: ``state`` is consumed (its arrays are deleted), so a second run
    from the same start needs a fresh ``init_train_state`` or a copy
    (``jax.tree.map(jnp.copy, state)``) made before the first.
    """
    if progress:  # a notebook's widget bar (a TqdmWarning without ipywidgets), else text
        from tqdm.auto import tqdm
    else:  # no bar: tqdm.auto's notebook check warned even so
        from tqdm.std import tqdm

    start_step = int(state.step)
    num_steps = check_count(num_steps, "num_steps", minimum=0)  # 2.5 ran 2 steps
    chunk_size = check_count(chunk_size, "chunk_size")
    periods = () if every is None else (every,) if np.ndim(every) == 0 else tuple(every)
    periods = tuple(check_count(e, "every", what="or None, or a tuple of them") for e in periods)
    if num_steps < start_step:
        raise ValueError(f"the state is at step {start_step}, past num_steps = {num_steps}")
    chunks: dict[int, Callable] = {}
    history: list[float] = []
    bar = tqdm(total=num_steps, initial=start_step, desc=desc, disable=not progress, leave=False)
    step, t0, done = start_step, time.perf_counter(), 0
    while step < num_steps:
        k = min(
            [chunk_size - step % chunk_size, num_steps - step, *(e - step % e for e in periods)]
        )
        if k not in chunks:
            chunks[k] = make_chunk(k)
        state, losses = chunks[k](state)
        loss = float(jnp.mean(losses))
        if not jnp.isfinite(loss):  # the chunk's first bad step (was its last: the input
            bar.close()  # state is donated, so the chunk cannot be rerun to find it)
            each = np.asarray(losses, np.float32).reshape(-1)
            first = int(np.flatnonzero(~np.isfinite(each))[0])
            raise FloatingPointError(f"the loss became {each[first]} at step {step + first + 1}")
        # a step's loss is taken before its update: NaN parameters from a chunk's last update
        # (a NaN gradient of a finite loss, weight decay inf) reached on_every and checkpoints
        if not bool(_all_finite(state.params)):
            bar.close()
            raise FloatingPointError(
                f"the parameters became non-finite at step {step + k} (the loss before that "
                "update was finite: a NaN or inf gradient or optimizer update)"
            )
        history.append(loss)
        step, done = step + k, done + k
        rate = done / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix(loss=f"{loss:.4f}", steps_s=f"{rate:.0f}")
        bar.update(k)
        if on_chunk is not None:
            on_chunk(state, losses)
        at_every = any(step % e == 0 for e in periods) or step == num_steps
        if on_every is not None and at_every:  # without every: at the end only (it never ran)
            on_every(state)
    bar.close()
    return state, history
