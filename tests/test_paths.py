"""Gaussian paths: schedules, their derivatives, SDE coefficients, conditional fields, validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd

PATHS = {
    "vp": lambda: jd.vp_path(0.1, 20.0),
    "subvp": lambda: jd.subvp_path(0.1, 20.0),
    "ve": lambda: jd.ve_path(0.01, 50.0),
    "linear": lambda: jd.linear_path(),
    "linear_smin": lambda: jd.linear_path(1e-3),
    "cosine": lambda: jd.cosine_path(),
    "trig": lambda: jd.GaussianPath(
        lambda t: jnp.cos(0.5 * jnp.pi * t), lambda t: jnp.sin(0.5 * jnp.pi * t)
    ),
}
T_INNER = np.linspace(0.05, 0.95, 19)


@pytest.mark.parametrize("name", PATHS)
def test_derivatives_match_finite_differences(name, x64):
    path = PATHS[name]()
    t = jnp.asarray(T_INNER)
    h = 1e-6
    for fn, dfn in [(path.alpha, path.d_alpha), (path.sigma, path.d_sigma)]:
        fd = (fn(t + h) - fn(t - h)) / (2 * h)  # central differences: error O(h^2) + O(eps/h)
        np.testing.assert_allclose(dfn(t), fd, rtol=1e-6, atol=1e-7)
    # d log(alpha)/dt and g^2 = d(sigma^2)/dt - 2 f sigma^2 from the same finite differences
    fd_log_alpha = (jnp.log(path.alpha(t + h)) - jnp.log(path.alpha(t - h))) / (2 * h)
    np.testing.assert_allclose(path.drift_coef(t), fd_log_alpha, rtol=1e-6, atol=1e-7)
    fd_var = (path.sigma_sq(t + h) - path.sigma_sq(t - h)) / (2 * h)
    g2 = fd_var - 2 * fd_log_alpha * path.sigma_sq(t)
    np.testing.assert_allclose(path.diffusion_sq(t), g2, rtol=1e-6, atol=1e-6)


def test_sde_coefficients_match_song_et_al(x64):
    """The path-derived f, g^2 equal the closed forms of score_sde's VP, sub-VP and VE SDEs."""
    t = jnp.asarray(T_INNER)
    beta = 0.1 + t * (20.0 - 0.1)
    integral = 0.1 * t + 0.5 * t**2 * (20.0 - 0.1)
    np.testing.assert_allclose(jd.vp_path().drift_coef(t), -0.5 * beta, rtol=1e-12)
    np.testing.assert_allclose(jd.vp_path().diffusion_sq(t), beta, rtol=1e-12)
    np.testing.assert_allclose(
        jd.subvp_path().diffusion_sq(t), beta * (1 - jnp.exp(-2 * integral)), rtol=1e-10
    )
    sigma = 0.01 * (50.0 / 0.01) ** t
    np.testing.assert_allclose(jd.ve_path().drift_coef(t), 0.0, atol=1e-14)
    np.testing.assert_allclose(
        jd.ve_path().diffusion_sq(t), sigma**2 * 2 * np.log(50.0 / 0.01), rtol=1e-10
    )
    np.testing.assert_allclose(jd.linear_path().diffusion_sq(t), 2 * t / (1 - t), rtol=1e-10)
    # VP at t = 0: sigma' is infinite but g^2 = beta_min stays finite (no 0 * inf)
    assert float(jd.vp_path().diffusion_sq(0.0)) == pytest.approx(0.1)
    assert float(jd.cosine_path().diffusion_sq(0.0)) > 0


@pytest.mark.parametrize("name", ["vp", "subvp", "ve", "linear", "cosine"])
def test_marginal_variance_obeys_the_sde(name, x64):
    """d Var/dt = 2 f Var + g^2 for Var = sigma_t^2 + alpha_t^2 v0: the SDE's moment equation."""
    path = PATHS[name]()
    t = jnp.asarray(T_INNER)
    v0 = 0.7

    def var(t):
        return path.sigma_sq(t) + path.alpha(t) ** 2 * v0

    dvar = jax.jvp(var, (t,), (jnp.ones_like(t),))[1]
    np.testing.assert_allclose(
        dvar, 2 * path.drift_coef(t) * var(t) + path.diffusion_sq(t), rtol=1e-9, atol=1e-9
    )


def test_constant_schedule_functions_broadcast(x64):
    path = jd.GaussianPath(lambda t: 1.0, lambda t: 0.01 * (50.0 / 0.01) ** t)
    t = jnp.asarray(T_INNER)
    np.testing.assert_allclose(path.diffusion_sq(t), jd.ve_path().diffusion_sq(t), rtol=1e-10)
    assert path.d_alpha(t).shape == t.shape and float(jnp.abs(path.d_alpha(t)).max()) == 0.0


def test_custom_two_line_path_equals_cosine_with_s0(x64):
    trig, cos0 = PATHS["trig"](), jd.cosine_path(0.0)
    t = jnp.asarray(T_INNER)
    for method in ["alpha", "sigma", "d_alpha", "d_sigma", "diffusion_sq", "log_snr"]:
        # atol: log_snr crosses 0 at t = 1/2 (cosine's sine form gives 3e-16 there, trig's 0)
        np.testing.assert_allclose(
            getattr(trig, method)(t), getattr(cos0, method)(t), rtol=1e-10, atol=1e-14
        )


@pytest.mark.parametrize("name", PATHS)
def test_t_from_log_snr_inverts_log_snr(name, x64):
    path = PATHS[name]()
    t = jnp.asarray(T_INNER)
    np.testing.assert_allclose(path.t_from_log_snr(path.log_snr(t)), t, atol=1e-10)


def test_conditional_velocity_is_the_time_derivative_of_the_path(x64):
    path = jd.vp_path()
    k1, k2 = jax.random.split(jax.random.key(0))
    x0 = jax.random.normal(k1, (5, 3))
    eps = jax.random.normal(k2, (5, 3))
    t = jnp.linspace(0.1, 0.9, 5)  # per-sample times
    xt, dxt = jax.jvp(lambda t: path.interpolate(x0, eps, t), (t,), (jnp.ones_like(t),))
    np.testing.assert_allclose(path.conditional_velocity(xt, x0, t), dxt, rtol=1e-10)
    score = jax.vmap(jax.grad(lambda x, m, s: jax.scipy.stats.norm.logpdf(x, m, s).sum()))(
        xt, path.alpha(t)[:, None] * x0, jnp.broadcast_to(path.sigma(t)[:, None], xt.shape)
    )
    np.testing.assert_allclose(path.conditional_score(xt, x0, t), score, rtol=1e-10)


def test_sample_returns_the_noise_it_used():
    path = jd.linear_path()
    x0 = jnp.arange(6.0).reshape(3, 2)
    xt, eps = path.sample(jax.random.key(1), x0, jnp.array([0.0, 0.5, 1.0]))
    np.testing.assert_allclose(xt, path.interpolate(x0, eps, jnp.array([0.0, 0.5, 1.0])))
    np.testing.assert_allclose(xt[0], x0[0])  # t = 0 is data
    np.testing.assert_allclose(xt[2], eps[2])  # t = 1 is the prior
    mean, std = path.marginal(x0, 0.25)
    np.testing.assert_allclose(mean, 0.75 * x0)
    assert float(std) == pytest.approx(0.25)


@pytest.mark.parametrize("name", ["vp", "subvp", "linear", "cosine"])
def test_transition_from_zero_is_the_path_when_sigma0_is_zero(name, x64):
    path = PATHS[name]()
    x0 = jnp.array([[1.0, -2.0]])
    mean, std = path.transition(x0, 0.0, 0.6)
    np.testing.assert_allclose(mean, path.alpha(0.6) * x0, rtol=1e-12)
    assert float(std) == pytest.approx(float(path.sigma(0.6)), rel=1e-10)


def test_ve_transition_subtracts_sigma_min(x64):
    path = jd.ve_path(0.01, 50.0)
    _, std = path.transition(jnp.zeros(1), 0.0, 0.5)
    assert float(std) ** 2 == pytest.approx(float(path.sigma_sq(0.5)) - 0.01**2, rel=1e-12)


def test_prior(x64):
    path = jd.ve_path(0.01, 50.0)
    x = path.prior_sample(jax.random.key(0), (20000, 2))
    assert float(x.std()) == pytest.approx(50.0, rel=0.02)  # std error 0.5%
    ref = jax.scipy.stats.norm.logpdf(x[:3], 0.0, 50.0).sum(-1)
    np.testing.assert_allclose(path.prior_logp(x[:3]), ref, rtol=1e-12)


def test_paths_are_pytrees_with_differentiable_hyperparameters(x64):
    def sigma_at_half(beta_max):
        return jd.vp_path(0.1, beta_max).sigma(0.5)

    h = 1e-5
    fd = (sigma_at_half(20.0 + h) - sigma_at_half(20.0 - h)) / (2 * h)
    assert float(jax.grad(sigma_at_half)(20.0)) == pytest.approx(float(fd), rel=1e-6)
    f = jax.jit(lambda path, t: path.alpha(t))
    assert float(f(jd.vp_path(0.1, 20.0), 0.5)) == pytest.approx(float(jd.vp_path().alpha(0.5)))
    assert float(f(jd.vp_path(0.1, 10.0), 0.5)) > float(jd.vp_path().alpha(0.5))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: jd.vp_path(beta_min=1.0, beta_max=0.5), "beta_min <= beta_max"),
        (lambda: jd.vp_path(beta_min=-0.1), "beta_min must be >= 0"),
        (lambda: jd.subvp_path(beta_min=2.0, beta_max=1.0), "beta_min <= beta_max"),
        (lambda: jd.ve_path(sigma_min=0.0), "sigma_min must be > 0"),
        (lambda: jd.ve_path(sigma_min=1.0, sigma_max=0.5), "sigma_min < sigma_max"),
        (lambda: jd.linear_path(sigma_min=1.0), "sigma_min < 1"),
        (lambda: jd.cosine_path(s=-0.1), "s must be >= 0"),
        (lambda: jd.vp_path(beta_min=float("nan")), "must be finite"),
        (lambda: jd.GaussianPath(lambda t: 1 - t, lambda t: t - 0.5), "sigma"),
        (lambda: jd.GaussianPath(lambda t: 1 - 2 * t, lambda t: t), "alpha"),
        (lambda: jd.GaussianPath(lambda t: jnp.ones(2), lambda t: t), "alpha_fn must map times"),
    ],
)
def test_invalid_schedules_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_times_raise():
    path = jd.vp_path()
    with pytest.raises(ValueError, match=r"t must lie in \[0.0, 1.0\]"):
        path.sample(jax.random.key(0), jnp.zeros((2, 2)), 1.5)
    with pytest.raises(ValueError, match="prefix of x's shape"):
        path.interpolate(jnp.zeros((4, 2)), jnp.zeros((4, 2)), jnp.ones(3) * 0.5)
    traced = jax.jit(lambda t: path.sample(jax.random.key(0), jnp.zeros((2,)), t)[0])
    with pytest.raises(Exception, match=r"t must lie in \[0.0, 1.0\]"):
        traced(-0.5).block_until_ready()


# Each hyperparameter check fires eagerly (ValueError) and under jit (error_if tied to the leaves
# the path stores, so any use of the path keeps it): (build-and-use, bad value, message).
TRACED_CHECKS = {
    "vp order": (lambda b: jd.vp_path(b, 1.0).alpha(0.5), 20.0, "beta_min <= beta_max"),
    "vp negative": (lambda b: jd.vp_path(b, 20.0).sigma(0.5), -0.1, "beta_min must be"),
    "vp nan": (lambda b: jd.vp_path(0.1, b).alpha(0.5), float("nan"), "beta_max must be finite"),
    "subvp order": (lambda b: jd.subvp_path(0.1, b).sigma(0.5), 0.05, "beta_min <= beta_max"),
    "ve negative": (lambda s: jd.ve_path(s, 50.0).sigma(0.5), -1.0, "sigma_min must be"),
    "ve order": (lambda s: jd.ve_path(1.0, s).sigma(0.5), 0.5, "sigma_min < sigma_max"),
    "linear": (lambda s: jd.linear_path(s).sigma(0.5), 1.5, "sigma_min < 1"),
    "cosine": (lambda s: jd.cosine_path(s).alpha(0.5), -0.1, "s must be"),
    "nan t": (
        lambda t: jd.vp_path().sample(jax.random.key(0), jnp.zeros(2), t)[0],
        float("nan"),
        r"t must lie in \[0.0, 1.0\]",
    ),
}


@pytest.mark.parametrize("case", TRACED_CHECKS)
def test_checks_fire_eagerly_and_under_jit(case):
    fn, bad, match = TRACED_CHECKS[case]
    with pytest.raises(ValueError, match=match):
        fn(bad)
    with pytest.raises(Exception, match=match):
        jax.block_until_ready(jax.jit(fn)(bad))


def test_hyperparameter_checks_are_paid_once_not_per_call():
    """A path built outside jit adds no check to alpha(t); one built inside adds one per check."""
    path = jd.vp_path()
    hot = str(jax.make_jaxpr(lambda t: path.sigma(t) * path.alpha(t) * path.d_sigma(t))(0.5))
    assert "cond[" not in hot and "callback" not in hot
    inside = str(jax.make_jaxpr(lambda b: jd.vp_path(b, 20.0).sigma(0.5))(0.1))
    assert inside.count("cond[") == 2  # beta_min >= 0 and beta_min <= beta_max, at construction
    good = jax.jit(lambda b: jd.vp_path(0.1, b).alpha(0.5))(20.0)
    assert float(good) == pytest.approx(float(path.alpha(0.5)), rel=1e-6)
