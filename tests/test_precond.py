"""EDM preconditioning on any Gaussian path: unit variances (closed form and Monte Carlo), EDM's
own coefficients on the VE path sigma = t, the loss it makes, and samplers on the wrapped field."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd

PATHS = {
    "vp": jd.vp_path(),
    "subvp": jd.subvp_path(),
    "ve": jd.ve_path(),
    "linear": jd.linear_path(),
    "cosine": jd.cosine_path(),
}
EDM_VE = jd.GaussianPath(lambda t: jnp.ones_like(t), lambda t: 80.0 * t)  # sigma = 80 t


def _f_target(path, t, x0, eps, s):
    c = jd.edm_scalings(path, t, s)
    x_t = path.interpolate(x0, eps, t)
    expand = lambda a: a.reshape(a.shape + (1,) * (x0.ndim - a.ndim))  # noqa: E731
    return (x0 - expand(c.c_skip) * x_t) / expand(c.c_out), expand(c.c_in) * x_t


@pytest.mark.parametrize("name", sorted(PATHS))
def test_target_and_input_have_unit_variance_closed_form(x64, name):
    path, t = PATHS[name], jnp.linspace(1e-3, 1 - 1e-3, 101)
    for s in (0.5, 1.0):
        _check_unit_variance(path, t, s)


def _check_unit_variance(path, t, s):
    c = jd.edm_scalings(path, t, s)
    a, var = path.alpha(t), path.sigma_sq(t)
    target_var = ((1 - a * c.c_skip) ** 2 * s**2 + c.c_skip**2 * var) / c.c_out**2
    np.testing.assert_allclose(target_var, 1.0, rtol=1e-9)
    np.testing.assert_allclose(c.c_in**2 * (a**2 * s**2 + var), 1.0, rtol=1e-12)
    # c_skip minimises the target's variance: the derivative in c_skip vanishes there
    grad = -2 * a * (1 - a * c.c_skip) * s**2 + 2 * c.c_skip * var
    np.testing.assert_allclose(grad / (a**2 * s**2 + var), 0.0, atol=1e-12)


@pytest.mark.parametrize("name", ["vp", "ve", "linear"])
def test_target_has_unit_variance_monte_carlo(name):
    # unit-variance data that is far from Gaussian (Rademacher); n = 2^16 per noise level: the
    # sample variance of a x0 + b eps (a^2 + b^2 = 1) has standard error <= sqrt(2 / n) = 0.0055,
    # the mean 1 / sqrt(n) = 0.004; tolerances are 4-5 standard errors
    path, n = PATHS[name], 2**16
    kx, ke = jax.random.split(jax.random.key(0))
    x0 = jax.random.rademacher(kx, (n, 1), jnp.float32)
    eps = jax.random.normal(ke, (n, 1))
    for t in (1e-3, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.999):
        target, x_in = _f_target(path, jnp.full(n, t), x0, eps, 1.0)
        assert abs(float(jnp.var(target)) - 1.0) < 0.025, (t, float(jnp.var(target)))
        assert abs(float(jnp.var(x_in)) - 1.0) < 0.025, (t, float(jnp.var(x_in)))
        assert abs(float(jnp.mean(target))) < 0.02


def test_equals_edm_on_the_ve_path_sigma_t(x64):
    s = 0.5
    t = jnp.linspace(0.002 / 80, 1.0, 50)  # EDM's sigma from 0.002 to 80
    sigma = 80.0 * t
    c = jd.edm_scalings(EDM_VE, t, s)
    np.testing.assert_allclose(c.c_skip, s**2 / (sigma**2 + s**2), rtol=1e-13)
    np.testing.assert_allclose(c.c_out, sigma * s / jnp.sqrt(sigma**2 + s**2), rtol=1e-13)
    np.testing.assert_allclose(c.c_in, 1 / jnp.sqrt(sigma**2 + s**2), rtol=1e-13)
    np.testing.assert_allclose(c.c_noise, jnp.log(sigma) / 4, rtol=1e-13)


def _raw(params, x, c_noise, *args):  # any smooth network F(c_in x, c_noise)
    w, b = params
    return jnp.tanh(x @ w + b * c_noise[:, None])


def test_any_path_is_edm_in_the_scaled_variable(x64):
    # D(x, t) on VP equals EDM's D(x / alpha; sigma / alpha) with the same raw network
    path, s = PATHS["vp"], 0.5
    params = (jax.random.normal(jax.random.key(0), (3, 3)), 0.7)
    x = jax.random.normal(jax.random.key(1), (64, 3))
    t = jnp.linspace(0.01, 1.0, 64)
    d = jd.edm_precond(_raw, path, sigma_data=s, params=params)(x, t)
    a, sig = path.alpha(t)[:, None], (path.sigma(t) / path.alpha(t))[:, None]
    x_edm = x / a
    f = _raw(params, x_edm / jnp.sqrt(sig**2 + s**2), jnp.log(sig[:, 0]) / 4)
    edm = s**2 / (sig**2 + s**2) * x_edm + sig * s / jnp.sqrt(sig**2 + s**2) * f
    np.testing.assert_allclose(d, edm, rtol=1e-12, atol=1e-12)


def test_field_has_the_raw_params_and_the_edm_loss_is_the_raw_networks_mse(x64):
    path, s = PATHS["cosine"], 0.5
    params = (jax.random.normal(jax.random.key(0), (4, 4)), 0.3)
    field = jd.edm_precond(jd.Field(_raw, "x0", params), path, sigma_data=s)
    assert field.target == "x0" and field.params is params
    assert field.bind((params[0], 0.0)).params[1] == 0.0
    x0 = 0.5 * jax.random.rademacher(jax.random.key(1), (512, 4), jnp.float64)
    key = jax.random.key(2)
    loss = jd.x0_loss(field, path, weighting=jd.edm_weight(s))(params, key, x0)
    # the same draws by hand: EDM's loss is |F(c_in x_t, c_noise) - (x0 - c_skip x_t) / c_out|^2
    t_key, eps_key, _ = jax.random.split(key, 3)
    t = jd.uniform_time()(t_key, (512,))
    eps = jax.random.normal(eps_key, x0.shape, x0.dtype)
    target, x_in = _f_target(path, t, x0, eps, s)
    f = _raw(params, x_in, jd.edm_noise(path, t))
    np.testing.assert_allclose(loss, jnp.mean((f - target) ** 2), rtol=1e-11)


def test_endpoints_stay_finite():
    # alpha = 0 (linear path, t = 1) and sigma = 0 (t = 0): D = s F and D = x, no NaN
    field = jd.edm_precond(_raw, PATHS["linear"], params=(jnp.eye(2), 1.0))
    x = jnp.ones((2, 2))
    out = field(x, jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(out[0], x[0], rtol=1e-6)
    f1 = _raw((jnp.eye(2), 1.0), x[1:], jnp.array([2.5]))
    np.testing.assert_allclose(out[1], 0.5 * f1[0], rtol=1e-6)


def test_samplers_take_the_wrapped_field():
    # a raw network that is the exact oracle seen through the scalings (noise_fn feeds t): the
    # wrapped field equals the oracle's x0, so samples agree with the oracle's own
    mix = jd.GaussianMixture.isotropic(jnp.array([[2.0, 0.0], [-2.0, 0.0]]), std=0.5)
    path, s = PATHS["vp"], 1.0
    oracle = mix.field(path, "x0")

    def raw(params, x_in, t):
        c = jd.edm_scalings(path, t, s)
        x = x_in / c.c_in[:, None]
        return (oracle(x, t) - c.c_skip[:, None] * x) / c.c_out[:, None]

    field = jd.edm_precond(raw, path, sigma_data=s, params=(), noise_fn=lambda p, t: t)
    x, t = 3 * jax.random.normal(jax.random.key(1), (64, 2)), jnp.linspace(1e-3, 1, 64)
    np.testing.assert_allclose(field(x, t), oracle(x, t), rtol=1e-4, atol=1e-4)

    @jax.jit
    def run(f):
        return jd.sample(
            jax.random.key(0), path, f, (256, 2), sampler=jd.samplers.ddim(), steps=6
        ).x

    np.testing.assert_allclose(run(field), run(oracle), atol=2e-4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="sigma_data"):
        jd.edm_precond(_raw, PATHS["vp"], sigma_data=0.0)
    with pytest.raises(ValueError, match="sigma_data"):
        jd.edm_scalings(PATHS["vp"], 0.5, -1.0)
    with pytest.raises(TypeError):  # beartype in the tests, our own message otherwise
        jd.edm_precond(3.0, PATHS["vp"])
