"""Training: EMA math, the step against a hand-written optax update, chunks, checkpoints (round
trip, a failed save, bit-for-bit resume through the CLI) and data parallelism on 4 fake devices."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdiff as jd
from jaxdiff import losses as L
from jaxdiff.checkpoint import Checkpointer
from jaxdiff.cli import main
from jaxdiff.train import (
    TrainState,
    _ema_decay,
    adamw_cosine,
    ema_update,
    init_train_state,
    make_train_chunk,
    make_train_step,
    train,
)


def _tree_equal(a, b):
    return all(
        bool(jnp.array_equal(x, y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_ema_closed_form_for_constant_params():
    # ema_n = p + decay^n (ema_0 - p) when the params stay at p.
    ema, p, decay = {"w": jnp.zeros(3)}, {"w": jnp.array([1.0, -2.0, 4.0])}, 0.9
    for _ in range(25):
        ema = ema_update(ema, p, decay)
    np.testing.assert_allclose(ema["w"], p["w"] * (1 - decay**25), rtol=1e-5)
    # warm-up decay min(d, (1 + n) / (10 + n)): 0.1 at n = 0, then the cap
    np.testing.assert_allclose(_ema_decay(0.999, jnp.array(0), True), 0.1)
    np.testing.assert_allclose(_ema_decay(0.5, jnp.array(100), True), 0.5)
    np.testing.assert_allclose(_ema_decay(0.999, jnp.array(0), False), 0.999)


def _setup(batch=64):
    from jaxdiff.nets import MLP, init_params

    model = MLP(width=16, depth=1)
    params = init_params(model, jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros(1))
    loss = L.flow_matching_loss(jd.Field(model.apply, "velocity"))
    opt = adamw_cosine(1e-2, 100, warmup_steps=5)
    return model, params, loss, opt, lambda key: jd.data.checkerboard(key, batch)


def test_train_step_matches_a_hand_written_update_and_the_ema_formula():
    _, params, loss, opt, sample_batch = _setup()
    step = jax.jit(make_train_step(loss, opt, ema_decay=0.9))
    state = init_train_state(params, opt, jax.random.key(1))

    @jax.jit
    def reference(p, s, ema, key, batch, d):
        key, sub = jax.random.split(key)
        value, grads = jax.value_and_grad(loss)(p, sub, batch)
        updates, s = opt.update(grads, s, p)
        p = optax.apply_updates(p, updates)
        ema = jax.tree.map(lambda e, q: d * e + (1 - d) * q, ema, p)
        return p, s, ema, key, value

    p, s, ema, key = params, opt.init(params), params, jax.random.key(1)
    for n in range(3):
        batch = sample_batch(jax.random.key(10 + n))
        state, value = step(state, batch)
        p, s, ema, key, ref_value = reference(p, s, ema, key, batch, min(0.9, (1 + n) / (10 + n)))
        np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    for a, b in zip(
        jax.tree.leaves((state.params, state.ema)), jax.tree.leaves((p, ema)), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(state.step) == 3


def _quadratic():
    """A step on a quadratic loss of three numbers, for the tests of train()'s schedule of chunks
    and callbacks (what the step computes is no part of them): its chunks compile in a fraction
    of a second each, where the MLP's flow matching chunks took ~2.5 s each on a 2-core CPU."""
    params, opt = {"w": jnp.zeros(3)}, adamw_cosine(1e-2, 100, warmup_steps=5)
    step = make_train_step(lambda p, key, batch: jnp.sum((p["w"] - batch) ** 2), opt)
    return params, opt, step, lambda key: jax.random.normal(key, (3,))


def test_train_loop_chunks_callbacks_and_errors():
    params, opt, step, sample_batch = _quadratic()
    calls = []
    state = init_train_state(params, opt, jax.random.key(1))
    state, hist = train(
        state,
        lambda k: (calls.append(k), make_train_chunk(step, sample_batch, k))[1],
        25,
        chunk_size=10,
        every=20,
        on_every=lambda s: calls.append(("every", int(s.step))),
        progress=False,
    )
    assert int(state.step) == 25 and len(hist) == 3  # chunks 0-10, 10-20, 20-25
    assert ("every", 20) in calls and ("every", 25) in calls
    assert sorted(k for k in calls if isinstance(k, int)) == [5, 10]  # compiled once per length
    with pytest.raises(ValueError, match="past num_steps"):
        train(state, None, 10, progress=False)
    for bad in ({"chunk_size": 0}, {"every": 0}, {"every": (5, -1)}):  # were ZeroDivisionError
        with pytest.raises(ValueError, match="chunk_size must be|every must be"):
            train(state, None, 30, progress=False, **bad)
    with pytest.raises(ValueError, match="multiple of the"):
        make_train_chunk(step, lambda key: jnp.zeros((3, 2)), 1, mesh=_FakeMesh())


def test_non_finite_parameters_after_a_finite_loss_stop_the_run_and_on_every_runs_at_the_end():
    """A step's loss is taken before its update: a NaN gradient of a finite loss (``|w|`` at 0)
    made NaN parameters that train() returned, and passed to on_every (checkpoints), with the
    loss history [0.0] (the stop-53 review). And on_every without every never ran, though its
    docstring said "and at the end"."""
    opt = adamw_cosine(1e-2, 10)
    step = make_train_step(lambda p, key, batch: jnp.sqrt(jnp.sum(p["w"] ** 2)), opt)
    seen = []
    state = init_train_state({"w": jnp.zeros(3)}, opt, jax.random.key(0))
    chunk = lambda k: make_train_chunk(step, lambda key: jnp.zeros(2), k)  # noqa: E731
    with pytest.raises(FloatingPointError, match="parameters became non-finite at step 1"):
        train(state, chunk, 1, every=1, on_every=lambda s: seen.append(s), progress=False)
    assert seen == []
    params, opt, step, sample_batch = _quadratic()
    state = init_train_state(params, opt, jax.random.key(1))
    state, _ = train(state, lambda k: make_train_chunk(step, sample_batch, k), 20, chunk_size=8,
                     on_every=lambda s: seen.append(int(s.step)), progress=False)  # fmt: skip
    assert seen == [20]


def test_a_non_finite_batch_is_refused_where_it_gave_a_nan_loss():
    """A NaN in one training batch gave a NaN loss and NaN parameters, which train() reported
    only as "the loss became nan" at the end of the chunk; now the step names the batch, under
    jit and inside the training scan."""
    _, params, loss, opt, sample_batch = _setup()
    step = make_train_step(loss, opt)
    state = init_train_state(params, opt, jax.random.key(1))
    good = sample_batch(jax.random.key(2))
    # the library's losses check their batch too (the stop-42 review), whichever runs first
    either = "(the training batch|the batch's x0) contains non-finite values"
    with pytest.raises(Exception, match=either):
        jax.block_until_ready(jax.jit(step)(state, good.at[3, 0].set(jnp.nan)))
    with pytest.raises(Exception, match=either):
        chunk = make_train_chunk(step, lambda k: sample_batch(k).at[0, 1].set(jnp.inf), 2)
        jax.block_until_ready(chunk(init_train_state(params, opt, jax.random.key(1))))
    new, value = jax.jit(step)(state, good)  # a finite batch trains as before
    assert np.isfinite(float(value)) and int(new.step) == 1
    # the review: a check tied to the batch's first floating leaf vanished under jit where the
    # loss did not read that leaf (NaN parameters); tied to the loss it stays
    reads_x = make_train_step(lambda p, k, b: loss(p, k, b["x"]), opt)
    with pytest.raises(Exception, match=r"(the training batch\['x'\]|the batch's x0) contains no"):
        batch = {"a": jnp.ones(4), "x": good.at[0, 0].set(jnp.nan)}
        jax.block_until_ready(jax.jit(reads_x)(state, batch))
    with pytest.raises(ValueError, match=either):
        step(state, good.astype(jnp.bfloat16).at[1, 1].set(jnp.inf))  # eagerly: bfloat16 too
    # a loss of one's own, which checks nothing: the step's check names the leaf
    own = make_train_step(lambda p, k, b: sum(jnp.sum(v) for v in jax.tree.leaves(p)) * 0.0
                          + jnp.mean(b["x"]), opt)  # fmt: skip
    with pytest.raises(Exception, match=r"the training batch\['x'\] contains non-finite values"):
        batch = {"a": jnp.ones(4), "x": good.at[0, 0].set(jnp.nan)}
        jax.block_until_ready(jax.jit(own)(state, batch))


def test_several_periods_end_chunks_at_each_multiple():
    """Evaluation every 7 steps and checkpoints every 9: chunks end at multiples of 7, 9 and the
    chunk size (their gcd, 1, made every step its own call)."""
    params, opt, step, sample_batch = _quadratic()
    lengths, seen = [], []

    def make_chunk(k):
        chunk = make_train_chunk(step, sample_batch, k)
        return lambda s: (lengths.append(k), chunk(s))[1]

    state = init_train_state(params, opt, jax.random.key(1))
    state, _ = train(
        state, make_chunk, 25, chunk_size=10, every=(7, 9),
        on_every=lambda s: seen.append(int(s.step)), progress=False,
    )  # fmt: skip
    assert lengths == [7, 2, 1, 4, 4, 2, 1, 4]  # ends 7 9 10 14 18 20 21 25
    assert seen == [7, 9, 14, 18, 21, 25] and int(state.step) == 25
    with pytest.raises(ValueError, match="clip_norm must be > 0"):
        adamw_cosine(1e-3, 100, clip_norm=-1.0)  # it reversed the gradient
    for bad in ({"end_factor": -0.1}, {"weight_decay": -1e-4}, {"warmup_steps": -1}):
        with pytest.raises(ValueError, match="must"):
            adamw_cosine(1e-3, 100, **bad)


class _FakeMesh:
    shape = {"data": 2}


def test_checkpoint_round_trip_and_a_failed_save_keeps_the_previous(tmp_path, monkeypatch):
    from orbax.checkpoint._src.path import atomicity

    _, params, _, opt, _ = _setup()
    state = init_train_state(params, opt, jax.random.key(7))
    state = state._replace(step=jnp.array(1, jnp.int32))
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(state, {"config": {"a": 1}})
        with pytest.raises(ValueError, match="step 1 is already saved"):  # Orbax's raw error
            ckpt.save(state, {"config": {"a": 2}})
    with Checkpointer(tmp_path) as ckpt:
        restored, meta = ckpt.restore(state)
    assert meta == {"config": {"a": 1}} and _tree_equal(restored, state)
    assert jax.random.key_data(restored.key).tolist() == jax.random.key_data(state.key).tolist()

    async def broken_finalize(self):  # the disk fills up or the job dies before the commit
        raise OSError("simulated failure while committing the checkpoint")

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", broken_finalize)
    later = state._replace(
        step=jnp.array(2, jnp.int32), params=jax.tree.map(jnp.zeros_like, params)
    )
    with pytest.raises(Exception, match="simulated failure"):
        with Checkpointer(tmp_path) as ckpt:
            ckpt.save(later)
    monkeypatch.undo()
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.steps() == [1]
        restored, _ = ckpt.restore(state)
        assert _tree_equal(restored.params, params)
        ckpt.save(later)  # the next save of that step goes through
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.steps() == [1, 2]


SMALL = "--data checkerboard --width 16 --depth 1 --batch 64 --chunk 50 --ckpt-every 100 --eval-n 0 --no-progress".split()


def test_resume_from_checkpoint_is_bit_for_bit(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", *SMALL, "--steps", "300", "--out", str(a)]) == 0
    assert main(["train", *SMALL, "--steps", "300", "--until", "200", "--out", str(b)]) == 0
    with Checkpointer(b / "ckpt") as ckpt:
        assert ckpt.latest_step() == 200
    assert main(["train", "--out", str(b), "--resume", "--no-progress"]) == 0
    like = _like_state(a)
    with Checkpointer(a / "ckpt") as ca, Checkpointer(b / "ckpt") as cb:
        assert ca.latest_step() == cb.latest_step() == 300
        sa, _ = ca.restore(like)
        sb, _ = cb.restore(like)
    assert _tree_equal(sa, sb)
    assert jax.random.key_data(sa.key).tolist() == jax.random.key_data(sb.key).tolist()
    ma = json.loads((a / "metrics.json").read_text())
    mb = json.loads((b / "metrics.json").read_text())
    # the resumed run's history keeps the steps before the resume: it reads as the one-go run
    assert mb["loss_steps"] == ma["loss_steps"] == [50, 100, 150, 200, 250, 300]
    assert mb["loss_history"] == ma["loss_history"]
    assert [(s["start"], s["end"]) for s in mb["sessions"]] == [(0, 200), (200, 300)]
    assert mb["step"] == 300 and mb["train_seconds"] == sum(s["seconds"] for s in mb["sessions"])


def _like_state(run) -> TrainState:
    from jaxdiff import experiment as E

    with Checkpointer(Path(run) / "ckpt") as ckpt:
        c = E.resolve(ckpt.meta()["config"])
    return E.init_state(c, E.build(c))[0]


MULTI = textwrap.dedent(
    """
    import json, jax, jax.numpy as jnp
    import jaxdiff as jd
    from jaxdiff import losses as L
    from jaxdiff.nets import MLP, init_params
    from jaxdiff.train import *
    assert jax.device_count() == 4, jax.devices()
    model = MLP(width=32, depth=2)
    params = init_params(model, jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros(1))
    loss = L.flow_matching_loss(jd.Field(model.apply, "velocity"))
    opt = adamw_cosine(1e-2, 100)
    step = make_train_step(loss, opt)
    sample = lambda key: jd.data.checkerboard(key, 256)
    out = {}
    for n in (1, 4):
        mesh = data_mesh(jax.devices()[:n])
        state = replicate(init_train_state(params, opt, jax.random.key(1)), mesh)
        chunk = make_train_chunk(step, sample, 20, mesh=mesh)
        hlo = chunk.lower(state).compile().as_text()
        state, losses = chunk(state)
        out[n] = {"losses": losses.tolist(), "params": [x.ravel().tolist() for x in jax.tree.leaves(state.params)],
                  "ema": [x.ravel().tolist() for x in jax.tree.leaves(state.ema)],
                  "all_reduce": "all-reduce" in hlo,
                  "devices": len(state.params["params"]["Dense_0"]["kernel"].sharding.device_set)}
    print(json.dumps(out))
    """
)


def test_data_parallel_on_four_devices_matches_one_device():
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    proc = subprocess.run(
        [sys.executable, "-c", MULTI], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    one, four = out["1"], out["4"]
    assert four["all_reduce"] and not one["all_reduce"]  # the gradient really is all-reduced
    assert four["devices"] == 4 and one["devices"] == 1
    np.testing.assert_allclose(four["losses"], one["losses"], rtol=1e-5)
    for a, b in zip(four["params"] + four["ema"], one["params"] + one["ema"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_loss_that_requires_a_keyword_step_gets_the_state_s_step():
    """``make_train_step`` passes ``step=state.step`` (updates before this one) to a loss whose
    ``step`` is keyword-only without a default, and nothing to one whose ``step`` means
    something else (a default, or positional)."""
    from jaxdiff.train import init_train_state, make_train_step

    opt = optax.sgd(1.0)
    seen = []

    def needs(params, key, batch, *, step):  # d/dw = step: the update shows what it was
        return params["w"] * step.astype(jnp.float32)

    def other(params, key, batch, step=0.5):  # a step size of its own
        seen.append(step)
        return params["w"] * step

    state = init_train_state({"w": jnp.array(0.0)}, opt, jax.random.key(0))
    step = jax.jit(make_train_step(needs, opt))
    for _ in range(3):
        state, _ = step(state, jnp.zeros((2, 1)))
    assert float(state.params["w"]) == -(0 + 1 + 2)  # sgd(1): w -= step at steps 0, 1, 2
    state = init_train_state({"w": jnp.array(0.0)}, opt, jax.random.key(0))
    state, _ = make_train_step(other, opt)(state, jnp.zeros((2, 1)))
    assert seen == [0.5] and float(state.params["w"]) == -0.5


def test_train_without_a_bar_does_not_import_tqdm_auto():
    """tqdm.auto checks for a notebook when imported and, without ipywidgets, warns
    (TqdmWarning "IProgress not found"): train(progress=False) imported it anyway, and the
    notebooks printed the warning with no bar shown. It uses tqdm's plain class now."""
    code = textwrap.dedent(
        """
        import sys, jax, jax.numpy as jnp, optax
        from jaxdiff.train import init_train_state, make_train_chunk, make_train_step, train
        step = make_train_step(lambda p, k, b: jnp.sum((p - b) ** 2), optax.sgd(0.1))
        chunk = lambda k: make_train_chunk(step, lambda key: jnp.ones(2), k)
        train(init_train_state(jnp.zeros(2), optax.sgd(0.1), jax.random.key(0)), chunk, 3,
              progress=False)
        print("tqdm.auto" in sys.modules)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == "False"
