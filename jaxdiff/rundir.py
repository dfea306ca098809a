"""The run folder (``--out``): who is using it, what is already in it, and its metrics over resumes.

A run folder holds ``ckpt/`` (checksummed Orbax checkpoints, see ``jaxdiff.checkpoint``),
``metrics.json``, ``samples.png`` and ``.jaxdiff.lock``. Nothing here ever deletes a file.

* :func:`prepare` creates the folder; a path that is a file, or a folder that cannot be written,
  is a ``ValueError`` naming it.
* :class:`RunLock` takes an exclusive advisory lock (``fcntl.flock``) on ``OUT/.jaxdiff.lock`` and
  writes the holder's PID, host and start time into it. A second process gets
  :class:`RunBusyError` naming the holder. The kernel releases the lock when its holder dies
  (even by ``kill -9``), so the file a dead process left behind is simply taken over. (Where
  ``fcntl`` is missing, i.e. on Windows, the folder is not locked.)
* :func:`resume_config`: what a resume takes from the checkpoint and what it may change.
* :class:`History` is ``metrics.json``'s record of the training: the loss of every chunk with the
  step it ended at, the evaluations, and one entry per session (a run and each resume). A resume
  keeps everything up to the step it restarts from, so the history reads as one run.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

from jaxdiff import run_images as IR

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the run folder is not locked there
    fcntl = None

LOCK = ".jaxdiff.lock"
METRICS = "metrics.json"
RUN_FILES = ("ckpt", METRICS, "samples.png")  # what a training run writes


class RunBusyError(RuntimeError):
    """Another process holds the run folder's lock."""


class RunWarning(UserWarning):
    """Something in a run folder was set aside (never deleted)."""


def prepare(out: str | Path) -> Path:
    """Create the folder ``out`` (and its parents); ``ValueError`` if it is a file or unwritable."""
    if not str(out).strip():  # Path("") is the working directory
        raise ValueError("--out must name a folder; got an empty string")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create the folder {out}: {err.strerror}") from None
    return out


class RunLock:
    """``with RunLock(out):`` hold the exclusive lock of the run folder ``out`` (which must exist)."""

    def __init__(self, out: str | Path):
        self.file = Path(out) / LOCK
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        try:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ValueError(f"cannot write in {self.file.parent}: {err.strerror}") from None
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 500, 0).decode(errors="replace").strip() or "pid unknown"
            os.close(fd)
            raise RunBusyError(
                f"{self.file.parent} is in use by another jaxdiff process ({holder}); "
                "wait for it to finish or choose another --out"
            ) from None
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # no holder; the empty file stays (removing it would race)
            if fcntl is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def holder(out: str | Path) -> str | None:
    """Who holds the lock of the run folder ``out`` (its ``pid ... on HOST since ...`` line), or
    ``None`` when no process does (or ``out`` has no lock file). Takes nothing: a shared lock is
    tried and released at once."""
    file = Path(out) / LOCK
    if fcntl is None or not file.is_file():
        return None
    try:
        fd = os.open(file, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 500, 0).decode(errors="replace").strip() or "pid unknown"
    finally:
        os.close(fd)  # closing releases a shared lock taken here
    return None


def has_steps(ckpt_dir: Path) -> bool:
    """Whether ``ckpt_dir`` holds any step folder (intact or not)."""
    return ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())


def run_files(out: Path) -> list[str]:
    """The files of a training run already present in ``out`` (an empty ``ckpt/`` does not count)."""
    found = []
    for name in RUN_FILES:
        p = out / name
        if (p.is_dir() and any(p.iterdir())) or p.is_file():
            found.append(name)
    return found


def write_json(file: Path, data: dict) -> None:
    """Write ``data`` to ``file`` atomically (a temporary file, then a rename)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, file)


def read_metrics(out: Path) -> dict | None:
    """``out/metrics.json``, or ``None`` if absent; an unreadable one is renamed aside (warning)."""
    file = out / METRICS
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
        if not isinstance(data, dict):  # valid JSON, but a list or a number: AttributeError
            raise ValueError(f"a {type(data).__name__}, not an object")
        _check_history(data)
        return data
    except ValueError as err:
        stamp = int(time.time())
        aside = file.with_name(f"{METRICS}.unreadable-{stamp}")
        n = 1
        while aside.exists():  # a second one in the same second had replaced the first
            aside, n = file.with_name(f"{METRICS}.unreadable-{stamp}-{n}"), n + 1
        os.replace(file, aside)
        warnings.warn(f"{file} is unreadable ({err}); kept as {aside}", RunWarning, stacklevel=2)
        return None


def _check_history(data: dict) -> None:
    """``ValueError`` unless the history entries of a ``metrics.json`` have the shape
    :class:`History` reads (a hand-edited one raised ``KeyError`` deep in a resume)."""

    def fail(what):
        raise ValueError(f"its {what}")

    losses, steps = data.get("loss_history", []), data.get("loss_steps")
    if not isinstance(losses, list):
        fail("loss_history is not a list")
    if steps is not None and (
        not isinstance(steps, list)
        or len(steps) != len(losses)
        or not all(s is None or isinstance(s, int) for s in steps)
    ):
        fail("loss_steps is not a list of steps as long as loss_history")
    evaluations = data.get("evaluations", [])
    if not isinstance(evaluations, list) or not all(
        isinstance(e, dict) and isinstance(e.get("step"), int) for e in evaluations
    ):
        fail("evaluations are not records with a step")
    sessions = data.get("sessions", [])
    keys = ("start", "end", "seconds")
    if not isinstance(sessions, list) or not all(
        isinstance(e, dict) and all(isinstance(e.get(k), int | float) for k in keys)
        for e in sessions
    ):
        fail("sessions are not records with a start, an end and seconds")


class History:
    """The training record of a run: chunk losses with their end steps, evaluations, sessions."""

    def __init__(self, previous: dict | None = None, up_to: int = 0):
        """Continue ``previous`` (a ``metrics.json``) from step ``up_to``: entries after it (from a
        session whose later checkpoints were lost) are dropped."""
        previous = previous or {}
        losses = previous.get("loss_history", [])
        steps = previous.get("loss_steps", [None] * len(losses))  # None: written before steps
        keep = [i for i, s in enumerate(steps) if s is None or s <= up_to]
        self.losses = [losses[i] for i in keep]
        self.steps = [steps[i] for i in keep]
        self.evaluations = [e for e in previous.get("evaluations", []) if e["step"] <= up_to]
        self.sessions = [
            dict(s, end=min(s["end"], up_to))
            for s in previous.get("sessions", [])
            if s["start"] < up_to
        ]
        self.final = previous.get("final") if previous.get("step") == up_to else None

    def add_loss(self, step: int, loss: float) -> None:
        self.losses.append(loss)
        self.steps.append(step)

    def record(self, config: dict, step: int, session: dict | None = None) -> dict:
        """The ``metrics.json`` of the run at ``step`` with the current ``session`` (``None``: the
        record as it stands, of a run that trains no further)."""
        sessions = self.sessions if session is None else [*self.sessions, session]
        last = sessions[-1] if sessions else {}
        out = {
            "config": config,
            "step": step,
            "train_seconds": sum(s["seconds"] for s in sessions),
            "steps_per_second": last.get("steps_per_second"),
            "loss_history": self.losses,
            "loss_steps": self.steps,
            "evaluations": self.evaluations,
            "sessions": sessions,
        }
        if self.final is not None:
            out["final"] = self.final
        return out


def saved_config(meta: dict, where: str | Path) -> dict:
    """The run config in a checkpoint's ``meta``; ``ValueError`` naming ``where`` when it holds
    none (a checkpoint saved from Python with a ``meta`` of its own, not by a run)."""
    config = meta.get("config")
    if not isinstance(config, dict):
        raise ValueError(
            f"the checkpoint in {where} holds no run config (meta keys: {sorted(meta)}); it was "
            "not written by python -m jaxdiff train or demo"
        )
    return config


# What a resumed run may change: when and how much to train, evaluate and checkpoint. Everything
# else (data, path, loss, model, batch, optimizer, EMA, seed) is fixed by the checkpoint.
RESUME_MAY_CHANGE = ("steps", "chunk", "eval_every", "ckpt_every", "eval_n", "eval_steps", "images")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return list(a) == list(b)
    return a == b


def _flag(key: str) -> str:
    return "--no-flip" if key == "flip" else "--" + key.replace("_", "-")  # no --flip flag


def resume_config(saved: dict, given: dict) -> tuple[dict, dict]:
    """The config of a resumed run: ``saved`` (the checkpoint's) updated by the options in
    ``given`` that may change (``RESUME_MAY_CHANGE``), and ``{key: (old, new)}`` of the changes.

    A ``given`` option that differs from ``saved`` but may not change is a ``ValueError`` naming
    it; one equal to the saved value is accepted (the original command line plus ``--resume``).
    ``steps`` is the total of the learning-rate schedule: more steps continue on the schedule of
    a run of the new total (warmup + cosine over ``steps``), so after a finished run the rate
    rises again from its end value and decays to it at the new total (a warm restart)."""
    saved = IR.resolve(saved)
    given = IR.normalize({k: v for k, v in given.items() if v is not None})
    unknown = set(given) - set(IR.KEYS)
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)}; known: {sorted(IR.KEYS)}")
    fixed = [k for k in given if k not in RESUME_MAY_CHANGE and not _same(given[k], saved.get(k))]
    if fixed:

        def has(k):  # the saved value, in the words of the run
            if saved.get(k) is None:
                return "no images" if k in ("images", "flip") else "none"
            return saved.get(k)

        def switch(k):  # flags that take no value: --no-flip, --ema-targets
            on = not given[k] if k == "flip" else bool(given[k])
            if saved.get(k) is None:
                return f"{_flag(k)} (the run has {has(k)})"
            return f"{_flag(k)} (the run was trained {'without' if on else 'with'} it)"

        listing = ", ".join(
            switch(k)
            if k in ("flip", "ema_targets")
            else f"{_flag(k)} {given[k]} (the run has {has(k)})"
            for k in fixed
        )
        may = ", ".join(_flag(k) for k in RESUME_MAY_CHANGE if k != "eval_steps")
        raise ValueError(
            f"--resume continues the saved run, whose other options are fixed: {listing}; "
            f"only {may} may change (start a new run in another --out to change the rest)"
        )
    changes = {
        k: (saved.get(k), given[k])
        for k in RESUME_MAY_CHANGE
        if k in given and not _same(given[k], saved.get(k))
    }
    return IR.resolve({**saved, **{k: new for k, (_, new) in changes.items()}}), changes
