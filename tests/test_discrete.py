"""Discrete DDPM and DDIM: closed forms against brute-force Gaussian conditioning, Ho et al.'s
formulas, spacings, DDIM = DDPM at eta = 1 and = the exponential integrator at eta = 0, inversion,
and the negative ELBO against the exact NLL of Gaussian data."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd

PAIRS = [(0.1, 0.3), (0.5, 0.52), (0.02, 0.9)]  # (s, t), s < t; floats: exact in float64


@pytest.mark.parametrize(
    "make", [jd.vp_path, jd.cosine_path, lambda: jd.discrete_path(jd.linear_betas(100))]
)
def test_posterior_is_gaussian_conditioning(make, x64):
    """q(x_s | x_t, x0) from the joint of (x_s, x_t): x_s = a_s x0 + sigma_s e1,
    x_t = (a_t / a_s) x_s + sqrt(sigma_t^2 - (a_t / a_s)^2 sigma_s^2) e2."""
    path = make()
    x0, xt = jnp.array([[0.7, -1.2]]), jnp.array([[0.3, 0.5]])
    for s, t in PAIRS:
        a_s, a_t, v_s, v_t = path.alpha(s), path.alpha(t), path.sigma_sq(s), path.sigma_sq(t)
        cov = a_t / a_s * v_s  # Cov(x_s, x_t)
        mean_bf = a_s * x0 + cov / v_t * (xt - a_t * x0)
        var_bf = v_s - cov**2 / v_t
        mean, var = jd.posterior(path, xt, x0, t, s)  # the step from t back to s
        np.testing.assert_allclose(mean, mean_bf, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(var, var_bf, rtol=1e-9)


def test_ddpm_formulas_of_ho_et_al(x64):
    """beta~_t, mu~_t, Design II's mean and the x0 KL weight on the 1000 linear betas."""
    betas = jd.linear_betas(1000)
    abar = jd.alpha_bars(betas)
    path = jd.discrete_path(betas)
    i = jnp.array([2, 10, 500, 1000])  # 1-based steps
    s, t = (i - 1) / 1000, i / 1000
    b, ab, ab_prev = betas[i - 1], abar[i - 1], abar[i - 2]
    x0, eps = jnp.array([[0.5, -1.0]] * 4), jnp.array([[1.3, 0.2]] * 4)
    xt = jnp.sqrt(ab)[:, None] * x0 + jnp.sqrt(1 - ab)[:, None] * eps
    mean, var = jd.posterior(path, xt, x0, t, s)
    mu = (jnp.sqrt(ab_prev) * b / (1 - ab))[:, None] * x0 + (
        jnp.sqrt(1 - b) * (1 - ab_prev) / (1 - ab)
    )[:, None] * xt
    np.testing.assert_allclose(mean, mu, rtol=1e-9)
    np.testing.assert_allclose(var, (1 - ab_prev) * b / (1 - ab), rtol=1e-9)
    x0_hat, _ = jd.to_x0_eps(path, xt, t, eps, "eps")  # Design II: the network predicts eps
    mean_ii, var_large = jd.reverse_mean_var(path, xt, x0_hat, t, s, var_weight=1.0)
    ho = (xt - (b / jnp.sqrt(1 - ab))[:, None] * eps) / jnp.sqrt(1 - b)[:, None]
    np.testing.assert_allclose(mean_ii, ho, rtol=1e-9)
    np.testing.assert_allclose(var_large, b, rtol=1e-9)
    w = jd.denoising_weight(path, t, s, "x0")
    np.testing.assert_allclose(w, ab_prev * b**2 / (2 * var * (1 - ab) ** 2), rtol=1e-8)
    w_eps = jd.denoising_weight(path, t, s, "eps")
    np.testing.assert_allclose(w_eps, b**2 / (2 * var * (1 - b) * (1 - ab)), rtol=1e-8)


def test_spacings_and_zero_terminal_snr():
    np.testing.assert_allclose(jd.trailing_timesteps(1000, 4), [1, 0.75, 0.5, 0.25, 0], atol=1e-6)
    for spacing in (jd.linspace_timesteps, jd.leading_timesteps, jd.trailing_timesteps):
        # static index arithmetic: the same grid inside jit (a sampler traced with its grid)
        np.testing.assert_allclose(jax.jit(lambda s=spacing: s(1000, 7))(), spacing(1000, 7), 1e-6)
    np.testing.assert_allclose(
        jd.leading_timesteps(1000, 4), [0.751, 0.501, 0.251, 0.001, 0], atol=1e-6
    )
    np.testing.assert_allclose(
        jd.linspace_timesteps(1000, 4), [1.0, 0.667, 0.334, 0.001, 0], atol=1e-6
    )
    betas = jd.linear_betas(1000)
    zt = jd.rescale_zero_terminal_snr(betas)
    abar, abar_zt = jd.alpha_bars(betas), jd.alpha_bars(zt)
    assert float(abar_zt[-1]) == 0.0 and float(zt[-1]) == 1.0
    np.testing.assert_allclose(abar_zt[0], abar[0], rtol=1e-5)
    assert bool(jnp.all(jnp.diff(abar_zt) < 0))
    path = jd.discrete_path(zt)
    assert float(path.alpha(1.0)) == 0.0 and float(path.sigma(1.0)) == 1.0
    with pytest.raises(ValueError, match="num_steps <= num_train_steps"):
        jd.trailing_timesteps(10, 20)


MIX = jd.GaussianMixture.isotropic(jnp.array([[2.0, 0.0], [-1.0, 1.5]]), std=0.4)


def test_ddim_eta_one_is_ancestral_ddpm_step_and_sample():
    path = jd.vp_path()
    grid = jd.trailing_timesteps(1000, 50)
    field = MIX.field(path, "eps")
    key = jax.random.key(0)
    S = jd.samplers
    ddpm = jax.jit(lambda k: jd.sample(k, path, field, (4000, 2), sampler=S.ancestral(), ts=grid))
    ddim = jax.jit(lambda k: jd.sample(k, path, field, (4000, 2), sampler=S.ddim(1.0), ts=grid))
    a, b = ddpm(key).x, ddim(key).x
    # the same draws: identical samples (the step formulas agree), up to float32 rounding
    np.testing.assert_allclose(a, b, atol=2e-4)
    # and the distribution is right: ED bound as in test_sample (null sd ~7e-4 at N = 4000)
    true = MIX.sample(jax.random.key(9), 4000)
    assert abs(float(jd.energy_distance(a, true))) < 5e-3
    x0, eps = MIX.predict(path, a, 0.5, "x0"), MIX.predict(path, a, 0.5, "eps")
    z = jax.random.normal(jax.random.key(3), a.shape)
    mean, var = jd.posterior(path, a, x0, 0.5, 0.4)
    step = jd.ddim_step(path, x0, eps, 0.5, 0.4, eta=1.0, noise=z)
    np.testing.assert_allclose(step, mean + jnp.sqrt(var) * z, rtol=1e-4, atol=1e-5)


def test_ddim_eta_zero_is_the_exponential_integrator_of_the_pf_ode(x64):
    path = jd.cosine_path()
    field = MIX.field(path, "v")
    x1 = jax.random.normal(jax.random.key(0), (256, 2), jnp.float64)
    tight = jd.samplers.ode(diffrax.Tsit5(), rtol=1e-10, atol=1e-10)
    ref = jd.sample(None, path, field, x_init=x1, sampler=tight, t_start=0.99, t_end=0.05).x
    errs = []
    for steps in (40, 80):
        grid = jnp.linspace(0.99, 0.05, steps + 1)
        ddim = jd.sample(None, path, field, x_init=x1, sampler=jd.samplers.ddim(), ts=grid).x
        errs.append(float(jnp.sqrt(jnp.mean((ddim - ref) ** 2))))
    dpm1 = jd.sample(None, path, field, x_init=x1, sampler=jd.samplers.dpm_solver_pp(1), ts=grid,
                     denoise=False).x  # fmt: skip
    np.testing.assert_allclose(ddim, dpm1, rtol=1e-12, atol=1e-12)  # DPM-Solver-1 = DDIM
    slope = np.log2(errs[0] / errs[1])
    assert abs(slope - 1.0) < 0.3  # first order, converging to the PF-ODE solution
    assert errs[-1] < 2e-2


def test_ddim_inversion_round_trip(x64):
    path = jd.vp_path()
    field = MIX.field(path, "eps")
    x = MIX.sample(jax.random.key(1), 512).astype(jnp.float64)
    errs = []
    for steps in (50, 200):
        grid = jnp.linspace(1e-3, 1.0, steps + 1)
        z = jd.ddim_invert(path, field, x, ts=grid).x
        back = jd.sample(None, path, field, x_init=z, sampler=jd.samplers.ddim(), ts=grid[::-1]).x
        errs.append(float(jnp.median(jnp.linalg.norm(back - x, axis=-1))))
    assert errs[1] < 0.02 and errs[1] < errs[0] / 3  # O(1 / steps): 4x the steps, ~4x smaller
    assert abs(float(jnp.std(z)) - 1.0) < 0.1  # lands on the prior N(0, I)


def test_nelbo_bounds_the_exact_nll_of_gaussian_data(x64):
    """-ELBO >= -log p(x0) for Gaussian data and the exact (oracle) network; close with many steps.

    The chain is uniform in log-SNR (lambda = 10 - 20 t): each step's gap is O(d lambda^2), the
    sum O(1 / T). (On ``vp_path`` SNR ~ 1 / t near the data, consecutive steps there differ in SNR
    by a factor (i + 1) / i whatever T is, and the gap stays ~0.9 nats in 2-D at T = 1000.)"""
    data = jd.GaussianMixture(jnp.ones(1), jnp.array([[0.3, -0.2]]), 0.25 * jnp.eye(2)[None])
    path = jd.GaussianPath(lambda t: jnp.sqrt(jax.nn.sigmoid(10.0 - 20.0 * t)))
    x = data.sample(jax.random.key(0), 2000)
    nll = -data.log_prob(x)
    gaps = {}
    for steps, target in ((50, "eps"), (1000, "x0")):
        # jitted: one compile per chain instead of its ops compiled one by one eagerly
        field = data.field(path, target)
        run = jax.jit(lambda k, x, f=field, n=steps: jd.nelbo(k, path, f, x, steps=n))
        terms = run(jax.random.key(1), x)
        gaps[steps] = float(jnp.mean(terms.total - nll))
    # measured: 1.61 at T = 50, 0.101 at T = 1000 (0.055 at 4000); standard error of the mean
    # gap 0.026 (the draws of x_t), so the bound 0 holds at ~4 SE and the cap at ~4 SE
    assert gaps[50] > 1.0
    assert 0.0 < gaps[1000] < 0.2


def test_nelbo_on_a_log_snr_grid_closes_the_gap_the_uniform_grid_leaves():
    """On the linear path SNR = ((1 - t) / t)^2: the uniform grid's first steps differ in SNR by
    (i / (i - 1))^2 whatever T is, and the exact model stays ~1.40 nats per dimension above -log p
    (measured 2.91 +- 0.13 in 2-D at T = 400); ts uniform in log-SNR from t = 1e-4 closes it
    (2.37 at T = 100, 0.50 +- 0.05 at T = 400)."""
    data = jd.GaussianMixture(jnp.ones(1), jnp.array([[0.3, -0.2]]), 0.25 * jnp.eye(2)[None])
    path = jd.linear_path()
    field = data.field(path, "x0")
    x = data.sample(jax.random.key(0), 1000)
    nll = -data.log_prob(x)
    grid = jnp.flip(jd.log_snr_grid(path, 399, 1.0, 1e-4))
    run = jax.jit(lambda k, x, ts: jd.nelbo(k, path, field, x, ts=ts))
    uniform = run(jax.random.key(1), x, jnp.arange(1, 401) / 400)  # steps=400's grid
    gap_uniform = float(jnp.mean(uniform.total - nll))
    gap = float(jnp.mean(run(jax.random.key(1), x, grid).total - nll))
    assert gap_uniform > 2.3 and 0.2 < gap < 0.8, (gap_uniform, gap)  # ~4 SE either side
    with pytest.raises(ValueError, match="either steps or ts"):
        jd.nelbo(jax.random.key(1), path, field, x, steps=10, ts=grid)
    with pytest.raises(ValueError, match="ts must increase from a time above 0 to t = 1"):
        jd.nelbo(jax.random.key(1), path, field, x, ts=grid[:-1])
    # a grid out of order was "strictly monotone (increasing or decreasing)", though it must
    # increase; a decreasing one is named so at once
    with pytest.raises(ValueError, match=r"ts \(ending at t = 1\) must be strictly increasing"):
        jd.nelbo(jax.random.key(1), path, field, x, ts=jnp.flip(grid))
    with pytest.raises(ValueError, match=r"ts \(of an inversion\) must be strictly increasing"):
        jd.ddim_invert(path, field, x, ts=jnp.array([0.5, 0.2, 0.3]))


def test_two_times_are_taken_from_to_and_the_wrong_order_is_an_error():
    """(t, s) = (from, to) everywhere; posterior(..., 0.6, 0.3) used to mean s = 0.6 > t = 0.3 and
    returned a negative variance with no error."""
    path, x = jd.vp_path(), jnp.ones((2, 2))
    _, var = jd.posterior(path, x, x, 0.6, 0.3)  # from 0.6 back to 0.3
    assert bool(jnp.all(var > 0))
    for fn in (
        lambda t, s: jd.posterior(path, x, x, t, s)[1],
        lambda t, s: jd.reverse_mean_var(path, x, x, t, s)[1],
        lambda t, s: jd.denoising_weight(path, t, s, "eps"),
    ):
        with pytest.raises(ValueError, match="s < t"):
            fn(0.3, 0.6)
        with pytest.raises(Exception, match="s < t"):  # traced times: checked when it runs
            jax.jit(fn)(0.3, 0.6).block_until_ready()
        assert bool(jnp.all(jnp.isfinite(jax.jit(fn)(0.6, 0.3))))


@pytest.mark.parametrize("make", [jd.vp_path, jd.ve_path])
def test_forward_chain_is_the_markov_chain_of_the_path(make):
    """Each step draws q(x_t | x_s): the marginals are q(x_t | x0) (mean alpha_t x0, std sigma_t)
    and neighbouring states covary as a Markov chain does, Cov(x_s, x_t) = (alpha_t / alpha_s)
    sigma_s^2. 40,000 chains: standard errors of the moments below 0.5% of their scale; bounds 4x
    that. A grid out of order or touching t = 0 is refused (it returned a wrong chain)."""
    path, n = make(), 40_000
    ts = jnp.array([0.2, 0.5, 1.0])
    x0 = jnp.full((n,), 0.7)
    xs = jd.forward_chain(jax.random.key(0), path, x0, ts)
    a, s = path.alpha(ts), path.sigma(ts)
    assert xs.shape == (3, n)
    np.testing.assert_allclose(xs.mean(1), 0.7 * a, atol=float(4 * s.max() / np.sqrt(n)))
    np.testing.assert_allclose(xs.std(1), s, rtol=4 / np.sqrt(2 * n))
    cov = float(jnp.mean((xs[0] - xs[0].mean()) * (xs[1] - xs[1].mean())))
    expected = float(a[1] / a[0] * s[0] ** 2)
    assert abs(cov - expected) < 4 * float(s[0] * s[1]) / np.sqrt(n), (cov, expected)
    chain = jax.jit(lambda ts: jd.forward_chain(jax.random.key(0), path, x0[:4], ts))
    for bad in ([0.5, 0.2], [0.0, 0.5], [0.2, jnp.nan], [0.5, 1.5]):
        with pytest.raises(ValueError, match=r"ts must be a 1-D grid increasing strictly inside \(0, 1\]"):  # fmt: skip
            jd.forward_chain(jax.random.key(0), path, x0, jnp.array(bad))
        with pytest.raises(Exception, match=r"ts must be a 1-D grid increasing strictly inside"):
            chain(jnp.array(bad)).block_until_ready()  # traced: when the program runs
    assert bool(jnp.all(jnp.isfinite(chain(ts))))


def test_var_weight_and_the_decoder_bins_are_checked():
    path, x = jd.vp_path(), jnp.ones((2, 2))
    with pytest.raises(ValueError, match=r"var_weight must be finite; got \[nan\]"):
        jd.reverse_mean_var(path, x, x, 0.5, 0.4, var_weight=float("nan"))
    with pytest.raises(ValueError, match=r"var_weight must be finite"):
        jd.nelbo(jax.random.key(0), path, jd.Field(lambda x, t: x, "eps"), x, steps=4,
                 var_weight=jnp.array([0.5, jnp.inf]))  # fmt: skip
    with pytest.raises(ValueError, match="num_bins must be >= 2"):  # 1 bin: half-width 1 / 0
        jd.discretized_gaussian_log_prob(x, x, x, num_bins=1)


def test_bits_per_dim_and_its_dimension():
    assert float(jd.bits_per_dim(64 * np.log(2.0), 64)) == pytest.approx(1.0)
    for dim in (0, -3):  # (a float is refused by the test suite's type checker first)
        with pytest.raises(ValueError, match=f"dim must be a positive integer; got {dim}"):
            jd.bits_per_dim(1.0, dim)


def test_a_stochastic_ddim_step_checks_eta():
    path, x = jd.vp_path(), jnp.ones((2, 2))
    for eta in (-1.0, jnp.nan):
        with pytest.raises(ValueError, match=r"eta must lie in \[0, 1.0\]"):
            jd.ddim_step(path, x, x, 0.5, 0.4, eta=eta, noise=x)


def test_the_chain_and_the_posterior_take_any_data_dtype():
    """Times never take the data's dtype (a bfloat16 grid of 1,000 times has duplicates and the
    chain raised 'increasing'); integer data gives floats (the posterior mean was truncated)."""
    path, key = jd.vp_path(), jax.random.key(0)
    ts = jnp.linspace(1e-3, 1.0, 1000)
    ref = jd.forward_chain(key, path, jnp.ones((3, 2)), ts)
    for dtype in (jnp.bfloat16, jnp.float16, jnp.int32):
        chain = jd.forward_chain(key, path, jnp.ones((3, 2), dtype), ts)
        assert chain.dtype == (jnp.float32 if dtype == jnp.int32 else dtype)
        np.testing.assert_allclose(chain[-1].astype(jnp.float32), ref[-1], atol=0.05)
    ones = jnp.ones((2, 3), jnp.int32)
    mean, _ = jd.posterior(path, ones, ones, 0.5, 0.2)
    assert mean.dtype == jnp.float32
    np.testing.assert_allclose(mean, jd.posterior(path, 1.0 * ones, 1.0 * ones, 0.5, 0.2)[0])
    assert 0.5 < float(mean[0, 0]) < 1.0


def test_the_transition_kernel_runs_forward():
    """p(x_t | x_s) needs s <= t: reversed times gave a mean x20 and a std clamped to 0."""
    path, x = jd.vp_path(), jnp.ones(3)
    with pytest.raises(ValueError, match="expected s <= t"):
        path.transition(x, 0.8, 0.2)
    with pytest.raises(Exception, match="expected s <= t"):
        jax.jit(lambda s: path.transition(x, s, 0.2)[0])(0.8).block_until_ready()
    mean, std = path.transition(x, 0.2, 0.8)
    assert 0.0 < float(std) < 1.0 and bool(jnp.all(mean < x))


def test_negative_betas_are_an_error_under_jit_too():
    betas = jnp.array([0.1, 0.5])
    with pytest.raises(ValueError, match="betas must lie in"):
        jd.discrete_path(-betas)
    with pytest.raises(Exception, match="betas must lie in"):
        jax.jit(lambda b: jd.discrete_path(b).alpha(0.5))(-betas).block_until_ready()


def test_discrete_sigma_near_zero_is_computed_without_cancellation():
    # float32 1 - abar at t = 1e-3 (abar = 0.9999) was 1.4e-4 off relative; now to a few ulps
    betas = jd.linear_betas(1000)
    path = jd.discrete_path(betas)
    b64 = np.asarray(betas, np.float64)
    one_minus = np.concatenate([[0.0], -np.expm1(np.cumsum(np.log1p(-b64)))])
    t = jnp.array([1e-3, 2e-3, 2.5e-3, 0.01, 0.5, 1.0], jnp.float32)
    ref = np.interp(np.asarray(t, np.float64), np.linspace(0, 1, 1001), one_minus)
    np.testing.assert_allclose(path.sigma_sq(t), ref, rtol=2e-6)
    np.testing.assert_allclose(path.sigma(t), np.sqrt(ref), rtol=2e-6)
    np.testing.assert_allclose(path.alpha(t) ** 2 + path.sigma_sq(t), 1.0, atol=3e-7)
    assert float(path.sigma_sq(0.0)) == 0.0


def test_nelbo_eager_repeat_reuses_its_program():
    """nelbo after its checks is one kept program (as jd.sample's): a repeat with another key,
    other data or other params reuses it with a jitted call's numbers (each eager call had run
    its terms op by op and compiled its scan anew: 2.8 s a repeat, 0.13 s now)."""
    from jaxdiff import _programs

    path = jd.vp_path()
    net = jd.Field(lambda p, x, t: p * x + t[:, None], "eps", jnp.asarray(0.5))
    x = jax.random.normal(jax.random.key(0), (8, 2))
    _programs.clear()
    a = jd.nelbo(jax.random.key(1), path, net, x, steps=20)
    b = jd.nelbo(jax.random.key(2), path, net.bind(jnp.asarray(0.1)), 2.0 * x, steps=20)
    assert len(_programs._cache) == 1
    jitted = jax.jit(lambda k, f, y: jd.nelbo(k, path, f, y, steps=20))
    for got, args in ((a, (jax.random.key(1), net, x)),
                      (b, (jax.random.key(2), net.bind(jnp.asarray(0.1)), 2.0 * x))):  # fmt: skip
        np.testing.assert_allclose(got.total, jitted(*args).total, rtol=1e-5)
