"""Shortcut models (Frans et al. 2024): the exact average velocity of Gaussian data makes one jump
equal two half jumps, so its self-consistency loss is at the floor of the finest level's Euler
halves; a zero network leaves the flow-matching part's closed form; the targets carry no gradient;
sources and labels reach the loss; and a tiny training generates in one step."""

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

import jaxdiff as jd
from tests.test_meanflow import MU, PATH, S, exact_u, gauss


def _levels(n):
    k = np.arange(n) % 7
    d = jnp.asarray(0.5**k)
    j = jax.random.randint(jax.random.key(1), (n,), 1, jnp.asarray(2**k) + 1)
    return j * d, d


def test_the_exact_average_velocity_is_self_consistent(x64):
    z = jax.random.normal(jax.random.key(0), (512, 2)) * 2.0
    t, d = _levels(512)
    u, target = jd.shortcut_target(exact_u, z, t, d)
    np.testing.assert_allclose(u, target, atol=1e-12)  # one jump of d = two of d / 2
    # the instantaneous velocity at every step size is not (Euler's error at d <= 1)
    u, target = jd.shortcut_target(lambda z, t, r: exact_u(z, t, t), z, t, d)
    assert float(jnp.abs(u - target).max()) > 1.0
    # finest: halves of at most 1/128 are Euler steps of u(., s, s), not jumps
    calls = []
    jd.shortcut_target(lambda z, t, r: calls.append(t - r) or z, z, t, d, finest=1 / 128)
    np.testing.assert_allclose(calls[0], d)
    np.testing.assert_allclose(calls[1], jnp.where(d / 2 <= 1 / 128, 0.0, d / 2))
    np.testing.assert_allclose(calls[2], calls[1])


def test_the_self_consistency_loss_separates_the_exact_jump_from_the_velocity(x64):
    """Bootstrap part only (bootstrap_fraction = 1), 4,096 Gaussian data. Measured: the exact u
    7.1e-6 (the finest level's two Euler half steps of 1/128), the instantaneous velocity used for
    every jump 0.014; with max_steps = 8 the floor rises to 3.8e-3 (halves of 1/8)."""
    batch = gauss().sample(jax.random.key(4), 4096)

    def loss(f, m=128):
        net = jd.Field(lambda p, x, t, r: f(x, t, r), "velocity")
        fn = jax.jit(jd.shortcut_loss(net, PATH, max_steps=m, bootstrap_fraction=1.0))
        return float(fn(None, jax.random.key(5), batch))

    exact, instant = loss(exact_u), loss(lambda z, t, r: exact_u(z, t, t))
    assert exact < 2e-5 and instant > 5e-3, (exact, instant)
    assert 1e-3 < loss(exact_u, 8) < 1e-2


def test_a_zero_network_leaves_the_flow_matching_closed_form(x64):
    """Zero jumps are self-consistent (targets 0), so the loss is the flow-matching part alone:
    (1 - f) E mean_i (e_i - x_i)^2 = (1 - f)(|MU|^2 + D (S^2 + 1)) / D = 2.8125 at f = 1/4
    (Monte Carlo standard error 0.6% with 12,288 examples). A source N(m1, s1^2): |m1 - MU|^2 +
    D (S^2 + s1^2), and the batch's x1 exactly."""
    n = 16384
    zero = jd.Field(lambda p, x, t, r: jnp.zeros_like(x), "velocity")
    x0 = gauss().sample(jax.random.key(0), n)

    def loss(frac=0.25, **kw):
        fn = jax.jit(jd.shortcut_loss(zero, PATH, bootstrap_fraction=frac, **kw))
        return lambda batch: float(fn(None, jax.random.key(1), batch))

    closed = float(jnp.sum(MU**2) + 2 * (S**2 + 1)) / 2
    np.testing.assert_allclose(loss()(x0), 0.75 * closed, rtol=0.03)
    m1, s1 = jnp.array([[-1.0, 1.0]]), 0.8
    source = lambda key, shape: m1 + s1 * jax.random.normal(key, shape)  # noqa: E731
    with_source = float(jnp.sum(jnp.square(m1 - MU)) + 2 * (S**2 + s1**2)) / 2
    np.testing.assert_allclose(loss(0.0, source=source)(x0), with_source, rtol=0.03)
    x1 = source(jax.random.key(2), x0.shape)
    np.testing.assert_allclose(
        loss(0.0)({"x0": x0, "x1": x1}), float(jnp.mean(jnp.square(x1 - x0))), rtol=1e-12
    )
    with pytest.raises(ValueError, match="needs a path that ends at it"):
        jd.shortcut_loss(zero, jd.vp_path(), source=source)


def test_the_targets_carry_no_gradient_and_labels_reach_every_call():
    w = jnp.array(0.3)

    def u_fn(w, z, t, r):
        return jnp.tanh(w * z) * (1 + t - r)[:, None]

    z = jax.random.normal(jax.random.key(0), (64, 2))
    t, d = _levels(64)
    g_target = jax.grad(lambda w: jnp.sum(jd.shortcut_target(lambda *a: u_fn(w, *a), z, t, d)[1]))
    g_u = jax.grad(lambda w: jnp.sum(jd.shortcut_target(lambda *a: u_fn(w, *a), z, t, d)[0]))
    assert float(g_target(w)) == 0.0 and abs(float(g_u(w))) > 0.1
    seen = []

    def cond(p, x, t, r, y):
        seen.append(y.shape)
        return jnp.zeros_like(x) + p * y[:, None]

    net = jd.Field(cond, "velocity")
    x0 = jnp.ones((8, 2))
    loss = jd.shortcut_loss(net, PATH, bootstrap_fraction=0.5)
    value = float(loss(1.0, jax.random.key(0), (x0, jnp.arange(8.0))))
    assert seen == [(4,), (4,), (4,), (4,)], seen  # flow matching, then jump and two halves
    assert value != float(loss(1.0, jax.random.key(0), (x0, jnp.zeros(8))))


def test_bad_arguments_raise_clear_errors():
    field = jd.Field(lambda p, z, t, r: z, "velocity")
    with pytest.raises(ValueError, match="power of two >= 2; got 100"):
        jd.shortcut_loss(field, max_steps=100)
    with pytest.raises(ValueError, match="power of two >= 2; got 1"):
        jd.shortcut_loss(field, max_steps=1)
    jaxtyping.config.update("jaxtyping_disable", True)  # the tests' type hook refuses it first
    try:
        with pytest.raises(TypeError, match="max_steps must be an int"):
            jd.shortcut_loss(field, max_steps=128.0)
    finally:
        jaxtyping.config.update("jaxtyping_disable", False)
    with pytest.raises(ValueError, match=r"bootstrap_fraction must lie in \[0, 1\]; got 1.5"):
        jd.shortcut_loss(field, bootstrap_fraction=1.5)
    with pytest.raises(
        ValueError, match="target at r = t is 'velocity'; got a field of target 'x0'"
    ):
        jd.shortcut_loss(jd.Field(lambda p, z, t, r: z, "x0"))


def test_tiny_shortcut_training_generates_in_one_step():
    """TwoTimeMLP(64, 2), 600 steps at batch 256 on a two-component mixture, the setting of
    MeanFlow's tiny test. Measured one-step ED 0.020 (MeanFlow: 0.040), 2 steps 0.006, 4 steps
    0.0025; the untrained network (x = z_1, the prior) 0.62."""
    from jaxdiff.nets import init_params
    from jaxdiff.nets.two_time import TwoTimeMLP
    from jaxdiff.train import adamw_cosine, init_train_state, make_train_chunk, make_train_step

    data = jd.GaussianMixture.isotropic(jnp.array([[1.5, 1.5], [-1.5, -1.5]]), std=0.3)
    model = TwoTimeMLP(width=64, depth=2)
    params = init_params(model, jax.random.key(0), jnp.zeros((1, 2)), 0.5, 0.5)
    net = jd.Field(model.apply, "velocity")
    opt = adamw_cosine(3e-3, 600)
    step = make_train_step(jd.shortcut_loss(net), opt)
    chunk = make_train_chunk(step, lambda k: data.sample(k, 256), 600)
    state, _ = chunk(init_train_state(params, opt, jax.random.key(1)))
    x1 = jax.random.normal(jax.random.key(2), (4000, 2))
    true = data.sample(jax.random.key(3), 4000)

    def ed(steps):
        sol = jd.sample(None, PATH, net.bind(state.ema), x_init=x1, sampler=jd.samplers.meanflow(),
                        steps=steps)  # fmt: skip
        return float(jd.energy_distance(sol.x, true))

    one, four = ed(1), ed(4)
    prior = float(jd.energy_distance(x1, true))
    assert one < 0.04 and four < 0.01 and prior > 0.5, (one, four, prior)


def test_small_batches_reach_every_level_and_half_precision_gives_a_float32_loss():
    """Levels were dealt round robin: with fewer self-consistency examples than levels (batch 16
    at a quarter: 4 < 7) the finest jumps were never trained (the review's F3). A level is drawn
    per example now: 20 steps of batch 8 (2 examples each) reach all 7. bfloat16 data gave a
    bfloat16 loss (F4); the error is taken in float32, as MeanFlow's."""
    gaps = []

    def record(p, x, t, r):
        gaps.append(t - r)
        return jnp.zeros_like(x)

    x = jnp.ones((8, 2))
    seen = set()
    for i in range(20):  # eagerly, to read the gaps; calls: flow matching, jump, two halves
        gaps.clear()
        jd.shortcut_loss(jd.Field(record, "velocity"), PATH)(None, jax.random.key(i), x)
        seen |= {round(float(g), 6) for g in np.asarray(gaps[1])}
    assert seen == {round(0.5**k, 6) for k in range(7)}, sorted(seen)
    net = jd.Field(lambda p, x, t, r: (p * x).astype(x.dtype), "velocity")
    value = jd.shortcut_loss(net, PATH)(jnp.float32(0.3), jax.random.key(0), x.astype(jnp.bfloat16))
    assert value.dtype == jnp.float32


def test_a_teacher_velocity_distils_with_the_minimum_at_its_flow(x64):
    """velocity= (as meanflow_loss's) replaces the conditional velocity of the flow-matching part:
    with the exact field of Gaussian data as the teacher, the exact u has flow-matching loss 0
    and u + 0.1 exactly 0.01; with the conditional velocity the loss keeps its spread (0.82)."""
    batch = gauss().sample(jax.random.key(0), 2048)
    teacher = gauss().field(PATH, "eps")  # any target: converted to the velocity

    def loss(p, **kw):
        net = jd.Field(lambda q, x, t, r: exact_u(x, t, r) + q, "velocity")
        fn = jax.jit(jd.shortcut_loss(net, PATH, bootstrap_fraction=0.0,
                                      time_sampler=jd.uniform_time(1e-3, 1.0), **kw))  # fmt: skip
        return float(fn(p, jax.random.key(1), batch))

    assert loss(0.0, velocity=teacher) < 1e-20
    np.testing.assert_allclose(loss(0.1, velocity=teacher), 0.01, rtol=1e-9)
    assert loss(0.0) > 0.1  # E|(x1 - x0) - v(z_t, t)|^2 / D, the conditional velocity's spread
