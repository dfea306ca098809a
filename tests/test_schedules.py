"""DDPM beta schedules and sampling time grids."""

import jax
import jax.numpy as jnp
import mpmath as mp
import numpy as np
import pytest

import jaxdiff as jd


def test_linear_betas_and_alpha_bars(x64):
    betas = jd.linear_betas(1000)
    assert betas.shape == (1000,)
    assert float(betas[0]) == pytest.approx(1e-4) and float(betas[-1]) == pytest.approx(0.02)
    abar = jd.alpha_bars(betas)
    np.testing.assert_allclose(abar, np.cumprod(1 - np.asarray(betas)), rtol=1e-10)
    # DDPM's 1000 linear betas are the VP path with (0.1, 20): log abar_i ~ 2 log alpha(i / T),
    # up to the sum of beta^2/2 that log(1 - beta) adds (0.7% at i = T)
    i = np.array([100, 400, 700, 1000])
    np.testing.assert_allclose(
        jnp.log(abar[i - 1]), 2 * jnp.log(jd.vp_path().alpha(i / 1000)), rtol=0.01
    )


def test_cosine_betas_follow_the_cosine_alpha_bar(x64):
    s = 0.008
    betas = jd.cosine_betas(1000, s=s)
    abar = jd.alpha_bars(betas)
    u = np.arange(1, 1001) / 1000
    f = np.cos(0.5 * np.pi * (u + s) / (1 + s)) ** 2 / np.cos(0.5 * np.pi * s / (1 + s)) ** 2
    np.testing.assert_allclose(abar[:900], f[:900], rtol=1e-9)  # before the 0.999 clip acts
    assert float(betas.max()) == pytest.approx(0.999)
    np.testing.assert_allclose(abar[:900], jd.cosine_path(s).alpha(u[:900]) ** 2, rtol=1e-9)


@pytest.mark.parametrize("make", [jd.linear_betas, jd.cosine_betas])
def test_beta_schedule_errors(make):
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        make(0)


def test_beta_range_errors():
    with pytest.raises(ValueError, match="beta_start <= beta_end"):
        jd.linear_betas(10, 0.02, 0.01)
    with pytest.raises(ValueError, match="beta_end < 1"):
        jd.linear_betas(10, 0.1, 1.5)


def test_uniform_and_quadratic_grids(x64):
    g = jd.uniform_grid(10)
    assert g.shape == (11,) and float(g[0]) == 1.0 and float(g[-1]) == pytest.approx(1e-3)
    np.testing.assert_allclose(jnp.diff(g), -(1 - 1e-3) / 10, rtol=1e-12)
    q = jd.quadratic_grid(10, 1.0, 0.0)
    np.testing.assert_allclose(q, (np.arange(10, -1, -1) / 10) ** 2, atol=1e-12)
    with pytest.raises(ValueError, match="t_end must lie in"):
        jd.uniform_grid(10, 1.0, -0.5)


@pytest.mark.parametrize("path", [jd.vp_path(), jd.ve_path(), jd.linear_path(), jd.cosine_path()])
def test_log_snr_grid_is_uniform_in_log_snr(path, x64):
    g = jd.log_snr_grid(path, 20, 0.9, 1e-3)
    assert float(g[0]) == 0.9 and float(g[-1]) == 1e-3
    assert bool(jnp.all(jnp.diff(g) < 0))
    lam = path.log_snr(g)
    np.testing.assert_allclose(jnp.diff(lam), (lam[-1] - lam[0]) / 20, rtol=1e-6)


def test_karras_grid_matches_edm_formula_on_ve(x64):
    """On VE, sigma_t / alpha_t = sigma_t: the grid's sigmas are EDM's eq. 5, at step counts on
    both sides of the padded lengths the grids are computed on (16, 32), eagerly and traced."""
    path, rho = jd.ve_path(0.002, 80.0), 7.0
    smax, smin = 80.0, 0.002
    traced = jax.jit(
        lambda t_end, n: jd.karras_grid(path, n, 1.0, t_end, rho=rho), static_argnums=1
    )
    for n in (1, 2, 14, 15, 16, 18, 31, 40):
        g = jd.karras_grid(path, n, 1.0, 0.0, rho=rho)
        i = np.arange(n + 1)
        edm = (smax ** (1 / rho) + i / n * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
        np.testing.assert_allclose(path.sigma(g), edm, rtol=1e-8)
        np.testing.assert_allclose(traced(0.0, n), g, rtol=1e-13)  # XLA fuses it otherwise


def test_karras_grid_to_sigma_zero_ends_as_edm_s_does():
    """``t_end = 0`` where ``sigma = 0`` (VP, linear): the grid is EDM's, ``s`` down to
    ``sigma_min = 0.002`` and then 0 (spaced down to ``s = 0`` its last points crowded at ~1e-19,
    repeated, and every gradient in the path's parameters was NaN)."""
    for path in (jd.vp_path(), jd.linear_path()):
        g = jd.karras_grid(path, 10, 1.0, 0.0)
        s = path.sigma(g[:-1]) / path.alpha(g[:-1])
        assert float(g[-1]) == 0.0 and bool(jnp.all(jnp.diff(g) < 0))
        np.testing.assert_allclose(s[-1], 0.002, rtol=1e-5)
    grad = jax.grad(lambda b: jd.karras_grid(jd.vp_path(0.1, b), 10, 1.0, 0.0)[5])(20.0)
    assert np.isfinite(float(grad)) and float(grad) != 0.0


def test_karras_grid_on_vp_and_linear_is_monotone_and_pinned(x64):
    for path in (jd.vp_path(), jd.linear_path()):
        g = jd.karras_grid(path, 10)
        assert float(g[0]) == 1.0 and float(g[-1]) == 1e-3
        assert bool(jnp.all(jnp.diff(g) < 0))


def test_cosine_betas_are_accurate_in_float32():
    """Against mpmath (40 digits): within 4e-7 relative (measured 3.3e-7); 1 - ratio gave 2.3e-3."""
    mp.mp.dps = 40
    steps, s = 1000, mp.mpf("0.008")

    def f(u):
        return mp.cos(mp.pi / 2 * (u + s) / (1 + s)) ** 2

    ref = [min(1 - f(mp.mpf(i) / steps) / f(mp.mpf(i - 1) / steps), 0.999) for i in range(1, 1001)]
    np.testing.assert_allclose(jd.cosine_betas(steps), np.array(ref, float), rtol=4e-7)


# Eagerly a ValueError, under jit an error_if tied to the returned array: (fn, bad value, message).
TRACED_CHECKS = {
    "linear beta_end > 1": (lambda b: jd.linear_betas(10, 1e-4, b), 1.5, "beta_end < 1"),
    "linear order": (lambda b: jd.linear_betas(10, b, 0.02), 0.05, "beta_start <= beta_end"),
    "cosine max_beta > 1": (lambda m: jd.cosine_betas(10, max_beta=m), 1.5, "max_beta <= 1"),
    "cosine s < 0": (lambda s: jd.cosine_betas(10, s=s), -0.1, "s must be"),
    "alpha_bars": (lambda b: jd.alpha_bars(jnp.array([0.1, 1.0]) * b), 1.5, "betas must"),
    "discrete_path": (
        lambda b: jd.discrete_path(jnp.array([0.1, 0.5]) * b).alpha(0.5),
        3.0,
        "betas must",
    ),
    "uniform t_start": (lambda t: jd.uniform_grid(4, t), 1.5, "t_start must lie in"),
    "uniform t_end": (lambda t: jd.uniform_grid(4, 1.0, t), -0.5, "t_end must lie in"),
    "uniform nan": (lambda t: jd.uniform_grid(4, 1.0, t), float("nan"), "t_end must lie in"),
    "quadratic": (lambda t: jd.quadratic_grid(4, 1.0, t), -0.5, "t_end must lie in"),
    "log_snr": (lambda t: jd.log_snr_grid(jd.vp_path(), 4, t), 1.5, "t_start must lie in"),
    "karras": (lambda t: jd.karras_grid(jd.ve_path(), 4, 1.0, t), -0.5, "t_end must lie in"),
    "karras rho": (lambda r: jd.karras_grid(jd.ve_path(), 4, rho=r), -1.0, "rho must be"),
    "uniform order": (lambda t: jd.uniform_grid(4, t, 0.5), 0.2, "t_end < t_start"),
    "quadratic equal": (lambda t: jd.quadratic_grid(4, t, 0.5), 0.5, "t_end < t_start"),
    "log_snr order": (lambda t: jd.log_snr_grid(jd.vp_path(), 4, t, 0.5), 0.2, "t_end < t_start"),
    "karras order": (lambda t: jd.karras_grid(jd.ve_path(), 4, 0.5, t), 0.7, "t_end < t_start"),
}


@pytest.mark.parametrize("case", TRACED_CHECKS)
def test_checks_fire_eagerly_and_under_jit(case):
    fn, bad, match = TRACED_CHECKS[case]
    with pytest.raises(ValueError, match=match):
        fn(bad)
    with pytest.raises(Exception, match=match):
        jax.block_until_ready(jax.jit(fn)(bad))


def test_traced_grids_equal_eager_grids():
    for fn in [jd.uniform_grid, jd.quadratic_grid]:
        traced = jax.jit(lambda t, fn=fn: fn(5, 0.9, t))
        np.testing.assert_allclose(traced(0.01), fn(5, 0.9, 0.01))
    np.testing.assert_allclose(
        jax.jit(lambda b: jd.linear_betas(10, 1e-4, b))(0.02), jd.linear_betas(10), rtol=1e-6
    )


@pytest.mark.parametrize("path", [jd.vp_path(), jd.linear_path(), jd.cosine_path()])
def test_a_log_snr_grid_may_end_at_zero(path):
    """lambda(0) = inf: the grid keeps 0 as its last point and spaces the others up to EDM's
    sigma_min (lambda = -2 log 0.002); it gave NaN (lo + 0 * inf), and samplers rejected it."""
    ts = jd.log_snr_grid(path, 6, t_end=0.0)
    assert float(ts[0]) == 1.0 and float(ts[-1]) == 0.0 and bool(jnp.all(jnp.diff(ts) < 0))
    lam = path.log_snr(ts[1:-1])
    np.testing.assert_allclose(float(lam[-1]), -2 * np.log(0.002), rtol=1e-4)
    if bool(jnp.isfinite(path.log_snr(1.0))):  # uniform in lambda between the two ends
        np.testing.assert_allclose(
            jnp.diff(path.log_snr(ts[:-1])), (lam[-1] - path.log_snr(1.0)) / 5, rtol=2e-3
        )
    np.testing.assert_allclose(
        jax.jit(lambda t: jd.log_snr_grid(path, 6, 1.0, t))(0.0), ts, rtol=1e-6
    )
    mix = jd.GaussianMixture.isotropic(jnp.zeros((1, 2)), std=1.0)
    sampler = jd.samplers.dpm_solver_pp(2)
    x = jd.sample(
        jax.random.key(0),
        path,
        mix.field(path, "x0"),
        (256, 2),
        sampler=sampler,
        steps=6,
        t_end=0.0,
        denoise=False,
    ).x
    assert bool(jnp.all(jnp.isfinite(x))) and 0.7 < float(jnp.std(x)) < 1.3
