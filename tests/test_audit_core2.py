"""The stop-42 review of the core math (``/work/audit/review42_core.md``, C1-C12). Each test
failed on the code before its fix."""

import diffrax
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

import jaxdiff as jd

S = jd.samplers


@pytest.mark.parametrize(
    "predictor",
    [S.euler_maruyama_predictor, S.reverse_diffusion_predictor, S.ancestral_predictor],
    ids=["em", "reverse_diffusion", "ancestral"],
)
def test_pc_predictors_take_one_time_per_sample(predictor):
    # C1: coefficients shaped like t multiplied x (B, D) without expand_like: with B = D = 3 the
    # values were wrong by up to 0.54, silently, and x of shape (4, 1) came back (4, 4)
    path = jd.vp_path()
    x, x0, eps = (jax.random.normal(jax.random.key(i), (3, 3)) for i in range(3))
    t, s = jnp.array([0.9, 0.5, 0.3]), jnp.array([0.8, 0.4, 0.2])
    key = jax.random.key(7)
    # with the noise fixed at z = 1 (the same for every row), per-sample times equal row-by-row
    # scalar times: the mean and the noise's scale
    ones = lambda k, v: jnp.ones_like(v)  # noqa: E731
    import jaxdiff.samplers.langevin as lang

    saved = lang.normal
    lang.normal = ones
    try:
        out = predictor(key, path, x, t, s, x0, eps)
        rows = [predictor(key, path, x[i : i + 1], t[i], s[i], x0[i : i + 1], eps[i : i + 1])
                for i in range(3)]  # fmt: skip
        np.testing.assert_allclose(out, jnp.concatenate(rows), rtol=1e-5, atol=1e-6)
        narrow = predictor(key, path, x[:, :1], t, s, x0[:, :1], eps[:, :1])
        assert narrow.shape == (3, 1)
    finally:
        lang.normal = saved


def test_prior_logp_takes_one_time_per_sample_and_refuses_sigma_zero():
    # C2: a per-sample t was broadcast along the wrong axis; t = 0 gave NaN
    path = jd.vp_path()
    x = jax.random.normal(jax.random.key(0), (2, 2, 4))
    t = jnp.array([0.2, 0.9])
    out = path.prior_logp(x, 1, t)
    rows = jnp.stack([path.prior_logp(x[i], 1, t[i]) for i in range(2)])
    np.testing.assert_allclose(out, rows, rtol=1e-6)
    with pytest.raises(ValueError, match="prior_logp needs sigma_t > 0"):
        path.prior_logp(jnp.ones((1, 3)), t=0.0)
    with pytest.raises(ValueError, match="expected a scalar or the batch's"):
        path.prior_logp(jnp.ones((2, 3)), t=jnp.ones(3))


def test_a_path_whose_log_snr_rises_is_refused():
    # C3: g^2 = -sigma^2 d(lambda)/dt < 0 was read as 0: no forward SDE, silently
    with pytest.raises(ValueError, match="log-SNR .* must not rise with t"):
        jd.GaussianPath(lambda t: jnp.ones_like(t), lambda t: 1 - 0.5 * t)
    for path in (jd.vp_path(), jd.subvp_path(), jd.ve_path(), jd.cosine_path(), jd.linear_path()):
        assert bool(jnp.all(path.diffusion_sq(jnp.linspace(0.01, 0.99, 9)) >= 0))


def test_interpolant_and_bridge_checks():
    # C4: d_a, d_b, d_gamma and conditional_velocity took a known t = 1.5, and the bridge's
    # velocity at t = 0 was inf; C5: a traced sigma went unchecked
    bridge = jd.brownian_bridge(0.5)
    x = jnp.ones((1, 2))
    for fn in (bridge.d_a, bridge.d_b, bridge.d_gamma):
        with pytest.raises(ValueError, match="t must lie in"):
            fn(1.5)
    with pytest.raises(ValueError, match="gamma_t', which is not finite at t = \\[0.0\\]"):
        bridge.conditional_velocity(x, x, x, 0.0)
    assert bool(jnp.all(jnp.isfinite(bridge.conditional_velocity(x, x, x, jnp.array([0.3])))))
    # and a traced t at an end, when the program runs (they returned inf and NaN under jit)
    x3 = jnp.ones((3, 2))

    @jax.jit
    def both(t):
        return bridge.conditional_velocity(x3, x3, x3, t), bridge.conditional_score(x3, x3, x3, t)

    velocity, score = both(jnp.array([0.2, 0.5, 0.7]))
    assert bool(jnp.all(jnp.isfinite(velocity)) & jnp.all(jnp.isfinite(score)))
    for t in (0.0, 1.0):  # the velocity's check fires first
        with pytest.raises(Exception, match="gamma_t', which is not finite; take t inside"):
            jax.block_until_ready(both(jnp.array([0.2, t, 0.7])))
    score_only = jax.jit(lambda t: bridge.conditional_score(x3, x3, x3, t))
    with pytest.raises(Exception, match="divides by gamma_t\\^2, which is 0 or so small"):
        jax.block_until_ready(score_only(jnp.array([0.2, 0.5, 1.0])))
    far = jnp.full((3, 2), 1e3)  # gamma_t^2 ~ 1e-36 is not 0, but the score overflows
    for call in (jax.jit(bridge.conditional_score), bridge.conditional_score):
        with pytest.raises(Exception, match="so small that the score overflows"):
            jax.block_until_ready(call(far, x3 * 0, x3 * 0, jnp.array([0.5, 4e-36, 0.5])))
    with pytest.raises(Exception, match="sigma must be finite and >= 0"):
        jax.block_until_ready(jax.jit(lambda s: jd.brownian_bridge(s).gamma(0.5))(-1.0))


def test_small_numeric_holes():
    # C6: sqrt's slope at g^2 = 0 (sub-VP at t = 0) made the gradient NaN
    grad = jax.grad(lambda b: jd.subvp_path(0.1, b).diffusion(0.0))(20.0)
    assert float(grad) == 0.0
    # C8: a negative beta gave abar > 1 (a negative variance)
    with pytest.raises(ValueError, match=r"betas must lie in \[0, 1\]"):
        jd.alpha_bars(jnp.array([0.1, -0.5]))
    # C9: var_weight 1.5 gave inf where the posterior variance is 0
    path = jd.discrete_path(jd.linear_betas(10))
    with pytest.raises(ValueError, match=r"var_weight must lie in \[0, 1\]"):
        jd.reverse_mean_var(path, jnp.ones((1, 2)), jnp.ones((1, 2)), 0.5, 0.0, var_weight=1.5)
    # C12: n_steps 2.7 ran 2 steps
    jaxtyping.config.update("jaxtyping_disable", True)  # the tests' type hook refuses it first
    try:
        with pytest.raises(ValueError, match="steps must be an integer >= 0; got 2.7"):
            jd.langevin(
                jax.random.key(0), lambda x: -x, jnp.zeros((2, 1)), step_size=0.1, steps=2.7
            )
    finally:
        jaxtyping.config.update("jaxtyping_disable", False)


def test_rescale_zero_terminal_snr_without_cancellation():
    # C7: 1 - abar_i / abar_{i-1} lost ~3 digits in float32: beta_1 = 1.0014e-4 for 1e-4 (max
    # relative error 1.4e-3 on linear betas, 2.1e-3 on cosine); Lin et al.'s rescale keeps beta_1
    def reference(b):  # diffusers' algorithm, in float64
        root = np.sqrt(np.cumprod(1.0 - np.asarray(b, np.float64)))
        root = (root - root[-1]) * root[0] / (root[0] - root[-1])
        abar = root**2
        return 1.0 - np.concatenate([abar[:1], abar[1:] / abar[:-1]])

    for betas in (jd.linear_betas(1000), jd.cosine_betas(1000)):
        out = np.asarray(jd.rescale_zero_terminal_snr(betas))
        assert out.dtype == np.float32
        assert out[0] == np.asarray(betas)[0] and out[-1] == 1.0
        np.testing.assert_allclose(out, reference(betas), rtol=5e-6)  # measured 5.3e-7


def test_t_from_log_snr_returns_the_ends_exactly():
    # C10: a log-SNR at or beyond lambda(0) gave 4.3e-19, not 0 (VE: lambda(0) is finite)
    path = jd.ve_path(0.01, 50.0)
    lam = jnp.array([jnp.inf, 1e3, path.log_snr(0.0), path.log_snr(1.0), -1e3, -jnp.inf])
    assert path.t_from_log_snr(lam).tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert abs(float(path.t_from_log_snr(path.log_snr(0.25))) - 0.25) < 1e-6


def test_adaptive_save_ts_in_any_order_and_range_checked():
    # C11: integrating 1 -> 0, save_ts = [0.5, 0.9] failed in the adaptive engine with diffrax's
    # "saveat.ts must be increasing or decreasing" (the fixed grid took it); [2.0] failed at run
    # time in the integration variable
    kwargs = dict(solver=diffrax.Tsit5(), rtol=1e-7, atol=1e-9)
    for save in ([0.5, 0.9], [0.9, 0.5], [0.2]):
        sol = jd.integrate(lambda x, t: -x, jnp.ones(2), t_start=1.0, t_end=0.0, steps=10,
                           save_ts=jnp.array(save), **kwargs)  # fmt: skip
        assert sol.ts.tolist() == pytest.approx(save)
        np.testing.assert_allclose(sol.xs[:, 0], np.exp(1.0 - np.array(save)), rtol=1e-5)
    with pytest.raises(ValueError, match=r"save_ts must lie between t_start and t_end; got \[2"):
        jd.integrate(
            lambda x, t: -x, jnp.ones(2), t_start=1.0, t_end=0.0, save_ts=jnp.array([2.0]), **kwargs
        )
    run = jax.jit(lambda s: jd.integrate(lambda x, t: -x, jnp.ones(2), t_start=1.0, t_end=0.0,
                                         save_ts=s, **kwargs).xs)  # fmt: skip
    with pytest.raises(Exception, match="save_ts must lie between t_start and t_end"):
        jax.block_until_ready(run(jnp.array([0.3, 1.7])))


def test_c12_messages_and_checks():
    # C12: the messages named no hyperparameter; a traced negative eta gave a negative noise
    # scale (-3.17) and reverse_drift read it as eta = 1; bfloat16 ts rounded the increments
    with pytest.raises(ValueError, match="sigma_max must be finite"):
        jd.ve_path(0.01, float("inf"))
    with pytest.raises(ValueError, match="beta_max must be finite"):
        jd.vp_path(0.1, float("inf"))
    with pytest.raises(ValueError, match=r"<= 0 from t = \[0.8.*\] \(float32 underflow\?\)"):
        jd.vp_path(0.1, 500.0)
    with pytest.raises(ValueError, match=r"alpha\(t\) must be finite on \[0, 1\]; .* t = \[0.5\]"):
        jd.GaussianPath(lambda t: 1.0 / (0.5 - t), lambda t: t)
    path = jd.vp_path()
    field = jd.Field(lambda x, t: jnp.zeros_like(x), "eps")
    noise = jax.jit(lambda e: jd.reverse_diffusion(path, 0.5, e))
    drift = jax.jit(lambda e: jd.reverse_drift(path, field, jnp.ones((1, 2)), 0.5, eta=e))
    assert float(noise(0.5)) == pytest.approx(0.5 * float(path.diffusion(0.5)))
    for fn in (noise, drift):
        with pytest.raises(Exception, match=r"eta must lie in \[0, inf\)"):
            jax.block_until_ready(fn(-1.0))
    ts = jnp.array([0.0, 0.1, 0.3, 0.7], jnp.bfloat16)
    w = jd.brownian_motion(jax.random.key(0), ts, (3,))
    assert w.dtype == jnp.float32
    wide = jd.brownian_motion(jax.random.key(0), ts.astype(jnp.float32), (3,))
    np.testing.assert_array_equal(w, wide)
