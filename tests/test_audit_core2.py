"""The stop-42 review of the core math (``/work/audit/review42_core.md``, C1-C12). Each test
failed on the code before its fix."""

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
        with pytest.raises(ValueError, match="n_steps must be an integer >= 0; got 2.7"):
            jd.langevin(
                jax.random.key(0), lambda x: -x, jnp.zeros((2, 1)), step_size=0.1, n_steps=2.7
            )
    finally:
        jaxtyping.config.update("jaxtyping_disable", False)
