"""One check for every count (steps, bins, points, periods): ``_checks.check_count``.

Several places once carried their own copy, and the copies disagreed: some accepted ``True``
(one step), some ``1.5`` (read as 1), some refused NumPy integers. They all call
``check_count(value, name, minimum=...)`` now.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd
from jaxdiff import experiment as E
from jaxdiff._checks import check_count
from jaxdiff.checkpoint import Checkpointer
from jaxdiff.digits import tile
from jaxdiff.nets.conv import conv2d
from jaxdiff.runs import make_sampler
from jaxdiff.train import adamw_cosine, init_train_state, train

BAD = [True, False, np.True_, jnp.array(True), 1.5, float("inf"), float("nan"), "3", None, [2]]


@pytest.mark.parametrize("good", [3, 3.0, np.int64(3), np.array(3), jnp.array(3)])
def test_integers_pass_as_python_ints(good):
    out = check_count(good, "n")
    assert out == 3 and type(out) is int


@pytest.mark.parametrize("bad", BAD)
def test_bools_fractions_and_non_numbers_are_refused(bad):
    with pytest.raises(ValueError, match=r"^n must be a positive integer; got "):
        check_count(bad, "n")


def test_minimum_and_what_are_said():
    assert check_count(0, "n", minimum=0) == 0
    with pytest.raises(
        ValueError, match=r"n must be an integer >= 0 \(a number of points\); got -1"
    ):
        check_count(-1, "n", minimum=0, what="a number of points")
    with pytest.raises(ValueError, match="n must be an integer >= 2; got 1"):
        check_count(1, "n", minimum=2)


def test_a_traced_count_is_refused_at_trace_time():
    with pytest.raises(
        ValueError, match="steps must be a positive integer known at trace time .*; got JitTracer"
    ):
        jax.jit(lambda s: check_count(s, "steps"))(3)


def test_public_counts_refuse_a_bool():
    # each of these once took True as 1 (a one-step grid, one corrector step, stride 1, ...)
    with pytest.raises(ValueError, match="steps must be a positive integer; got True"):
        jd.uniform_grid(True)
    with pytest.raises(ValueError, match="num_steps must be a positive integer; got True"):
        jd.linear_betas(True)
    with pytest.raises(ValueError, match="corrector_steps must be an integer >= 0; got True"):
        jd.samplers.pc(corrector_steps=True)
    with pytest.raises(ValueError, match="strides must be a positive integer"):
        conv2d(jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 4)), True)
    with pytest.raises(ValueError, match="cols must be a positive integer; got True"):
        tile(np.zeros((2, 8, 8)), cols=True)
    with pytest.raises(ValueError, match="block must be a positive integer; got True"):
        jd.mmd(jnp.zeros((4, 2)), jnp.ones((4, 2)), block=True)


def test_run_configs_refuse_fractions_and_bools():
    # width 1.5 was int(1.5) = 1 >= 1, accepted; a sampler's steps 2.5 passed "steps < 1"
    with pytest.raises(ValueError, match="width must be a positive integer; got 1.5"):
        E.resolve({"width": 1.5})
    with pytest.raises(ValueError, match="eval_n must be an integer >= 0; got True"):
        E.resolve({"eval_n": True})
    # a bool is no number: lr True trained at a rate of 1, ot_reg True regularised by 1
    with pytest.raises(ValueError, match="lr must be a positive number; got True"):
        E.resolve({"lr": True})
    with pytest.raises(ValueError, match="rho must be a finite number > 0; got True"):
        E.resolve({"loss": "consistency", "rho": True})
    with pytest.raises(ValueError, match="ot_reg must be a positive number; got True"):
        E.resolve({"coupling": "sinkhorn", "ot_reg": True})
    # weight_decay and clip reached the optimizer unchecked (the stop-53 review): -1 and "x"
    # failed after the run folder was made, inf trained to NaN, clip true clipped at 1
    for bad in (-1.0, "x", float("inf"), True):
        with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0"):
            E.resolve({"weight_decay": bad})
    for bad in (-1.0, "1", True, float("nan")):
        with pytest.raises(ValueError, match="clip .the gradient's global norm. must be"):
            E.resolve({"clip": bad})
    assert E.resolve({"clip": 0})["clip"] == 0  # no clipping
    with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0"):
        adamw_cosine(1e-3, 10, weight_decay=float("inf"))
    c = E.resolve({"steps": 10.0, "batch": 8.0})  # integral floats are counts, kept as ints
    assert type(c["steps"]) is int and type(c["batch"]) is int
    c = E.resolve({"data": "moons", "steps": 2})
    setup = E.build(c)
    with pytest.raises(ValueError, match="steps must be a positive integer; got 2.5"):
        make_sampler(c, setup, steps=2.5)
    assert make_sampler(c, setup, steps=3.0) is not None  # an integral float is a count


def test_checkpointer_and_train_take_numpy_integers(tmp_path):
    # max_to_keep=np.int64(2) was refused (not an int); chunk_size=True was accepted
    with Checkpointer(tmp_path, max_to_keep=np.int64(2)) as ckpt:
        assert ckpt.max_to_keep == 2 and type(ckpt.max_to_keep) is int
    state = init_train_state({"w": jnp.zeros(2)}, adamw_cosine(1e-3, 10), jax.random.key(0))
    for bad, name in ((True, "chunk_size"), ((5, 2.5), "every")):
        kwargs = {"chunk_size": bad} if name == "chunk_size" else {"every": bad}
        with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
            train(state, None, 10, progress=False, **kwargs)
