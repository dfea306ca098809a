"""Forward SDEs simulated against their kernels, Euler-Maruyama on OU, the reverse family,
Langevin dynamics and Brownian motion."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd
from tests.test_oracles import POINTS, TIMES, mixture
from tests.test_paths import PATHS


@pytest.mark.parametrize(
    "name, s, t", [("vp", 0.0, 0.7), ("subvp", 0.0, 0.7), ("ve", 0.0, 0.7), ("linear", 0.0, 0.6),
                   ("cosine", 0.1, 0.8)],
)  # fmt: skip
def test_transition_kernel_matches_forward_euler_maruyama(name, s, t):
    """Simulate dx = f x dt + g dw from x_s = 1.5 with 500 EM steps and 50k paths."""
    path = PATHS[name]()
    n, x_s = 50_000, 1.5

    @jax.jit
    def simulate(key):
        x = jnp.full((n, 1), x_s)
        return jd.integrate(
            path.drift, x, t_start=s, t_end=t, steps=500, key=key,
            diffusion=lambda x, t: path.diffusion(t),
        ).x  # fmt: skip

    x = simulate(jax.random.key(0))
    mean, std = path.transition(jnp.array([x_s]), s, t)
    # Monte-Carlo standard errors: std/sqrt(n) for the mean (0.45% of std), sqrt(2/n) = 0.63% of
    # the variance. EM's bias at 500 steps is below 0.5%. Bounds: 2% of std, 4% of variance.
    assert float(x.mean()) == pytest.approx(float(mean[0]), abs=0.02 * float(std))
    assert float(x.var()) == pytest.approx(float(std) ** 2, rel=0.04)


def test_euler_maruyama_on_ornstein_uhlenbeck_has_weak_order_one():
    """dx = -theta x dt + s dw, x_0 = 1: E x_T = exp(-theta T), Var = s^2 (1 - e^{-2 theta T})/(2 theta)."""
    theta, s, T, n = 2.0, 0.5, 1.0, 200_000

    def solve(steps, key):
        x = jnp.ones((n,))
        return jd.integrate(
            lambda x, t: -theta * x, x, t_start=0.0, t_end=T, steps=steps, key=key,
            diffusion=lambda x, t: s,
        ).x  # fmt: skip

    exact_mean = np.exp(-theta * T)
    exact_var = s**2 * (1 - np.exp(-2 * theta * T)) / (2 * theta)
    fine = jax.jit(solve, static_argnums=0)(256, jax.random.key(0))
    # standard errors at n = 2e5: mean 5.6e-4, variance 3.5e-4; EM bias at 256 steps ~ 1e-3, 5e-4
    assert float(fine.mean()) == pytest.approx(exact_mean, abs=4e-3)
    assert float(fine.var()) == pytest.approx(exact_var, abs=3e-3)

    steps = [4, 8, 16, 32]  # errors 0.07 ... 0.008 >> MC error 6e-4
    errors = [
        abs(float(jax.jit(solve, static_argnums=0)(k, jax.random.key(k)).mean()) - exact_mean)
        for k in steps
    ]
    slope = np.polyfit(np.log(1.0 / np.array(steps)), np.log(errors), 1)[0]
    assert 0.7 <= slope <= 1.3, (errors, slope)  # weak order 1, within +-0.3


@pytest.mark.parametrize("name", ["vp", "ve", "linear"])
def test_reverse_family_keeps_the_marginals(name, x64):
    """For b = reverse_drift(eta), dp/dt = -div(b p) - eta^2 g^2 / 2 lap p equals the true dp/dt."""
    data, path = mixture(), PATHS[name]()

    def log_p(x, t):
        return data.marginal_log_prob(path, x, t)

    @jax.jit
    @jax.vmap
    def check(x, t):
        dlogp_dt = jax.jvp(lambda t: log_p(x, t), (t,), (jnp.ones_like(t),))[1]
        s = jax.grad(log_p)(x, t)
        lap_logp = jnp.trace(jax.hessian(log_p)(x, t))
        g2 = path.diffusion_sq(t)
        out = []
        for eta, target in [(0.0, "x0"), (0.5, "velocity"), (1.0, "eps"), (2.0, "score")]:

            def drift(x, eta=eta, target=target):  # one sample: a batch of 1 for the field
                field = data.field(path, target)
                return jd.reverse_drift(path, field, x[None], t, eta=eta)[0]

            b = drift(x)
            div_b = jnp.trace(jax.jacfwd(drift)(x))
            rhs = -div_b - b @ s - 0.5 * eta**2 * g2 * (lap_logp + s @ s)
            out.append(rhs - dlogp_dt)
        return jnp.stack(out)

    residual = check(jnp.asarray(POINTS), jnp.asarray(TIMES))
    np.testing.assert_allclose(residual, 0.0, atol=1e-8)


def test_reverse_drift_is_score_sde_formula(x64):
    """eta = 1: f x - g^2 score (Anderson); eta = 0: f x - g^2 score / 2; noise eta g."""
    data, path = mixture(), jd.vp_path()
    x, t = jnp.asarray(POINTS), 0.4
    score = data.score(path, x, t)
    field = data.field(path, "score")
    f, g2 = path.drift_coef(t), path.diffusion_sq(t)
    np.testing.assert_allclose(
        jd.reverse_drift(path, field, x, t, eta=1.0), f * x - g2 * score, rtol=1e-10
    )
    np.testing.assert_allclose(
        jd.probability_flow_drift(path, field, x, t), f * x - 0.5 * g2 * score, rtol=1e-10
    )
    assert float(jd.reverse_diffusion(path, t, 0.5)) == pytest.approx(0.5 * float(jnp.sqrt(g2)))
    # eta as a function of t: eta(t)^2 / 2 g^2 of extra score, at each sample's own time
    ts = jnp.array([0.2, 0.4, 0.6, 0.8])
    eta = lambda t: 3.0 * t  # noqa: E731
    expected = f_at(path, ts)[:, None] * x - (1 + eta(ts)[:, None] ** 2) / 2 * (
        path.diffusion_sq(ts)[:, None] * data.score(path, x, ts)
    )
    np.testing.assert_allclose(jd.reverse_drift(path, field, x, ts, eta=eta), expected, rtol=1e-10)
    np.testing.assert_allclose(
        jd.reverse_diffusion(path, ts, eta), eta(ts) * path.diffusion(ts), rtol=1e-12
    )


def f_at(path, t):
    return path.drift_coef(t)


def test_langevin_samples_a_gaussian():
    mean, cov = jnp.array([1.0, -2.0]), jnp.array([[1.0, 0.5], [0.5, 2.0]])
    prec = jnp.linalg.inv(cov)
    x = jd.langevin(
        jax.random.key(0), lambda x: -(x - mean[None]) @ prec, jnp.zeros((20000, 2)),
        step_size=0.02, steps=600,
    )  # fmt: skip
    # ULA's stationary covariance is biased by O(step): about 1% here; MC standard errors ~1%.
    np.testing.assert_allclose(x.mean(0), mean, atol=0.05)
    np.testing.assert_allclose(jnp.cov(x.T), cov, rtol=0.06, atol=0.04)
    with pytest.raises(ValueError, match="step_size must be > 0"):
        jd.langevin(jax.random.key(0), lambda x: -x, jnp.zeros(2), step_size=0.0, steps=5)


def test_the_reverse_family_checks_eta():
    path, field, x = jd.vp_path(), jd.Field(lambda x, t: x, "eps"), jnp.ones((2, 2))
    for eta in (-1.0, float("nan")):  # eta^2 hid a negative eta; NaN gave a NaN drift
        with pytest.raises(ValueError, match=r"eta must lie in \[0, inf\)"):
            jd.reverse_drift(path, field, x, 0.5, eta=eta)
        with pytest.raises(ValueError, match=r"eta must lie in \[0, inf\)"):
            jd.reverse_diffusion(path, 0.5, eta)


def test_brownian_motion_covariance_is_min_s_t():
    ts = jnp.array([0.1, 0.25, 0.5, 1.0])
    w = jd.brownian_motion(jax.random.key(0), ts, (50_000,))
    assert w.shape == (4, 50_000)
    cov = jnp.cov(w)
    np.testing.assert_allclose(cov, jnp.minimum(ts[:, None], ts[None, :]), atol=0.02)  # SE < 0.007
    np.testing.assert_allclose(jd.brownian_motion(jax.random.key(1), jnp.array([0.0, 1.0]))[0], 0.0)
    traced = jax.jit(lambda ts: jd.brownian_motion(jax.random.key(0), ts))
    for bad in ([0.5, 0.2], [0.0, jnp.nan], [-0.1, 0.5]):  # NaN used to pass, giving NaN paths
        with pytest.raises(ValueError, match="ts must be finite, non-decreasing and >= 0"):
            jd.brownian_motion(jax.random.key(0), jnp.array(bad))
        with pytest.raises(Exception, match="ts must be finite, non-decreasing and >= 0"):
            traced(jnp.array(bad)).block_until_ready()  # traced: when the program runs
    assert bool(jnp.all(jnp.isfinite(traced(ts))))


def test_fixed_grid_sde_engine_equals_a_hand_written_euler_maruyama_scan():
    """One key per step, split from ``key`` before the scan: the increments a hand scan draws."""
    ts = jnp.linspace(0.0, 1.0, 11)
    key = jax.random.key(3)
    sol = jd.integrate(lambda x, t: -x, jnp.ones((3,)), ts=ts, key=key,
                       diffusion=lambda x, t: 0.3)  # fmt: skip

    def body(x, inputs):
        t0, t1, k = inputs
        return x - (t1 - t0) * x + 0.3 * jnp.sqrt(t1 - t0) * jax.random.normal(k, x.shape), None

    keys = jax.random.split(key, 10)
    ref = jax.lax.scan(body, jnp.ones((3,)), (ts[:-1], ts[1:], keys))[0]
    np.testing.assert_allclose(sol.x, ref, rtol=1e-6)
    # backwards in time (t from 1 to 0) the same increments are used, in the order of the steps
    back = jd.integrate(lambda x, t: x, jnp.ones((3,)), ts=ts[::-1], key=key,
                        diffusion=lambda x, t: 0.3)  # fmt: skip
    np.testing.assert_allclose(back.x, ref, rtol=1e-6)


def test_the_reverse_drift_of_low_precision_data_is_finite():
    """On Song et al.'s CIFAR VE path (sigma_max 348) g^2 reaches 2.5e6, past float16's 65504:
    the drift is computed in float32 and returned in the data's dtype (it was all NaN)."""
    ve = jd.ve_path(0.01, 348.0)
    x = ve.sigma(0.99) * jax.random.normal(jax.random.key(0), (4, 3))
    x = x.astype(jnp.float16)  # the reference sees the same rounded input, in float32
    score = jd.Field(lambda x, t: -x.astype(jnp.float32) / ve.sigma_sq(0.99), "score")
    eps = jd.Field(lambda x, t: x.astype(jnp.float32) / ve.sigma(0.99), "eps")
    for field in (score, eps):
        ref = jd.reverse_drift(ve, field, x.astype(jnp.float32), 0.99)
        half = jd.reverse_drift(ve, field, x, 0.99)
        assert half.dtype == jnp.float16 and float(jnp.abs(ref).min()) > 10.0
        np.testing.assert_allclose(half.astype(jnp.float32), ref, rtol=2e-3)


def test_langevin_keeps_a_low_precision_state_and_prior_logp_checks_its_axes():
    """A float32 step size with a bfloat16 state broke the scan's carry; event_ndim > x.ndim
    gave a cryptic 'duplicate axis'."""
    x = jd.langevin(jax.random.key(0), lambda x: -x, jnp.zeros((8, 2), jnp.bfloat16),
                    step_size=jnp.float32(0.05), steps=10)  # fmt: skip
    assert x.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(x)))
    with pytest.raises(ValueError, match="event_ndim must lie in"):
        jd.vp_path().prior_logp(jnp.zeros((3, 2)), 3)


def test_the_reverse_sde_at_an_infinite_g_is_refused():
    """With eta > 0 at t = 1 on the linear path (alpha_1 = 0, g infinite) reverse_drift gave
    [[inf, inf], [nan, nan]] and reverse_diffusion inf, eagerly and under jit."""
    path = jd.linear_path()
    field = jd.Field(lambda x, t: -x, "velocity")
    x = jnp.array([[1.0, 2.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match=r"eta > 0 where g\(t\) is infinite.*got t = \[1.0\]"):
        jd.reverse_drift(path, field, x, 1.0)
    with pytest.raises(ValueError, match=r"eta > 0 where g\(t\) is infinite"):
        jd.reverse_diffusion(path, 1.0)
    with pytest.raises(Exception, match=r"eta > 0 where g\(t\) is infinite"):
        jax.block_until_ready(jax.jit(lambda t: jd.reverse_drift(path, field, x, t))(1.0))
    assert np.all(np.isfinite(jd.reverse_drift(path, field, x, 1.0, eta=0.0)))  # the ODE's
    assert np.isfinite(float(jd.reverse_diffusion(path, 0.999)))


def test_the_old_step_keywords_still_work_with_a_deprecation_warning():
    """nelbo(num_steps=) and langevin(n_steps=) are steps= now, as in sample, integrate and
    log_likelihood; the old names give the same result with a DeprecationWarning, both at once
    are an error, and langevin without a count names what it needs."""
    score = lambda x: -x  # noqa: E731
    x, key = jnp.zeros((8, 2)), jax.random.key(0)
    new = jd.langevin(key, score, x, step_size=0.1, steps=3)
    with pytest.warns(DeprecationWarning, match=r"langevin\(n_steps=\) is now langevin\(steps=\)"):
        old = jd.langevin(key, score, x, step_size=0.1, n_steps=3)
    np.testing.assert_array_equal(old, new)
    with pytest.raises(ValueError, match="give steps= .the new name of n_steps=., not both"):
        jd.langevin(key, score, x, step_size=0.1, steps=3, n_steps=3)
    with pytest.raises(TypeError, match="langevin needs steps="):
        jd.langevin(key, score, x, step_size=0.1)
    path = jd.vp_path()
    mix = jd.GaussianMixture.isotropic(jnp.array([[1.0, 0.0]]), std=0.5)
    data = mix.sample(jax.random.key(1), 8)
    new = jd.nelbo(key, path, mix.field(path, "eps"), data, steps=20).total
    with pytest.warns(DeprecationWarning, match=r"nelbo\(num_steps=\) is now nelbo\(steps=\)"):
        old = jd.nelbo(key, path, mix.field(path, "eps"), data, num_steps=20).total
    np.testing.assert_array_equal(old, new)
