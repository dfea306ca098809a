"""Samplers: a 3-component mixture recovered by the reverse SDE and the PF-ODE on every path;
determinism and reversibility; NFE; trajectories; adaptive steps; jit/vmap/grad; errors."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd
from tests.test_paths import PATHS

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


CASES = [  # (path, eta, target, solver, steps): ODEs with Heun, SDEs with Euler-Maruyama
    ("vp", 0.0, "eps", diffrax.Heun(), 100),
    ("vp", 1.0, "score", None, 500),
    ("subvp", 0.0, "score", diffrax.Heun(), 100),
    ("subvp", 1.0, "eps", None, 500),
    ("ve", 0.0, "x0", diffrax.Heun(), 100),
    ("ve", 1.0, "score", None, 500),
    ("linear", 0.0, "velocity", diffrax.Heun(), 100),
    ("linear", 1.0, "x0", None, 500),
]


@pytest.mark.parametrize("name, eta, target, solver, steps", CASES)
def test_samplers_reproduce_the_mixture(name, eta, target, solver, steps, true_samples):
    path = PATHS[name]()
    t_start = 1.0 - 1e-3 if (name == "linear" and eta) else 1.0  # reverse SDE singular at alpha=0
    grid = jd.uniform_grid(steps, t_start, 1e-3)
    if name == "ve":  # VE's sigma spans 1e-2..50: a Karras grid puts the steps where they matter
        grid = jd.karras_grid(path, steps, t_start, 1e-3)

    @jax.jit
    def run(key):
        field = DATA.field(path, target)
        return jd.sample(key, path, field, (N, 2), target=target, eta=eta, solver=solver, ts=grid)

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
    kw = dict(target="eps", solver=diffrax.Tsit5(), rtol=1e-8, atol=1e-8)

    @jax.jit
    def there_and_back(key):
        x0 = jd.sample(key, path, field, x_init=x1, t_start=1.0, t_end=1e-3, **kw).x
        return x0, jd.sample(key, path, field, x_init=x0, t_start=1e-3, t_end=1.0, **kw).x

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
                target=target,
                t_start=0.99,
                steps=50,
                solver=diffrax.Heun(),
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

    def field(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return -x

    path = jd.vp_path()
    sol = jd.sample(jax.random.key(0), path, field, (4, 2), target="eps", solver=solver, steps=7)
    jax.block_until_ready(sol.x)
    assert int(sol.nfe) == init + per_step * 7 == len(calls)


def test_nfe_of_adaptive_and_sde_solves():
    calls = []

    def field(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return DATA.predict(path, x, t, "eps")

    path = jd.vp_path()
    sol = jd.sample(jax.random.key(0), path, field, (16, 2), target="eps",
                    solver=diffrax.Tsit5(), rtol=1e-4, atol=1e-4)  # fmt: skip
    jax.block_until_ready(sol.x)
    assert int(sol.nfe) == len(calls) == 1 + 6 * int(sol.num_steps)
    calls.clear()
    sol = jd.sample(jax.random.key(0), path, field, (16, 2), target="eps", eta=1.0,
                    solver=diffrax.ShARK(), steps=10)  # fmt: skip
    jax.block_until_ready(sol.x)
    assert int(sol.nfe) == len(calls) == 20


def test_trajectories_on_fixed_and_adaptive_grids(x64):
    path = jd.linear_path()
    field = DATA.field(path, "velocity")
    x1 = path.prior_sample(jax.random.key(0), (32, 2), jnp.float64)
    grid = jd.uniform_grid(100, 1.0, 1e-3)
    save = grid[jnp.array([0, 25, 50, 100])]
    fixed = jd.sample(jax.random.key(0), path, field, x_init=x1, target="velocity", ts=grid,
                      save_ts=save, solver=diffrax.Heun())  # fmt: skip
    assert fixed.xs.shape == (4, 32, 2)
    np.testing.assert_array_equal(fixed.xs[0], x1)
    np.testing.assert_array_equal(fixed.xs[-1], fixed.x)
    half = jd.sample(jax.random.key(0), path, field, x_init=x1, target="velocity",
                     ts=grid[:51], solver=diffrax.Heun())  # fmt: skip
    np.testing.assert_allclose(fixed.xs[2], half.x, rtol=1e-12)
    adaptive = jd.sample(jax.random.key(0), path, field, x_init=x1, target="velocity",
                         save_ts=save, solver=diffrax.Tsit5(), rtol=1e-9, atol=1e-9)  # fmt: skip
    np.testing.assert_allclose(adaptive.xs, fixed.xs, atol=2e-3)  # Heun at 100 steps: O(1e-4)
    with pytest.raises(ValueError, match="must be a point of the fixed time grid"):
        jd.sample(jax.random.key(0), path, field, x_init=x1, target="velocity", ts=grid,
                  save_ts=jnp.array([0.333]))  # fmt: skip


def test_jit_compiles_once_and_vmap_matches_a_loop(x64):
    # float64: vmap batches the field's matmuls differently, and near t = 0 the mixture's sharp
    # score amplifies float32 rounding to ~5e-5; in float64 the two agree to ~1e-13
    path = jd.vp_path()
    field = DATA.field(path, "eps")
    traces = []

    @jax.jit
    def run(key):
        traces.append(1)
        return jd.sample(key, path, field, (8, 2), target="eps", eta=1.0, steps=20).x

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
                        target="eps", steps=50, solver=diffrax.Heun())  # fmt: skip
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
        sol = jd.sample(None, path, data.field(path, "velocity"), x_init=x1, target="velocity",
                        solver=diffrax.Tsit5(), rtol=1e-9, atol=1e-9, adjoint=adjoint)  # fmt: skip
        return sol.x.mean()

    forward = jax.jit(mean_sample)
    fd = (forward(0.5 + 1e-5) - forward(0.5 - 1e-5)) / 2e-5
    assert float(jax.jit(jax.grad(mean_sample))(0.5)) == pytest.approx(float(fd), rel=1e-5)


def test_additive_noise_sde_solver_shark_reproduces_the_mixture(true_samples):
    path = jd.vp_path()

    @jax.jit
    def run(key):
        return jd.sample(key, path, DATA.field(path, "eps"), (N, 2), target="eps", eta=1.0,
                         solver=diffrax.ShARK(), steps=100)  # fmt: skip

    sol = run(jax.random.key(0))
    weights, means = _summary(sol.x)
    np.testing.assert_allclose(weights, WEIGHTS, atol=0.03)
    np.testing.assert_allclose(means, MEANS, atol=0.05)
    assert int(sol.nfe) == 200
    assert float(jd.energy_distance(sol.x, true_samples)) < ED_BOUND


def test_sampling_errors_are_clear():
    path = jd.vp_path()
    with pytest.raises(ValueError, match=r"field\(x, t\) returned shape \(8, 3\) but x has"):
        jd.sample(jax.random.key(0), path, lambda x, t: jnp.zeros((8, 3)), (8, 2))
    with pytest.raises(ValueError, match=r"t_end must lie in \[0.0, 1.0\]"):
        jd.sample(jax.random.key(0), path, lambda x, t: x, (8, 2), t_end=-0.1)
    with pytest.raises(ValueError, match="stop at t_end > 0"):
        jd.sample(jax.random.key(0), path, lambda x, t: x, (8, 2), t_end=0.0)
    with pytest.raises(ValueError, match="alpha_t = 0 at t = 1.0"):
        jd.sample(jax.random.key(0), jd.linear_path(), lambda x, t: x, (8, 2), eta=1.0)
    with pytest.raises(ValueError, match="non-finite"):
        jd.sample(jax.random.key(0), path, lambda x, t: x, x_init=jnp.full((2, 2), jnp.nan))
    with pytest.raises(ValueError, match="give the sample shape, or x_init"):
        jd.sample(jax.random.key(0), path, lambda x, t: x)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        jd.integrate(lambda x, t: x, jnp.ones(2), t_start=0.0, t_end=1.0, steps=4,
                     diffusion=lambda x, t: 1.0)  # fmt: skip
    with pytest.raises(ValueError, match="strictly monotone"):
        jd.integrate(lambda x, t: x, jnp.ones(2), ts=jnp.array([0.0, 0.5, 0.2]))
    with pytest.raises(Exception, match="non-finite"):  # a field that produces NaN
        jd.sample(jax.random.key(0), path, lambda x, t: x * jnp.nan, (4, 2)).x.block_until_ready()
