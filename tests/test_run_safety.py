"""Runs never lose data: damaged checkpoints, resumes, locks and the CLI's one-line errors.

Every corruption here is real: bytes flipped, files truncated or deleted in the folders Orbax
wrote. One tiny run (30 steps, checkpoints at 20 and 30) is trained once and copied per test.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxdiff import experiment as E
from jaxdiff import rundir
from jaxdiff.checkpoint import (
    CHECKSUMS,
    Checkpointer,
    CheckpointError,
    DamagedCheckpointWarning,
)
from jaxdiff.cli import main
from jaxdiff.rundir import RunLock
from tests.cli_helpers import cli_error as _error

TINY = "--width 8 --depth 1 --batch 16 --chunk 10 --ckpt-every 10 --eval-n 0 --no-progress".split()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", *TINY, "--steps", "30", "--out", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def like(trained):
    """A train state shaped like the run's, to restore into."""
    with Checkpointer(trained / "ckpt") as ckpt:
        c = E.resolve(ckpt.meta()["config"])
    return E.init_state(c, E.build(c))[0]


@pytest.fixture
def run(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def _tree_digest(folder: Path) -> dict:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".jaxdiff.lock"
    }


def _arrays(step_dir: Path) -> list[Path]:
    """The array data files Orbax wrote for a step, largest first."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return sorted(files, key=lambda p: -p.stat().st_size)


def _flip(file: Path, n: int = 8) -> None:
    data = bytearray(file.read_bytes())
    for i in range(n):
        data[len(data) // 2 + i] ^= 0xFF
    file.write_bytes(bytes(data))


def _flip_every_array_file(step: Path) -> None:
    for f in _arrays(step):
        _flip(f)


CORRUPTIONS = {
    "flipped bytes": (lambda step: _flip(_arrays(step)[0]), "does not match its checksum"),
    "flipped bytes in every file": (_flip_every_array_file, "does not match its checksum"),
    "truncated file": (
        lambda step: os.truncate(_arrays(step)[0], _arrays(step)[0].stat().st_size // 2),
        "truncated",
    ),
    "deleted file": (lambda step: _arrays(step)[0].unlink(), "is missing"),
    "deleted metadata": (lambda step: (step / "state" / "_METADATA").unlink(), "is missing"),
    "lost checksums": (lambda step: (step / CHECKSUMS).unlink(), "save did not finish"),
    # valid JSON of the wrong structure raised AttributeError / TypeError (sample's traceback)
    "checksums not a table": (
        lambda step: (step / CHECKSUMS).write_text('{"files": 5}'),
        "is unreadable",
    ),
    "checksums without sizes": (
        lambda step: (step / CHECKSUMS).write_text('{"files": {"x": 3}}'),
        "is unreadable",
    ),
    "emptied folder": (
        lambda step: [shutil.rmtree(p) if p.is_dir() else p.unlink() for p in step.iterdir()],
        "folder is empty",
    ),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_a_damaged_newest_step_is_skipped_with_a_warning(run, like, kind):
    corrupt, reason = CORRUPTIONS[kind]
    with Checkpointer(run / "ckpt") as ckpt:
        assert ckpt.steps() == [20, 30]
        good, _ = ckpt.restore(like, 20)
    corrupt(run / "ckpt" / "30")
    with Checkpointer(run / "ckpt") as ckpt:
        assert ckpt.steps() == [20] and ckpt.latest_step() == 20
        assert reason in ckpt.damaged_steps()[30]
        with pytest.warns(DamagedCheckpointWarning, match=f"step 30 .*{reason}.*using step 20"):
            state, meta = ckpt.restore(like)
        with pytest.raises(CheckpointError, match="step 30 .* is damaged"):
            ckpt.restore(like, 30)
    assert int(state.step) == 20 and meta["config"]["steps"] == 30
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(good.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_half_deleted_and_empty_steps_are_never_listed(run, like):
    shutil.rmtree(run / "ckpt" / "20" / "state")  # a kill while Orbax deleted an old step
    (run / "ckpt" / "40").mkdir()  # an empty step folder
    with Checkpointer(run / "ckpt") as ckpt:
        assert ckpt.steps() == [30]
        assert set(ckpt.damaged_steps()) == {20, 40}
        with pytest.warns(DamagedCheckpointWarning, match="step 40 .* folder is empty"):
            state, _ = ckpt.restore(like)
    assert int(state.step) == 30


def test_sampling_a_live_run_skips_its_save_in_progress_without_a_warning(run, capsys):
    """A run still training holds its lock; its newest step, renamed into place but not yet
    sealed, is a save in progress: `sample` warned that it was damaged. It says the run is live
    now, and samples the newest sealed step (one step for the config and the state)."""
    (run / "ckpt" / "30" / CHECKSUMS).unlink()  # between Orbax's rename and the seal
    sample = ["sample", "--ckpt", str(run), "--n", "50", "--steps", "2", "--solver", "euler"]
    capsys.readouterr()
    with RunLock(run):
        assert rundir.holder(run).startswith(f"pid {os.getpid()} on ")
        assert main(sample) == 0
    captured = capsys.readouterr()
    assert captured.err == "", captured.err
    assert f"sampling 50 from step 20 (the run is still training: pid {os.getpid()}" in captured.out
    assert rundir.holder(run) is None  # released; and with no writer the warning is back
    assert main([*sample, "--out", str(run / "again")]) == 0
    captured = capsys.readouterr()
    assert "checkpoint step 30" in captured.err and "save did not finish" in captured.err
    assert "sampling 50 from step 20:" in captured.out


def test_sampling_a_live_run_picks_again_when_its_retention_deleted_the_step(
    run, capsys, monkeypatch
):
    """`sample` picks the newest step, builds the model, then reads the state: a live run keeping
    two checkpoints could delete the step in between (a raw "No such file or directory"). It
    picks the newest step again."""
    restore, deleted = Checkpointer.restore, []

    def retention_first(self, like, step=None):  # the live run saved twice meanwhile
        if not deleted:
            deleted.append(step)
            shutil.rmtree(self.directory / str(step))
        return restore(self, like, step)

    monkeypatch.setattr(Checkpointer, "restore", retention_first)
    capsys.readouterr()
    with RunLock(run):
        assert main(["sample", "--ckpt", str(run), "--n", "50", "--steps", "2"]) == 0
    assert deleted == [30]
    assert "sampling 50 from step 20 (the run is still training" in capsys.readouterr().out


def test_sample_falls_back_to_an_intact_step_and_fails_in_one_line_when_none_is(run, capsys):
    _flip(_arrays(run / "ckpt" / "30")[0])
    capsys.readouterr()
    assert (
        main(["sample", "--ckpt", str(run), "--n", "50", "--steps", "2", "--solver", "euler"]) == 0
    )
    captured = capsys.readouterr()
    assert "checkpoint step 30" in captured.err and "using step 20" in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert "sampling 50 from step 20" in captured.out
    assert np.isfinite(np.load(run / "samples" / "samples.npz")["samples"]).all()
    os.truncate(_arrays(run / "ckpt" / "20")[0], 3)
    err = _error(["sample", "--ckpt", str(run), "--n", "50"], capsys)
    assert "no intact checkpoint" in err and "step 20" in err and "step 30" in err


def test_resume_after_damage_sets_it_aside_and_repeats_the_lost_steps_bit_for_bit(
    run, trained, like, capsys
):
    _flip(_arrays(run / "ckpt" / "30")[0])
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "using step 20" in err[0] and "set aside" in err[1], err
    assert (run / "ckpt" / "damaged" / "30" / CHECKSUMS).is_file()  # kept, not deleted
    with Checkpointer(trained / "ckpt") as a, Checkpointer(run / "ckpt") as b:
        assert b.steps() == [20, 30]
        sa, _ = a.restore(like, 30)
        sb, _ = b.restore(like, 30)
    sa, sb = (s._replace(key=jax.random.key_data(s.key)) for s in (sa, sb))
    for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb), strict=True):
        np.testing.assert_array_equal(x, y)
    ma = json.loads((trained / "metrics.json").read_text())
    mb = json.loads((run / "metrics.json").read_text())
    assert mb["loss_steps"] == ma["loss_steps"] == [10, 20, 30]
    assert mb["loss_history"] == ma["loss_history"]  # steps 20-30 again, bit for bit
    assert [(s["start"], s["end"]) for s in mb["sessions"]] == [(0, 20), (20, 30)]


def test_resuming_a_finished_run_changes_nothing(run, capsys):
    before = _tree_digest(run)
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "is finished (step 30 of 30); nothing to train" in out
    assert "nan" not in out and "steps/s" not in out
    assert _tree_digest(run) == before


def test_a_finished_run_whose_later_session_was_lost_reports_its_own_step(run, capsys):
    """Trained on to step 40 (`--steps 50 --until 40`), whose checkpoint is then damaged: the
    run is finished at step 30 again, but its metrics.json (written before each checkpoint) still
    said step 40, and a resume reported and kept that record. It is trimmed to step 30 now."""
    more = ["train", "--out", str(run), "--resume", "--steps", "50", "--until", "40"]
    assert main([*more, "--no-progress"]) == 0
    assert json.loads((run / "metrics.json").read_text())["step"] == 40
    _flip(_arrays(run / "ckpt" / "40")[0])
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "is finished (step 30 of 30)" in captured.out and "step 40" in captured.err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 30 and max(metrics["loss_steps"]) == 30
    assert [(s["start"], s["end"]) for s in metrics["sessions"]] == [(0, 30)]


def test_resume_honours_what_may_change_and_refuses_the_rest(run, capsys):
    err = _error(
        ["train", "--out", str(run), "--resume", "--steps", "40", "--lr", "0.1", "--data", "moons"],
        capsys,
    )
    assert (
        "--lr 0.1 (the run has 0.005)" in err and "--data moons (the run has checkerboard)" in err
    )
    for argv in (["--width", "16"], ["--seed", "3"], ["--batch", "32"], ["--path", "vp"]):
        assert "fixed" in _error(["train", "--out", str(run), "--resume", *argv], capsys)
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--steps", "20"]) == 2
    said = capsys.readouterr()  # refused before anything is logged or set aside (it announced
    assert "behind it" in said.err and said.out == ""  # the schedule "now ends at step 20")
    # the original options repeated are fine; more steps and a new checkpoint period apply
    argv = ["train", *TINY, "--steps", "40", "--ckpt-every", "5", "--out", str(run), "--resume"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "from the checkpoint: data checkerboard" in out and "lr 0.005" in out
    assert "steps: 30 -> 40" in out and "ckpt_every: 10 -> 5" in out
    with Checkpointer(run / "ckpt") as ckpt:
        assert ckpt.steps() == [35, 40]  # every 5 steps now, two kept
        assert ckpt.meta()["config"]["steps"] == 40
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["loss_steps"] == [10, 20, 30, 35, 40]
    assert [s["total_steps"] for s in metrics["sessions"]] == [30, 40]


def test_a_new_run_never_overwrites_one(run, tmp_path, capsys):
    before = _tree_digest(run)
    new = ["train", *TINY, "--steps", "30", "--out"]
    assert "already holds checkpoints" in _error([*new, str(run)], capsys)
    shutil.rmtree(run / "ckpt")
    assert "already holds metrics.json" in _error([*new, str(run)], capsys)
    assert _tree_digest(run) == {k: v for k, v in before.items() if not k.startswith("ckpt/")}


def test_demo_never_replaces_another_run(run, tmp_path, capsys):
    before = _tree_digest(run)
    err = _error(["demo", "--out", str(run), "--steps", "5", "--no-progress"], capsys)
    assert "holds another run" in err and "choose another --out" in err
    assert _tree_digest(run) == before  # nothing deleted, nothing overwritten
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "samples.png").write_bytes(b"someone's plot")
    err = _error(["demo", "--out", str(stray), "--steps", "5", "--no-progress"], capsys)
    assert "files of another run (samples.png)" in err
    assert (stray / "samples.png").read_bytes() == b"someone's plot"


def test_second_trainer_refused_then_kill_9_and_resume_equals_an_uninterrupted_run(
    tmp_path, like, capsys
):
    """A trainer (subprocess) holds the folder: a second one is refused, naming it. Killed with
    SIGKILL while it checkpoints every 10 steps, its lock is taken over by the resume, which
    then matches a run that was never interrupted, bit for bit."""
    out, ref = tmp_path / "busy", tmp_path / "ref"
    long = [*TINY, "--steps", "100000"]
    first = subprocess.Popen(
        [sys.executable, "-m", "jaxdiff", "train", *long, "--out", str(out)],
        cwd=Path(__file__).parents[1],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    lock = out / ".jaxdiff.lock"
    try:
        deadline = time.monotonic() + 120
        while not (lock.is_file() and f"pid {first.pid} " in lock.read_text()):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        err = _error(["train", *TINY, "--steps", "30", "--out", str(out)], capsys)
        assert f"in use by another jaxdiff process (pid {first.pid} on" in err
        while not (out / "ckpt" / "20").is_dir():  # saving every 10 steps by now
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.3)
    finally:
        first.kill()
        first.wait()
    assert f"pid {first.pid} " in lock.read_text()  # the dead holder's note is still there
    with Checkpointer(out / "ckpt") as ckpt:
        until = str(ckpt.latest_step() + 20)
    assert main(["train", "--out", str(out), "--resume", "--until", until, "--no-progress"]) == 0
    assert main(["train", *long, "--until", until, "--out", str(ref)]) == 0
    with Checkpointer(out / "ckpt") as a, Checkpointer(ref / "ckpt") as b:
        sa, sb = (c.restore(like, int(until))[0] for c in (a, b))
    sa, sb = (s._replace(key=jax.random.key_data(s.key)) for s in (sa, sb))
    for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb), strict=True):
        np.testing.assert_array_equal(x, y)
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (out, ref))
    assert ma["loss_steps"] == mb["loss_steps"] and ma["loss_history"] == mb["loss_history"]
    with RunLock(out):  # released at the end of the resume, and free to take
        assert lock.read_text().startswith(f"pid {os.getpid()} ")


def test_old_steps_leave_through_a_trash_folder_that_the_next_save_empties(tmp_path):
    import jax.numpy as jnp
    import optax

    from jaxdiff.train import init_train_state

    state = init_train_state({"w": jnp.ones(3)}, optax.sgd(0.1), jax.random.key(0))
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(state._replace(step=jnp.array(step, jnp.int32)))
        assert ckpt.steps() == [2, 3] and not (tmp_path / "1").exists()
    leftover = tmp_path / ".deleting" / "2"  # as a kill during the removal of step 2 leaves it
    (tmp_path / ".deleting").mkdir()
    os.replace(tmp_path / "2", leftover)
    shutil.rmtree(leftover / "state")
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        assert ckpt.steps() == [3] and ckpt.damaged_steps() == {}
        ckpt.save(state._replace(step=jnp.array(4, jnp.int32)))
        assert ckpt.steps() == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3", "4"]


def test_out_that_cannot_be_a_run_folder(run, tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("not a folder")
    assert "is a file" in _error(["train", *TINY, "--out", str(file)], capsys)
    assert "is a file" in _error(["demo", "--out", str(file)], capsys)
    assert "is a file" in _error(["sample", "--ckpt", str(run), "--out", str(file)], capsys)
    assert "cannot create" in _error(["train", *TINY, "--out", str(file / "sub")], capsys)
    assert file.read_text() == "not a folder"


@pytest.fixture
def read_only(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = False
    try:
        (folder / "probe").touch()  # root ignores permissions: make the folder immutable
        (folder / "probe").unlink()
        if shutil.which("chattr") is None:
            pytest.skip("running as root without chattr: cannot make a read-only folder")
        immutable = subprocess.run(["chattr", "+i", str(folder)]).returncode == 0
        if not immutable:
            pytest.skip("running as root without CAP_LINUX_IMMUTABLE")
    except PermissionError:
        pass
    yield folder
    if immutable:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)


def test_read_only_out_is_a_one_line_error(read_only, run, capsys):
    assert "cannot write in" in _error(["train", *TINY, "--out", str(read_only)], capsys)
    assert "cannot create" in _error(["train", *TINY, "--out", str(read_only / "new")], capsys)
    err = _error(["sample", "--ckpt", str(run), "--n", "20", "--out", str(read_only / "s")], capsys)
    assert "cannot create" in err


def test_non_finite_samples_are_a_one_line_error(run, capsys):
    err = _error(
        ["sample", "--ckpt", str(run), "--n", "50", "--eta", "1e6", "--steps", "5"], capsys
    )
    assert "non-finite" in err and "eta 1e+06" in err
    assert not (run / "samples" / "samples.npz").exists()


@pytest.mark.parametrize("seed", [str(2**64), str(2**32), "-1"])
def test_seed_out_of_range_is_refused_up_front(seed, capsys):
    err = _error(["train", "--out", "x", "--seed", seed], capsys)
    assert "expected an integer in [0, 2**32)" in err
    assert "[0, 2**32)" in _error(["sample", "--ckpt", "x", "--seed", seed], capsys)
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*32\)"):
        E.resolve({"seed": int(seed)})
    assert not Path("x").exists()


def test_saves_are_synchronous(tmp_path):
    """A failed asynchronous save (an unwritable folder) left Orbax's threads waiting ~300 s
    before the process could exit; save() waits for each step to seal it, so async gains nothing."""
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt._manager._options.enable_async_checkpointing is False
