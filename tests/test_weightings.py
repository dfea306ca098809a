"""Loss weightings and time samplers against their closed forms, the unit conversions between
targets, and Kingma & Gao (2023)'s identity: every weighted loss is an integral over log-SNR of
the eps error, and a monotone weighting is a mixture of ELBOs of noisy data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import ndtr
from jax.scipy.stats import norm

import jaxdiff as jd

TRIG = jd.GaussianPath(lambda t: jnp.cos(jnp.pi * t / 2), lambda t: jnp.sin(jnp.pi * t / 2))


def _times():  # in float64 under the x64 fixture
    return jnp.linspace(0.02, 0.98, 49)


def _mixed_field(s_model):
    """The Bayes eps predictor for data N(0, s_model^2 I): wrong for other data (a real error)."""

    def fn(params, x, t):
        path = params
        a, sig = path.alpha(t)[:, None], path.sigma(t)[:, None]
        return sig * x / (a**2 * s_model**2 + sig**2)

    return fn


def _eps_error(path, t, s_data, s_model):
    """``E|eps_hat - eps|^2`` per dimension for x0 ~ N(0, s_data^2) and ``_mixed_field(s_model)``."""
    a, sig = path.alpha(t), path.sigma(t)
    k = sig / (a**2 * s_model**2 + sig**2)
    return k**2 * (a**2 * s_data**2 + sig**2) - 2 * k * sig + 1


@pytest.mark.parametrize("regress", ["eps", "x0", "v", "score", "velocity"])
def test_a_weight_is_the_same_objective_in_every_loss(x64, regress):
    # a Weight in x0 units gives the same loss value whatever target the loss regresses on
    path = jd.vp_path()
    field = jd.Field(_mixed_field(0.7), "eps", path)
    x0 = jax.random.normal(jax.random.key(0), (256, 3))
    key = jax.random.key(1)
    for w in (jd.min_snr_weight(5.0), jd.edm_weight(0.5), jd.v_weight(), jd.sigmoid_weight()):
        ref = jd.x0_loss(field, path, weighting=w)(path, key, x0)
        got = jd.diffusion_loss(field, path, regress=regress, weighting=w)(path, key, x0)
        np.testing.assert_allclose(got, ref, rtol=1e-10)


def test_eps_loss_with_w_equals_x0_loss_with_w_times_snr(x64):
    # plain functions are taken in the loss's own units: |x0 err|^2 = |eps err|^2 / SNR
    path = jd.cosine_path()
    field = jd.Field(_mixed_field(0.7), "eps", path)
    x0 = jax.random.normal(jax.random.key(0), (256, 3))
    w = lambda p, t: 1 + t**2  # noqa: E731
    eps = jd.eps_loss(field, path, weighting=w)(path, jax.random.key(1), x0)
    snr_w = lambda p, t: w(p, t) * jnp.exp(p.log_snr(t))  # noqa: E731
    x0_ = jd.x0_loss(field, path, weighting=snr_w)(path, jax.random.key(1), x0)
    np.testing.assert_allclose(eps, x0_, rtol=1e-10)


def test_closed_forms_of_the_weightings(x64):
    path, t = jd.vp_path(), _times()
    snr = jnp.exp(path.log_snr(t))
    w_as = lambda w, units: jd.weight_as(w, path, t, units)  # noqa: E731
    # Hang et al. 2023: min(SNR, gamma) on x0, min(1, gamma / SNR) on eps, min(SNR, g)/(SNR+1) on v
    ms = jd.min_snr_weight(5.0)
    np.testing.assert_allclose(w_as(ms, "x0"), jnp.minimum(snr, 5.0), rtol=1e-12)
    np.testing.assert_allclose(w_as(ms, "eps"), jnp.minimum(1.0, 5.0 / snr), rtol=1e-12)
    np.testing.assert_allclose(w_as(ms, "v"), jnp.minimum(snr, 5.0) / (snr + 1), rtol=1e-12)
    # v-prediction: SNR + 1 on x0 ("SNR+1 weighting"), 1 + 1/SNR on eps
    np.testing.assert_allclose(w_as(jd.v_weight(), "x0"), snr + 1, rtol=1e-12)
    np.testing.assert_allclose(w_as(jd.v_weight(), "eps"), 1 + 1 / snr, rtol=1e-12)
    # EDM: 1 / c_out^2
    c_out = jd.edm_scalings(path, t, 0.5).c_out
    np.testing.assert_allclose(w_as(jd.edm_weight(0.5), "x0"), 1 / c_out**2, rtol=1e-12)


@pytest.mark.parametrize("name", ["vp", "subvp", "ve", "cosine", "linear"])
def test_the_elbo_weighting_is_the_likelihood_weighting(x64, name):
    path = getattr(jd, f"{name}_path")()
    t = _times()
    got = jd.weight_as(jd.elbo_weight(), path, t, "score")
    np.testing.assert_allclose(got, jd.likelihood_weight(path, t), rtol=1e-9)
    np.testing.assert_allclose(jd.log_snr_weighting(path, jd.likelihood_weight, regress="score")(t), 1.0, rtol=1e-9)  # fmt: skip


def test_implied_log_snr_weightings_of_kingma_and_gao_table(x64):
    t = _times()
    lam = lambda p: p.log_snr(t)  # noqa: E731
    # flow matching (linear path, velocity, uniform t): e^{-lambda/2} / 2
    lin = jd.linear_path()
    got = jd.log_snr_weighting(lin, jd.unit_weight, regress="velocity")(t)
    np.testing.assert_allclose(got, jnp.exp(-lam(lin) / 2) / 2, rtol=1e-9)
    # v and eps prediction on the trigonometric (cosine) path: e^{-lambda/2} / pi, sech(lambda/2) / 2pi
    got = jd.log_snr_weighting(TRIG, jd.unit_weight, regress="v")(t)
    np.testing.assert_allclose(got, jnp.exp(-lam(TRIG) / 2) / jnp.pi, rtol=1e-9)
    got = jd.log_snr_weighting(TRIG, jd.unit_weight, regress="eps")(t)
    np.testing.assert_allclose(got, 1 / jnp.cosh(lam(TRIG) / 2) / (2 * jnp.pi), rtol=1e-9)
    # EDM: N(lambda; 2.4, 2.4^2) (e^{-lambda} + s^2) / s^2, over the truncation's mass
    vp = jd.vp_path()
    sampler = jd.edm_time(vp)
    got = jd.log_snr_weighting(vp, jd.edm_weight(0.5), regress="x0", time_sampler=sampler)(t)
    mass = ndtr(sampler.hi) - ndtr(sampler.lo)
    want = norm.pdf(lam(vp), 2.4, 2.4) * (jnp.exp(-lam(vp)) + 0.25) / 0.25 / mass
    np.testing.assert_allclose(got, want, rtol=1e-9)
    # sigmoid weighting: W = sigmoid(b - lambda) under uniform times
    got = jd.log_snr_weighting(vp, jd.sigmoid_weight(1.5))(t)
    np.testing.assert_allclose(got, jax.nn.sigmoid(1.5 - lam(vp)), rtol=1e-9)


@pytest.mark.parametrize("name", ["vp", "linear"])
def test_edm_time_draws_the_log_normal_noise_level(name):
    # log(sigma/alpha) of the drawn t follows N(-1.2, 1.2^2) truncated to [t_min, t_max]: the
    # Kolmogorov-Smirnov distance of n = 2^15 draws is below the 1% critical value 1.63 / sqrt(n)
    path = getattr(jd, f"{name}_path")()
    sampler = jd.edm_time(path)
    n = 2**15
    t = sampler(jax.random.key(0), (n,))
    assert float(t.min()) >= 1e-3 and float(t.max()) <= 1.0
    z = jnp.sort((-0.5 * path.log_snr(t) + 1.2) / 1.2)
    cdf = (ndtr(z) - ndtr(sampler.lo)) / (ndtr(sampler.hi) - ndtr(sampler.lo))
    ks = jnp.max(jnp.abs(cdf - (jnp.arange(n) + 0.5) / n))
    assert float(ks) < 1.63 / np.sqrt(n), float(ks)
    grid = jnp.linspace(1e-3, 1 - 1e-6, 400_001)  # and pdf is its density
    assert abs(float(jnp.trapezoid(sampler.pdf(grid), grid)) - 1.0) < 2e-3


def test_weighted_loss_is_an_integral_over_log_snr_and_a_mixture_of_elbos(x64):
    # data N(0, 0.8^2 I), a field that is Bayes-optimal for N(0, 0.5^2 I): E|eps_hat - eps|^2 = e(t)
    path, s_data, s_model, bias = jd.vp_path(), 0.8, 0.5, 1.0
    w = jd.sigmoid_weight(bias)
    t_min = 1e-3
    big_w = jd.log_snr_weighting(path, w, time_sampler=jd.uniform_time(t_min))
    # (1) the loss is int W(lambda) e(lambda) d lambda over the drawn range
    lam = jnp.linspace(path.log_snr(1.0), path.log_snr(t_min), 200_001)
    t_of = path.t_from_log_snr(lam)
    e = _eps_error(path, t_of, s_data, s_model)
    integral = jnp.trapezoid(big_w(t_of) * e, lam)
    # the actual loss, 2^17 draws: its mean is within 4 standard errors of the integral
    field = jd.Field(_mixed_field(s_model), "eps", path)
    n, key = 2**17, jax.random.key(3)
    x0 = s_data * jax.random.normal(jax.random.key(4), (n, 2))
    loss = jd.eps_loss(field, path, weighting=w, time_sampler=jd.uniform_time(t_min))
    value = loss(path, key, x0)
    t_key, eps_key, _ = jax.random.split(key, 3)  # the loss's draws, to get its standard error
    t = jd.uniform_time(t_min)(t_key, (n,))
    eps = jax.random.normal(eps_key, x0.shape, x0.dtype)
    pred = field(path.interpolate(x0, eps, t), t)
    per = jd.losses.per_example_loss(pred, path, x0, eps, t, target="eps", regress="eps", weighting=w)  # fmt: skip
    np.testing.assert_allclose(jnp.mean(per), value, rtol=1e-12)
    stderr = float(jnp.std(per) / np.sqrt(n))
    assert abs(float(value) - float(integral)) < 4 * stderr, (value, integral, stderr)
    # (2) integration by parts: sum of ELBOs of noisy data, L(lambda) = 1/2 int_{lam_min}^lambda e
    ell = 0.5 * jnp.concatenate([jnp.zeros(1), jnp.cumsum(0.5 * (e[1:] + e[:-1]) * jnp.diff(lam))])
    w_lam = jax.nn.sigmoid(bias - lam)
    density = w_lam * (1 - w_lam)  # -dW/dlambda: the logistic density centred at the bias
    mixture = jnp.trapezoid(density * 2 * ell, lam) + w_lam[-1] * 2 * ell[-1]
    np.testing.assert_allclose(mixture, integral * (1 - t_min), rtol=1e-8)  # W = pdf * sigmoid
    np.testing.assert_allclose(density, -jax.vmap(jax.grad(lambda x: jax.nn.sigmoid(bias - x)))(lam), atol=1e-15)  # fmt: skip


def test_edm_recipe_loss_matches_its_log_snr_integral(x64):
    # x0 loss, EDM weighting, EDM's log-normal times on the cosine path: the loss's mean equals
    # int W e d lambda with W = N(lambda; 2.4, 2.4^2)(e^{-lambda} + s^2)/s^2 (within 4 std errors)
    path, s_data, s_model = jd.cosine_path(), 0.5, 0.3
    sampler, w = jd.edm_time(path), jd.edm_weight(0.5)
    field = jd.Field(_mixed_field(s_model), "eps", path)
    n, key = 2**17, jax.random.key(5)
    x0 = s_data * jax.random.normal(jax.random.key(6), (n, 2))
    value = jd.x0_loss(field, path, weighting=w, time_sampler=sampler)(path, key, x0)
    t_key, eps_key, _ = jax.random.split(key, 3)
    t = sampler(t_key, (n,))
    eps = jax.random.normal(eps_key, x0.shape, x0.dtype)
    pred = field(path.interpolate(x0, eps, t), t)
    per = jd.losses.per_example_loss(pred, path, x0, eps, t, target="eps", regress="x0", weighting=w)  # fmt: skip
    np.testing.assert_allclose(jnp.mean(per), value, rtol=1e-12)
    grid = jnp.linspace(1e-3, 1 - 1e-7, 400_001)
    lam = path.log_snr(grid)
    big_w = jd.log_snr_weighting(path, w, regress="x0", time_sampler=sampler)(grid)
    integral = -jnp.trapezoid(big_w * _eps_error(path, grid, s_data, s_model), lam)
    stderr = float(jnp.std(per) / np.sqrt(n))
    assert abs(float(value) - float(integral)) < 4 * stderr, (value, integral, stderr)


def test_bad_arguments():
    with pytest.raises(ValueError, match="sigma_data"):
        jd.edm_weight(0.0)
    with pytest.raises(ValueError, match="gamma"):
        jd.min_snr_weight(-1.0)
    with pytest.raises(ValueError, match="bias contains non-finite values"):
        jd.sigmoid_weight(float("nan"))
    with pytest.raises(ValueError, match="p_std"):
        jd.edm_time(jd.vp_path(), p_std=0.0)
    with pytest.raises(ValueError, match="p_mean contains non-finite values"):
        jd.edm_time(jd.vp_path(), p_mean=float("nan"))
    with pytest.raises(ValueError, match="t_min"):
        jd.edm_time(jd.vp_path(), t_min=0.5, t_max=0.2)
    with pytest.raises((ValueError, TypeError), match="units"):  # TypeError: beartype in tests
        jd.Weight(lambda p, t: t, "noise")


def test_edm_time_draws_in_float64_under_x64(x64):
    """edm_time built its truncation bounds in float32, so under x64 its draws ran in float32:
    99.995% of the log-SNRs were float32 numbers (a dtype review). They are float64 now."""
    path = jd.vp_path()
    t = jd.edm_time(path)(jax.random.key(0), (4096,))
    assert t.dtype == jnp.float64
    lam = np.asarray(-0.5 * path.log_snr(t))
    as32 = lam.astype(np.float32).astype(np.float64)
    assert np.mean(lam == as32) < 0.01  # float64 values, not float32 ones widened
