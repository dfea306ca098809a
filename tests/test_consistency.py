"""Consistency models: the boundary condition f(x, t_min) = x holds exactly, consistency training
pairs share their noise (a closed-form loss value), distillation's loss at the exact consistency
function vanishes at the order of its ODE step, and the samplers of the exact function are exact."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd

MU = jnp.array([[2.0, -1.0]])
S = 0.5  # data N(MU, S^2 I) on the linear path
PATH = jd.linear_path()


def _sigma(t):
    return jnp.sqrt((1 - t) ** 2 * S**2 + t**2)


def exact_f(x, t):
    """The exact consistency function to t = 0: the flow map m_0 + (sigma_0 / sigma_t)(x - m_t)."""
    t = t[:, None]
    return MU + S * (x - (1 - t) * MU) / _sigma(t)


@pytest.mark.parametrize("kind", ["euler", "edm"])
@pytest.mark.parametrize("t_min", [0.0, 1e-3])
def test_boundary_condition_holds_exactly(kind, t_min):
    fn = lambda p, x, t: p * jnp.sin(3.0 * x) + t[:, None]  # noqa: E731 - any nonzero network
    f = jd.consistency_function(fn, kind=kind, t_min=t_min)
    x = jax.random.normal(jax.random.key(0), (64, 2))
    np.testing.assert_array_equal(f(2.0, x, jnp.full(64, t_min)), x)
    np.testing.assert_array_equal(jax.jit(f)(2.0, x, jnp.full(64, t_min)), x)
    assert float(jnp.abs(f(2.0, x, jnp.full(64, 0.5)) - x).min()) > 1e-3


def test_edm_scalings_are_song_et_al():
    c_skip, c_out = jd.consistency_scalings(0.7, kind="edm", t_min=0.002, sigma_data=0.5)
    np.testing.assert_allclose(c_skip, 0.25 / (0.698**2 + 0.25), rtol=1e-6)
    np.testing.assert_allclose(c_out, 0.5 * 0.698 / np.sqrt(0.25 + 0.49), rtol=1e-6)
    c_skip, c_out = jd.consistency_scalings(0.7, kind="euler", t_min=0.002)
    assert float(c_skip) == 1.0 and abs(float(c_out) + 0.698) < 1e-7


def test_consistency_training_pairs_share_data_and_noise():
    """With f(x, t) = x, x0 = 0 and the linear path, x_{t_{n+1}} - x_{t_n} = (t_{n+1} - t_n) e, so
    the inverse-gap-weighted L2 loss is E|e| = sqrt(pi / 2) in 2-D whatever the grid. Over
    n = 100,000 samples its standard error is sqrt(2 - pi / 2) / sqrt(n) = 2.1e-3: 5 SE = 0.0104.
    Independent noises for the two times would give E|t_hi e1 - t_lo e2| / (t_hi - t_lo) >> 1."""
    net = jd.Field(lambda p, x, t: x, "x0")
    for ts in (None, jnp.linspace(0.0, 1.0, 7)):
        loss = jd.consistency_training_loss(net, PATH, num_scales=20, ts=ts, huber_c=0.0)
        value = float(jax.jit(loss)(None, jax.random.key(1), jnp.zeros((100_000, 2))))
        assert abs(value - np.sqrt(np.pi / 2)) < 0.0104, value


@pytest.mark.parametrize("solver, order", [("euler", 1), ("heun", 2)])
def test_distillation_loss_at_the_exact_function_vanishes_at_the_solver_order(x64, solver, order):
    """The exact f is constant along exact trajectories, so the CD loss measures the teacher step's
    local error O(dt^(p+1)), weighted by 1 / dt: O(dt^p). Slope of log loss vs log N within 0.3."""
    oracle = jd.GaussianMixture.isotropic(MU, std=S).field(PATH, "velocity")
    net = jd.Field(lambda p, x, t: exact_f(x, t), "x0")
    batch = jd.GaussianMixture.isotropic(MU, std=S).sample(jax.random.key(2), 4096)
    ns = np.array([8, 16, 32, 64])
    losses = []
    for n in ns:
        loss = jd.consistency_distillation_loss(net, oracle, PATH, solver=solver, huber_c=0.0,
                                                ts=jnp.linspace(0.0, 1.0, n + 1))  # fmt: skip
        losses.append(float(loss(None, jax.random.key(3), batch)))
    slope = np.polyfit(np.log(ns), np.log(losses), 1)[0]
    assert abs(slope + order) < 0.3, (slope, losses)


def test_distillation_passes_the_labels_to_a_conditional_teacher(x64):
    """With (x0, labels) batches the teacher sees the labels: the loss equals the one of a teacher
    with those labels bound (on the unlabelled batch: the same draws), and differs from one with
    other labels."""
    means = jnp.array([[2.0, -1.0], [-2.0, 1.0]])
    oracles = [jd.GaussianMixture.isotropic(m[None], std=S).field(PATH, "velocity") for m in means]

    def teacher(x, t, y):  # class y's exact velocity
        return jnp.where((y == 0)[:, None], oracles[0](x, t), oracles[1](x, t))

    net = jd.Field(lambda p, x, t, *y: exact_f(x, t), "x0")
    x0 = jax.random.normal(jax.random.key(7), (512, 2))
    labels = jnp.arange(512) % 2
    key = jax.random.key(8)
    cond = jd.consistency_distillation_loss(net, jd.Field(teacher, "velocity"), PATH)(
        None, key, (x0, labels)
    )
    bound = jd.Field(lambda x, t: teacher(x, t, labels), "velocity")
    same = jd.consistency_distillation_loss(net, bound, PATH)(None, key, x0)
    other = jd.Field(lambda x, t: teacher(x, t, 1 - labels), "velocity")
    changed = jd.consistency_distillation_loss(net, other, PATH)(None, key, x0)
    np.testing.assert_allclose(cond, same, rtol=1e-12)
    assert abs(float(changed) - float(cond)) > 1e-3 * float(cond)


def test_samples_of_the_exact_consistency_function_are_exact(x64):
    f = jd.Field(lambda x, t: exact_f(x, t), "x0")
    x1 = jax.random.normal(jax.random.key(4), (20_000, 2))
    sampler = jd.samplers.consistency()
    sol = jd.sample(
        jax.random.key(5), PATH, f, x_init=x1, sampler=sampler, save_ts=jnp.array([1.0, 0.0])
    )
    np.testing.assert_allclose(sol.x, MU + S * x1, atol=1e-12)  # one step: the flow map
    assert sol.xs.shape == (2, 20_000, 2) and int(sol.nfe) == 1
    for steps in (2, 4):  # fresh noise between steps: still exactly N(MU, S^2 I) in law
        x = jd.sample(jax.random.key(6), PATH, f, (20_000, 2), sampler=sampler, steps=steps).x
        # standard errors: mean S / sqrt(n) = 3.5e-3, std S / sqrt(2 n) = 2.5e-3; 5 SE each
        np.testing.assert_allclose(x.mean(0), MU[0], atol=0.018)
        np.testing.assert_allclose(x.std(0), S, atol=0.0125)


def test_consistency_sampling_on_a_path_noisy_at_zero_adds_no_second_sigma_0():
    """On VE (``sigma_0 = 0.01``) the exact consistency function returns the trajectory's point
    at ``t = 0``, which holds ``sigma_0``'s noise: re-noising to ``s`` adds ``sigma_s^2 -
    sigma_0^2`` (Alg. 1's ``sqrt(tau^2 - eps^2)``) and the last step adds nothing. The law at 0 is
    ``N(m, s^2 + sigma_0^2)``; adding ``sigma_0 z`` again gave std ``sqrt(3) 0.01`` (0.0173)."""
    path, m, s = jd.ve_path(), 1.0, 0.01
    sd = lambda t: jnp.sqrt(s**2 + jnp.square(path.sigma(t)))  # noqa: E731
    f = jd.Field(lambda x, t: m + (sd(0.0) / sd(t))[:, None] * (x - m), "x0")
    for steps in (1, 2, 4):
        x = jd.sample(jax.random.key(steps), path, f, (20_000, 2),
                      sampler=jd.samplers.consistency(), steps=steps).x  # fmt: skip
        # std's standard error sd(0) / sqrt(2 * 40,000) = 5e-5; 2% is 5.6 of them
        np.testing.assert_allclose(float(x.std()), float(sd(0.0)), rtol=0.02)
        np.testing.assert_allclose(float(x.mean()), m, atol=5e-4)  # SE 7e-5


def test_ict_curriculum_and_grid():
    # Song & Dhariwal (2024): K = 400k, s0 = 10, s1 = 1280 -> stages of 50k steps, N = 11 .. 1281
    sizes = [jd.ict_num_scales(k, 400_000) for k in (0, 49_999, 50_000, 399_999)]
    assert sizes == [11, 11, 21, 1281]
    np.testing.assert_allclose(jd.consistency_grid(11), np.linspace(0, 1, 11), atol=1e-7)
    np.testing.assert_allclose(jd.consistency_grid(3, 0.01, 0.81, rho=2.0), [0.01, 0.25, 0.81],
                               rtol=1e-6)  # fmt: skip


def test_ct_curriculum_target_decay_and_stages():
    """Song et al. (2023), Appendix C, as in the authors' code: N(k) = ceil(sqrt(k / K ((s1 + 1)^2
    - s0^2) + s0^2) - 1) + 1 points, mu = exp(s0 log mu0 / (N - 1)); CIFAR-10: K = 800k, s0 = 2,
    s1 = 150, mu0 = 0.9."""
    K = 800_000
    sizes = [jd.ct_num_scales(k, K) for k in (0, 1, 100_000, 400_000, K)]
    # by hand: sqrt(k / K * (151^2 - 4) + 4) = 2, 2.0003, 53.4, 106.8, 151
    assert sizes == [2, 3, 54, 107, 151]
    assert jd.ct_target_decay(2) == pytest.approx(0.81, rel=1e-12)  # mu0^2 at the first stage
    assert jd.ct_target_decay(151) == pytest.approx(0.9 ** (2 / 150), rel=1e-12)
    assert jd.ct_target_decay(11, mu0=0.5, s0=5) == pytest.approx(0.5**0.5, rel=1e-12)
    stages = jd.curriculum_stages(lambda k: jd.ct_num_scales(k, 100, 2, 8), 100)
    assert stages == [(2, 1), (3, 7), (4, 16), (5, 28), (6, 42), (7, 59), (8, 78), (9, 100)]
    for (n, end), start in zip(stages, [0] + [e for _, e in stages[:-1]], strict=True):
        assert all(jd.ct_num_scales(k, 100, 2, 8) == n for k in range(start, end))
    assert jd.curriculum_stages(lambda k: k % 2, 4) == [(0, 1), (1, 2), (0, 3), (1, 4)]
    ict = jd.curriculum_stages(lambda k: jd.ict_num_scales(k, 4_000), 4_000)
    assert ict[:2] == [(11, 500), (21, 1_000)] and ict[-1] == (1281, 4_000) and len(ict) == 8
    with pytest.raises(ValueError, match="step must be <= total_steps = 10; got 11"):
        jd.ct_num_scales(11, 10)
    with pytest.raises(ValueError, match="need s0 <= s1; got s0 = 5, s1 = 4"):
        jd.ct_num_scales(0, 10, 5, 4)
    with pytest.raises(ValueError, match=r"mu0 must lie in \(0, 1\); got 1.0"):
        jd.ct_target_decay(5, mu0=1.0)
    with pytest.raises(ValueError, match="num_scales"):
        jd.ct_target_decay(1)


def test_a_curriculum_trains_in_stages_with_its_target_decays():
    """Two stages of consistency training through ``train``, each with its own loss and target
    decay: the state carries on (step, target), and each stage's target is the mu-average of the
    online parameters of that stage's steps."""
    import optax

    from jaxdiff.train import init_train_state, make_train_step

    net = jd.Field(lambda p, x, t: p["w"] * x + 0.0 * t[..., None], "x0")

    def fn(p, x, t):
        c_skip, c_out = jd.consistency_scalings(t, kind="euler")
        return c_skip[..., None] * x + c_out[..., None] * net.apply(p, x, t)

    cm = jd.Field(fn, "x0")
    opt = optax.sgd(0.1)
    state = init_train_state({"w": jnp.array(0.5)}, opt, jax.random.key(0), target_ema=True)
    data = lambda key: jax.random.normal(key, (64, 2))  # noqa: E731
    stages = jd.curriculum_stages(lambda k: jd.ct_num_scales(k, 6, 2, 4), 6)
    assert [end for _, end in stages][-1] == 6 and len(stages) >= 2
    for n, end in stages:
        mu = jd.ct_target_decay(n)
        step = make_train_step(jd.consistency_training_loss(cm, jd.linear_path(), num_scales=n),
                               opt, ema_targets=True, target_decay=mu)  # fmt: skip
        before = float(state.target["w"])
        online = []
        for _ in range(end - int(state.step)):
            state, _ = jax.jit(step)(state, data(jax.random.fold_in(jax.random.key(1), state.step)))
            online.append(float(state.params["w"]))
        expected = before
        for w in online:
            expected = mu * expected + (1 - mu) * w
        assert int(state.step) == end
        assert float(state.target["w"]) == pytest.approx(expected, rel=1e-6)
    assert float(state.target["w"]) != pytest.approx(float(state.params["w"]), rel=1e-3)


def test_a_curriculum_takes_a_traced_step_and_equals_its_schedule_at_every_step():
    K = 1_000
    for sched in (
        lambda k: jd.ct_num_scales(k, K, 2, 30),
        lambda k: jd.ict_num_scales(k, K, 4, 64),
    ):
        c = jd.curriculum(sched, K)
        assert c.stages == jd.curriculum_stages(sched, K)
        got = jax.jit(jax.vmap(c))(jnp.arange(K + 50))  # past the end: the last stage's value
        assert got.dtype == jnp.int32
        np.testing.assert_array_equal(got, [sched(min(k, K - 1)) for k in range(K + 50)])
    mu = jd.curriculum(lambda k: jd.ct_target_decay(jd.ct_num_scales(k, K)), K)
    got = jax.jit(jax.vmap(mu))(jnp.arange(K))
    want = [jd.ct_target_decay(jd.ct_num_scales(k, K)) for k in range(K)]
    assert got.dtype == jnp.float32 and len(mu.stages) == 146  # 150 sizes, 4 skipped at K = 1000
    np.testing.assert_array_equal(got, np.float32(want))
    with pytest.raises(TypeError, match="real numbers; got False"):
        jd.curriculum(lambda k: k > 2, 5)
    with pytest.raises(TypeError, match="real numbers; got 'a'"):
        jd.curriculum(lambda k: "a", 5)
    with pytest.raises(TypeError, match="integer step; got dtype float32"):
        mu(1.0)
    # short, for the messages that name it (the values' repr ran to 3,700 characters)
    assert repr(mu).startswith("Curriculum(146 stages to step 1000, values 0.81..0.99")
    direct = jd.Curriculum((np.int64(2), 3), (5, 9))  # NumPy numbers become Python ones
    assert direct.values == (2, 3) and direct(jnp.int32(9)).dtype == jnp.int32
    for values, ends in (((2, 3), (5,)), ((2,), (0,)), ((2, 3), (5, 5)), ((), ())):
        with pytest.raises(ValueError, match="one value per stage and increasing positive"):
            jd.Curriculum(values, ends)


def _linear_cm(t_min=0.0):
    net = jd.Field(lambda p, x, t: p["w"] * x + p["b"] * t[..., None], "x0")

    def fn(p, x, t):
        c_skip, c_out = jd.consistency_scalings(t, kind="euler", t_min=t_min)
        return c_skip[..., None] * x + c_out[..., None] * net.apply(p, x, t)

    return jd.Field(fn, "x0")


@pytest.mark.parametrize("lognormal", [None, (-1.1, 2.0)])
def test_one_compiled_step_follows_a_curriculum_as_its_stages_do(lognormal):
    """``num_scales`` and ``target_decay`` as curricula of the step: one program trains what a
    loop over the stages (one loss and one compile each) trains, draw for draw (iCT's log-normal
    intervals too: drawn by the inverse CDF, the same for a padded grid)."""
    import optax

    from jaxdiff.train import init_train_state, make_train_chunk, make_train_step, train

    cm, opt, K = _linear_cm(), optax.sgd(0.1), 40
    data = lambda key: MU + S * jax.random.normal(key, (64, 2))  # noqa: E731
    sched = lambda k: jd.ct_num_scales(k, K, 2, 5)  # noqa: E731
    p0 = {"w": jnp.array(0.5), "b": jnp.array(0.1)}
    staged = init_train_state(p0, opt, jax.random.key(0), target_ema=True)  # train donates it
    stages = jd.curriculum_stages(sched, K)
    assert len(stages) == 5  # 2 to 6 points
    for n, end in stages:
        step = make_train_step(jd.consistency_training_loss(cm, PATH, num_scales=n,
                                                            lognormal=lognormal), opt,
                               ema_targets=True, target_decay=jd.ct_target_decay(n))  # fmt: skip
        staged, _ = train(
            staged, lambda c, s=step: make_train_chunk(s, data, c), end, progress=False
        )
    n = jd.curriculum(sched, K)
    loss = jd.consistency_training_loss(cm, PATH, num_scales=n, lognormal=lognormal)
    mu = jd.curriculum(lambda k: jd.ct_target_decay(sched(k)), K)
    step = make_train_step(loss, opt, ema_targets=True, target_decay=mu)
    one = init_train_state(p0, opt, jax.random.key(0), target_ema=True)
    one, _ = train(one, lambda c: make_train_chunk(step, data, c), K, progress=False)
    assert int(one.step) == K
    for a, b in zip(jax.tree.leaves((staged.params, staged.target, staged.ema)),
                    jax.tree.leaves((one.params, one.target, one.ema)), strict=True):  # fmt: skip
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert abs(float(one.params["w"]) - 0.5) > 0.05  # it trained
    # the loss at step k is the fixed grid's of N(k) points, the same key drawing the same pairs
    x0, key = data(jax.random.key(3)), jax.random.key(4)
    for k in (0, 5, 39, 1_000):
        fixed = jd.consistency_training_loss(cm, PATH, num_scales=sched(min(k, K - 1)),
                                             lognormal=lognormal)  # fmt: skip
        np.testing.assert_allclose(jax.jit(loss)(one.params, key, x0, step=jnp.int32(k)),
                                   fixed(one.params, key, x0), rtol=1e-6)  # fmt: skip
    with pytest.raises(TypeError, match="step"):  # the step is required
        loss(one.params, key, x0)
    # a curriculum on a grid denser near the data (rho = 3 from t_min = 0.002): the same
    cm3 = _linear_cm(0.002)
    grid = dict(t_min=0.002, rho=3.0, lognormal=lognormal)
    loss3 = jd.consistency_training_loss(cm3, PATH, num_scales=n, **grid)
    for k in (7, 39):
        fixed = jd.consistency_training_loss(cm3, PATH, num_scales=sched(k), **grid)
        np.testing.assert_allclose(jax.jit(loss3)(one.params, key, x0, step=jnp.int32(k)),
                                   fixed(one.params, key, x0), rtol=1e-6)  # fmt: skip
    with pytest.raises(ValueError, match="rho must be finite and > 0"):
        jd.consistency_training_loss(cm3, PATH, num_scales=lambda k: 3, rho=-1.0)


def test_lognormal_intervals_are_ict_s_discretised_log_normal():
    """iCT (Song & Dhariwal 2024, sec. 3.5): p(n) proportional to erf((log s_{n+1} - P_mean) /
    (sqrt 2 P_std)) - erf((log s_n - P_mean) / (sqrt 2 P_std)), s = sigma / alpha = t / (1 - t)
    on the linear path; by hand in float64 against 20,000 draws (uniform would be 0.1 each)."""
    import math

    from jaxdiff.consistency import _draw_intervals, _lognormal_table

    ts = jd.consistency_grid(11)
    with np.errstate(divide="ignore"):
        level = np.log(np.float64(ts) / (1 - np.float64(ts)))
    cdf = [0.5 * math.erfc(-(v + 1.1) / (2.0 * math.sqrt(2.0))) for v in level]
    p = np.diff(cdf)  # 0.29 at the first interval, 0.05 at the last
    n = 20_000
    cum = _lognormal_table(PATH, [np.asarray(ts)], 11, (-1.1, 2.0))[0]
    idx = np.asarray(_draw_intervals(jax.random.key(0), n, cum))
    freq = np.bincount(idx, minlength=10) / n
    np.testing.assert_allclose(freq, p, atol=5 * np.sqrt(p * (1 - p) / n).max())  # 5 SE: 0.016
    # a row padded to more intervals (a curriculum's table) draws the same intervals
    padded = _lognormal_table(PATH, [np.asarray(ts)], 20, (-1.1, 2.0))[0]
    np.testing.assert_array_equal(_draw_intervals(jax.random.key(0), n, padded), idx)
    # all the mass below the grid (0.1 .. 1, P_mean -3.5, P_std 0.2): the first interval, not
    # the last (a float32 Phi rounded to 1 everywhere, and the draws went to the noisiest end)
    far = np.asarray(jd.consistency_grid(17, 0.1, 1.0))
    for law, end in (((-3.5, 0.2), 0), ((-300.0, 1.0), 0), ((300.0, 1.0), 15)):
        drawn = _draw_intervals(jax.random.key(0), 1000, _lognormal_table(PATH, [far], 17, law)[0])
        np.testing.assert_array_equal(drawn, end)
    # all the mass in the interval (0.5, 0.6), log-level 0.2: the loss is that 2-point grid's
    # (the network's boundary at 0.5, where the 2-point grid's loss checks it)
    cm, x0 = _linear_cm(0.5), MU + S * jax.random.normal(jax.random.key(1), (64, 2))
    p0 = {"w": jnp.array(0.5), "b": jnp.array(0.1)}
    peaked = jd.consistency_training_loss(cm, PATH, num_scales=11, lognormal=(0.2, 1e-3))
    two = jd.consistency_training_loss(cm, PATH, ts=jnp.array([0.5, 0.6]))
    np.testing.assert_allclose(peaked(p0, jax.random.key(2), x0), two(p0, jax.random.key(2), x0),
                               rtol=1e-6)  # fmt: skip
    for bad in ((0.0, 0.0), (float("nan"), 1.0), (-1.1, -2.0)):
        with pytest.raises(ValueError, match=r"lognormal must be \(P_mean, P_std\)"):
            jd.consistency_training_loss(cm, lognormal=bad)
    for bad in ((1.0,), "iCT", "12", (True, True)):  # the type checker first, where it runs
        with pytest.raises((TypeError, ValueError), match="lognormal"):
            jd.consistency_training_loss(cm, lognormal=bad)
    with pytest.raises(ValueError, match="grid of known sizes"):
        jd.consistency_training_loss(cm, num_scales=lambda k: 4, lognormal=(-1.1, 2.0))


def test_a_curriculum_is_checked_where_it_is_built_or_where_it_runs():
    import optax

    from jaxdiff.train import init_train_state, make_train_step

    cm = _linear_cm()
    with pytest.raises(ValueError, match="num_scales must be an integer >= 2"):
        jd.consistency_training_loss(cm, num_scales=jd.curriculum(lambda k: 1 + k, 4))
    with pytest.raises(ValueError, match="not both"):
        jd.consistency_training_loss(
            cm, num_scales=jd.curriculum(lambda k: 4, 4), ts=jnp.array([0.0, 1.0])
        )
    eps_teacher = jd.Field(lambda x, t: x, "eps")  # no velocity where alpha_t = 0 (t = 1)
    with pytest.raises(ValueError, match="teacher"):
        jd.consistency_distillation_loss(cm, eps_teacher, PATH, solver="euler",
                                         num_scales=jd.curriculum(lambda k: 3 + k, 3))  # fmt: skip
    with pytest.raises(ValueError, match=r"target_decay must lie in \[0, 1\)"):
        make_train_step(lambda p, k, b, target_params=None: 0.0, optax.sgd(0.1), ema_targets=True,
                        target_decay=jd.curriculum(lambda k: 0.9 + 0.1 * k, 2))  # fmt: skip
    x0, key = MU + jnp.zeros((8, 2)), jax.random.key(0)
    p = {"w": jnp.array(0.5), "b": jnp.array(0.1)}
    own = jd.consistency_training_loss(cm, num_scales=lambda k: 4 - k)  # a function of our own
    assert np.isfinite(float(jax.jit(own)(p, key, x0, step=jnp.int32(2))))  # 2 points: one gap
    with pytest.raises(Exception, match=r"num_scales\(step\) must be >= 2"):
        jax.jit(own)(p, key, x0, step=jnp.int32(3)).block_until_ready()
    for bad in (lambda k: 3.5, lambda k: jnp.array([3, 4])):  # a float N made a wrong grid
        with pytest.raises(TypeError, match="num_scales\\(step\\) must be an integer scalar"):
            jd.consistency_training_loss(cm, num_scales=bad)(p, key, x0, step=jnp.int32(0))
    with pytest.raises(ValueError, match="every time of every grid of the curriculum"):
        jd.consistency_distillation_loss(cm, eps_teacher, PATH, num_scales=lambda k: 4 + k)
    opt = optax.sgd(0.1)
    loss = jd.consistency_training_loss(cm)
    state = init_train_state(p, opt, key, target_ema=True)
    for bad, what in ((lambda k: jnp.full(2, 0.5), "be a scalar"), (lambda k: jnp.nan, "lie in")):
        with pytest.raises(ValueError, match=f"target_decay\\(step\\) must {what}"):
            make_train_step(loss, opt, ema_targets=True, target_decay=bad)(state, x0)
    step = jax.jit(make_train_step(loss, opt, ema_targets=True, target_decay=lambda k: 0.5 + k))
    state = init_train_state(p, opt, key, target_ema=True)
    state, _ = step(state, x0)  # 0.5 at step 0
    with pytest.raises(Exception, match=r"target_decay\(step\) must lie in \[0, 1\)"):
        step(state, x0)[1].block_until_ready()  # 1.5 at step 1


def test_bad_arguments_raise_clear_errors():
    f = jd.Field(lambda p, x, t: x, "x0")
    with pytest.raises(ValueError, match="target 'x0'"):
        jd.consistency_training_loss(jd.Field(lambda p, x, t: x, "eps"))
    with pytest.raises((TypeError, ValueError), match="solver"):  # Literal: the type checker first
        jd.consistency_distillation_loss(f, jd.Field(lambda x, t: x, "velocity"), solver="rk4")
    with pytest.raises((TypeError, ValueError), match="kind"):
        jd.consistency_function(lambda p, x, t: x, kind="karras")
    with pytest.raises(ValueError, match="num_scales"):
        jd.consistency_training_loss(f, num_scales=1)
    for bad in (0.0, -0.5, float("nan")):  # a NaN sigma_data gave NaN outputs at every t
        with pytest.raises(ValueError, match="sigma_data must be"):
            jd.consistency_function(lambda p, x, t: x, sigma_data=bad)
    with pytest.raises(ValueError, match="t_min must be >= 0"):
        jd.consistency_scalings(0.5, t_min=-0.1)
    with pytest.raises(ValueError, match="strictly increasing"):
        jd.consistency_training_loss(f, ts=jnp.array([0.0, 0.5, 0.4]))
    with pytest.raises(ValueError, match="target 'x0'"):
        jd.sample(jax.random.key(0), PATH, jd.Field(lambda x, t: x, "velocity"), (4, 2),
                  sampler=jd.samplers.consistency())  # fmt: skip


def test_bfloat16_and_integer_data_keep_the_grid_in_float32():
    # The grid was cast to x0's dtype: in bfloat16 736 of the 1280 intervals of iCT's final grid
    # collapse to 0, and the 1 / (t_{n+1} - t_n) weight made the loss NaN (float32: 0.4934).
    # Integer data raised jax.random.normal's dtype error.
    net = jd.Field(lambda p, x, t: exact_f(x, t), "x0")
    x0 = MU + S * jax.random.normal(jax.random.key(0), (256, 2))
    loss = jd.consistency_training_loss(net, PATH, num_scales=1281)
    assert np.isfinite(float(loss(None, jax.random.key(1), x0.astype(jnp.bfloat16))))
    small = jd.consistency_training_loss(net, PATH, num_scales=16)
    ref = float(small(None, jax.random.key(1), x0))
    np.testing.assert_allclose(float(small(None, jax.random.key(1), x0.astype(jnp.bfloat16))),
                               ref, rtol=0.1)  # fmt: skip
    xi = jnp.round(x0).astype(jnp.int32)
    np.testing.assert_allclose(float(small(None, jax.random.key(1), xi)),
                               float(small(None, jax.random.key(1), xi.astype(jnp.float32))),
                               rtol=1e-6)  # fmt: skip


def test_bad_grid_and_huber_hyperparameters_raise():
    for rho in (0.0, -1.0, float("nan")):  # ZeroDivisionError, or a NaN grid for NaN
        with pytest.raises(ValueError, match="rho must be"):
            jd.consistency_grid(5, 0.0, 1.0, rho)
    f = jd.Field(lambda p, x, t: x, "x0")
    for c in (-1.0, float("nan")):  # -1 shifted the loss by 2 per example, NaN made it NaN
        with pytest.raises(ValueError, match="huber_c must be"):
            jd.consistency_training_loss(f, huber_c=c)
    with pytest.raises(ValueError, match="s0 must be a positive integer"):  # ZeroDivisionError
        jd.ict_num_scales(0, 1000, s0=0)
    with pytest.raises(ValueError, match="s0 <= s1"):  # math domain error
        jd.ict_num_scales(0, 1000, s0=20, s1=10)


def test_huber_c_zero_has_a_finite_gradient_at_an_exact_match():
    # c = 0 is the L2 distance |d|: its sqrt at d = 0 gave a NaN gradient (inf * 0) for the batch
    def fn(p, x, t):  # both times give the same output where x0 = 0 (the first half): d = 0
        return p * jnp.where(jnp.abs(x) > 10, x, 0.0)

    net = jd.Field(fn, "x0")
    x0 = jnp.concatenate([jnp.zeros((32, 2)), jnp.full((32, 2), 100.0)])
    grads = []
    for c in (0.0, 1e-9):  # the pseudo-Huber gradient is 0 at d = 0 for any c > 0
        loss = jd.consistency_training_loss(net, PATH, num_scales=8, huber_c=c)
        grads.append(float(jax.grad(loss)(1.0, jax.random.key(0), x0)))
    assert np.isfinite(grads[0]) and abs(grads[0]) > 0.1, grads
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-6)


def test_consistency_t_min_must_be_below_one():
    for bad in (1.0, 1.5):  # t_min >= 1 was accepted: no time left to sample over
        with pytest.raises(ValueError, match="expected t_min < 1"):
            jd.consistency_scalings(0.5, t_min=bad)
        with pytest.raises(ValueError, match="expected t_min < 1"):
            jd.consistency_function(lambda p, x, t: x, t_min=bad)


def test_a_network_without_the_boundary_condition_is_refused():
    """A raw network bound as "x0" (jd.consistency_function forgotten) trained silently: with
    jaxdiff's MLP, whose last layer starts at zero, the loss and its gradient were exactly 0 at
    every step. The loss now checks f(x, ts[0]) = x on the pairs of the first interval, under jit
    and in both losses; the wrapped network passes, and so does the exact function."""
    from jaxdiff.nets import MLP, init_params

    model = MLP(width=16, depth=1)
    params = init_params(model, jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros(1))
    x0 = jd.GaussianMixture.isotropic(MU, std=S).sample(jax.random.key(1), 256)
    oracle = jd.GaussianMixture.isotropic(MU, std=S).field(PATH, "velocity")
    raw, wrapped = jd.Field(model.apply, "x0"), jd.Field(jd.consistency_function(model.apply), "x0")
    for make in (
        lambda net: jd.consistency_training_loss(net, PATH),
        lambda net: jd.consistency_distillation_loss(net, oracle, PATH),
    ):
        with pytest.raises(Exception, match="needs f.x, ts.0.. = x"):
            jax.block_until_ready(jax.jit(make(raw))(params, jax.random.key(2), x0))
        value, grads = jax.jit(jax.value_and_grad(make(wrapped)))(params, jax.random.key(2), x0)
        assert float(value) > 0 and np.isfinite(float(value))
    exact = jd.Field(lambda p, x, t: exact_f(x, t), "x0")
    assert np.isfinite(
        float(jd.consistency_training_loss(exact, PATH)(None, jax.random.key(3), x0))
    )


@pytest.mark.parametrize("lognormal", [None, (-1.1, 2.0)])
def test_ict_weighting_divides_by_the_gap_in_noise_level(lognormal):
    """``weighting="inverse_sigma_gap"``: iCT's ``1 / (s_{n+1} - s_n)``, ``s = sigma_t / alpha_t``.
    On a VE path ``sigma_t = 80 t`` it is CT's ``1 / (t_{n+1} - t_n)`` over 80, pair by pair (the
    same key draws the same pairs); on the linear path with one interval ``[0, 0.9]``, the unit
    weighting's loss over ``s(0.9) = 9``. Refused where ``alpha_t = 0`` on the grid (``t = 1``
    on the linear path, an infinite level), when built or, for a traced grid, when it runs."""
    ve80 = jd.GaussianPath(jd.paths.Affine(1.0, 0.0), jd.paths.Affine(0.0, 80.0))
    cm, p = _linear_cm(), {"w": jnp.array(0.7), "b": jnp.array(0.2)}
    x0, key = MU + S * jax.random.normal(jax.random.key(0), (256, 2)), jax.random.key(1)

    def loss(path, weighting, **kw):
        kw = {"lognormal": lognormal, **kw}
        return jd.consistency_training_loss(cm, path, weighting=weighting, **kw)(p, key, x0)

    for kw in ({"num_scales": 12}, {"num_scales": 12, "t_max": 0.5, "rho": 3.0}):
        ict, ct = loss(ve80, "inverse_sigma_gap", **kw), loss(ve80, "inverse_gap", **kw)
        np.testing.assert_allclose(ict, ct / 80.0, rtol=1e-5)
    one = {"num_scales": 2, "t_max": 0.9}  # s(0) = 0, s(0.9) = 0.9 / 0.1
    unit = loss(PATH, "unit", **one)
    np.testing.assert_allclose(loss(PATH, "inverse_sigma_gap", **one), unit / 9.0, rtol=1e-5)
    np.testing.assert_allclose(loss(PATH, "inverse_gap", **one), unit / 0.9, rtol=1e-5)
    with pytest.raises(ValueError, match="sigma_t / alpha_t = inf at t = 1"):
        loss(PATH, "inverse_sigma_gap", num_scales=8)
    n = jd.curriculum(lambda k: jd.ict_num_scales(k, 100, 2, 8), 100)  # every grid ends at t_max
    with pytest.raises(ValueError, match="take t_max < 1"):
        jd.consistency_training_loss(cm, PATH, num_scales=n, weighting="inverse_sigma_gap")
    # CT's 150 grids of 2 to 151 points on [0, 0.99]: each one's levels increase, though their
    # union holds equal float32 levels at times an ulp apart (a first version refused it)
    ct = jd.Curriculum(tuple(range(2, 152)), tuple(range(1, 151)))
    ict = jd.consistency_training_loss(cm, PATH, num_scales=ct, t_max=0.99, lognormal=lognormal,
                                       weighting="inverse_sigma_gap")  # fmt: skip
    fixed = {"num_scales": 36, "t_max": 0.99}
    np.testing.assert_allclose(ict(p, key, x0, step=jnp.int32(34)),
                               loss(PATH, "inverse_sigma_gap", **fixed), rtol=1e-6)  # fmt: skip
    if lognormal is None:  # a traced grid: checked when the program runs
        traced = jax.jit(lambda ts: jd.consistency_training_loss(
            cm, PATH, ts=ts, weighting="inverse_sigma_gap")(p, key, x0))  # fmt: skip
        ts = jnp.linspace(0.0, 0.9, 6)
        np.testing.assert_allclose(traced(ts), loss(PATH, "inverse_sigma_gap", ts=ts), rtol=1e-6)
        with pytest.raises(Exception, match="take t_max < 1"):
            traced(jnp.linspace(0.0, 1.0, 6))
