"""The driver and the diffrax samplers: a 3-component mixture recovered by the reverse SDE and the
PF-ODE on every path; determinism and reversibility; NFE; trajectories; adaptive steps;
jit/vmap/grad; the start at t_start < 1; the default grid; hooks; errors."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd
from tests.test_paths import PATHS

S = jd.samplers

MEANS = jnp.array([[3.0, 0.0], [-1.5, 2.6], [-1.5, -2.6]])  # pairwise 5.2 apart, std 0.4
WEIGHTS = jnp.array([0.5, 0.3, 0.2])
DATA = jd.GaussianMixture.isotropic(MEANS, std=0.4, weights=WEIGHTS)
N = 10_000

# Energy distance between two independent true sets of N = 10,000 points (measured over 30 seeds):
# mean 0 (a U-statistic), standard deviation 5.2e-4, largest 2.0e-3, right-skewed like a scaled
# chi-square with ~2 degrees of freedom (it is dominated by the multinomial error of the weights),
# whose tail puts P(ED > 5e-3) near 1e-4. The bound is 5e-3. A 0.05 error in two weights or a 0.3
# shift of one mean gives ED >= 0.02, four times the bound (test_energy_distance_bound_has_power).
ED_BOUND = 5e-3


def _summary(x):
    labels = jnp.argmin(jnp.linalg.norm(x[:, None, :] - MEANS[None], axis=-1), axis=1)
    weights = jnp.bincount(labels, length=3) / x.shape[0]
    means = jnp.stack([x[labels == k].mean(0) for k in range(3)])
    return weights, means


@pytest.fixture(scope="module")
def true_samples():
    return DATA.sample(jax.random.key(123), N)


def test_energy_distance_bound_has_power(true_samples):
    wrong_weights = jd.GaussianMixture.isotropic(MEANS, 0.4, jnp.array([0.45, 0.35, 0.2]))
    shifted = jd.GaussianMixture.isotropic(MEANS.at[0, 0].add(0.3), 0.4, WEIGHTS)
    for other in (wrong_weights, shifted):
        x = other.sample(jax.random.key(7), N)
        assert float(jd.energy_distance(x, true_samples)) > 3 * ED_BOUND
    null = jd.energy_distance(DATA.sample(jax.random.key(8), N), true_samples)
    assert abs(float(null)) < ED_BOUND


CASES = [  # (path, sampler, target, steps): ODEs with Heun, SDEs with Euler-Maruyama (Heun on VP
    # with the eps field: test_samplers' conformance suite, at 50 steps)
    ("vp", S.sde(), "score", 500),
    ("subvp", S.ode(diffrax.Heun()), "score", 100),
    ("subvp", S.sde(), "eps", 500),
    ("ve", S.ode(diffrax.Heun()), "x0", 100),  # default grid on VE: Karras'
    ("ve", S.sde(), "score", 500),
    ("linear", S.ode(diffrax.Heun()), "velocity", 100),
    ("linear", S.sde(), "x0", 500),
]


@pytest.mark.parametrize("name, sampler, target, steps", CASES)
def test_samplers_reproduce_the_mixture(name, sampler, target, steps, true_samples):
    path = PATHS[name]()  # the SDE on the linear path starts at 1 - 1e-3 by default

    @jax.jit
    def run(key):
        field = DATA.field(path, target)
        return jd.sample(key, path, field, (N, 2), sampler=sampler, steps=steps)

    x = run(jax.random.key(0)).x
    weights, means = _summary(x)
    # standard errors: weights 0.005 (N = 1e4), means 0.4 / sqrt(2000) = 0.009
    np.testing.assert_allclose(weights, WEIGHTS, atol=0.03)
    np.testing.assert_allclose(means, MEANS, atol=0.05)
    assert float(jd.energy_distance(x, true_samples)) < ED_BOUND


def test_probability_flow_is_deterministic_and_reversible(x64):
    path = jd.vp_path()
    field = DATA.field(path, "eps")
    x1 = path.prior_sample(jax.random.key(0), (256, 2), jnp.float64)
    ode = S.ode(diffrax.Tsit5(), rtol=1e-8, atol=1e-8)

    @jax.jit
    def there_and_back(key):
        x0 = jd.sample(key, path, field, x_init=x1, sampler=ode, t_end=1e-3).x
        back = jd.integrate(
            lambda x, t: jd.probability_flow_drift(path, field, x, t),
            x0,
            t_start=1e-3,
            t_end=1.0,
            solver=diffrax.Tsit5(),
            rtol=1e-8,
            atol=1e-8,
        )
        return x0, back.x  # fmt: skip

    x0_a, back = there_and_back(jax.random.key(1))
    x0_b, _ = there_and_back(jax.random.key(2))  # the key does not enter an ODE
    np.testing.assert_array_equal(x0_a, x0_b)
    np.testing.assert_allclose(back, x1, atol=1e-5, rtol=1e-5)


def test_every_target_gives_the_same_ode_solution(x64):
    path = jd.cosine_path()
    x1 = path.prior_sample(jax.random.key(0), (64, 2), jnp.float64)

    @jax.jit
    def solve_all(x1):
        return {
            target: jd.sample(
                None,
                path,
                DATA.field(path, target),
                x_init=x1,
                sampler=S.ode(diffrax.Heun()),
                t_start=0.99,
                steps=50,
            ).x  # fmt: skip
            for target in jd.TARGETS
        }

    sols = solve_all(x1)
    for target in jd.TARGETS:
        np.testing.assert_allclose(sols[target], sols["score"], rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize(
    "solver, per_step, init", [(diffrax.Euler(), 1, 0), (diffrax.Heun(), 2, 0),
                               (diffrax.Midpoint(), 2, 0), (diffrax.Tsit5(), 6, 1)],
)  # fmt: skip
def test_nfe_counts_the_real_field_evaluations(solver, per_step, init):
    calls = []

    def fn(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return -x

    path, field = jd.vp_path(), jd.Field(fn, "eps")
    sol = jd.sample(jax.random.key(0), path, field, (4, 2), sampler=S.ode(solver), steps=7)
    jax.block_until_ready(sol.x)
    assert int(sol.nfe) == init + per_step * 7 == len(calls)


def test_nfe_of_adaptive_and_sde_solves():
    calls = []

    def fn(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return DATA.predict(path, x, t, "eps")

    path, field = jd.vp_path(), jd.Field(fn, "eps")
    sol = jd.sample(jax.random.key(0), path, field, (16, 2),
                    sampler=S.ode(diffrax.Tsit5(), rtol=1e-4, atol=1e-4))  # fmt: skip
    jax.block_until_ready(sol.x)
    assert int(sol.nfe) == len(calls) == 1 + 6 * int(sol.num_steps)
    calls.clear()
    sol = jd.sample(jax.random.key(0), path, field, (16, 2), sampler=S.sde(diffrax.ShARK()),
                    steps=10)  # fmt: skip
    jax.block_until_ready(sol.x)
    assert int(sol.nfe) == len(calls) == 20


def test_trajectories_on_fixed_and_adaptive_grids(x64):
    path = jd.linear_path()
    field = DATA.field(path, "velocity")
    x1 = path.prior_sample(jax.random.key(0), (32, 2), jnp.float64)
    grid = jd.uniform_grid(100, 1.0, 1e-3)
    save = grid[jnp.array([0, 25, 50, 100])]
    heun = S.ode(diffrax.Heun())
    tsit5 = S.ode(diffrax.Tsit5(), rtol=1e-9, atol=1e-9)

    @jax.jit  # the three solves in one program: one compile instead of three eager ones
    def solves(key, x1):
        return (
            jd.sample(key, path, field, x_init=x1, sampler=heun, ts=grid, save_ts=save),
            jd.sample(key, path, field, x_init=x1, sampler=heun, ts=grid[:51]),
            jd.sample(key, path, field, x_init=x1, sampler=tsit5, save_ts=save),
        )

    fixed, half, adaptive = solves(jax.random.key(0), x1)
    assert fixed.xs.shape == (4, 32, 2)
    np.testing.assert_array_equal(fixed.xs[0], x1)
    np.testing.assert_array_equal(fixed.xs[-1], fixed.x)
    np.testing.assert_allclose(fixed.xs[2], half.x, rtol=1e-12)
    np.testing.assert_allclose(adaptive.xs, fixed.xs, atol=2e-3)  # Heun at 100 steps: O(1e-4)
    with pytest.raises(ValueError, match="must be a point of the time grid"):
        jd.sample(jax.random.key(0), path, field, x_init=x1, ts=grid, save_ts=jnp.array([0.333]))


def test_jit_compiles_once_and_vmap_matches_a_loop(x64):
    # float64: vmap batches the field's matmuls differently, and near t = 0 the mixture's sharp
    # score amplifies float32 rounding to ~5e-5; in float64 the two agree to ~1e-13
    path = jd.vp_path()
    field = DATA.field(path, "eps")
    traces = []

    @jax.jit
    def run(key):
        traces.append(1)
        return jd.sample(key, path, field, (8, 2), sampler=S.sde(), steps=20).x

    a, b = run(jax.random.key(0)), run(jax.random.key(1))
    assert len(traces) == 1
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(run(jax.random.key(0)), a)  # same key, same samples
    keys = jax.random.split(jax.random.key(2), 3)
    batched = jax.vmap(run)(keys)
    for i in range(3):
        np.testing.assert_allclose(batched[i], run(keys[i]), rtol=1e-10, atol=1e-12)


def test_gradients_flow_through_fixed_step_sampling(x64):
    """d/dm of the PF-ODE sample of N(m, 0.5^2) from fixed noise, against finite differences."""
    path = jd.vp_path()
    x1 = path.prior_sample(jax.random.key(0), (16, 1), jnp.float64)

    def mean_sample(m):
        data = jd.GaussianMixture(jnp.ones(1), jnp.reshape(m, (1, 1)), jnp.full((1, 1, 1), 0.25))
        sol = jd.sample(jax.random.key(0), path, data.field(path, "eps"), x_init=x1,
                        sampler=S.ode(diffrax.Heun()), steps=50)  # fmt: skip
        return sol.x.mean()

    g = jax.jit(jax.grad(mean_sample))(1.0)
    forward = jax.jit(mean_sample)
    fd = (forward(1.0 + 1e-5) - forward(1.0 - 1e-5)) / 2e-5
    assert float(g) == pytest.approx(float(fd), rel=1e-6)
    assert float(g) == pytest.approx(1.0, abs=0.02)  # the sample's mean moves with m


@pytest.mark.parametrize("adjoint", [None, diffrax.BacksolveAdjoint()])  # None: RecursiveCheckpoint
def test_gradients_through_adaptive_sampling_use_diffrax_adjoints(adjoint, x64):
    path = jd.linear_path()
    x1 = path.prior_sample(jax.random.key(0), (8, 1), jnp.float64)

    def mean_sample(m):
        data = jd.GaussianMixture(jnp.ones(1), jnp.reshape(m, (1, 1)), jnp.full((1, 1, 1), 0.25))
        ode = S.ode(diffrax.Tsit5(), rtol=1e-9, atol=1e-9, adjoint=adjoint)
        sol = jd.sample(None, path, data.field(path, "velocity"), x_init=x1, sampler=ode)
        return sol.x.mean()

    forward = jax.jit(mean_sample)
    fd = (forward(0.5 + 1e-5) - forward(0.5 - 1e-5)) / 2e-5
    assert float(jax.jit(jax.grad(mean_sample))(0.5)) == pytest.approx(float(fd), rel=1e-5)


def test_additive_noise_sde_solver_shark_reproduces_the_mixture(true_samples):
    path = jd.vp_path()

    @jax.jit
    def run(key):
        return jd.sample(key, path, DATA.field(path, "eps"), (N, 2), sampler=S.sde(diffrax.ShARK()),
                         steps=100)  # fmt: skip

    sol = run(jax.random.key(0))
    weights, means = _summary(sol.x)
    np.testing.assert_allclose(weights, WEIGHTS, atol=0.03)
    np.testing.assert_allclose(means, MEANS, atol=0.05)
    assert int(sol.nfe) == 200
    assert float(jd.energy_distance(sol.x, true_samples)) < ED_BOUND


def test_sampling_errors_are_clear():
    path, field = jd.vp_path(), jd.Field(lambda x, t: x, "eps")
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"field\(x, t\) returned shape \(8, 3\) but x has"):
        jd.sample(key, path, jd.Field(lambda x, t: jnp.zeros((8, 3)), "eps"), (8, 2))
    with pytest.raises(ValueError, match=r"must lie in \[0(\.0)?, 1"):
        jd.sample(key, path, field, (8, 2), t_end=-0.1)
    with pytest.raises(ValueError, match="end at t_end > 0"):
        jd.sample(key, path, field, (8, 2), t_end=0.0)
    with pytest.raises(ValueError, match="reverse SDE .* is singular"):  # t = 1 given: refused
        jd.sample(
            key, jd.linear_path(), jd.Field(lambda x, t: x, "x0"), (8, 2), sampler=S.sde(),
            t_start=1.0,
        )  # fmt: skip
    with pytest.raises(ValueError, match="alpha_t = 0 at the first time"):
        jd.sample(key, jd.linear_path(), field, (8, 2), t_start=1.0)  # eps: nothing about x0
    with pytest.raises(ValueError, match="x_init contains non-finite"):  # before the field runs
        jd.sample(key, path, field, x_init=jnp.full((2, 2), jnp.nan))
    with pytest.raises(ValueError, match="give the sample shape, or x_init"):
        jd.sample(key, path, field)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        jd.sample(None, path, field, x_init=jnp.ones((2, 2)), sampler=S.sde())
    with pytest.raises(ValueError, match="needs a PRNG key"):
        jd.integrate(lambda x, t: x, jnp.ones(2), t_start=0.0, t_end=1.0, steps=4,
                     diffusion=lambda x, t: 1.0)  # fmt: skip
    with pytest.raises(ValueError, match="strictly monotone"):
        jd.integrate(lambda x, t: x, jnp.ones(2), ts=jnp.array([0.0, 0.5, 0.2]))
    with pytest.raises(ValueError, match="strictly decreasing"):  # forwards in time: an error
        jd.sample(key, path, field, (8, 2), ts=jnp.linspace(1e-3, 1.0, 11))
    with pytest.raises(ValueError, match="give either ts or steps"):
        jd.sample(key, path, field, (8, 2), ts=jnp.linspace(1.0, 1e-3, 11), steps=10)
    with pytest.raises(ValueError, match="Euler has no error estimate"):
        S.ode(rtol=1e-3)
    with pytest.raises(ValueError, match="rtol must be a finite number >= 0"):
        S.ode(diffrax.Tsit5(), rtol=-1.0, atol=1e-3)
    with pytest.raises(ValueError, match="adjoint applies to adaptive solves"):
        S.ode(adjoint=diffrax.BacksolveAdjoint())
    with pytest.raises(ValueError, match="eta must lie in"):
        S.sde(eta=-1.0)
    for bad in (0, -1):  # silently accepted before (read only by adaptive solves)
        with pytest.raises(ValueError, match=f"max_steps must be a positive integer; got {bad}"):
            S.ode(diffrax.Tsit5(), rtol=1e-3, atol=1e-3, max_steps=bad)
        with pytest.raises(ValueError, match=f"max_steps must be a positive integer; got {bad}"):
            jd.integrate(lambda x, t: x, jnp.ones(2), t_start=0.0, t_end=1.0, rtol=1e-3,
                         atol=1e-3, solver=diffrax.Tsit5(), max_steps=bad)  # fmt: skip
    with pytest.raises(ValueError, match="s_tmin must be >= 0; got s_tmin = -1.0"):
        S.edm_heun(churn=40.0, s_tmin=-1.0)
    for s_tmax in (0.01, float("nan")):  # NaN compared false: churn silently never applied
        with pytest.raises(ValueError, match="expected s_tmin <= s_tmax"):
            S.edm_heun(churn=40.0, s_tmin=0.05, s_tmax=s_tmax)
    with pytest.raises(TypeError):  # a bare function has no target (message: test_losses)
        jd.sample(key, path, lambda x, t: x, (8, 2))
    with pytest.raises(Exception, match="non-finite"):  # a field that produces NaN
        nan = jd.Field(lambda x, t: x * jnp.nan, "eps")
        jd.sample(key, path, nan, (4, 2)).x.block_until_ready()


def test_checks_fire_under_jit_too():
    """Traced grids and times are checked when the program runs (equinox.error_if)."""
    path, field = jd.vp_path(), jd.Field(lambda x, t: x, "eps")
    key = jax.random.key(0)
    run = jax.jit(lambda ts: jd.sample(key, path, field, (8, 2), ts=ts).x)
    with pytest.raises(Exception, match="strictly decreasing"):
        run(jnp.linspace(1e-3, 1.0, 11)).block_until_ready()
    with pytest.raises(Exception, match=r"must lie in \[0(\.0)?, 1"):
        run(jnp.linspace(1.5, 1e-3, 11)).block_until_ready()
    start = jax.jit(lambda t0: jd.sample(key, path, field, (8, 2), t_start=t0).x)
    with pytest.raises(Exception, match=r"must lie in \[0(\.0)?, 1"):
        start(1.5).block_until_ready()
    end_at_zero = jax.jit(lambda t1: jd.sample(key, path, field, (8, 2), t_end=t1).x)
    with pytest.raises(Exception, match="end at t_end > 0"):
        end_at_zero(0.0).block_until_ready()
    assert bool(jnp.all(jnp.isfinite(run(jnp.linspace(1.0, 1e-3, 11)))))  # and a good grid runs


def test_start_is_drawn_at_the_first_time_of_the_grid(true_samples):
    """Starting at t_start = 0.8 on VE (sigma 9.1): the start is N(0, sigma_0.8^2), not the prior
    at t = 1 (sigma 50). Measured: ED 4.3e-4 with the reverse SDE at 200 steps; from the prior at
    t = 1 it was 0.059 (DDIM: 0.013 against 0.97; nearer the data, at t = 0.6, p_t is no longer
    close to N(0, sigma^2) for this mixture and neither start is right)."""
    path = jd.ve_path(0.01, 50.0)
    field = DATA.field(path, "x0")

    @jax.jit
    def run(key):
        ts = jd.karras_grid(path, 200, 0.8, 1e-3)
        return jd.sample(key, path, field, (N, 2), sampler=S.sde(), ts=ts, save_ts=ts[:1])

    sol = run(jax.random.key(0))
    sigma = float(path.sigma(0.8))
    # the start: std sigma_0.6 per coordinate (SE 0.7% at 2N values)
    assert float(jnp.std(sol.xs[0])) == pytest.approx(sigma, rel=0.03)
    assert float(jd.energy_distance(sol.x, true_samples)) < ED_BOUND


def test_default_grid_follows_the_path(true_samples):
    """EDM's VE path sigma = 80 t: the uniform grid gave energy distance 0.143 at 50 Euler steps;
    the default grid for a constant-alpha path is Karras'."""
    path = jd.GaussianPath(lambda t: jnp.ones_like(t), lambda t: 0.002 + (80.0 - 0.002) * t)
    field = DATA.field(path, "x0")
    sol = jax.jit(lambda k: jd.sample(k, path, field, (N, 2), steps=50))(jax.random.key(0))
    assert float(jd.energy_distance(sol.x, true_samples)) < ED_BOUND
    np.testing.assert_allclose(jd.default_grid(path, 7), jd.karras_grid(path, 7), rtol=1e-6)
    np.testing.assert_allclose(jd.default_grid(jd.vp_path(), 7), jd.uniform_grid(7), rtol=1e-6)


@pytest.mark.parametrize("kind", ["eps", "score", "sde", "tmpd"])
def test_default_start_is_inside_a_singular_prior(true_samples, kind):
    """Where alpha_1 = 0 (the linear path) and the field or the step divides by alpha_t, the
    default grid starts at 1 - 1e-3: the same draw as with that t_start given, and the data. Before,
    each of these was refused until t_start was set by hand; a velocity field still starts at 1."""
    path, key = jd.linear_path(), jax.random.key(0)
    sampler = S.sde() if kind == "sde" else S.dpm_solver_pp(2)
    field = DATA.field(path, "velocity" if kind == "sde" else "x0" if kind == "tmpd" else kind)
    if kind == "tmpd":  # an inverse field of a measurement that sees everything loosely
        meas = jd.Measurement(jd.matrix_operator(jnp.eye(2)), true_samples[:N], 100.0)
        field = jd.tmpd(field, path, meas)

    def run(**start):
        return jax.jit(lambda k: jd.sample(k, path, field, (N, 2), sampler=sampler, steps=50,
                                           **start).x)(key)  # fmt: skip

    x = run()
    np.testing.assert_array_equal(x, run(t_start=1.0 - 1e-3))
    assert float(jd.energy_distance(x, true_samples)) < ED_BOUND
    plain = DATA.field(path, "velocity")
    np.testing.assert_array_equal(  # nothing singular: from t = 1 as before
        jd.sample(key, path, plain, (8, 2), steps=5).x,
        jd.sample(key, path, plain, (8, 2), steps=5, t_start=1.0).x,
    )


def test_wrapped_fields_and_half_precision_keep_the_singular_start_rules():
    """The review: the rule read only the outer field, so clip_x0 of an eps field (target x0)
    started at t = 1 and gave NaN, and a dps field inside clip_x0, or any inverse field under a
    bfloat16 start (wrapped to cast), failed only at run time. Wrapped fields are now found in
    the wrapper's params: the default start moves inside, and t = 1 given is refused now."""
    path, key = jd.linear_path(), jax.random.key(0)
    small = jd.GaussianMixture.isotropic(jnp.array([[0.5, 0.0], [-0.5, 0.0]]), std=0.1)
    clipped = jd.clip_x0(small.field(path, "eps"), path)
    x = jd.sample(key, path, clipped, (8, 2), steps=5).x
    np.testing.assert_array_equal(x, jd.sample(key, path, clipped, (8, 2), steps=5,
                                               t_start=1.0 - 1e-3).x)  # fmt: skip
    with pytest.raises(ValueError, match="where an 'eps' prediction says nothing about x0"):
        jd.sample(key, path, clipped, (8, 2), steps=5, t_start=1.0)
    with pytest.raises(ValueError, match="where a 'score' prediction says nothing"):  # "an 'score'"
        jd.sample(key, path, small.field(path, "score"), (8, 2), steps=5, t_start=1.0)
    meas = jd.Measurement(jd.matrix_operator(jnp.eye(2)), jnp.zeros((8, 2)), 1.0)
    inverse = jd.dps(small.field(path, "x0"), path, meas)
    with pytest.raises(ValueError, match="jd.dps needs alpha_t > 0"):  # at trace time
        jd.sample(key, path, jd.clip_x0(inverse, path), (8, 2), steps=5, t_start=1.0)
    half = jnp.ones((8, 2), jnp.bfloat16)
    with pytest.raises(ValueError, match="jd.dps needs alpha_t > 0"):
        jd.sample(key, path, inverse, x_init=half, steps=5, t_start=1.0)
    assert bool(jnp.all(jnp.isfinite(jd.sample(key, path, inverse, x_init=half, steps=5).x)))


def test_zero_terminal_snr_starts_inside_where_the_drift_needs_the_slope(true_samples):
    """On a zero-terminal-SNR schedule (Lin et al. 2024) alpha ~ sqrt(1 - t) at t = 1, so
    d alpha / dt = -inf there: the ODE samplers with any field, and any sampler with a velocity
    field, gave NaN from the default t = 1 ("the sample contains non-finite values"), and so did
    log_likelihood. They now start (end) at 1 - 1e-3 by default, t = 1 given is refused with the
    reason, and DDIM of an x0 or v field still starts at t = 1, the schedule's point."""
    path = jd.discrete_path(jd.rescale_zero_terminal_snr(jd.linear_betas(1000)))
    key = jax.random.key(0)
    for sampler, target in ((S.ode(), "x0"), (S.ddim(), "velocity")):
        field = DATA.field(path, target)
        run = jax.jit(lambda k, s=sampler, f=field: jd.sample(k, path, f, (N, 2), sampler=s,
                                                              steps=50).x)  # fmt: skip
        x = run(key)
        assert float(jd.energy_distance(x, true_samples)) < ED_BOUND
        with pytest.raises(ValueError, match="slope .* is not finite at the first time"):
            jd.sample(key, path, field, (8, 2), sampler=sampler, steps=5, t_start=1.0)
    v = DATA.field(path, "v")
    np.testing.assert_array_equal(
        jd.sample(key, path, v, (8, 2), sampler=S.ddim(), steps=5).x,
        jd.sample(key, path, v, (8, 2), sampler=S.ddim(), steps=5, t_start=1.0).x,
    )
    logp = jd.log_likelihood(path, DATA.field(path, "velocity"), true_samples[:8]).logp
    assert bool(jnp.all(jnp.isfinite(logp)))
    with pytest.raises(ValueError, match="slope .* is not finite at t_end"):
        jd.log_likelihood(path, DATA.field(path, "x0"), true_samples[:8], t_end=1.0)


@pytest.mark.parametrize("name", ["linear_path", "cosine_path"])
def test_reverse_sde_default_grid_resolves_the_stiff_start(true_samples, name):
    """From 1 - 1e-3 where alpha_1 = 0 the reverse SDE's drift grows like eta^2 / (1 - t), and
    Euler--Maruyama on a uniform grid of 40 steps blows the first step up (energy distance 0.19 on
    the linear path and 0.24 on the cosine path at eta = 0.5, measured); the default grid there is
    uniform in log-SNR (0.0018 and 0.0002). At eta >= 1 the later steps undo the first one's
    overshoot, while 10 log-SNR steps compound the excess noise (2.5 on the linear path and 0.17
    on the cosine path against 0.20 and 0.078 uniform, measured): the grid stays uniform there.
    VP keeps the uniform grid."""
    path, key = getattr(jd, name)(), jax.random.key(0)
    sampler = S.sde(eta=0.5)
    np.testing.assert_allclose(
        sampler.grid(path, 40, 1.0 - 1e-3, 1e-3), jd.log_snr_grid(path, 40, 1.0 - 1e-3, 1e-3)
    )
    np.testing.assert_allclose(sampler.grid(jd.vp_path(), 40, 1.0, 1e-3), jd.uniform_grid(40))
    x0 = DATA.field(path, "x0")
    run = jax.jit(lambda k: jd.sample(k, path, x0, (N, 2), sampler=sampler, steps=40).x)
    assert float(jd.energy_distance(run(key), true_samples)) < ED_BOUND
    per_sample = S.sde(eta=jnp.full((8,), 0.5))  # the rule reads all of a per-sample eta
    np.testing.assert_allclose(
        per_sample.grid(path, 5, 1.0 - 1e-3, 1e-3), jd.log_snr_grid(path, 5, 1.0 - 1e-3, 1e-3)
    )
    assert bool(jnp.all(jnp.isfinite(jd.sample(key, path, x0, (8, 2), sampler=per_sample,
                                               steps=5).x)))  # fmt: skip
    np.testing.assert_allclose(
        S.sde().grid(path, 10, 1.0 - 1e-3, 1e-3), jd.uniform_grid(10, 1.0 - 1e-3, 1e-3)
    )
    by_grid = jax.jit(lambda k, ts: jd.sample(k, path, x0, (N, 2), sampler=S.sde(), ts=ts).x)
    default = jd.energy_distance(
        by_grid(key, S.sde().grid(path, 10, 1.0 - 1e-3, 1e-3)), true_samples
    )
    log_snr = jd.energy_distance(
        by_grid(key, jd.log_snr_grid(path, 10, 1.0 - 1e-3, 1e-3)), true_samples
    )
    assert float(default) < 0.6 * float(log_snr)  # 0.08 linear, 0.45 cosine (0.38-0.45 by seed)


def test_a_stiff_prior_end_starts_inside(true_samples):
    """discrete_path(cosine_betas()) clips its last beta at 0.999: alpha_1 = 4.9e-5, not 0, but
    the log-SNR falls by 6.9 over the last 1e-3, where alpha grows 31-fold and an eps field's
    error is multiplied by sigma / alpha = 2e4 in x0. From t = 1 a trained MLP's samples were
    ruined (energy distance 240 by Heun, 29 by DDIM and 225 by the reverse SDE at 10 steps; 0.19,
    0.20 and 0.29 from 1 - 1e-3, measured), and so were exact fields of any target under the
    samplers that step the drift (Euler on the probability-flow ODE of an x0 field: 1.8 against
    0.004 on this mixture, measured). Every field and sampler starts at 1 - 1e-3 by default
    there; t = 1 given is still allowed (alpha_1 > 0). VP's drop is 0.02."""
    path, key = jd.discrete_path(jd.cosine_betas()), jax.random.key(0)
    drop = float(path.log_snr(1.0 - 1e-3) - path.log_snr(1.0))
    vp = jd.vp_path()
    assert 6.5 < drop < 7.5 and float(vp.log_snr(1.0 - 1e-3) - vp.log_snr(1.0)) < 0.05

    @jax.jit  # all 18 draws in one program: one compile instead of 18 eager ones (the default
    def starts(key):  # start is chosen at trace time, from the path closed over, as eagerly)
        out = []
        for target in ("eps", "x0"):
            field = DATA.field(path, target)
            for sampler in (S.ode(), S.ddim(), S.sde()):
                draw = lambda s=sampler, f=field, **kw: jd.sample(key, path, f, (8, 2), sampler=s,
                                                                   steps=5, **kw).x  # fmt: skip
                out.append((draw(), draw(t_start=1 - 1e-3), draw(t_start=1.0)))
        return out

    for x, inside, at_one in starts(key):
        np.testing.assert_array_equal(x, inside)
        assert bool(jnp.all(jnp.isfinite(at_one)))
    x0 = DATA.field(path, "x0")
    for sampler, steps in ((S.sde(), 50), (S.ode(), 10)):
        run = jax.jit(lambda k, s=sampler, n=steps: jd.sample(k, path, x0, (N, 2), sampler=s,
                                                              steps=n).x)  # fmt: skip
        assert float(jd.energy_distance(run(key), true_samples)) < ED_BOUND


def test_stiffness_at_one_is_read_in_the_working_precision(x64):
    """vp_path(0.1, 700) in float64: alpha_1 = exp(-175) > 0 and the log-SNR falls by 0.70 over
    the last 1e-3 (not stiff), but stiff_at_one evaluated at float32 times, where alpha_1
    underflows to 0 and the drop is NaN: it read the path as singular (the last review's F5).
    (In float32 alpha_t underflows from t = 0.71 on, so float32 data cannot start near 1 on this
    path at all: the grid's own check names it, from 1 or from 1 - 1e-3 alike.)"""
    from jaxdiff._engine import prior_time, stiff_at_one

    path = jd.vp_path(0.1, 700.0)
    assert float(path.alpha(1.0)) > 0 and float(path.alpha(jnp.float32(0.999))) == 0
    np.testing.assert_allclose(
        float(path.log_snr(1.0 - 1e-3) - path.log_snr(1.0)), 0.6997, atol=1e-4
    )
    assert not bool(stiff_at_one(path))
    field = jd.Field(lambda x, t: 0.1 * x, "eps")
    assert prior_time(path, field) == 1.0
    sol = jd.sample(None, path, field, x_init=jnp.ones((4, 2)), steps=5, sampler=S.ddim())
    assert bool(jnp.all(jnp.isfinite(sol.x)))
    assert bool(stiff_at_one(jd.linear_path()))  # alpha_1 = 0 stays singular in float64


def test_fields_see_one_time_per_sample():
    """The field contract: t of shape (batch,) in samplers, as in losses."""
    seen = []

    def fn(x, t):
        seen.append(t.shape)
        return 0.5 * x

    path = jd.vp_path()
    samplers = (S.ode(diffrax.Heun()), S.ddim(), S.dpm_solver_pp(3), S.pc(), S.edm_heun())

    @jax.jit  # the calls are traced as eagerly (fn sees the same shapes): one compile, not six
    def calls(key, x):
        for sampler in samplers:
            jd.sample(key, path, jd.Field(fn, "eps"), (5, 2), sampler=sampler, steps=3)
        return jd.log_likelihood(path, jd.Field(fn, "eps"), x, t_start=0.5, rtol=1e-2).logp

    jax.block_until_ready(calls(jax.random.key(0), jnp.ones((5, 2))))
    assert seen and set(seen) == {(5,)}


def test_half_solver_sees_a_consistent_brownian_path():
    """HalfSolver takes two half steps inside each grid step: the increments must add up to one
    Brownian increment (variance 1 over [0, 1]); with one key per query it was 2.05."""
    x = jnp.zeros((20_000, 1))
    sol = jd.integrate(lambda x, t: jnp.zeros_like(x), x, t_start=0.0, t_end=1.0, steps=10,
                       diffusion=lambda x, t: 1.0, key=jax.random.key(0),
                       solver=diffrax.HalfSolver(diffrax.Euler()))  # fmt: skip
    # Var(W_1) = 1; the sample variance of 20,000 has standard error sqrt(2 / 20000) = 1%
    assert float(jnp.var(sol.x)) == pytest.approx(1.0, abs=0.05)


def test_gradients_through_a_sampler_store_one_state_per_step(x64):
    """Checkpointed steps: the backward pass keeps x per step, not the network's activations."""

    def mlp(params, x, t):
        h = jnp.tanh(jnp.concatenate([x, t[:, None]], axis=1) @ params["w1"])
        return h @ params["w2"]

    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"w1": jax.random.normal(k1, (3, 256)) / 2, "w2": jax.random.normal(k2, (256, 2)) / 16}
    field = jd.Field(mlp, "velocity", params)
    x1 = jax.random.normal(jax.random.key(1), (512, 2))

    def loss(params, steps, checkpoint):
        sol = jd.sample(None, jd.linear_path(), field.bind(params), x_init=x1, steps=steps,
                        checkpoint=checkpoint)  # fmt: skip
        return jnp.mean(sol.x**2)

    def temp_bytes(steps, checkpoint):
        grad = jax.jit(jax.grad(lambda p: loss(p, steps, checkpoint)))
        return grad.lower(params).compile().memory_analysis().temp_size_in_bytes

    lean, full = temp_bytes(100, True), temp_bytes(100, False)
    state = 512 * 2 * 8  # one float64 state
    # stored activations: 100 steps x 512 x 256 float64 x (2 or more) >= 200 MiB; one state per
    # step: 100 x 8 KiB = 0.8 MiB, plus one step's recomputation
    assert full > 100 * 512 * 256 * 8
    assert lean < 200 * state + 8 * 512 * 256 * 8
    g1 = jax.grad(lambda p: loss(p, 20, True))(params)
    g2 = jax.grad(lambda p: loss(p, 20, False))(params)
    np.testing.assert_allclose(g1["w1"], g2["w1"], rtol=1e-10)  # the same gradient


def test_inpainting_hook_replaces_the_known_coordinates(x64):
    """Independent coordinates: the known one ends at its value (up to sigma_t_end noise), the
    other keeps its marginal exactly. Correlated ones: replacement moves the unknown coordinate
    towards E[x2 | x1] but is biased (0.76 instead of 1.2 at correlation 0.8, measured), the known
    limitation of replacement (jd.inpaint's docstring)."""
    path, known, n = jd.vp_path(), 1.5, 8000
    x_known = jnp.zeros((n, 2)).at[:, 0].set(known)
    hook = jd.inpaint(path, x_known, jnp.array([True, False]))
    out = {}
    for rho in (0.0, 0.8):
        cov = jnp.array([[[1.0, rho], [rho, 1.0]]])
        data = jd.GaussianMixture(jnp.ones(1), jnp.zeros((1, 2)), cov)
        field = data.field(path, "eps")
        run = jax.jit(lambda k, f=field: jd.sample(k, path, f, (n, 2), sampler=S.sde(), steps=500,
                                                   hook=hook))  # fmt: skip
        out[rho] = run(jax.random.key(0)).x
    x = out[0.0]
    assert float(jnp.max(jnp.abs(x[:, 0] - known))) < 5 * float(path.sigma(1e-3))
    # standard errors at n = 8000: mean 0.011, variance 0.016
    assert abs(float(jnp.mean(x[:, 1]))) < 0.05
    assert float(jnp.var(x[:, 1])) == pytest.approx(1.0, abs=0.07)
    biased = float(jnp.mean(out[0.8][:, 1]))
    assert 0.5 < biased < 1.0, biased  # towards rho * known = 1.2, not there


def test_float32_data_under_x64_keeps_its_dtype_through_diffrax(x64):
    """With jax_enable_x64 the grid was float64, diffrax's stages promoted a float32 state to
    float64 and every solver but Euler failed ('different dynamic arguments', 'buffer.at[i].set
    dtype'); the grid now takes the state's precision."""
    path = jd.linear_path()
    data = jd.GaussianMixture.isotropic(jnp.zeros((1, 2)), std=1.0)
    f = data.field(path, "velocity")
    x = jnp.ones((4, 2), jnp.float32)
    for sampler in (jd.samplers.ode(diffrax.Heun()), jd.samplers.sde(diffrax.Heun())):
        out = jd.sample(
            jax.random.key(0), path, f, x_init=x, sampler=sampler, steps=10, t_start=0.999
        )
        assert out.x.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out.x)))
    low = jd.sample(
        None,
        path,
        f,
        x_init=x.astype(jnp.bfloat16),
        sampler=jd.samplers.ode(diffrax.Heun()),
        steps=10,
    )
    assert low.x.dtype == jnp.bfloat16
    like = jd.log_likelihood(path, f, x)  # adaptive Tsit5
    wide = jd.log_likelihood(path, f, x.astype(jnp.float64))
    np.testing.assert_allclose(like.logp, wide.logp, rtol=1e-4)


def test_traced_time_range_under_jit_equals_eager():
    """A traced t_start or t_end failed its own order check under jit ('expected t_end <
    t_start' for valid values: equinox's check misfired inside ensure_compile_time_eval)."""
    path = jd.vp_path()
    f = jd.GaussianMixture.isotropic(jnp.zeros((1, 2)), std=1.0).field(path, "eps")
    key = jax.random.key(0)

    def run(t_end, t_start=1.0):
        return jd.sample(key, path, f, (64, 2), steps=10, t_start=t_start, t_end=t_end).x

    np.testing.assert_allclose(jax.jit(run)(0.01), run(0.01), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        jax.jit(lambda s: run(0.01, s))(0.9), run(0.01, 0.9), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(Exception, match=r"t_end must lie in \[0.0, 1.0\]"):
        jax.jit(run)(1.5).block_until_ready()


def test_stochastic_samplers_that_end_at_sigma_zero_stay_finite():
    """DPM-Solver++ with eta > 0 to t = 0 gave 0 * inf = NaN in its noise; edm_heun's discarded
    second evaluation at sigma = 0 put a NaN in the gradients."""
    path, key = jd.vp_path(), jax.random.key(0)
    f = jd.GaussianMixture.isotropic(jnp.zeros((1, 2)), std=1.0).field(path, "eps")
    for order in (1, 2, 3):
        sampler = jd.samplers.dpm_solver_pp(order, eta=1.0)
        x = jd.sample(
            key, path, f, (4000, 2), sampler=sampler, steps=100, t_end=0.0, denoise=False
        ).x
        assert 0.9 < float(jnp.std(x)) < 1.1  # measured 0.94-1.02; N(0, I) data
    net = jd.Field(lambda p, x, t: p * x, "x0", 0.5)
    ts = jnp.linspace(0.999, 0.0, 11)

    def total(p):
        sampler = jd.samplers.edm_heun()
        return jd.sample(
            key, path, net.bind(p), (8, 2), sampler=sampler, ts=ts, denoise=False
        ).x.sum()

    grad = float(jax.grad(total)(0.5))
    central = (float(total(0.5 + 1e-3)) - float(total(0.5 - 1e-3))) / 2e-3
    assert np.isfinite(grad) and grad == pytest.approx(central, rel=1e-2)


def test_quiet_misuses_of_the_sampler_api_are_errors():
    """A save time given twice left a slot of zeros; ddim_step ignored eta without noise;
    dpm_solver_sde(eta=0) demanded a key it never used."""
    path = jd.vp_path()
    f = jd.GaussianMixture.isotropic(jnp.zeros((1, 2)), std=1.0).field(path, "eps")
    ts = jnp.linspace(1.0, 1e-3, 11)
    with pytest.raises(ValueError, match="the same grid time twice"):
        jd.sample(
            None,
            path,
            f,
            (4, 2),
            sampler=jd.samplers.ddim(),
            ts=ts,
            save_ts=ts[jnp.array([5, 5])],
            x_init=jnp.ones((4, 2)),
        )
    run = jax.jit(
        lambda st: (
            jd.sample(
                None,
                path,
                f,
                sampler=jd.samplers.ddim(),
                ts=ts,
                save_ts=st,
                x_init=jnp.ones((4, 2)),
            ).xs
        )
    )
    with pytest.raises(Exception, match="the same grid time twice"):  # traced: when it runs
        run(ts[jnp.array([5, 5])]).block_until_ready()
    x = jnp.ones((3, 2))
    with pytest.raises(ValueError, match="needs noise=z"):
        jd.ddim_step(path, x, x, 0.5, 0.4, eta=1.0)
    with pytest.raises(ValueError, match="needs noise=z"):  # a traced eta: at trace time
        jax.jit(lambda e: jd.ddim_step(path, x, x, 0.5, 0.4, eta=e))(1.0)
    det = jd.sample(None, path, f, x_init=x, sampler=jd.samplers.dpm_solver_sde(eta=0.0), steps=4)
    assert bool(jnp.all(jnp.isfinite(det.x)))


def _tiny_sample(sampler) -> jax.Array:
    path = jd.vp_path()
    f = jd.GaussianMixture.isotropic(jnp.zeros((1, 2)), std=1.0).field(path, "eps")
    return jd.sample(jax.random.key(0), path, f, (4, 2), sampler=sampler, steps=2).x


def _field_at_half(transform) -> jax.Array:
    path = jd.vp_path()
    field = transform(
        jd.GaussianMixture.isotropic(jnp.zeros((1, 2)), std=1.0).field(path, "eps"), path
    )
    return field(jnp.ones((4, 2)), jnp.full((4,), 0.5))


# Hyperparameter checks whose result was dropped, so jit dropped the check (those typed float,
# such as edm_scalings' sigma_data, cannot be traced): (use, bad value, name in the message).
DROPPED_CHECKS = {
    "langevin": (
        lambda v: jd.langevin(
            jax.random.key(0), lambda x: -x, jnp.zeros((4, 2)), step_size=v, steps=2
        ),
        -0.1,
        "step_size",
    ),
    "clip_x0": (lambda v: _field_at_half(lambda f, p: jd.clip_x0(f, p, v)), -1.0, "value"),
    "dynamic_thresholding": (
        lambda v: _field_at_half(lambda f, p: jd.dynamic_thresholding(f, p, value=v)),
        -1.0,
        "value",
    ),
    "edm_heun churn": (lambda v: _tiny_sample(jd.samplers.edm_heun(churn=v)), -1.0, "churn"),
    "edm_heun rho": (lambda v: _tiny_sample(jd.samplers.edm_heun(rho=v)), -1.0, "rho"),
    "edm_heun s_noise": (  # s_noise is read only where churn adds noise
        lambda v: _tiny_sample(jd.samplers.edm_heun(churn=1.0, s_noise=v)),
        -1.0,
        "s_noise",
    ),
    "pc snr": (lambda v: _tiny_sample(jd.samplers.pc(snr=v)), -0.1, "snr"),
    "ancestral var_weight": (
        lambda v: _tiny_sample(jd.samplers.ancestral(var_weight=v)),
        float("nan"),  # out of [0, 1]: "var_weight must lie in" (tests/test_audit_traced.py)
        "var_weight",
    ),
    "dpm_solver_2s s_noise": (
        lambda v: _tiny_sample(jd.samplers.dpm_solver_2s(s_noise=v)),
        -1.0,
        "s_noise",
    ),
    "dpm_solver_sde s_noise": (
        lambda v: _tiny_sample(jd.samplers.dpm_solver_sde(s_noise=v)),
        -1.0,
        "s_noise",
    ),
    "annealed_langevin": (
        lambda v: _tiny_sample(jd.samplers.annealed_langevin(steps_per_level=1, step_size=v)),
        -1.0,
        "step_size",
    ),
}


@pytest.mark.parametrize(
    "make",
    [
        lambda e: jd.samplers.sde(eta=e),
        lambda e: jd.samplers.dpm_solver_pp(eta=e),
        lambda e: jd.samplers.dpm_solver_2s(eta=e),
        lambda e: jd.samplers.dpm_solver_sde(eta=e),
        lambda e: jd.samplers.ddim(eta=e),
    ],
)
def test_a_traced_eta_is_checked_when_the_program_runs(make):
    """``check_eta`` returned nothing for a traced ``eta``: under ``jit`` a negative one ran
    (DDIM's ``eta = 2`` with its noise term clipped). It now comes back tied to a check."""
    with pytest.raises(ValueError, match=r"eta must lie in \[0, "):
        _tiny_sample(make(-1.0))
    with pytest.raises(Exception, match=r"eta must lie in \[0, "):
        jax.block_until_ready(jax.jit(lambda e: _tiny_sample(make(e)))(-1.0))
    assert bool(jnp.isfinite(jax.jit(lambda e: _tiny_sample(make(e)))(0.5)).all())


@pytest.mark.parametrize("case", DROPPED_CHECKS)
def test_hyperparameter_checks_hold_under_jit(case):
    fn, bad, name = DROPPED_CHECKS[case]
    with pytest.raises(ValueError, match=f"{name} must be"):
        fn(bad)
    with pytest.raises(Exception, match=f"{name} must be"):
        jax.block_until_ready(jax.jit(fn)(bad))


def test_messages_name_the_users_mistake():
    """A usability audit: a sample shape without its batch axis ((2,) for one 2-D point) was
    refused by the field's time check ("t has shape (2,); expected ... x's shape ()"), about a t
    the user never gave; save_ts = [0.0] after a grid ending at 1e-3 did not point to denoise=True."""
    mix = jd.GaussianMixture.isotropic(jnp.array([[2.0, 0.0], [-2.0, 0.0]]), std=0.3)
    path = jd.vp_path()
    field = mix.field(path, "eps")
    with pytest.raises(
        ValueError, match=r"shape \(2,\), read as \(batch, \*event\): batch 2, event shape \(\)"
    ):
        jd.sample(jax.random.key(0), path, field, (2,))
    with pytest.raises(ValueError, match=r"needs a batch axis.*got x_init = \(\)"):
        jd.sample(jax.random.key(0), path, field, x_init=jnp.zeros(()))
    # a batch of scalar samples is (batch,): it samples, as before
    scalar = jd.GaussianMixture.isotropic(jnp.array([[2.0], [-2.0]]), std=0.3)
    wrap = jd.Field(lambda x, t: scalar.field(path, "eps")(x[:, None], t)[:, 0], "eps")
    got = jd.sample(jax.random.key(0), path, wrap, (2000,), steps=20).x
    assert got.shape == (2000,) and abs(float(jnp.mean(jnp.abs(got))) - 2.0) < 0.05
    with pytest.raises(ValueError, match="denoise=True"):
        jd.sample(jax.random.key(0), path, field, (4, 2), save_ts=jnp.zeros(1))
    sol = jd.sample(jax.random.key(0), path, field, (4, 2), save_ts=jnp.zeros(1), denoise=True)
    np.testing.assert_array_equal(sol.xs[0], sol.x)


def test_an_eager_repeat_reuses_its_program_and_never_a_stale_one():
    """``jd.sample`` called eagerly jits a fresh closure; its compiled program is kept by the
    lowered text: a repeat with another key, a fresh sampler or new ``params`` runs the same
    program (equal to a jitted call's numbers), while new closed-over constants or a host
    callback's other function are new programs (never a stale result)."""
    from jaxdiff import _programs

    path = jd.linear_path()
    f = jd.Field(lambda p, x, t: jnp.tanh(p * x + t[:, None]), "velocity", 0.5)
    f = jd.Field(f.fn, "velocity", jnp.asarray(0.5))  # params: an array, an argument
    _programs._cache.clear()

    def draw(field, key, sampler=None):
        return jd.sample(key, path, field, (4, 2), sampler=sampler or jd.samplers.ode(), steps=3).x

    a = draw(f, jax.random.key(0))
    b = draw(f, jax.random.key(1), jd.samplers.ode())  # a new sampler object, another key
    c = draw(f.bind(jnp.asarray(-2.0)), jax.random.key(0))
    assert len(_programs._cache) == 1
    jitted = jax.jit(draw, static_argnums=2)  # traced: compiled on its own, no cache
    for got, field, seed in ((a, f, 0), (b, f, 1), (c, f.bind(jnp.asarray(-2.0)), 0)):
        np.testing.assert_allclose(got, jitted(field, jax.random.key(seed)), rtol=1e-6, atol=1e-6)
    assert not np.allclose(a, b) and not np.allclose(a, c)
    x_init = jnp.ones((4, 2))
    for w in (1.0, 3.0):  # a closed-over array: a constant of the text, a new program
        const = jnp.full((1, 2), w)
        field = jd.Field(lambda x, t, c=const: jnp.zeros_like(x) + c, "velocity")
        x = jd.sample(None, path, field, (4, 2), x_init=x_init, steps=3).x
        np.testing.assert_allclose(x, 1.0 - w * (1.0 - 1e-3), atol=1e-6)  # x_init - w (1 - t_end)
    assert len(_programs._cache) == 3

    def closed_over(w):  # under grad (and jit) the field closes over a tracer: not cached
        field = jd.Field(lambda x, t: jnp.zeros_like(x) + w, "velocity")
        return jd.sample(None, path, field, (4, 2), x_init=x_init, steps=3).x.sum()

    for outer in (jax.grad, lambda f: jax.jit(jax.grad(f))):
        np.testing.assert_allclose(outer(closed_over)(2.0), -8 * (1.0 - 1e-3), rtol=1e-6)
    assert len(_programs._cache) == 3

    class Net:  # one function object whose mode picks the leaf it reads (live or EMA weights)
        use = "live"

        def __call__(self, p, x, t):
            return jnp.zeros_like(x) + p[self.use]

    net = Net()  # jit drops the unused leaf from the text: both modes print the same text
    weights = jd.Field(net, "velocity", {"live": jnp.asarray(1.0), "ema": jnp.asarray(5.0)})
    for use, w in (("live", 1.0), ("ema", 5.0)):
        net.use = use
        x = jd.sample(None, path, weights, (4, 2), x_init=x_init, steps=3).x
        np.testing.assert_allclose(x, 1.0 - w * (1.0 - 1e-3), atol=1e-5)
    with jax.disable_jit():  # jit's own path (the AOT path refuses disable_jit)
        x = jd.sample(None, path, weights, (4, 2), x_init=x_init, steps=3).x
    np.testing.assert_allclose(x, 1.0 - 5.0 * (1.0 - 1e-3), atol=1e-5)
    nan = jd.Field(lambda x, t: x * jnp.nan, "velocity")
    with jax.debug_nans(True), pytest.raises(FloatingPointError):  # names the operation
        jd.sample(None, path, nan, (4, 2), x_init=x_init, steps=3)
    _programs.clear()
    for host in (np.sin, np.cos):  # the same text; a callback's function is not in it

        def velocity(x, t, host=host):  # the value comes from the host function alone
            like = jax.ShapeDtypeStruct(x.shape, x.dtype)
            return jax.pure_callback(lambda v: np.full_like(v, host(1.0)), like, x)

        field = jd.Field(velocity, "velocity")
        x = jd.sample(None, path, field, (4, 2), x_init=x_init, steps=3).x
        np.testing.assert_allclose(x, 1.0 - host(1.0) * (1.0 - 1e-3), atol=1e-6)
    assert len(_programs._cache) == 0


def test_runtime_checks_of_the_same_messages_share_a_program():
    """A program whose only host callbacks are runtime checks (``equinox.error_if``, e.g. the
    mixture oracle's finite-``x`` and time-range checks) is kept with its checks' messages in the
    key: an eager repeat runs it (it had compiled again on every call, ~0.4 s for a 20-step
    sample), a check of another message is another program, and a kept program's check still
    raises its own message."""
    import equinox as eqx

    from jaxdiff import _programs

    path = jd.linear_path()
    mix = jd.GaussianMixture.isotropic(jnp.array([[1.0, 0.0], [-1.0, 0.0]]), std=0.5)
    oracle = mix.field(path, "velocity")
    _programs.clear()
    a = jd.sample(jax.random.key(0), path, oracle, (8, 2), steps=5).x
    b = jd.sample(jax.random.key(1), path, oracle, (8, 2), steps=5).x
    assert len(_programs._cache) == 1 and not np.allclose(a, b)
    jitted = jax.jit(lambda k: jd.sample(k, path, oracle, (8, 2), steps=5).x)
    np.testing.assert_allclose(b, jitted(jax.random.key(1)), rtol=1e-6, atol=1e-6)

    class Checked:  # one function object (the same tree), whose check's message may change
        msg = "first message"

        def __call__(self, x, t):
            return eqx.error_if(jnp.zeros_like(x), jnp.any(x > 2.0), self.msg)

    checked, x_init = Checked(), jnp.ones((4, 2))
    field = jd.Field(checked, "velocity")
    for msg in ("first message", "second message"):  # the same text, another message
        checked.msg = msg
        jd.sample(None, path, field, (4, 2), x_init=x_init, steps=3)
        with pytest.raises(Exception, match=msg):
            jd.sample(None, path, field, (4, 2), x_init=3.0 * x_init, steps=3)
    assert len(_programs._cache) == 3


def test_eager_calls_run_under_equinox_breakpoint_mode():
    """EQX_ON_ERROR=breakpoint (equinox's debugging mode) replaces jax.jit by a wrapper without
    .lower: the eager program cache called it and jd.sample, log_likelihood and nelbo failed with
    an AttributeError; they take jit's own path there now."""
    import os
    import subprocess
    import sys

    code = (
        "import jax, jax.numpy as jnp, jaxdiff as jd\n"
        "mix = jd.GaussianMixture.isotropic(jnp.array([[1.0, 0.0], [-1.0, 0.0]]), std=0.5)\n"
        "lin, vp = jd.linear_path(), jd.vp_path()\n"
        "x = mix.sample(jax.random.key(1), 4)\n"
        "a = jd.sample(jax.random.key(0), vp, mix.field(vp, 'eps'), (8, 2), steps=5).x\n"
        "b = jd.log_likelihood(lin, mix.field(lin, 'velocity'), x).logp\n"
        "c = jd.nelbo(jax.random.key(0), vp, mix.field(vp, 'eps'), x, steps=10).total\n"
        "print(bool(jnp.all(jnp.isfinite(a)) & jnp.all(jnp.isfinite(b)) & jnp.all(jnp.isfinite(c))))\n"
    )
    env = dict(os.environ, EQX_ON_ERROR="breakpoint", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == "True"
