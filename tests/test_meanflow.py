"""Mean flows: the JVP target against finite differences, the exact average velocity of Gaussian
data (closed form, checked against an ODE solve) satisfies the MeanFlow identity and zeroes the
loss, its one- and few-step samples are exact, the loss's gradient vanishes there in expectation,
and a tiny training beats a stated one-step bound."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd

MU = jnp.array([[2.0, -1.0]])  # (1, 2): rank promotion is strict in tests
S = 0.5  # data N(MU, S^2 I) on the linear path z_t = (1 - t) x + t e


def _sigma(t):
    return jnp.sqrt((1 - t) ** 2 * S**2 + t**2)


def exact_u(z, t, r):
    """Average velocity over [r, t]: z_r = m_r + (sigma_r / sigma_t)(z - m_t), m_t = (1 - t) MU, so
    u = (z - z_r) / (t - r) = (z - m_t) D / sigma_t - MU with the divided difference
    D = (sigma_t - sigma_r) / (t - r) = ((t + r) - S^2 (2 - t - r)) / (sigma_t + sigma_r)."""
    t, r = t[:, None], r[:, None]
    d = ((t + r) - S**2 * (2 - t - r)) / (_sigma(t) + _sigma(r))
    return (z - (1 - t) * MU) * d / _sigma(t) - MU


PATH = jd.linear_path()


def gauss():  # built inside a test, so in float64 under the x64 fixture
    return jd.GaussianMixture.isotropic(MU, std=S)


def test_jvp_target_equals_central_finite_differences(x64):
    key = jax.random.key(0)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    w = jax.random.normal(k1, (2, 2))

    def u_fn(w, z, t, r):  # a smooth test function of all three arguments
        return jnp.tanh(z @ w + 0.7 * t[:, None] - 1.3 * r[:, None] ** 2) * (1 + t * r)[:, None]

    z, v = jax.random.normal(k2, (64, 2)), jax.random.normal(k3, (64, 2))
    t = jax.random.uniform(k4, (64,), minval=0.2, maxval=1.0)
    r = 0.5 * t
    h = 1e-5

    @jax.jit  # one program (eagerly, each op compiled on its own)
    def run(w, z, t, r, v):
        u, target = jd.meanflow_target(lambda *a: u_fn(w, *a), z, t, r, v)
        fd = (u_fn(w, z + h * v, t + h, r) - u_fn(w, z - h * v, t - h, r)) / (2 * h)
        # the target is a constant for the optimiser: no gradient flows through it
        g_target = jax.grad(
            lambda w: jnp.sum(jd.meanflow_target(lambda *a: u_fn(w, *a), z, t, r, v)[1])
        )
        g_u = jax.grad(lambda w: jnp.sum(jd.meanflow_target(lambda *a: u_fn(w, *a), z, t, r, v)[0]))
        return u, target, fd, u_fn(w, z, t, r), g_target(w), g_u(w)

    u, target, fd, u_direct, g_target, g_u = run(w, z, t, r, v)
    # central differences: error ~ h^2 |u'''| ~ 1e-10, rounding ~ 1e-16 / h ~ 1e-11
    np.testing.assert_allclose(target, v - (t - r)[:, None] * fd, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(u, u_direct, rtol=1e-14)
    assert float(jnp.abs(g_target).max()) == 0.0 and float(jnp.abs(g_u).max()) > 0.1


def test_closed_form_average_velocity_matches_the_ode_and_the_oracle(x64):
    z = jax.random.normal(jax.random.key(1), (16, 2)) * 1.5
    t, r = 0.9, 0.3
    oracle = gauss().field(PATH, "velocity")
    ones = jnp.ones(16)

    @jax.jit  # one program: eagerly, the sample's set-up and the formulas compile op by op
    def run(z):
        sol = jd.sample(None, PATH, oracle, x_init=z, t_start=t, t_end=r, steps=40,
                        sampler=jd.samplers.ode(diffrax.Tsit5()))  # fmt: skip
        return (sol.x, exact_u(z, t * ones, r * ones), exact_u(z, t * ones, t * ones),
                oracle(z, t * ones))  # fmt: skip

    x_r, u_tr, u_tt, v = run(z)
    np.testing.assert_allclose(u_tr, (z - x_r) / (t - r), atol=1e-9)
    # u(z, t, t) is the instantaneous velocity
    np.testing.assert_allclose(u_tt, v, atol=1e-12)


def _times(key, n):
    k1, k2 = jax.random.split(key)
    t = jax.random.uniform(k1, (n,), minval=0.0, maxval=1.0)
    r = jnp.where(jnp.arange(n) < n // 4, t, t * jax.random.uniform(k2, (n,)))
    return t, r


def test_exact_average_velocity_satisfies_the_identity_and_zeroes_the_loss(x64):
    key = jax.random.key(2)
    z = jax.random.normal(key, (512, 2)) * 2.0
    t, r = _times(jax.random.key(3), 512)
    u, target = jax.jit(  # one program (eagerly, each op compiled on its own)
        lambda z, t, r: jd.meanflow_target(
            exact_u, z, t, r, gauss().predict(PATH, z, t, "velocity")
        )
    )(z, t, r)
    np.testing.assert_allclose(u, target, atol=1e-12)  # u = v - (t - r) du/dt
    # the loss with the marginal velocity of the oracle is exactly 0 at the exact u
    net = jd.Field(lambda p, x, t, r: exact_u(x, t, r) + p, "velocity")
    oracle = gauss().field(PATH, "velocity")
    batch = gauss().sample(jax.random.key(4), 4096)
    loss = jax.jit(jd.meanflow_loss(net, PATH, velocity=oracle, weighting_power=0.0))
    assert float(loss(0.0, jax.random.key(5), batch)) < 1e-20
    np.testing.assert_allclose(float(loss(0.1, jax.random.key(5), batch)), 0.02, rtol=1e-9)


def test_loss_equals_one_jvp_over_the_whole_batch(x64):
    """The loss evaluates the r = t part of the batch without the JVP; value and gradient equal
    the direct formula: one JVP over all examples, adaptive weights, mean."""

    def u_fn(w, z, t, r):
        return jnp.tanh(z @ w + 0.7 * t[:, None] - 1.3 * r[:, None] ** 2) * (1 + t * r)[:, None]

    net = jd.Field(u_fn, "velocity")
    w = jax.random.normal(jax.random.key(10), (2, 2))
    x0 = jax.random.normal(jax.random.key(11), (64, 2))
    key, times = jax.random.key(12), jd.uniform_time(0.0, 1.0)

    def direct(w):
        t_key, r_key, e_key = jax.random.split(key, 3)
        t1, t2 = times(t_key, (64,)), times(r_key, (64,))
        t, r = jnp.maximum(t1, t2), jnp.minimum(t1, t2)
        r = jnp.where(jnp.arange(64) < 48, t, r)  # flow_matching_fraction 0.75 of 64
        eps = jax.random.normal(e_key, (64, 2))
        z = (1 - t[:, None]) * x0 + t[:, None] * eps
        u, target = jd.meanflow_target(lambda *a: u_fn(w, *a), z, t, r, eps - x0)
        err = jnp.sum((u - target) ** 2, axis=1)
        return jnp.mean(jax.lax.stop_gradient(1 / (err + 1e-3) ** 0.5) * err)

    loss = jd.meanflow_loss(net, time_sampler=times, weighting_power=0.5)
    both = jax.jit(  # one program (eagerly, each op compiled on its own)
        lambda w: (loss(w, key, x0), direct(w), jax.grad(loss)(w, key, x0), jax.grad(direct)(w))
    )
    value, direct_value, grad, direct_grad = both(w)
    np.testing.assert_allclose(value, direct_value, rtol=1e-12)
    np.testing.assert_allclose(grad, direct_grad, rtol=1e-10)


def test_guided_loss_equals_the_direct_formula(x64):
    """Guidance in training (Geng et al. 2025, Appendix B.1): labels dropped to the null label,
    and for the kept ones v~ = w v + k u(z, t, t | c) + (1 - w - k) u(z, t, t | null) under a
    stop-gradient, the target's velocity and the JVP's tangent both; value and gradient equal the
    direct formula."""

    def u_fn(w, z, t, r, y):
        h = z @ w + 0.7 * t[:, None] - 1.3 * r[:, None] ** 2 + 0.1 * y[:, None]
        return jnp.tanh(h) * (1 + t * r)[:, None]

    net = jd.Field(u_fn, "velocity")
    w = jax.random.normal(jax.random.key(10), (2, 2))
    x0 = jax.random.normal(jax.random.key(11), (64, 2))
    labels = jnp.arange(64) % 5
    key, times = jax.random.key(12), jd.uniform_time(0.0, 1.0)

    def direct(w, g_w=2.0, k=0.5, interval=(0.0, 1.0)):
        t_key, r_key, e_key = jax.random.split(key, 3)
        t1, t2 = times(t_key, (64,)), times(r_key, (64,))
        t, r = jnp.maximum(t1, t2), jnp.minimum(t1, t2)
        r = jnp.where(jnp.arange(64) < 48, t, r)
        eps = jax.random.normal(e_key, (64, 2))
        z = (1 - t[:, None]) * x0 + t[:, None] * eps
        drop = jax.random.bernoulli(jax.random.fold_in(key, 0x1AB), 0.3, (64,))
        y = jnp.where(drop, 5, labels)
        sg = jax.lax.stop_gradient
        u_c, u_null = sg(u_fn(w, z, t, t, y)), sg(u_fn(w, z, t, t, jnp.full(64, 5)))
        v = eps - x0
        keep = (y != 5) & (t >= interval[0]) & (t <= interval[1])
        v = jnp.where(keep[:, None], g_w * v + k * u_c + (1 - g_w - k) * u_null, v)
        u, target = jd.meanflow_target(lambda *a: u_fn(w, *a, y), z, t, r, v)
        err = jnp.sum((u - target) ** 2, axis=1)
        return jnp.mean(sg(1 / (err + 1e-3) ** 0.5) * err), jnp.mean(drop)

    loss = jd.meanflow_loss(net, time_sampler=times, label_dropout=0.3, null_label=5,
                            target_guidance=2.0, guidance_mix=0.5)  # fmt: skip
    plain = jd.meanflow_loss(net, time_sampler=times, label_dropout=0.3, null_label=5)
    inside = jd.meanflow_loss(net, time_sampler=times, label_dropout=0.3, null_label=5,
                              target_guidance=2.0, guidance_interval=(0.2, 0.7))  # fmt: skip
    batch = (x0, labels)
    both = jax.jit(
        lambda w: (
            loss(w, key, batch),
            direct(w)[0],
            jax.grad(loss)(w, key, batch),
            jax.grad(lambda w: direct(w)[0])(w),
            plain(w, key, batch),
            direct(w, 1.0, 0.0)[0],
            direct(w)[1],
            inside(w, key, batch),
            direct(w, 2.0, 0.0, (0.2, 0.7))[0],
        )
    )
    value, direct_value, grad, direct_grad, plain_value, unguided, dropped, *part = both(w)
    np.testing.assert_allclose(part[0], part[1], rtol=1e-12)  # guided for 0.2 <= t <= 0.7 only
    np.testing.assert_allclose(value, direct_value, rtol=1e-12)
    np.testing.assert_allclose(grad, direct_grad, rtol=1e-10)
    np.testing.assert_allclose(plain_value, unguided, rtol=1e-12)  # w = 1, k = 0: no guidance
    assert abs(float(value) - float(plain_value)) > 0.01 and 0.1 < float(dropped) < 0.5
    with pytest.raises(ValueError, match="guidance_mix 0.5 mixes the conditional velocity"):
        jd.meanflow_loss(net, guidance_mix=0.5)
    with pytest.raises(ValueError, match=r"guidance_mix 1.0 .* a value in \[0, 1\)"):
        jd.meanflow_loss(net, label_dropout=0.1, null_label=5, target_guidance=2.0,
                         guidance_mix=1.0)  # fmt: skip
    with pytest.raises(ValueError, match="target_guidance 2.0 needs the unconditional velocity"):
        jd.meanflow_loss(net, target_guidance=2.0)
    assert abs(float(part[0]) - float(value)) > 0.01
    with pytest.raises(ValueError, match=r"guidance_interval \(0.2, 0.7\) needs target_guidance"):
        jd.meanflow_loss(net, guidance_interval=(0.2, 0.7))
    with pytest.raises(ValueError, match="interval must satisfy 0 <= t_lo < t_hi"):
        jd.meanflow_loss(net, label_dropout=0.1, null_label=5, target_guidance=2.0,
                         guidance_interval=(0.7, 0.2))  # fmt: skip
    with pytest.raises(ValueError, match="target_guidance needs labels in the batch"):
        jd.meanflow_loss(net, label_dropout=0.1, null_label=5, target_guidance=2.0)(w, key, x0)


def test_loss_gradient_vanishes_in_expectation_at_the_exact_average_velocity(x64):
    """With the conditional velocity e - x the loss is not 0 at the exact u, but its expected
    gradient is: E[target | z_t] = u. Mean over 16 independent batches, within 4 standard errors."""
    net = jd.Field(lambda th, x, t, r: exact_u(x, t, r) + th * x, "velocity")
    loss = jd.meanflow_loss(net, PATH, weighting_power=0.0)
    grad = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0)))
    keys = jax.random.split(jax.random.key(6), 16)
    batches = jax.jit(jax.vmap(lambda k: gauss().sample(k, 4096)))(
        jax.random.split(jax.random.key(7), 16)
    )
    for theta, zero in ((0.0, True), (0.3, False)):
        g = np.asarray(grad(theta, keys, batches))
        se = g.std(ddof=1) / np.sqrt(len(g))
        assert (abs(g.mean()) < 4 * se) == zero, (theta, g.mean(), se)


def test_one_and_few_step_samples_of_the_exact_field_are_exact(x64):
    u = jd.Field(lambda x, t, r=None: exact_u(x, t, t if r is None else r), "velocity")
    x1 = jax.random.normal(jax.random.key(8), (256, 2))
    sampler = jd.samplers.meanflow()

    grids = {steps: np.linspace(1.0, 0.0, steps + 1) for steps in (1, 2, 4)}  # known at trace
    ts = np.array([1.0, 0.6, 0.1, 0.0])

    @jax.jit  # one program (an eager sample compiles its set-up op by op)
    def run(x1):
        sols = {steps: jd.sample(None, PATH, u, x_init=x1, sampler=sampler, steps=steps,
                                 save_ts=grid) for steps, grid in grids.items()}  # fmt: skip
        return sols, jd.sample(None, PATH, u, x_init=x1, sampler=sampler, ts=ts).x

    sols, on_ts = run(x1)
    for steps, grid in grids.items():
        sol = sols[steps]
        np.testing.assert_allclose(sol.x, MU + S * x1, atol=1e-12)  # the flow map 1 -> 0
        assert sol.xs.shape == (steps + 1, 256, 2) and int(sol.nfe) == steps
        want = (1 - grid[:, None, None]) * MU[None] + _sigma(grid)[:, None, None] * x1[None]
        np.testing.assert_allclose(sol.xs, want, atol=1e-12)
    np.testing.assert_allclose(on_ts, MU + S * x1, atol=1e-12)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="'velocity' target"):
        jd.meanflow_loss(jd.Field(lambda p, x, t, r: x, "eps"))
    with pytest.raises(ValueError, match="flow_matching_fraction"):
        jd.meanflow_loss(jd.Field(lambda p, x, t, r: x, "velocity"), flow_matching_fraction=1.5)
    with pytest.raises(
        ValueError, match="weighting_power must be finite; got weighting_power = nan"
    ):
        jd.meanflow_loss(jd.Field(lambda p, x, t, r: x, "velocity"), weighting_power=float("nan"))
    sampler, x = jd.samplers.meanflow(), jnp.ones((4, 2))
    with pytest.raises(TypeError):  # the suite's type checker answers before as_field does
        jd.sample(jax.random.key(0), PATH, lambda x, t, r=None: x, (4, 2), sampler=sampler)
    with pytest.raises(ValueError, match="average velocity"):
        jd.sample(None, PATH, jd.Field(lambda x, t, r=None: x, "x0"), x_init=x, sampler=sampler)
    u = jd.Field(lambda x, t, r=None: x, "velocity")
    with pytest.raises(ValueError, match="strictly decreasing"):
        jd.sample(None, PATH, u, x_init=x, sampler=sampler, ts=jnp.array([0.0, 1.0]))
    with pytest.raises(Exception, match="strictly decreasing"):  # traced grid: checked at run time
        jax.jit(lambda ts: jd.sample(None, PATH, u, x_init=x, sampler=sampler, ts=ts).x)(
            jnp.array([0.2, 0.5])
        )
    with pytest.raises(ValueError, match="give the sample shape"):
        jd.sample(jax.random.key(0), PATH, u, sampler=sampler)
    # a two-time network whose r is required (meanflow_loss takes it) failed with Python's bare
    # "missing 1 required positional argument: 'r'" from sample's shape probe field(x, t)
    strict = jd.Field(lambda x, t, r: x, "velocity")
    with pytest.raises(TypeError, match=r"must default its second time to the first"):
        jd.sample(None, PATH, strict, x_init=x, sampler=sampler)
    # JAX's own errors from the probe pass unchanged (the hint was added to them too: a review)
    branchy = jd.Field(lambda x, t, r=None: x if t.max() > 0.5 else -x, "velocity")
    with pytest.raises(jax.errors.TracerBoolConversionError):
        jd.sample(None, PATH, branchy, x_init=x, sampler=sampler)


def test_tiny_meanflow_training_generates_in_one_step():
    """TwoTimeMLP(64, 2), 600 steps at batch 256 on a two-component mixture: the one-step ED is
    far below the untrained network's (x = z_1, the prior: ED 0.62). Measured: 0.040 (0.11 after
    200 steps, 0.05 after 400); the null ED of two true sets of 4,000 is ~1e-3."""
    from jaxdiff.nets import init_params
    from jaxdiff.nets.two_time import TwoTimeMLP
    from jaxdiff.train import adamw_cosine, init_train_state, make_train_chunk, make_train_step

    data = jd.GaussianMixture.isotropic(jnp.array([[1.5, 1.5], [-1.5, -1.5]]), std=0.3)
    model = TwoTimeMLP(width=64, depth=2)
    params = init_params(model, jax.random.key(0), jnp.zeros((1, 2)), 0.5, 0.5)
    net = jd.Field(model.apply, "velocity")
    opt = adamw_cosine(3e-3, 600)
    loss = jd.meanflow_loss(net, time_sampler=jd.uniform_time(0.0, 1.0), weighting_power=0.5)
    step = make_train_step(loss, opt)
    chunk = make_train_chunk(step, lambda k: data.sample(k, 256), 600)
    state, _ = chunk(init_train_state(params, opt, jax.random.key(1)))
    x1 = jax.random.normal(jax.random.key(2), (4000, 2))
    true = data.sample(jax.random.key(3), 4000)
    sol = jd.sample(None, PATH, net.bind(state.ema), x_init=x1, sampler=jd.samplers.meanflow())
    one = float(jd.energy_distance(sol.x, true))
    prior = float(jd.energy_distance(x1, true))
    assert one < 0.1 and prior > 0.5, (one, prior)


def test_two_time_unet_is_the_unet_conditioned_on_the_gap_and_its_jvp_is_the_total_derivative(
    x64,
):
    """TwoTimeUNet: r = None is r = t; r != t changes the output; its parameters are the U-Net's
    plus one time embedding (features 8 -> 32 -> 32); MeanFlow's JVP target through it (the
    U-Net's convolutions, attention and group norms in forward mode) equals central differences
    along the trajectory."""
    from jaxdiff.nets import TwoTimeUNet, UNet, init_params

    unet = UNet(channels=(8, 16), norm_groups=4, num_classes=3, attention_resolutions=(4,))
    model = TwoTimeUNet.of(unet)
    assert model.channels == (8, 16) and model.num_classes == 3 and model.heads == unet.heads
    assert (model.time_embedding, model.time_scale) == ("fourier", 1.0)  # low frequencies
    k = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(k[0], (5, 8, 8, 1))
    labels = jnp.array([0, 1, 2, 3, 1])  # 3: the null label
    t = jax.random.uniform(k[1], (5,), minval=0.2, maxval=1.0)
    r = 0.4 * t
    params = init_params(model, k[2], x, t, r, labels)
    count = lambda p: sum(a.size for a in jax.tree_util.tree_leaves(p))  # noqa: E731
    one_time = count(jax.eval_shape(unet.init, k[2], x, t, labels))
    assert count(params) - one_time == 8 * 32 + 32 + 32 * 32 + 32
    # move every weight off its initialiser (the output convolution starts at zero)
    rng = np.random.default_rng(3)  # host draws: one jax.random kernel per leaf shape is slow
    # and the sum on the host too: an eager jnp add compiles once per leaf shape (~2 s)
    params = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, x.dtype) + 0.2 * rng.standard_normal(a.shape)),
                          params)  # fmt: skip
    apply = jax.jit(lambda z, t_, r_: model.apply(params, z, t_, r_, labels))  # one compile
    same = jax.jit(lambda z, t_: model.apply(params, z, t_, None, labels))(x, t)
    np.testing.assert_allclose(same, apply(x, t, t), rtol=1e-12, atol=1e-13)
    assert float(jnp.abs(apply(x, t, r) - same).max()) > 1e-2
    v = jax.random.normal(k[4], x.shape)
    u, target = jax.jit(jd.meanflow_target, static_argnums=0)(apply, x, t, r, v)
    h = 1e-6  # central differences: error ~ h^2 |d3u| / 6, rounding ~ 1e-16 / h
    fd = (apply(x + h * v, t + h, r) - apply(x - h * v, t - h, r)) / (2 * h)
    np.testing.assert_allclose(u, apply(x, t, r), rtol=1e-12)
    np.testing.assert_allclose(target, v - (t - r)[:, None, None, None] * fd, rtol=1e-6, atol=1e-8)


def test_a_conditional_teacher_sees_the_labels():
    """With (x0, labels) batches the teacher is called as velocity(z, t, labels), like the
    student (it was called without them: a TypeError, or an unconditional target)."""

    def by_label(x, y):
        return jnp.where((y == 1)[:, None], 1.0, -1.0) * jnp.ones_like(x)

    teacher = jd.Field(lambda x, t, y: by_label(x, y), "velocity")
    net = jd.Field(lambda p, x, t, r, y: by_label(x, y) + p, "velocity")
    x0 = jax.random.normal(jax.random.key(0), (64, 2))
    labels = jnp.arange(64) % 2
    loss = jax.jit(jd.meanflow_loss(net, PATH, velocity=teacher, weighting_power=0.0))
    # half the batch at r = t (the target is the teacher's velocity), half through the JVP
    # (du/dt = 0 here): either way the target is by_label, so the loss is p^2 per dimension
    assert float(loss(0.0, jax.random.key(1), (x0, labels))) == 0.0
    np.testing.assert_allclose(float(loss(0.5, jax.random.key(1), (x0, labels))), 0.5, rtol=1e-6)


def test_times_stay_float32_for_bfloat16_and_integer_data():
    # t and r were cast to x0's dtype: bfloat16 times for bfloat16 data (against the package's
    # precision policy, float32 or wider), and integer data raised jax.random.normal's error.
    seen = []

    def fn(p, z, t, r):
        seen.append((t.dtype, r.dtype))
        return exact_u(z, t, r).astype(z.dtype)

    loss = jd.meanflow_loss(jd.Field(fn, "velocity"), PATH, weighting_power=0.0)
    x0 = MU + S * jax.random.normal(jax.random.key(0), (64, 2))
    loss(None, jax.random.key(1), x0.astype(jnp.bfloat16))
    assert all(d == (jnp.float32, jnp.float32) for d in seen)
    xi = jnp.round(x0).astype(jnp.int32)
    np.testing.assert_allclose(float(loss(None, jax.random.key(1), xi)),
                               float(loss(None, jax.random.key(1), xi.astype(jnp.float32))),
                               rtol=1e-6)  # fmt: skip


def test_infinite_weighting_eps_is_refused():
    """``weighting_eps = inf`` made every adaptive weight 0, and so the loss."""
    field = jd.Field(lambda p, z, t, r: z, "velocity")
    with pytest.raises(ValueError, match="weighting_eps must be finite and > 0; got inf"):
        jd.meanflow_loss(field, PATH, weighting_eps=float("inf"))


def test_a_one_time_network_in_meanflow_is_named():
    """MeanFlow's sampler and loss call field(x, t, r): with jaxdiff's one-time MLP the second time
    landed in the labels and the error blamed labels the user never gave."""
    from jaxdiff.nets import MLP, init_params

    model = MLP(width=16, depth=1)
    params = init_params(model, jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros(1))
    field = jd.Field(model.apply, "velocity", params)
    with pytest.raises(ValueError, match="need a two-time network, TwoTimeMLP"):
        jd.sample(
            jax.random.key(0), jd.linear_path(), field, (4, 2), sampler=jd.samplers.meanflow()
        )
    with pytest.raises(ValueError, match="need a two-time network"):
        jd.meanflow_loss(jd.Field(model.apply, "velocity"))(
            params, jax.random.key(1), jnp.ones((4, 2))
        )


def test_source_points_and_couplings_reach_the_target(x64):
    """MeanFlow with any source (Geng et al. train from N(0, I)): the target is linear in the
    conditional velocity x1 - x0, whose mean given z_t is the marginal velocity under any
    coupling. A zero network at r = t and p = 0 makes the loss E|x1 - x0|^2: |m1 - MU|^2 +
    D (S^2 + s1^2) for independent draws (14.78 here), less under OT. The batch's x1, source= and
    coupling= used to be dropped or refused (TypeError), training a Gaussian-source model."""
    m1, s1, n = jnp.array([[-1.0, 1.0]]), 0.8, 8192
    source = lambda key, shape: m1 + s1 * jax.random.normal(key, shape)  # noqa: E731
    zero = jd.Field(lambda p, x, t, r: jnp.zeros_like(x), "velocity")
    x0 = gauss().sample(jax.random.key(0), n)
    independent = float(jnp.sum(jnp.square(m1 - MU)) + 2 * (S**2 + s1**2))

    def loss(**kw):
        fn = jd.meanflow_loss(zero, PATH, flow_matching_fraction=1.0, weighting_power=0.0, **kw)
        fn = jax.jit(fn)  # eagerly, each op (and the coupling's solve) compiled on its own
        return lambda batch: float(fn(None, jax.random.key(1), batch))

    np.testing.assert_allclose(loss(source=source)(x0), independent, rtol=0.02)
    x1 = source(jax.random.key(2), x0.shape)
    np.testing.assert_allclose(
        loss()({"x0": x0, "x1": x1}), float(jnp.mean(jnp.sum(jnp.square(x1 - x0), -1))), rtol=1e-12
    )
    # minibatch OT pairs x1 - m1 with (s1 / S)(x0 - MU): |m1 - MU|^2 + D (S - s1)^2 = 13.18
    ot = loss(source=source, coupling=jd.exact_ot())(x0[:512])
    assert ot < float(jnp.sum(jnp.square(m1 - MU)) + 2 * (S - s1) ** 2) + 0.1 < independent
    with pytest.raises(ValueError, match="needs a path that ends at it"):
        jd.meanflow_loss(zero, jd.vp_path(), source=source)
    gauss_x0 = jd.Field(lambda p, x, t: jnp.zeros_like(x), "x0")
    ct = jd.consistency_training_loss(gauss_x0, PATH)
    with pytest.raises(ValueError, match="does not use source points"):
        ct(None, jax.random.key(0), {"x0": x0, "x1": x1})
