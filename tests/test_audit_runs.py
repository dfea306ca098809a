"""Audit of the run modules: checkpoints, the CLI's one-line errors and run options."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdiff import experiment as E
from jaxdiff import run_train
from jaxdiff.checkpoint import Checkpointer
from jaxdiff.cli import main
from jaxdiff.runs import make_sampler
from jaxdiff.train import init_train_state
from tests.cli_helpers import cli_error as _error

TINY = "--width 8 --depth 1 --batch 16 --chunk 10 --eval-n 0 --no-progress --steps 10".split()


def _state(step: int = 0):
    params = {"w": jnp.arange(3, dtype=jnp.bfloat16), "u": jnp.array([0, 255, 7], jnp.uint8)}
    state = init_train_state(params, optax.sgd(0.1), jax.random.key(3))
    return state._replace(step=jnp.int32(step))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("audit") / "run"
    assert main(["train", *TINY, "--out", str(run)]) == 0
    return run


@pytest.mark.parametrize("bad", [-1, 0, 1.5, True])
def test_max_to_keep_must_be_positive(tmp_path, bad):
    # -1 once deleted each step right after saving it (steps() == [] after three saves)
    with pytest.raises(ValueError, match=rf"max_to_keep must be a positive integer .*got {bad!r}"):
        Checkpointer(tmp_path, max_to_keep=bad)
    with Checkpointer(tmp_path, max_to_keep=1) as ckpt:
        for step in range(3):
            ckpt.save(_state(step))
        assert ckpt.steps() == [2]
        restored, _ = ckpt.restore(_state())
    assert restored.params["w"].dtype == jnp.bfloat16 and restored.params["u"].dtype == jnp.uint8
    np.testing.assert_array_equal(restored.params["u"], [0, 255, 7])
    assert int(restored.step) == 2


def test_meta_that_is_not_json_is_refused_before_orbax_writes(tmp_path):
    # it once raised a TypeError mid-save and left 0.orbax-checkpoint-tmp behind, after which
    # the next save of step 0 failed with "OSError: Directory not empty"
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(ValueError, match="meta must be JSON-able: .*set"):
            ckpt.save(_state(), {"labels": {1, 2}})
        assert sorted(p.name for p in tmp_path.iterdir()) == []
        ckpt.save(_state(), {"labels": [1, 2]})
        assert ckpt.steps() == [0]
        assert ckpt.meta() == {"labels": [1, 2]}


def test_cli_on_a_checkpoint_without_a_run_config_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    with Checkpointer(run / "ckpt") as ckpt:  # saved from Python with a meta of its own
        ckpt.save(_state(), {"note": "hi"})
    expected = "holds no run config (meta keys: ['note'])"
    assert expected in _error(["sample", "--ckpt", str(run), "--n", "4"], capsys)  # KeyError
    assert expected in _error(["train", "--out", str(run), "--resume", "--no-progress"], capsys)
    assert expected in _error(["demo", "--out", str(run), "--no-progress"], capsys)


def test_out_of_memory_is_one_line(trained, tmp_path, capsys):
    err = _error(
        ["sample", "--ckpt", str(trained), "--n", str(10**13), "--out", str(tmp_path)], capsys
    )
    assert err.startswith("jaxdiff: error: out of memory: Unable to allocate 72.8 TiB"), err


def test_refused_sample_options_leave_no_folder(trained, tmp_path, capsys):
    out = tmp_path / "s"
    sample = ["sample", "--ckpt", str(trained), "--n", "4", "--out", str(out)]
    assert "eta must be >= 0; got -1.0" in _error([*sample, "--eta", "-1"], capsys)
    assert not out.exists()
    assert not (trained / "samples").exists()
    assert main([*sample, "--metrics-n", "0"]) == 0
    assert np.load(out / "samples.npz")["samples"].shape == (4, 2)


def test_non_finite_guidance_is_refused():
    # NaN once sampled for 24 s on a conditional model, then blamed eta and the step count
    c = E.resolve({})
    setup = E.Setup(None, None, None, None, jnp.zeros((1, 2)), 10)
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match=f"guidance must be a finite number; got {bad}"):
            make_sampler(c, setup, guidance=bad)


@pytest.mark.parametrize("until", [0, -3, 2.5])
def test_until_must_be_a_positive_step(tmp_path, until):
    # until=0 once saved a step-0 checkpoint, then failed with IndexError
    config = {"width": 8, "depth": 1, "batch": 16, "chunk": 10, "eval_n": 0, "steps": 10}
    with pytest.raises(ValueError, match=f"until must be a positive integer .*got {until!r}"):
        run_train.train_run(config, tmp_path / "run", until=until, progress=False)
    assert not (tmp_path / "run").exists()


def test_demo_steps_zero_is_refused(tmp_path, monkeypatch):
    # steps=0 once meant the default 8000 steps
    def no_training(*args, **kwargs):
        raise AssertionError("demo_run trained with steps=0")

    monkeypatch.setattr(run_train, "_train", no_training)
    with pytest.raises(ValueError, match="steps must be a positive integer; got 0"):
        run_train.demo_run(tmp_path / "demo", steps=0, progress=False)


@pytest.mark.parametrize(("key", "bad"), [("ema", "0.9"), ("ema", True), ("label_dropout", "x")])
def test_ema_and_label_dropout_must_be_numbers(key, bad):
    # a string once raised TypeError: '<=' not supported between instances of 'float' and 'str'
    with pytest.raises(ValueError, match=rf"{key} must be a number in \[0, 1\); got {bad!r}"):
        E.resolve({key: bad})


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (lambda m: m["evaluations"].append({"loss": 1.0}), "evaluations are not records"),
        (lambda m: m["sessions"][0].pop("start"), "sessions are not records"),
        (lambda m: m["loss_steps"].pop(), "loss_steps is not a list of steps as long"),
    ],
)
def test_a_hand_edited_metrics_json_is_set_aside_not_a_key_error(trained, tmp_path, edit, why):
    # History raised KeyError('step') / KeyError('start') deep in the resume; and two set aside in
    # the same second kept one copy (the second rename replaced the first)
    import shutil

    from jaxdiff import rundir

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    good = json.loads((run / "metrics.json").read_text())
    edited = json.loads(json.dumps(good))
    edit(edited)
    for _ in range(2):
        (run / "metrics.json").write_text(json.dumps(edited))
        with pytest.warns(rundir.RunWarning, match=f"unreadable \\(its {why}"):
            assert rundir.read_metrics(run) is None
    aside = sorted(p for p in run.iterdir() if p.name.startswith("metrics.json.unreadable-"))
    assert len(aside) == 2 and all(json.loads(p.read_text()) == edited for p in aside)
    (run / "metrics.json").write_text(json.dumps(edited))
    assert main(["train", "--out", str(run), "--resume", "--steps", "20", "--no-progress"]) == 0
    assert json.loads((run / "metrics.json").read_text())["step"] == 20


def test_metrics_json_that_is_not_an_object_is_set_aside_on_resume(trained, tmp_path, capsys):
    # a list once failed the resume with AttributeError: 'list' object has no attribute 'get'
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "metrics.json").write_text("[1, 2]\n")
    resume = ["train", "--out", str(run), "--resume", "--steps", "20", "--no-progress"]
    assert main(resume) == 0
    assert "metrics.json is unreadable (a list, not an object); kept as" in capsys.readouterr().err
    aside = [p.name for p in run.iterdir() if p.name.startswith("metrics.json.unreadable-")]
    assert len(aside) == 1 and (run / aside[0]).read_text() == "[1, 2]\n"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 20 and metrics["loss_steps"] == [20]


def test_sample_keys_are_apart_from_the_training_keys_of_the_same_seed(trained, tmp_path):
    """`sample` drew batch i from fold_in(key(seed), i), and training splits key(seed) into its
    init and state keys (split(k)[i] == fold_in(k, i)): at both defaults (seed 0) sample batch 0
    had the init key and batch 1 the training key, whose draws made training batch 1 (a
    key-hygiene review: the sampler's first noise a monotone function of those uniforms)."""
    from jaxdiff import runs

    seen = []
    real = runs.make_sampler

    def spy(*args, **kwargs):
        draw = real(*args, **kwargs)

        def wrapped(params, key, n, labels=None):
            seen.append(key)
            return draw(params, key, n, labels)

        return wrapped

    training = jax.random.split(jax.random.key(0), 4)  # init, state key (and their neighbours)
    mp = pytest.MonkeyPatch()
    mp.setattr(runs, "make_sampler", spy)
    try:
        assert main(["sample", "--ckpt", str(trained), "--n", "4", "--metrics-n", "0",
                     "--out", str(tmp_path / "s")]) == 0  # fmt: skip
    finally:
        mp.undo()
    (key,) = seen
    for i in range(4):
        batch_key = jax.random.key_data(jax.random.fold_in(key, i))
        for k in training:
            assert not np.array_equal(batch_key, jax.random.key_data(k)), i
