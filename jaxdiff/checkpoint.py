"""Orbax checkpoints of a :class:`~jaxdiff.train.TrainState`, sealed with checksums.

Each save writes ``DIR/<step>/`` with the state (params, optimizer state, EMA, step, the PRNG
key's raw bits, and the target network where the state has one) and ``meta`` (the
configuration needed to rebuild the model). Orbax writes a step
into a temporary folder and renames it only when complete, so a save that fails or is killed
leaves the previous checkpoints intact. Once the step is written, ``save`` *seals* it: the SHA-256
and size of every file go into ``DIR/<step>/jaxdiff_checksums.json`` (written atomically). A step
is intact only if it is sealed and every file still matches, so flipped bytes, a truncated or
deleted file, an empty step folder and a half-deleted step are all caught. (Orbax alone does not
catch them: of 39 flips of 8 bytes, one file at a time, 5 restored wrong values silently, 12
failed with a long traceback and 22 hit bytes that are never read.) ``steps()`` lists intact steps
only; ``restore()`` takes the newest intact step and warns (:class:`DamagedCheckpointWarning`)
about newer damaged ones; when none is intact it raises :class:`CheckpointError`.

Saves block until the step is sealed. Old steps beyond ``max_to_keep`` are removed after that (on
one process; Orbax's own retention otherwise), by renaming them into ``DIR/.deleting/`` first, so
a kill during clean-up never leaves a half-deleted step among the steps. A kill between Orbax's
rename and the seal leaves the newest step unsealed: it counts as damaged and the previous step
is used. Damaged steps are never deleted; ``set_aside_damaged`` moves them to ``DIR/damaged/``.

>>> import tempfile, jax, jax.numpy as jnp, optax
>>> from jaxdiff.train import init_train_state
>>> state = init_train_state({"w": jnp.ones(3)}, optax.sgd(0.1), jax.random.key(0))
>>> with Checkpointer(tempfile.mkdtemp()) as ckpt:
...     ckpt.save(state, {"note": "hi"})
>>> with Checkpointer(ckpt.directory) as ckpt:
...     restored, meta = ckpt.restore(state)
>>> meta["note"], bool(jnp.all(restored.params["w"] == 1)), ckpt.steps()
('hi', True, [0])
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxdiff._checks import check_count
from jaxdiff.train import TrainState

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "DamagedCheckpointWarning",
    "check_step",
    "read_meta",
    "seal_step",
]

CHECKSUMS = "jaxdiff_checksums.json"
DAMAGED = "damaged"  # damaged steps are moved here (never deleted) before a step is saved again
DELETING = ".deleting"  # old steps beyond max_to_keep pass through here on their way out


class CheckpointError(ValueError):
    """No intact checkpoint (every step is damaged), or the requested step is damaged."""


UNSEALED = f"no {CHECKSUMS} (the save did not finish, or it was partly deleted)"


class DamagedCheckpointWarning(UserWarning):
    """A damaged checkpoint step was skipped or set aside."""


def _files(step_dir: Path) -> list[str]:
    names = []
    for root, _, files in os.walk(step_dir):
        for name in files:
            rel = (Path(root) / name).relative_to(step_dir).as_posix()
            if rel != CHECKSUMS and not rel.startswith(f".{CHECKSUMS}"):
                names.append(rel)
    return sorted(names)


def _sha256(file: Path) -> str:
    with open(file, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def seal_step(step_dir: str | Path) -> None:
    """Write the size and SHA-256 of every file of ``step_dir`` to its checksum file, atomically.
    Only for a step known to be complete (``Checkpointer.save`` calls it)."""
    step_dir = Path(step_dir)
    files = {
        rel: [(step_dir / rel).stat().st_size, _sha256(step_dir / rel)] for rel in _files(step_dir)
    }
    tmp = step_dir / f".{CHECKSUMS}.tmp"
    with open(tmp, "w") as f:
        json.dump({"algorithm": "sha256", "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, step_dir / CHECKSUMS)


def check_step(step_dir: str | Path) -> str | None:
    """Why the checkpoint step in ``step_dir`` is damaged, or ``None`` when it is intact."""
    step_dir = Path(step_dir)
    if not step_dir.is_dir():
        return "the step folder is missing"
    try:
        files = json.loads((step_dir / CHECKSUMS).read_text())["files"]
        entries = sorted(files.items())  # {"files": 5} or {"x": 3}: damaged, not a crash
        if not all(isinstance(v, list) and len(v) == 2 for _, v in entries):
            raise TypeError
    except FileNotFoundError:
        if not any(step_dir.iterdir()):
            return "the step folder is empty"
        return UNSEALED
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{CHECKSUMS} is unreadable"
    for rel, (size, digest) in entries:
        file = step_dir / rel
        if not file.is_file():
            return f"{rel} is missing"
        if file.stat().st_size != size:
            return f"{rel} has {file.stat().st_size} bytes instead of {size} (truncated?)"
        if _sha256(file) != digest:
            return f"{rel} does not match its checksum (corrupted bytes)"
    return None


def _to_saveable(state: TrainState) -> dict:
    saveable = {
        "params": state.params,
        "opt_state": state.opt_state,
        "ema": state.ema,
        "step": state.step,
        "key": jax.random.key_data(state.key),
    }
    if state.target is not None:  # the target network (init_train_state(..., target_ema=True))
        saveable["target"] = state.target
    return saveable


def _saved_leaf(tree: Any, path: tuple) -> Any:
    """The metadata at a ``tree_flatten_with_path`` path of the saved tree, or ``None``."""
    for entry in path:
        key = getattr(entry, "key", getattr(entry, "idx", getattr(entry, "name", None)))
        try:
            tree = tree[key]
        except (KeyError, IndexError, TypeError):
            return None
    return tree


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
    """Save and restore train states in ``directory``, keeping the newest ``max_to_keep``.

    ``writer`` (a reader's argument: who holds the run's lock, :func:`jaxdiff.rundir.holder`) says
    that a live run saves here: a newer step without its checksum file is its save in progress,
    skipped without the warning a damaged step gets."""

    def __init__(
        self, directory: str | Path, *, max_to_keep: int | None = 3, writer: str | None = None
    ):
        if max_to_keep is not None:  # -1 once deleted every step right after saving it
            max_to_keep = check_count(max_to_keep, "max_to_keep", what="or None: keep all")
        self.directory = Path(directory).absolute()
        self.max_to_keep = max_to_keep
        # One process: old steps are removed after the new one is sealed (Orbax would remove
        # them before, widening the time in which a kill leaves the newest step unsealed).
        ours = jax.process_count() == 1
        # Synchronous saves: ``save`` waits for each step to seal it anyway, and a failed async
        # save (an unwritable folder) left Orbax's threads waiting ~300 s before the process
        # could exit, printing their tracebacks
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if ours else max_to_keep, create=True, enable_async_checkpointing=False
        )
        self._retention = max_to_keep if ours else None
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )
        self._verdicts: dict[int, str | None] = {}
        self._warned: set[int] = set()
        self.writer = writer  # a live process saving here: its newest unsealed step is no damage

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def save(self, state: TrainState, meta: dict | None = None, *, force: bool = True) -> None:
        """Save ``state`` (and the JSON-able ``meta``) under ``int(state.step)`` and seal it.

        A damaged step of the same number is first moved to ``DIR/damaged/`` (with a warning); an
        intact one is an error (``ValueError``): a checkpoint is never overwritten."""
        step = int(state.step)
        meta = dict(meta or {})
        try:  # before Orbax starts: a failed JSON write left a temporary folder that broke the
            json.dumps(meta)  # next save of this step (OSError)
        except (TypeError, ValueError) as err:
            raise ValueError(f"meta must be JSON-able: {err}") from None
        if step in self._manager.all_steps():
            if self._damage(step) is None:
                raise ValueError(
                    f"step {step} is already saved in {self.directory}; a checkpoint is never "
                    "overwritten (train on, or save to another directory)"
                )
            self.set_aside_damaged([step])
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_to_saveable(state)),
            meta=ocp.args.JsonSave(meta),
        )
        self._manager.save(step, args=args, force=force)
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            seal_step(self.directory / str(step))
        self._verdicts[step] = None
        self._remove_old()

    def _remove_old(self) -> None:
        """Delete the oldest intact steps beyond ``max_to_keep`` (damaged ones are left alone).
        Each is first renamed into ``DIR/.deleting/``, so a deletion cut short never leaves a
        half-deleted step among the steps; the next save finishes it."""
        trash = self.directory / DELETING
        old = self.steps()[: -self._retention] if self._retention else []
        for step in old:
            trash.mkdir(exist_ok=True)
            if (trash / str(step)).exists():
                shutil.rmtree(trash / str(step))
            os.replace(self.directory / str(step), trash / str(step))
            self._verdicts.pop(step, None)
        if trash.exists():
            shutil.rmtree(trash)
        if old:
            self._manager.reload()

    def wait(self) -> None:
        """Block until background saves have finished (``save`` already waits, to seal)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending asynchronous saves, then release the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def _damage(self, step: int) -> str | None:
        if step not in self._verdicts:
            self._verdicts[step] = check_step(self.directory / str(step))
        return self._verdicts[step]

    def damaged_steps(self) -> dict[int, str]:
        """``{step: reason}`` for every step folder that is not an intact checkpoint."""
        reasons = {s: self._damage(s) for s in sorted(self._manager.all_steps())}
        return {s: r for s, r in reasons.items() if r is not None}

    def steps(self) -> list[int]:
        """Steps with an intact (sealed, checksum-verified) checkpoint, ascending."""
        return [s for s in sorted(self._manager.all_steps()) if self._damage(s) is None]

    def latest_step(self) -> int | None:
        """The newest saved step, or ``None`` when the folder holds none."""
        steps = self.steps()
        return steps[-1] if steps else None

    def set_aside_damaged(self, steps: list[int] | None = None) -> list[Path]:
        """Move damaged steps (default: all) into ``DIR/damaged/`` with a warning; nothing is
        deleted. Returns where they went."""
        moved = []
        for step, reason in self.damaged_steps().items():
            if steps is not None and step not in steps:
                continue
            (self.directory / DAMAGED).mkdir(exist_ok=True)
            target, k = self.directory / DAMAGED / str(step), 1
            while target.exists():
                target, k = self.directory / DAMAGED / f"{step}-{k}", k + 1
            os.replace(self.directory / str(step), target)
            warnings.warn(
                f"checkpoint step {step} in {self.directory} is damaged: {reason}; set aside as "
                f"{target} (not deleted)",
                DamagedCheckpointWarning,
                stacklevel=2,
            )
            self._verdicts.pop(step, None)
            moved.append(target)
        if moved:
            self._manager.reload()
        return moved

    def _check_shapes(self, step: int, target: dict, like: TrainState) -> None:
        """One line naming the first leaf whose saved shape differs from ``like``'s (Orbax's own
        error came with hundreds of lines of event-loop traces, and named no leaf)."""
        try:  # the state item's own metadata (a fresh manager's item_metadata has none)
            saved = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state")
            saved = saved.tree
        except Exception:  # no metadata (another Orbax layout): Orbax's own checks remain
            return
        has_target = isinstance(saved, dict) and "target" in saved
        if has_target != ("target" in target):
            raise ValueError(
                f"checkpoint step {step} was saved "
                + ("with" if has_target else "without")
                + " a target network (state.target), but like has "
                + ("none" if has_target else "one")
                + ": build like with init_train_state(..., target_ema="
                + ("True" if has_target else "False")
                + "), as the run was"
            )
        for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
            meta = _saved_leaf(saved, path)
            shape = getattr(meta, "shape", None)
            if shape is None or tuple(shape) == tuple(np.shape(leaf)):
                continue
            name = jax.tree_util.keystr(path)
            if name == "['key']":
                raise ValueError(
                    f"the checkpoint's PRNG key data has shape {tuple(shape)}, the key of like "
                    f"{tuple(np.shape(leaf))} ({jax.random.key_impl(like.key)}): restore into a "
                    "state whose key has the saved implementation (e.g. jax.random.key(0, "
                    "impl='rbg') for shape (4,))"
                )
            raise ValueError(
                f"checkpoint step {step}: {name} was saved with shape {tuple(shape)}, but like has "
                f"{tuple(np.shape(leaf))} (build like with the run's model and config)"
            )

    def restore(self, like: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """The state saved at ``step`` (default: the newest intact one) with the structure, dtypes
        and shardings of ``like``, and its ``meta``."""
        step = self._pick(step)
        target = _to_saveable(like)
        self._check_shapes(step, target, like)
        abstract = _abstract(target)
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        saved = out["state"]
        sharding = getattr(like.key, "sharding", None)  # the others come back with like's
        key = np.asarray(saved["key"])
        key = key if sharding is None else jax.device_put(key, sharding)  # raw: any host's mesh
        if jnp.issubdtype(like.key.dtype, jax.dtypes.prng_key):
            key = jax.random.wrap_key_data(key, impl=jax.random.key_impl(like.key))
        else:  # a raw uint32 key (jax.random.PRNGKey) comes back raw, as like holds it
            key = jnp.asarray(key, like.key.dtype)
        state = TrainState(
            saved["params"], saved["opt_state"], saved["ema"], saved["step"], key,
            saved.get("target"),
        )  # fmt: skip
        return state, dict(out["meta"])

    def meta(self, step: int | None = None) -> dict:
        """Only the JSON record of ``step`` (default: the newest intact one)."""
        step = self._pick(step)
        out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def _pick(self, step: int | None) -> int:
        every = sorted(self._manager.all_steps())
        if not every:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        damaged = self.damaged_steps()
        if step is not None:
            if step in damaged:
                raise CheckpointError(
                    f"checkpoint step {step} in {self.directory} is damaged: {damaged[step]}"
                )
            if step not in every:
                raise FileNotFoundError(
                    f"no checkpoint for step {step} in {self.directory}: {self.steps()}"
                )
            return step
        intact = self.steps()
        if not intact:
            listing = "; ".join(f"step {s}: {r}" for s, r in damaged.items())
            raise CheckpointError(f"no intact checkpoint in {self.directory} ({listing})")
        for s, reason in damaged.items():
            if self.writer is not None and reason == UNSEALED:
                continue  # a save in progress (sealed when its files are complete)
            if s > intact[-1] and s not in self._warned:
                self._warned.add(s)
                warnings.warn(
                    f"checkpoint step {s} in {self.directory} is damaged: {reason}; "
                    f"using step {intact[-1]}",
                    DamagedCheckpointWarning,
                    stacklevel=3,
                )
        return intact[-1]


def read_meta(directory: str | Path) -> dict:
    """The JSON record of the newest intact checkpoint in ``directory`` (``FileNotFoundError``
    if there is none, :class:`CheckpointError` if every one is damaged)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    with Checkpointer(directory) as ckpt:
        return ckpt.meta()
