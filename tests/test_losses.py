"""Losses: closed forms with the exact (oracle) predictor, identities between losses, time samplers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd
from jaxdiff import losses as L

GAUSS = jd.GaussianMixture.isotropic(jnp.zeros((1, 2)), std=1.0)  # N(0, I) in 2-D


def oracle_apply(path, target):
    """An exact "network" ``apply(params, x, t)`` (params ignored) predicting ``target``."""
    return jd.Field(lambda params, x, t: GAUSS.predict(path, x, t, target), target)


def fixed_time(t0):
    return lambda key, shape: jnp.full(shape, t0)


N = 20_000  # per-dimension squared residuals: 40,000 values; relative SE sqrt(2 / 40000) = 0.7%


@pytest.mark.parametrize("t0", [0.1, 0.5, 0.9])
def test_eps_loss_of_the_exact_predictor_is_alpha_squared_on_vp(t0):
    # N(0, I) data on a VP path: E[eps | x_t] = sigma_t x_t, residual variance alpha_t^2.
    path = jd.vp_path()
    loss = L.eps_loss(oracle_apply(path, "eps"), path, time_sampler=fixed_time(t0))
    value = float(loss(None, jax.random.key(0), GAUSS.sample(jax.random.key(1), N)))
    expected = float(path.alpha(t0) ** 2)
    assert abs(value - expected) < 5 * 0.007 * expected + 1e-7


@pytest.mark.parametrize("t0", [0.2, 0.7])
def test_flow_matching_loss_of_the_exact_velocity_matches_the_gaussian_residual(t0):
    # u = eps - x0, x_t = (1 - t) x0 + t eps: Var(u | x_t) = 2 - (2t - 1)^2 / ((1 - t)^2 + t^2).
    path = jd.linear_path()
    loss = L.flow_matching_loss(oracle_apply(path, "velocity"), path, time_sampler=fixed_time(t0))
    value = float(loss(None, jax.random.key(0), GAUSS.sample(jax.random.key(1), N)))
    expected = 2 - (2 * t0 - 1) ** 2 / ((1 - t0) ** 2 + t0**2)
    assert abs(value - expected) < 5 * 0.007 * expected


def test_score_matching_with_sigma_squared_weight_equals_the_eps_loss():
    # sigma^2 |s + eps / sigma|^2 = |eps_hat - eps|^2 when s = -eps_hat / sigma: same key, same value.
    path = jd.vp_path()
    apply = jd.Field(lambda p, x, t: p * x, "eps")  # a linear "network" predicting eps
    x0 = GAUSS.sample(jax.random.key(1), 512)
    eps_value = L.eps_loss(apply, path)(0.3, jax.random.key(2), x0)
    dsm_value = L.score_matching_loss(apply, path)(0.3, jax.random.key(2), x0)
    np.testing.assert_allclose(dsm_value, eps_value, rtol=1e-5)


def test_x0_and_v_losses_are_eps_losses_reweighted():
    # For any eps prediction: |x0_hat - x0|^2 = (sigma/alpha)^2 |eps_hat - eps|^2 and
    # |v_hat - v|^2 = (1/alpha)^2 |eps_hat - eps|^2 on a VP path (alpha^2 + sigma^2 = 1).
    path = jd.vp_path()
    apply = jd.Field(lambda p, x, t: p * x, "eps")
    x0 = GAUSS.sample(jax.random.key(1), 256)
    key = jax.random.key(3)
    w_x0 = lambda path, t: path.sigma_sq(t) / path.alpha(t) ** 2  # noqa: E731
    w_v = lambda path, t: 1 / path.alpha(t) ** 2  # noqa: E731
    np.testing.assert_allclose(
        L.x0_loss(apply, path)(0.5, key, x0),
        L.eps_loss(apply, path, weighting=w_x0)(0.5, key, x0),
        rtol=1e-4,
    )
    np.testing.assert_allclose(
        L.v_loss(apply, path)(0.5, key, x0),
        L.eps_loss(apply, path, weighting=w_v)(0.5, key, x0),
        rtol=1e-4,
    )


def test_importance_sampling_is_unbiased_for_the_likelihood_weighted_score_loss():
    # Exact score of N(0, I) on VP: g^2 E|s - s_cond|^2 per dim = g^2 alpha^2 / sigma^2 at time t.
    # The uniform-time loss is its average over [t_min, 1]: a 1-D integral we take by quadrature.
    path, t_min = jd.vp_path(), 1e-3
    grid = jnp.linspace(t_min, 1.0, 200_001)
    f = path.diffusion_sq(grid) * path.alpha(grid) ** 2 / path.sigma_sq(grid)
    exact = float(jnp.trapezoid(f, grid) / (1 - t_min))
    sampler = L.importance_time(path, L.likelihood_weight, t_min, 1.0)
    loss = L.score_matching_loss(
        oracle_apply(path, "score"), path, weighting=L.likelihood_weight, time_sampler=sampler
    )
    x0 = GAUSS.sample(jax.random.key(1), 4096)
    loss = jax.jit(loss)
    values = jnp.stack([loss(None, k, x0) for k in jax.random.split(jax.random.key(2), 24)])
    se = float(jnp.std(values) / jnp.sqrt(values.shape[0]))
    assert abs(float(values.mean()) - exact) < 5 * se
    assert se < 0.02 * exact  # and the estimate is precise: importance sampling works


@pytest.mark.parametrize("loss_name", ["interpolant", "shortcut", "meanflow"])
def test_every_loss_with_a_time_sampler_reweights_importance_time(loss_name):
    """``importance_time``'s draws are reweighted by ``correction(t)`` in every loss that takes a
    ``time_sampler`` (the interpolant, shortcut and MeanFlow losses ignored it: the objective
    silently became ``E_q`` instead of the uniform-time one, 6% lower here). Density ``q ∝ 0.2 +
    t``, bounded below, so the weights have a finite variance; one batch of 100,000 each, whose
    standard errors are ~0.3% (the difference's), against a bias of 5.5-6.3% unweighted."""
    from jaxdiff import interpolants as I

    x0 = 3.0 + jax.random.normal(jax.random.key(9), (100_000, 2))
    lo, hi = 1e-3, 1 - 1e-3
    skewed = L.importance_time(jd.linear_path(), lambda path, t: 0.2 + t, lo, hi, regress="eps")
    one = jd.Field(lambda p, x, t: p * x, "velocity")
    two = jd.Field(lambda p, x, t, r: p * x, "velocity")
    make = {
        "interpolant": lambda ts: I.interpolant_loss(one, I.linear_interpolant(), time_sampler=ts),
        "shortcut": lambda ts: jd.shortcut_loss(two, time_sampler=ts, bootstrap_fraction=0.0),
        "meanflow": lambda ts: jd.meanflow_loss(two, time_sampler=ts, weighting_power=0.0),
    }[loss_name]
    uniform, weighted = (
        float(jax.jit(make(ts))(0.3, jax.random.key(1), x0))
        for ts in (L.uniform_time(lo, hi), skewed)
    )
    np.testing.assert_allclose(weighted, uniform, rtol=0.015)


def test_importance_time_has_the_requested_density():
    path = jd.vp_path()
    sampler = L.importance_time(path, L.unit_weight, 0.0, 1.0, regress="eps")  # w c = 1: uniform
    # from t_min = 0 on the score (1 / sigma^2 there: infinite, masked), as from t_min = 1e-3
    t0 = L.importance_time(path, L.likelihood_weight, 0.0, 1.0)(jax.random.key(1), (1000,))
    assert bool(jnp.all(jnp.isfinite(t0) & (t0 > 0) & (t0 <= 1)))
    # key 7's 2^20 uniform draws hold three exact zeros, which gave t = 0 exactly: an infinite
    # 1 / sigma^2 (probability 2^-23 per draw, a few inf losses in a long run)
    assert int(jnp.sum(jax.random.uniform(jax.random.key(7), (1 << 20,)) == 0)) == 3
    t7 = L.importance_time(path, L.likelihood_weight, 0.0, 1.0)(jax.random.key(7), (1 << 20,))
    assert float(jnp.min(t7)) > 0
    assert bool(jnp.all(jnp.isfinite(1 / path.sigma_sq(t7))))
    t = sampler(jax.random.key(0), (40_000,))
    hist = np.histogram(np.asarray(t), bins=10, range=(0, 1))[0] / 40_000
    assert np.abs(hist - 0.1).max() < 5 * np.sqrt(0.1 * 0.9 / 40_000)  # 5 binomial SEs
    np.testing.assert_allclose(sampler.correction(jnp.array([0.3, 0.8])), 1.0, rtol=1e-4)


@pytest.mark.parametrize(
    ("path", "weight", "regress", "t_min", "t_max"),
    [
        (jd.vp_path(), L.likelihood_weight, "score", 0.0, 1.0),  # 1/sigma^2 at 0: log-integrable
        (jd.linear_path(), L.unit_weight, "velocity", 1e-3, 0.999),  # 1/alpha^2, cut before 1
    ],
)
def test_importance_corrections_are_finite_and_average_to_one(path, weight, regress, t_min, t_max):
    """E_q[1 / ((t_max - t_min) q(t))] = 1 for the density the draws really have (piecewise
    constant: the inverse of a piecewise-linear CDF). With the trapezoid's density instead, 33
    in 10^6 draws landed on a masked end, where the correction was inf."""
    sampler = L.importance_time(path, weight, t_min, t_max, regress=regress)
    c = sampler.correction(sampler(jax.random.key(0), (200_000,)))
    assert bool(jnp.all(jnp.isfinite(c) & (c > 0)))
    se = float(jnp.std(c)) / np.sqrt(c.size)
    assert abs(float(jnp.mean(c)) - 1.0) < 5 * se + 1e-3


def test_importance_time_refuses_a_density_that_is_not_integrable():
    """Flow matching's velocity on the linear path weighs eps errors by 1/alpha^2: its mass up to
    t = 1 grows with the grid, 85% of the draws fell past 0.999, and the CLI's `--time importance`
    run diverged to NaN at step 100."""
    for path, regress in ((jd.linear_path(), "velocity"), (jd.cosine_path(), "velocity")):
        with pytest.raises(ValueError, match="is not integrable on"):
            L.importance_time(path, L.unit_weight, 1e-3, 1.0, regress=regress)


def test_mismatched_batches_are_refused_at_trace_time():
    """Labels for another number of points than x0 were taken as they came (they broadcast, or
    failed deep inside the network); source points of another shape were already refused."""
    loss = L.flow_matching_loss(jd.Field(lambda p, x, t, y=None: x, "velocity"), jd.linear_path())
    key, x = jax.random.key(0), jnp.ones((4, 2))
    with pytest.raises(ValueError, match=r"labels have shape \(3,\) for 4 points"):
        jax.jit(loss)(None, key, (x, jnp.zeros(3, int)))
    with pytest.raises(ValueError, match=r"source points have shape \(4, 3\); the data have"):
        loss(None, key, {"x0": x, "x1": jnp.ones((4, 3))})
    assert bool(jnp.isfinite(loss(None, key, {"x0": x, "x1": x, "labels": jnp.zeros(4, int)})))


def test_time_samplers_ranges_and_errors():
    key = jax.random.key(0)
    t = L.logit_normal_time(t_min=0.1, t_max=0.9)(key, (10_000,))
    assert float(t.min()) >= 0.1 and float(t.max()) <= 0.9
    assert abs(float(jnp.median(t)) - 0.5) < 0.02  # sigmoid(N(0, 1)) has median 1/2
    with pytest.raises(ValueError, match="t_min"):
        L.uniform_time(0.5, 0.2)
    with pytest.raises(ValueError, match="std"):
        L.logit_normal_time(std=0.0)
    with pytest.raises(ValueError, match="mean contains non-finite values"):
        L.logit_normal_time(mean=float("nan"))


def test_sd3_time_shift_on_grids_and_training_times(x64):
    """shift_time: SD3's t' = s t / (1 + (s - 1) t) fixes 0 and 1, is the identity at s = 1, and
    on the linear path lowers the log-SNR by exactly 2 log s (measured 1e-14 in float64).
    shifted_time: its draws follow the shifted law (Kolmogorov-Smirnov distance to the exact CDF
    t' / (s - (s - 1) t') of a uniform base; 20,000 draws, null 95% quantile 0.0096), its pdf
    integrates to 1 and matches the CDF's slope, and it trains a loss and weighs a log-SNR view."""
    t = jnp.linspace(0.05, 0.95, 19)
    path = jd.linear_path()
    for s in (0.5, 3.0):
        np.testing.assert_allclose(
            path.log_snr(jd.shift_time(t, s)), path.log_snr(t) - 2 * np.log(s), atol=1e-12
        )
    np.testing.assert_array_equal(jd.shift_time(jnp.array([0.0, 1.0]), 3.0), [0.0, 1.0])
    np.testing.assert_allclose(jd.shift_time(t, 1.0), t, rtol=1e-15)
    assert bool(jnp.all(jnp.diff(jd.shift_time(t, 3.0)) > 0))
    with pytest.raises(ValueError, match="shift"):
        jd.shift_time(t, 0.0)
    with pytest.raises(Exception, match="shift must be finite and > 0"):  # traced: at run time
        jax.jit(jd.shift_time)(t, 0.0).block_until_ready()
    with pytest.raises(Exception, match="t must lie in"):
        jax.jit(jd.shift_time)(t + 1.0, 3.0).block_until_ready()
    with pytest.raises(ValueError, match="shift must be finite"):
        jd.shifted_time(L.uniform_time(), float("inf"))
    s, n = 3.0, 20_000
    sampler = jd.shifted_time(L.uniform_time(0.0, 1.0), s)
    draws = np.sort(np.asarray(sampler(jax.random.key(0), (n,))))
    cdf = draws / (s - (s - 1) * draws)
    ks = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
    assert ks < 0.0096, ks  # 1.36 / sqrt(n)
    grid = jnp.linspace(0.0, 1.0, 20_001)
    pdf = sampler.pdf(grid)
    assert abs(float(jnp.trapezoid(pdf, grid)) - 1.0) < 1e-6
    slope = jnp.gradient(grid / (s - (s - 1) * grid), grid)
    np.testing.assert_allclose(pdf[1:-1], slope[1:-1], rtol=1e-4)
    sd3 = jd.shifted_time(L.logit_normal_time(), 3.0)
    net = jd.Field(lambda p, x, t: p * x, "velocity", jnp.asarray(0.5))
    loss = L.flow_matching_loss(net, path, time_sampler=sd3)
    assert np.isfinite(float(jax.jit(loss)(net.params, jax.random.key(1), jnp.ones((64, 2)))))
    w = jd.log_snr_weighting(path, L.unit_weight, regress="velocity", time_sampler=sd3)
    assert np.all(np.isfinite(np.asarray(w(t))))


def test_label_dropout_replaces_labels_by_the_null_label():
    seen = []

    def apply(params, x, t, labels):
        seen.append(labels)
        return jnp.zeros_like(x)

    net = jd.Field(apply, "eps")
    loss = L.eps_loss(net, jd.vp_path(), label_dropout=0.25, null_label=10)
    x0 = jnp.zeros((4000, 2))
    labels = jax.jit(lambda k: (loss(None, k, (x0, jnp.zeros(4000, jnp.int32))), seen[-1])[1])(
        jax.random.key(0)
    )
    frac = float(jnp.mean(labels == 10))
    assert set(np.unique(labels).tolist()) == {0, 10}
    assert abs(frac - 0.25) < 5 * np.sqrt(0.25 * 0.75 / 4000)
    with pytest.raises(ValueError, match="null_label"):
        L.eps_loss(net, jd.vp_path(), label_dropout=0.1)
    # Literal-typed: the suite's type checker answers first (TypeError); users get our ValueError.
    with pytest.raises((TypeError, ValueError), match="regress"):
        L.diffusion_loss(net, jd.vp_path(), regress="noise")
    # no silent default target: a bare function is refused (the suite's type checker answers
    # first in the loss; users get as_field's message, tested here directly)
    with pytest.raises(TypeError):
        L.eps_loss(apply, jd.vp_path())
    with pytest.raises(TypeError, match="bare function, so what it predicts is unknown"):
        jd.as_field(apply)


def test_integer_data_trains_as_floats():
    """Integer points (pixels) made ``jax.random.normal`` fail with a dtype error in every loss;
    they are now the default float: the same loss as their float32 copy."""
    net = jd.Field(lambda p, x, t, *labels: p * x, "velocity")
    x0 = jnp.arange(8, dtype=jnp.int32).reshape(4, 2)
    for loss in (jd.flow_matching_loss(net), jd.diffusion_loss(net, jd.vp_path())):
        for batch in (x0, (x0, jnp.zeros(4, jnp.int32)), {"x0": x0}):
            as_float = jax.tree.map(lambda a: a.astype(jnp.float32) if a is x0 else a, batch)
            got = loss(0.5, jax.random.key(0), batch)
            assert float(got) == float(loss(0.5, jax.random.key(0), as_float)) > 1.0


def test_every_loss_of_float32_data_is_float32_under_x64(x64):
    """Under jax_enable_x64 with float32 data the diffusion and flow-matching losses drew float64
    times and returned float64 losses, while interpolant_loss, meanflow_loss and the consistency
    losses returned float32 (the usability audit's U9). Each loss now returns the data's dtype
    widened to float32 (diffusion_loss draws its times so; interpolant_loss casts its error);
    float64 data keeps float64."""
    path = jd.linear_path()
    one = lambda target: jd.Field(lambda p, x, t: 0.5 * x, target)  # noqa: E731
    two = jd.Field(lambda p, x, t, r=None: 0.5 * x, "velocity")
    source = lambda key, shape: jax.random.normal(key, shape, jnp.float32)  # noqa: E731
    losses = {
        "flow_matching": jd.flow_matching_loss(one("velocity"), path),
        "exact_ot": jd.flow_matching_loss(one("velocity"), path, coupling=jd.exact_ot()),
        "source": jd.flow_matching_loss(one("velocity"), path, source=source),
        "eps": jd.diffusion_loss(one("eps"), jd.vp_path()),
        "interpolant": jd.interpolant_loss(one("velocity"), jd.brownian_bridge(0.5)),
        "meanflow": jd.meanflow_loss(two, path),
        "shortcut": jd.shortcut_loss(two, path),
        "ct": jd.consistency_training_loss(
            jd.Field(jd.consistency_function(lambda p, x, t: x), "x0"), path
        ),
        # importance_time's weights came in its table's default float (float64: a dtype review)
        "importance": jd.flow_matching_loss(
            one("velocity"), path, time_sampler=jd.importance_time(path, jd.min_snr_weight())
        ),
        "importance_meanflow": jd.meanflow_loss(
            two, path, time_sampler=jd.importance_time(path, jd.min_snr_weight())
        ),
    }
    for dtype in (jnp.float32, jnp.float64):
        x = jnp.ones((8, 2), dtype)
        # the dtype is fixed when the loss is traced: eval_shape traces each loss as an eager call
        # would (same code, same dtype rules) without compiling its ops one by one
        got = {
            name: jax.eval_shape(loss, None, jax.random.key(0), x).dtype
            for name, loss in losses.items()
        }
        assert got == dict.fromkeys(losses, jnp.dtype(dtype)), got
