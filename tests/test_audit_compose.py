"""Audit: composition with jax.grad through schedule parameters (paths built from traced numbers).

Each test failed on the code before the audit; the comments give the old numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd

S = jd.samplers
DATA = jd.GaussianMixture.isotropic(jnp.array([[2.0, 0.0], [-2.0, 0.0]]), std=0.5)


def _sample_sum(sampler, beta_max, steps=6):
    path = jd.vp_path(0.1, beta_max)
    field = DATA.field(path, "eps")
    sol = jd.sample(jax.random.key(0), path, field, (5, 2), sampler=sampler, steps=steps)
    return sol.x.sum()


def _central(fn, b, h):
    return (fn(b + h) - fn(b - h)) / (2 * h)


def test_t_from_log_snr_has_the_implicit_derivative():
    # old: bisection's derivative, 0.0 for every path (d t / d lambda and d t / d beta_max)
    path = jd.vp_path()
    t = jnp.array([0.1, 0.5, 0.9])
    lam = path.log_snr(t)
    got = jax.vmap(jax.grad(lambda v: path.t_from_log_snr(v)))(lam)
    want = 1.0 / jax.vmap(jax.grad(path.log_snr))(t)  # [-0.0496, -0.0916, -0.0555]
    np.testing.assert_allclose(got, want, rtol=1e-4)
    np.testing.assert_allclose(path.t_from_log_snr(lam), t, atol=1e-6)  # values unchanged

    def root(b):  # the time where log-SNR is 0 on vp_path(0.1, b)
        return jd.vp_path(0.1, b).t_from_log_snr(0.0)

    with jax.enable_x64(True):
        b = jnp.float64(20.0)
        np.testing.assert_allclose(jax.grad(root)(b), _central(root, b, 1e-4), rtol=1e-6)
        assert abs(float(jax.grad(root)(b))) > 1e-3  # old: 0.0 (true: -0.0124)


@pytest.mark.parametrize("sampler", [S.dpm_solver_pp(2), S.edm_heun()], ids=["dpm2", "edm"])
def test_sampler_gradient_through_a_log_snr_grid(x64, sampler):
    # their grids come from t_from_log_snr, whose derivative was 0: d/d beta_max of the sample's
    # sum was 0.1601 (dpm2, finite differences 0.1873) and -0.331 (edm_heun, f.d. 0.0100)
    b = jnp.float64(20.0)
    grad = jax.grad(lambda v: _sample_sum(sampler, v))(b)
    fd = _central(lambda v: _sample_sum(sampler, v), b, 1e-4)
    np.testing.assert_allclose(grad, fd, rtol=1e-4)


def test_schedule_gradients_are_finite_where_sigma_is_zero():
    # sigma_0 = sqrt(1 - alpha_0^2) = 0 whatever beta_max is: derivative 0, was NaN (sqrt's
    # infinite slope times 0), and so were log_snr(0)'s and the transition's std at s = t
    def grads(b):
        path = jd.vp_path(0.1, b)
        return (
            path.sigma(0.0),
            path.log_snr(jnp.array([0.0, 0.5]))[1],
            path.transition(jnp.ones((2, 3)), 0.3, 0.3)[1],
        )

    got = jax.jacobian(grads)(20.0)
    np.testing.assert_array_equal(got[0], 0.0)
    np.testing.assert_array_equal(got[2], 0.0)
    np.testing.assert_allclose(got[1], jax.grad(lambda b: jd.vp_path(0.1, b).log_snr(0.5))(20.0))


@pytest.mark.parametrize("sampler", [S.ddim(), S.ddim(0.5), S.ancestral()], ids=str)
def test_sampler_gradient_when_the_grid_ends_at_zero(sampler):
    # ddim and ancestral step to t = 0, where sigma = 0: d/d beta_max of the sample was NaN
    # (finite differences: 0.0118 ddim, 0.0063 ddim(0.5), -0.5126 ancestral)
    grad = jax.grad(lambda v: _sample_sum(sampler, v))(20.0)
    fd = _central(lambda v: _sample_sum(sampler, v), 20.0, 1e-2)
    assert np.isfinite(grad)
    np.testing.assert_allclose(grad, fd, rtol=2e-2, atol=1e-4)


def test_t_from_log_snr_is_constant_where_it_clamps():
    # a log-SNR below the path's range is clamped to t = 1 (EDM's churn relies on it): a constant,
    # whose derivative is 0; the implicit derivative gave 1 / lambda'(1) there (-0.0500 on VP)
    path = jd.vp_path()
    low = float(path.log_snr(1.0)) - 5.0
    assert float(path.t_from_log_snr(low)) == 1.0
    assert float(jax.grad(path.t_from_log_snr)(low)) == 0.0
    assert float(jax.grad(lambda b: jd.vp_path(0.1, b).t_from_log_snr(low))(20.0)) == 0.0
    inside = float(path.log_snr(0.7))  # inside the range: still 1 / lambda'(t)
    want = 1.0 / float(jax.grad(path.log_snr)(0.7))
    np.testing.assert_allclose(float(jax.grad(path.t_from_log_snr)(inside)), want, rtol=1e-4)
