"""Stop 55's review of the few-step losses: each test fails on the code before it.

A grid ``ts`` outside [0, 1], a teacher with no velocity at the sampler's end, 0-d labels, a
bfloat16 network's distance and a batch of 1 that cannot hold both parts of a split loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd


def _net():
    return jd.Field(jd.consistency_function(lambda p, x, t: p * x), "x0")


@pytest.mark.parametrize("ts", [[0.0, 0.5, 1.5], [-0.5, 0.5, 1.0]])
def test_consistency_grids_outside_the_unit_interval_are_refused(ts):
    """Under jit the loss trained at t = 1.5 (x_t = -0.5 x0 + 1.5 eps on the linear path) with
    no error; a negative start was reported as a broken boundary condition."""
    teacher = jd.Field(lambda x, t: -x, "velocity")
    with pytest.raises(ValueError, match=r"ts must lie in \[0, 1\].*got \[(1.5|-0.5)\]"):
        jd.consistency_training_loss(_net(), ts=jnp.array(ts))
    with pytest.raises(ValueError, match=r"ts must lie in \[0, 1\]"):
        jd.consistency_distillation_loss(_net(), teacher, ts=jnp.array(ts))
    # a traced grid (an argument of jit) is checked when the loss runs
    x0, p = jnp.ones((8, 2)), jnp.array(1.0)
    traced = jax.jit(lambda g: jd.consistency_training_loss(_net(), ts=g)(p, jax.random.key(0), x0))
    assert np.isfinite(traced(jnp.array([0.0, 0.5, 1.0])))
    for bad in (ts, [0.0, 0.7, 0.5]):
        with pytest.raises(Exception, match=r"strictly increasing grid in \[0, 1\]"):
            jax.block_until_ready(traced(jnp.array(bad)))


def test_a_shortcut_teacher_without_a_velocity_at_the_samplers_end_is_refused():
    """t = 1 - U draws t = 1 once in 2^23 (an eps teacher divides by alpha_1 = 0 there), and
    uniform_time(0, 1) draws t = 0 (an x0 teacher divides by sigma_0 = 0): under jit the loss
    was inf there, about once in 33,000 steps at batch 256."""
    net = jd.Field(lambda p, z, t, r=None: p * z, "velocity")
    eps_teacher = jd.Field(lambda x, t: 0.9 * x, "eps")
    x0_teacher = jd.Field(lambda x, t: 0.5 * x, "x0")
    with pytest.raises(ValueError, match=r"draws t = 1.0 itself.*'eps' prediction"):
        jd.shortcut_loss(net, velocity=eps_teacher)
    with pytest.raises(ValueError, match=r"draws t = 0.0 itself.*'x0' prediction"):
        jd.shortcut_loss(net, velocity=x0_teacher, time_sampler=jd.uniform_time(0.0, 1.0))
    loss = jd.shortcut_loss(net, velocity=eps_teacher, time_sampler=jd.uniform_time(0.0, 0.999))
    assert np.isfinite(float(jax.jit(loss)(0.3, jax.random.key(0), jnp.ones((8, 2)))))


@pytest.mark.parametrize("make", [jd.meanflow_loss, jd.shortcut_loss])
def test_zero_dimensional_labels_are_named(make):
    """They passed the batch check and failed in slicing: 'IndexError: Too many indices'."""
    net = jd.Field(lambda p, z, t, r=None, *a: p * z, "velocity")
    with pytest.raises(ValueError, match=r"labels have shape \(\) for 4 points"):
        make(net)(0.3, jax.random.key(0), (jnp.ones((4, 2)), jnp.array(3)))


def test_a_bfloat16_network_gives_the_consistency_distance_in_float32():
    """The pseudo-Huber distance was taken in the network's bfloat16 (0.4% off per distance),
    and with unit weighting the loss itself was bfloat16."""
    cf = jd.consistency_function(lambda p, x, t: p * x)
    half = jd.Field(lambda p, x, t: cf(p, x, t).astype(jnp.bfloat16), "x0")
    wide = jd.Field(lambda p, x, t: cf(p, x, t).astype(jnp.bfloat16).astype(jnp.float32), "x0")
    x = jnp.asarray(np.random.RandomState(0).randn(8, 8, 8, 3), jnp.bfloat16)
    key, p = jax.random.key(0), jnp.float32(0.3)
    value = jd.consistency_training_loss(half, weighting="unit")(p, key, x)
    exact = jd.consistency_training_loss(wide, weighting="unit")(p, key, x)
    assert value.dtype == jnp.float32
    assert float(value) == pytest.approx(float(exact), rel=1e-6)


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda net: jd.meanflow_loss(net), "flow_matching_fraction"),
        (lambda net: jd.shortcut_loss(net), "bootstrap_fraction"),
    ],
)
def test_a_batch_of_one_cannot_hold_both_parts_of_a_split_loss(make, name):
    """A batch of 1 kept one part alone: MeanFlow was plain flow matching (also under a
    per-example vmap), the shortcut loss had no self-consistency term."""
    net = jd.Field(lambda p, z, t, r=None: p * z, "velocity")
    with pytest.raises(ValueError, match=rf"{name} .* a batch of 1 cannot hold"):
        make(net)(0.3, jax.random.key(0), jnp.ones((1, 2)))
    assert np.isfinite(float(make(net)(0.3, jax.random.key(0), jnp.ones((2, 2)))))
