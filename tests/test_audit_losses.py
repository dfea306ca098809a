"""Audit of losses, sources and interpolants: half-precision noise, interpolant dtypes and times,
endpoint checks and the logit-normal density. Each test failed on the code before its fix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.stats import norm

import jaxdiff as jd
from jaxdiff import losses as L
from jaxdiff.sources import draw_pairs


def _tail_second_moment(c):
    """``E[z^2; |z| > c]`` for ``z ~ N(0, 1)``: ``2 (c phi(c) + Q(c))``."""
    return float(2 * (c * norm.pdf(c) + norm.sf(c)))


@pytest.mark.parametrize(("dtype", "c"), [(jnp.bfloat16, 3.0), (jnp.float16, 3.5)])
def test_half_precision_noise_of_a_loss_has_gaussian_tails(dtype, c):
    """The noise of a loss on bfloat16 data was drawn by ``jax.random.normal`` in bfloat16: 128
    distinct values, none beyond |2.89| (float16: 1024 values, none beyond 3.49), variance 0.994
    and fourth moment 2.88. On the linear path at t = 1, x_t = eps; a "network" that predicts eps
    exactly except beyond |c| leaves the loss E[eps^2; |eps| > c]: 0.0293 for c = 3, 0.0066 for
    c = 3.5. The old draws gave exactly 0 for both. 400,000 values: relative SE 7% at c = 3.5."""
    net = jd.Field(lambda p, x, t: jnp.where(jnp.abs(x) > c, 0, x), "eps")
    loss = L.eps_loss(net, jd.linear_path(), time_sampler=lambda key, shape: jnp.ones(shape))
    value = float(loss(None, jax.random.key(0), jnp.zeros((100_000, 4), dtype)))
    expected = _tail_second_moment(c)
    assert abs(value - expected) < 0.3 * expected, (value, expected)


def test_draw_pairs_and_interpolant_noise_in_bfloat16_are_gaussian():
    """``draw_pairs`` (every loss with a source or coupling, and ``interpolant_loss``) and
    ``StochasticInterpolant.sample`` drew bfloat16 noise the same way: P(|z| > 3) was 0 instead
    of 0.0027 (400,000 draws: SE 8e-5), the variance 0.994 instead of 1 (SE 0.0022)."""
    x0 = jnp.zeros((100_000, 4), jnp.bfloat16)
    _, x1, _ = draw_pairs(jax.random.key(0), x0)
    _, z = jd.brownian_bridge(1.0).sample(jax.random.key(1), x0, x0, 0.5)
    for noise in (x1, z):
        assert noise.dtype == jnp.bfloat16
        v = np.asarray(noise.astype(jnp.float32))
        tail = float(np.mean(np.abs(v) > 3))
        assert abs(tail - 0.0027) < 5 * 8e-5, tail
        assert abs(float(v.var()) - 1.0) < 5 * 0.0022, float(v.var())


def test_interpolant_loss_on_bfloat16_data_is_finite_and_matches_float32():
    """interpolant_loss cast t to x0's dtype: in bfloat16 t = 1 - 1e-3 rounds to 1 (112 of
    100,000 default draws), where the bridge's gamma' is infinite: the loss was inf. Times now stay
    float32 and the error is taken in float32: 4.9489 against 4.9494 for the float32 data."""
    si = jd.brownian_bridge(1.0)
    net = jd.Field(lambda p, x, t: jnp.zeros_like(x), "velocity")
    x0 = jax.random.normal(jax.random.key(1), (4096, 2))
    loss = jax.jit(jd.interpolant_loss(net, si))
    f32 = float(loss(None, jax.random.key(0), x0))
    bf16 = float(loss(None, jax.random.key(0), x0.astype(jnp.bfloat16)))
    assert np.isfinite(bf16)
    np.testing.assert_allclose(bf16, f32, rtol=1e-2)


def test_interpolant_sample_of_integer_points_and_dtype_policy():
    """``sample`` with integer points raised jax's "dtype argument to `normal` must be a float";
    the coefficients took a bfloat16 t's dtype, and bfloat16 points with a float32 t came back
    float32 (the package's policy: coefficients in float32 or wider, results in the points'
    dtype)."""
    si = jd.brownian_bridge(0.5)
    xi = jnp.arange(6, dtype=jnp.int32).reshape(3, 2)
    key = jax.random.key(0)
    xt, z = si.sample(key, xi, xi, 0.25)
    xt_f, z_f = si.sample(key, xi.astype(jnp.float32), xi.astype(jnp.float32), 0.25)
    assert xt.dtype == z.dtype == jnp.float32
    np.testing.assert_array_equal(xt, xt_f)
    np.testing.assert_array_equal(z, z_f)
    t16 = jnp.full((3,), 0.3, jnp.bfloat16)
    assert si.a(t16).dtype == si.gamma(t16).dtype == si.d_gamma(t16).dtype == jnp.float32
    xb = jnp.ones((3, 2), jnp.bfloat16)
    t = jnp.full((3,), 0.3, jnp.float32)
    assert si.interpolate(xb, xb, xb, t).dtype == jnp.bfloat16
    assert si.conditional_velocity(xb, xb, xb, t).dtype == jnp.bfloat16
    assert si.conditional_score(xb, xb, xb, t).dtype == jnp.bfloat16


def test_conditional_score_at_a_known_end_raises():
    """At t = 0 or 1 gamma = 0 and the conditional score is -(x - mean) / 0: it came back NaN
    (here x = mean: 0 / 0) or inf, silently, eagerly and under jit."""
    si = jd.brownian_bridge(1.0)
    x = jnp.ones((2, 2))
    for t in (0.0, 1.0, jnp.array([0.5, 1.0])):
        with pytest.raises(ValueError, match="divides by gamma_t"):
            si.conditional_score(x, x, x, t)
        with pytest.raises(ValueError, match="divides by gamma_t"):
            jax.jit(lambda x, t=t: si.conditional_score(x, x, x, t))(x)
    inside = si.conditional_score(x, x, x, jnp.array([0.5, 0.25]))
    np.testing.assert_allclose(inside, 0.0)  # x = mean: a score of 0, not NaN


def test_logit_normal_density_is_zero_outside_and_at_the_ends():
    """``pdf`` took log(0) at t_min and t_max and log of a negative outside: NaN at 0, 0.1, 1 for
    logit_normal_time(t_min=0.1, t_max=0.9) (the uniform's pdf gives 0 there). Its integral over
    the interval stays 1 (trapezoid on 200,001 points: 1 to 1e-4), its gradient finite."""
    sampler = L.logit_normal_time(mean=0.3, std=1.2, t_min=0.1, t_max=0.9)
    ends = jnp.array([0.0, 0.1, 0.9, 1.0])
    np.testing.assert_array_equal(sampler.pdf(ends), 0.0)
    grad = jax.vmap(jax.grad(sampler.pdf))(ends)
    assert bool(jnp.all(jnp.isfinite(grad)))
    grid = jnp.linspace(0.1, 0.9, 200_001)
    np.testing.assert_allclose(float(jnp.trapezoid(sampler.pdf(grid), grid)), 1.0, atol=1e-4)


def _assert_gaussian_tails(z, what):
    """200,000 N(0, 1) values: 93 expected beyond |3.5| (none by chance: P = e^-93), and a fourth
    moment of 3 (SE 0.022). bfloat16 draws of ``jax.random.normal`` had none beyond 2.89."""
    z = np.asarray(jnp.asarray(z, jnp.float32)).ravel()
    assert z.size >= 200_000, what
    assert np.sum(np.abs(z) > 3.5) > 40, (what, np.abs(z).max())
    assert abs(np.mean(z**4) / np.mean(z**2) ** 2 - 3.0) < 0.12, (what, np.mean(z**4))


def test_every_noise_draw_in_half_precision_has_gaussian_tails():
    """The same bfloat16 draw outside the losses: paths' ``sample`` and ``prior_sample``,
    ``measure`` and Brownian motion on bfloat16 times had no value beyond |2.89|. They, and the
    consistency and MeanFlow losses, DDPM's ancestral noise, Langevin and the diffrax Brownian
    path, now draw through ``_checks.normal`` (float32, rounded once). DDPM's forward chain and a
    bfloat16 mixture already drew in float32 and are checked here too. In float32 the draws are
    those of ``jax.random.normal``, bit for bit."""
    key, n = jax.random.key(3), 50_000
    x0 = jnp.zeros((n, 4), jnp.bfloat16)
    path = jd.linear_path()
    _assert_gaussian_tails(path.sample(key, x0, jnp.ones(()))[1], "path.sample")
    _assert_gaussian_tails(path.prior_sample(key, (n, 4), jnp.bfloat16), "prior_sample")
    chain = jd.forward_chain(key, jd.vp_path(), x0, jnp.array([1.0]))
    _assert_gaussian_tails(chain[0] / jd.vp_path().sigma(1.0), "forward_chain")
    op = jd.matrix_operator(jnp.eye(4))
    _assert_gaussian_tails(jd.measure(key, op, x0, 1.0).y, "measure")
    mix = jd.GaussianMixture.isotropic(jnp.zeros((1, 4), jnp.bfloat16), std=1.0)
    _assert_gaussian_tails(mix.sample(key, n), "GaussianMixture.sample")
    ts = jnp.ones((1,), jnp.bfloat16)  # W_1 ~ N(0, I)
    _assert_gaussian_tails(jd.brownian_motion(key, ts, (n * 4,))[0], "brownian_motion")
    # float32 draws are jax.random.normal's, bit for bit
    x32 = jnp.zeros((8, 4), jnp.float32)
    np.testing.assert_array_equal(
        path.sample(key, x32, jnp.ones(()))[1], jax.random.normal(key, (8, 4), jnp.float32)
    )


def test_flow_matching_with_an_x0_or_score_net_draws_t_from_1e_3():
    """The default U[0, 1) draws t = 0 with probability 2^-23 per draw; an x0 or score net's
    velocity divides by sigma_0 = 0 there: an inf loss a few times per 10^7 draws. Their default
    is now U[1e-3, 1]; velocity, v and eps nets keep U[0, 1], bit for bit."""
    batch, key = jnp.ones((64, 2)), jax.random.key(0)
    for target, t_min in (("x0", 1e-3), ("score", 1e-3), ("velocity", 0.0), ("eps", 0.0)):
        net = jd.Field(lambda p, x, t: p * x + t[:, None], target)
        default = jd.flow_matching_loss(net)(0.5, key, batch)
        given = jd.flow_matching_loss(net, time_sampler=L.uniform_time(t_min, 1.0))(0.5, key, batch)
        assert float(default) == float(given), (target, default, given)


def test_a_conversion_error_shows_the_first_times_only():
    # a batch of 4096 known times was printed whole in the error
    t = jnp.zeros((4096,))
    with pytest.raises(ValueError, match=r"at t = \[0.0, 0.0, 0.0, 0.0, ...\] on this path") as e:
        jd.convert(jd.vp_path(), jnp.zeros((4096, 2)), t, jnp.zeros((4096, 2)), src="x0", dst="eps")
    assert len(str(e.value)) < 300


def test_a_pair_batch_without_labels():
    # (x0, None), as an unlabelled loader may yield, raised jnp.asarray(None)'s raw TypeError
    net = jd.Field(lambda p, x, t: p * x, "eps")
    loss = jd.flow_matching_loss(net)
    x0 = jnp.ones((16, 2))
    assert float(loss(0.5, jax.random.key(0), (x0, None))) == float(
        loss(0.5, jax.random.key(0), x0)
    )


def test_a_time_sampler_of_ones_own_is_checked_eagerly_and_under_jit():
    """diffusers' integer timesteps ([0, 1000)) from a time sampler of the user's own: refused
    eagerly, but under jit (make_train_step, train) every loss trained on them silently, to a
    loss that looked better than a right one (flow matching 0.0032 against 0.50), and
    interpolant_loss gave NaN. A sampler inside [0, 1] gives the same loss either way."""
    timesteps = lambda k, s: jax.random.randint(k, s, 0, 1000).astype(jnp.float32)  # noqa: E731
    fine = lambda k, s: jax.random.uniform(k, s, minval=0.1, maxval=0.9)  # noqa: E731
    one = jd.Field(lambda p, x, t: p * x, "velocity")
    two = jd.Field(lambda p, x, t, r: p * x, "velocity")
    makers = {
        "flow_matching_loss": lambda ts: jd.flow_matching_loss(one, time_sampler=ts),
        "eps_loss": lambda ts: jd.eps_loss(jd.Field(one.fn, "eps"), jd.vp_path(), time_sampler=ts),
        "meanflow_loss": lambda ts: jd.meanflow_loss(two, time_sampler=ts),
        "interpolant_loss": lambda ts: jd.interpolant_loss(
            one, jd.brownian_bridge(0.5), time_sampler=ts
        ),
    }
    key, x = jax.random.key(0), jax.random.normal(jax.random.key(1), (16, 2))
    for name, make in makers.items():
        loss = make(timesteps)
        with pytest.raises(ValueError, match="t drawn by the time_sampler must lie in"):
            loss(0.5, key, x)
        with pytest.raises(Exception, match="t drawn by the time_sampler must lie in"):
            jax.block_until_ready(jax.jit(loss)(0.5, key, x))
        good = make(fine)
        eager, jitted = float(good(0.5, key, x)), float(jax.jit(good)(0.5, key, x))
        assert jnp.isfinite(eager) and abs(jitted - eager) <= 1e-5 * abs(eager), name
