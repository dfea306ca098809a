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


def test_the_paper_recipe_targets_ema_params_clipping_and_guidance():
    """target_params computes the two halves and params the jump; clipping bounds the midpoint
    and the target; guided targets (the finest level only) and label dropout (the flow-matching
    part only). Exact values on toy networks whose output is a parameter or a label."""
    seen = []

    def record(p, x, t, r, *y):
        seen.append(p)
        return jnp.zeros_like(x) + p

    x = jnp.ones((8, 2))
    loss = jd.shortcut_loss(jd.Field(record, "velocity"), PATH, bootstrap_fraction=0.5)
    value = loss(1.0, jax.random.key(0), x, target_params=3.0)
    assert seen == [1.0, 1.0, 3.0, 3.0], seen  # flow matching, jump, then the two halves
    boot = jd.shortcut_loss(jd.Field(record, "velocity"), PATH, bootstrap_fraction=1.0)
    np.testing.assert_allclose(boot(1.0, jax.random.key(0), x, target_params=3.0), 4.0)
    assert float(boot(1.0, jax.random.key(0), x)) == 0.0  # online targets: u = p is consistent
    assert np.isfinite(float(value))

    # clipping: u = 10 everywhere, midpoint z - h u and target clipped to [-4, 4]
    mids = []

    def big(z, t, r):
        mids.append(z)
        return jnp.full_like(z, 10.0)

    z, t, d = jnp.zeros((64, 2)), *_levels(64)
    u, target = jd.shortcut_target(big, z, t, d, clip=4.0)
    np.testing.assert_allclose(target, 4.0)
    np.testing.assert_allclose(mids[2], jnp.maximum(-(d / 2)[:, None] * 10.0, -4.0) + 0 * z)
    assert float(jnp.min(mids[2])) == -4.0 and float(jnp.max(u)) == 10.0

    # guidance: the network returns its label (null 0 -> velocity 0). With max_steps = 2 the only
    # level is d = 1, whose halves (h = 1/2) are the finest: target w y against the jump's y,
    # a squared error (w - 1)^2 y^2. With max_steps = 4, the coarse level (halves 1/2 > 1/4) keeps
    # the conditional targets: a loss strictly between 0 and the finest-only one.
    def label_net(p, x, t, r, y):
        return jnp.zeros_like(x) + p * y[:, None].astype(x.dtype)

    labels = jnp.arange(1, 9)
    batch = (x, labels)
    net = jd.Field(label_net, "velocity")

    def guided(m, w, tp=None, **kw):
        fn = jd.shortcut_loss(net, PATH, max_steps=m, bootstrap_fraction=1.0, label_dropout=0.1,
                              null_label=0, target_guidance=w, **kw)  # fmt: skip
        return float(jax.jit(fn)(1.0, jax.random.key(2), batch, tp))

    expected = float(jnp.mean(4.0 * labels**2))  # w = 3
    np.testing.assert_allclose(guided(2, 3.0), expected, rtol=1e-6)
    assert guided(2, 1.0) == 0.0
    assert 0.0 < guided(4, 3.0) < expected
    np.testing.assert_allclose(guided(2, 3.0, target_clip=4.0), np.mean((np.minimum(
        3.0 * np.arange(1, 9), 4.0) - np.arange(1, 9)) ** 2), rtol=1e-6)  # fmt: skip
    # guided halves from target_params = 2: target 2 w y against the jump's y
    np.testing.assert_allclose(guided(2, 3.0, 2.0), float(jnp.mean(25.0 * labels**2)), rtol=1e-6)

    # label dropout: a quarter of the flow-matching labels become the null label, none of the
    # self-consistency ones (4,096 each: the fraction's standard error is 0.0068)
    drawn = []

    def labels_seen(p, x, t, r, y):
        drawn.append(y)
        return jnp.zeros_like(x)

    n = 8192
    fn = jd.shortcut_loss(jd.Field(labels_seen, "velocity"), PATH, bootstrap_fraction=0.5,
                          label_dropout=0.25, null_label=-1)  # fmt: skip
    fn(None, jax.random.key(3), (jnp.zeros((n, 2)), jnp.arange(n) % 10))
    assert abs(float(jnp.mean(drawn[0] == -1)) - 0.25) < 0.03
    assert all(int(jnp.sum(y == -1)) == 0 for y in drawn[1:])


def test_the_recipe_refuses_what_it_cannot_do():
    field = jd.Field(lambda p, z, t, r, *y: z, "velocity")
    with pytest.raises(ValueError, match="target_guidance 2.0 needs the unconditional velocity"):
        jd.shortcut_loss(field, target_guidance=2.0)
    with pytest.raises(ValueError, match="label_dropout 0.1 > 0 needs the null_label"):
        jd.shortcut_loss(field, label_dropout=0.1)
    with pytest.raises(ValueError, match="target_clip must be > 0; got target_clip = 0.0"):
        jd.shortcut_loss(field, target_clip=0.0)
    with pytest.raises(ValueError, match="clip must be > 0; got clip = -1.0"):
        jd.shortcut_target(lambda z, t, r: z, jnp.ones((2, 2)), jnp.ones(2), jnp.ones(2), clip=-1.0)
    with pytest.raises(ValueError, match="bootstrap_fraction 0 has none"):
        jd.shortcut_loss(field, label_dropout=0.1, null_label=0, target_guidance=2.0,
                         bootstrap_fraction=0.0)  # fmt: skip
    loss = jd.shortcut_loss(field, label_dropout=0.1, null_label=0, target_guidance=2.0)
    with pytest.raises(ValueError, match="target_guidance needs labels in the batch"):
        loss(None, jax.random.key(0), jnp.ones((8, 2)))


def test_ema_targets_pass_the_ema_to_the_loss():
    """make_train_step(ema_targets=True) calls loss(params, key, batch, target_params=ema), with
    the gradient in params only: on sum((p - target)^2) plain SGD of rate 0.25 halves the gap."""
    import optax

    from jaxdiff.train import TrainState, make_train_step

    def loss(p, key, batch, target_params=None):
        tp = p if target_params is None else target_params
        return jnp.sum(jnp.square(p - tp))

    step = make_train_step(loss, optax.sgd(0.25), ema_targets=True, ema_decay=0.5,
                           ema_warmup=False)  # fmt: skip
    state = TrainState(jnp.array(2.0), optax.sgd(0.25).init(jnp.array(2.0)), jnp.array(0.0),
                       jnp.zeros((), jnp.int32), jax.random.key(0))  # fmt: skip
    new, value = jax.jit(step)(state, jnp.zeros((2,)))
    assert float(value) == 4.0 and float(new.params) == 1.0  # 2 - 0.25 * 2 (2 - 0)
    assert float(new.ema) == 0.5  # 0.5 * 0 + 0.5 * 1
    _, value = make_train_step(loss, optax.sgd(0.25))(state, jnp.zeros((2,)))
    assert float(value) == 0.0  # without: the online parameters
    with pytest.raises(TypeError, match="this loss takes no target_params"):
        make_train_step(lambda p, k, b: jnp.sum(p), optax.sgd(0.1), ema_targets=True)
    # the consistency losses take them too: the EMA network as theta^-
    cm = jd.Field(jd.consistency_function(lambda p, x, t: p * x), "x0")
    ct = jax.jit(jd.consistency_training_loss(cm, PATH, num_scales=4))
    x0 = jax.random.normal(jax.random.key(1), (256, 2))
    same = ct(jnp.float32(0.5), jax.random.key(2), x0, jnp.float32(0.5))
    np.testing.assert_allclose(same, ct(jnp.float32(0.5), jax.random.key(2), x0), rtol=1e-6)
    other = ct(jnp.float32(0.5), jax.random.key(2), x0, jnp.float32(2.0))
    assert abs(float(other) - float(same)) > 1e-3


def test_target_ema_is_a_second_average_with_its_own_decay(tmp_path):
    """make_train_step(ema_targets=True, target_decay=mu) passes state.target, updated as
    target <- mu target + (1 - mu) params, while ema keeps its own decay; a checkpoint keeps it."""
    import optax

    from jaxdiff.checkpoint import Checkpointer
    from jaxdiff.train import init_train_state, make_train_step

    def loss(p, key, batch, target_params=None):
        return jnp.sum(jnp.square(p - target_params))

    opt = optax.sgd(0.25)
    state = init_train_state(jnp.array(2.0, jnp.bfloat16), opt, jax.random.key(0), target_ema=True)
    assert state.target.dtype == jnp.float32 and float(state.target) == 2.0  # float32 copy
    state = state._replace(params=jnp.array(2.0), ema=jnp.array(0.0), target=jnp.array(0.0))
    step = jax.jit(make_train_step(loss, opt, ema_decay=0.5, ema_warmup=False,
                                   ema_targets=True, target_decay=0.9))  # fmt: skip
    one, value = step(state, jnp.zeros((2,)))
    assert float(value) == 4.0 and float(one.params) == 1.0  # the target 0, not the EMA
    assert float(one.ema) == 0.5 and abs(float(one.target) - 0.1) < 1e-7  # 0.9 * 0 + 0.1 * 1
    two, value = step(one, jnp.zeros((2,)))
    assert abs(float(value) - 0.81) < 1e-6  # (1 - 0.1)^2; the EMA would give (1 - 0.5)^2
    # mu = 0: the target is the online network of the step before (improved CT)
    zero = make_train_step(loss, opt, ema_targets=True, target_decay=0.0)
    assert float(zero(one, jnp.zeros((2,)))[0].target) == float(zero(one, None)[0].params)
    with pytest.raises(ValueError, match="target_decay 0.9 .* got ema_targets=False"):
        make_train_step(loss, opt, target_decay=0.9)
    with pytest.raises(ValueError, match=r"target_decay must lie in \[0, 1\)"):
        make_train_step(loss, opt, ema_targets=True, target_decay=1.0)
    plain = state._replace(target=None)
    with pytest.raises(ValueError, match="init_train_state\\(..., target_ema=True\\)"):
        step(plain, jnp.zeros((2,)))
    with pytest.raises(ValueError, match="the step would never update"):
        make_train_step(loss, opt, ema_targets=True)(state, jnp.zeros((2,)))
    # mu = 0 in consistency training: the targets equal the online network's, bit for bit
    cm = jd.Field(jd.consistency_function(lambda p, x, t: p * x), "x0")
    ct = jd.consistency_training_loss(cm, PATH, num_scales=4)
    x0 = jax.random.normal(jax.random.key(1), (64, 2))
    online = jax.jit(make_train_step(ct, opt))
    mu0 = jax.jit(make_train_step(ct, opt, ema_targets=True, target_decay=0.0))
    a = init_train_state(jnp.float32(0.5), opt, jax.random.key(2))
    b = init_train_state(jnp.float32(0.5), opt, jax.random.key(2), target_ema=True)
    for _ in range(3):
        (a, la), (b, lb) = online(a, x0), mu0(b, x0)
        assert float(la) == float(lb) > 0 and float(a.params) == float(b.params)
    assert float(a.params) != 0.5  # it trained
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(two)
        back, _ = ckpt.restore(two)
        assert float(back.target) == float(two.target) and float(back.ema) == float(two.ema)
        with pytest.raises(ValueError, match="saved with a target network .* target_ema=True"):
            ckpt.restore(plain)
        ckpt.save(plain._replace(step=jnp.array(5, jnp.int32)))
        with pytest.raises(ValueError, match="saved without a target network"):
            ckpt.restore(two, step=5)
