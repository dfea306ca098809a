"""Orbax checkpoints of a :class:`~jaxdiff.train.TrainState` plus a JSON record of the run.

Each save writes ``DIR/<step>/`` with the state (params, optimizer state, EMA, step and the PRNG
key's raw bits) and ``meta`` (the configuration needed to rebuild the model). Orbax writes a step
into a temporary folder and renames it only when complete, so a save that fails or is killed
leaves the previous checkpoints intact and is ignored on restore. Saves run in the background;
``close()`` (or leaving the ``with`` block) waits for them.

>>> import tempfile, jax, jax.numpy as jnp, optax
>>> from jaxdiff.train import init_train_state
>>> state = init_train_state({"w": jnp.ones(3)}, optax.sgd(0.1), jax.random.key(0))
>>> with Checkpointer(tempfile.mkdtemp()) as ckpt:
...     ckpt.save(state, {"note": "hi"})
>>> with Checkpointer(ckpt.directory) as ckpt:
...     restored, meta = ckpt.restore(state)
>>> meta["note"], bool(jnp.all(restored.params["w"] == 1))
('hi', True)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxdiff.train import TrainState

__all__ = ["Checkpointer", "read_meta"]


def _to_saveable(state: TrainState) -> dict:
    return {
        "params": state.params,
        "opt_state": state.opt_state,
        "ema": state.ema,
        "step": state.step,
        "key": jax.random.key_data(state.key),
    }


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
    """Save and restore train states in ``directory``, keeping the newest ``max_to_keep``."""

    def __init__(self, directory: str | Path, *, max_to_keep: int | None = 3):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def save(self, state: TrainState, meta: dict | None = None, *, force: bool = True) -> None:
        """Start saving ``state`` (and the JSON-able ``meta``) under ``int(state.step)``."""
        step = int(state.step)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_to_saveable(state)),
            meta=ocp.args.JsonSave(dict(meta or {})),
        )
        self._manager.save(step, args=args, force=force)

    def wait(self) -> None:
        """Block until background saves have finished."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, like: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """The state saved at ``step`` (default: the latest) with the structure, dtypes and
        shardings of ``like``, and its ``meta``."""
        step = self._pick(step)
        target = _to_saveable(like)
        abstract = _abstract(target)
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        saved = out["state"]
        key_impl = jax.random.key_impl(like.key)
        key = jax.random.wrap_key_data(np.asarray(saved["key"]), impl=key_impl)
        state = TrainState(saved["params"], saved["opt_state"], saved["ema"], saved["step"], key)
        return state, dict(out["meta"])

    def meta(self, step: int | None = None) -> dict:
        """Only the JSON record of ``step`` (default: the latest)."""
        step = self._pick(step)
        out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def _pick(self, step: int | None) -> int:
        steps = self.steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}: {steps}")
        return step


def read_meta(directory: str | Path) -> dict:
    """The JSON record of the latest checkpoint in ``directory`` (``FileNotFoundError`` if none)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    with Checkpointer(directory) as ckpt:
        return ckpt.meta()
