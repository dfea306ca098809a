"""One conformance suite for every sampler: a new sampler gets all of it by joining ``SAMPLERS``.

For each: output shape and dtype, ``x_init``, saved states, the evaluation count (against a
counting field, the same eagerly and under ``jit``), one compile per shape, keys (``None`` for a
deterministic sampler, an error for a stochastic one; the same key gives the same sample), ``vmap``
and one's own ``init``/``step`` loop against the driver from ``t_start < 1`` (no evaluation
later), ``grad`` through deterministic samplers, and the 3-component mixture recovered within the
energy-distance bound of ``test_sample`` at the stated steps, in float32 and from a bfloat16
start.

The suite's time is XLA compiles (each sampler's program ~1-3 s on 2 CPU cores), so properties
that can share a compiled program share it: one test checks structure, counts and keys on the same
jitted run, one checks ``vmap`` and one's own loop on the same batched run, and the Euler
identities run each case's five targets in one program.

Every sampler runs on the VP path with the mixture's exact eps field, except the few-step
samplers, which need fields of their own kind (``EXACT``): MeanFlow the exact average velocity and
consistency sampling the exact consistency function (the flow map to ``t = 0``) of the same mixture
on the linear path, both by an ODE solve of the exact velocity inside the field (Heun's
third-order method, 16 steps, whose stages never touch ``t = 0``). The interpolant sampler runs on
the VP path itself: a ``GaussianPath`` is the ``gamma = 0`` case of an interpolant (its
Brownian-bridge case is tested in ``test_interpolants``).
"""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd
from tests.test_sample import DATA, ED_BOUND, N

S = jd.samplers
PATH = jd.vp_path()
LINEAR = jd.linear_path()

SAMPLERS = [  # (name, sampler, steps at which the mixture is recovered within ED_BOUND)
    ("ode-euler", S.ode(), 100),
    ("ode-heun", S.ode(diffrax.Heun()), 50),
    ("ode-tsit5", S.ode(diffrax.Tsit5()), 20),
    ("sde-euler-maruyama", S.sde(), 500),
    ("sde-shark", S.sde(diffrax.ShARK()), 100),
    ("sde-eta-of-t", S.sde(eta=lambda t: 2.0 * t), 500),
    ("ancestral", S.ancestral(), 200),
    ("ddim", S.ddim(), 50),
    ("ddim-eta", S.ddim(0.5), 200),
    ("pc", S.pc(), 100),
    ("annealed-langevin", S.annealed_langevin(steps_per_level=100, step_size=5e-5), 20),
    ("edm-heun", S.edm_heun(), 17),
    ("edm-heun-churn", S.edm_heun(churn=10.0), 24),
    ("dpm-solver++-2m", S.dpm_solver_pp(2), 19),
    ("dpm-solver++-3m", S.dpm_solver_pp(3), 19),
    ("dpm-solver++-2m-sde", S.dpm_solver_pp(2, eta=1.0), 39),
    ("dpm-solver++-3m-sde", S.dpm_solver_pp(3, eta=1.0), 39),
    ("dpm-solver++-2s-ancestral", S.dpm_solver_2s(), 19),
    ("dpm-solver++-sde", S.dpm_solver_sde(), 19),
    ("unipc-2-bh2", S.unipc(2), 19),
    ("unipc-3-bh1", S.unipc(3, variant="bh1"), 19),
    ("meanflow", S.meanflow(), 1),  # exact fields: the data law at any number of steps
    ("consistency", S.consistency(), 2),
    ("interpolant-ode", S.interpolant_sde(), 50),
    ("interpolant-sde", S.interpolant_sde(lambda t: t), 100),
]
IDS = [name for name, _, _ in SAMPLERS]
STEPS = 4  # structural tests


def average_velocity(velocity, x, t, r, steps=16):
    """``u = int_0^1 v(x(tau), t + tau (r - t)) dtau`` along ``dx/dtau = (r - t) v``, so that
    ``x(r) = x - (t - r) u``: Heun's third-order method in ``tau`` (nodes 0, 1/3, 2/3, never the
    end), per-sample times; ``r = t`` gives ``v(x, t)`` exactly."""
    h, d = 1.0 / steps, (r - t)[:, None]

    def body(carry, i):
        x, acc = carry
        at = lambda c: t + (i + c) * h * (r - t)  # noqa: E731
        k1 = velocity(x, at(0.0))
        k3 = velocity(x + d * (2 * h / 3) * velocity(x + d * (h / 3) * k1, at(1 / 3)), at(2 / 3))
        inc = 0.25 * k1 + 0.75 * k3
        return (x + d * h * inc, acc + h * inc), None

    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # a bfloat16 x: integrate in float32
    (_, acc), _ = jax.lax.scan(body, (x32, jnp.zeros_like(x32)), jnp.arange(steps))
    return acc.astype(x.dtype)


def _meanflow_field(data):
    v = data.field(LINEAR, "velocity")
    return jd.Field(lambda x, t, r=None: v(x, t) if r is None else average_velocity(v, x, t, r),
                    "velocity")  # fmt: skip


def _consistency_field(data):
    v = data.field(LINEAR, "velocity")
    return jd.Field(lambda x, t: x - t[:, None] * average_velocity(v, x, t, 0.0 * t), "x0")


EXACT = {"meanflow": (LINEAR, _meanflow_field), "consistency": (LINEAR, _consistency_field)}


def setup(name):
    """``(path, data -> field)`` of a case: the VP path and the eps oracle unless ``EXACT``."""
    return EXACT.get(name, (PATH, lambda data: data.field(PATH, "eps")))


def _counting(field, calls, times=None):
    def fn(x, t, *args):
        if times is None:
            jax.debug.callback(lambda: calls.append(1))
        else:
            jax.debug.callback(lambda t: times.append(float(jnp.max(t))), t)
        return field(x, t, *args)

    return jd.Field(fn, field.target)


def _final_time(sampler, ts):
    return 0.0 if sampler.denoise else float(ts[-1])


@pytest.mark.parametrize("name, sampler, steps", SAMPLERS, ids=IDS)
def test_structure_counts_keys_and_saved_states(name, sampler, steps):
    """Eagerly and under ``jit``: shape, dtype, saved states and the evaluation count (against a
    counting field, per call); one compile per shape; keys: an error without one for a stochastic
    sampler, ``None`` accepted by a deterministic one; the same key gives the same sample, another
    key another sample (stochastic) or the same one (deterministic: the key enters nothing)."""
    calls = []
    path, make = setup(name)
    field = _counting(make(DATA), calls)
    x_init = jax.random.normal(jax.random.key(0), (6, 2))
    ts = sampler.grid(path, STEPS, 1.0, sampler.t_end)
    save = jnp.array([1.0, float(ts[2]), _final_time(sampler, ts)])
    traces = []

    def run(key):
        traces.append(1)
        return jd.sample(
            key, path, field, x_init=x_init, sampler=sampler, steps=STEPS, save_ts=save
        )

    def check(sol):
        jax.block_until_ready(sol.x)
        assert sol.x.shape == (6, 2) and sol.x.dtype == jnp.float32
        expected = sampler.nfe(STEPS) + int(sampler.denoise)
        assert int(sol.nfe) == expected == len(calls), (int(sol.nfe), expected, len(calls))
        assert int(sol.num_steps) == STEPS + int(sampler.denoise)
        assert sol.xs.shape == (3, 6, 2)
        np.testing.assert_array_equal(sol.xs[0], x_init)
        np.testing.assert_array_equal(sol.xs[-1], sol.x)
        assert not np.allclose(sol.xs[1], x_init)  # the middle state is a real intermediate
        calls.clear()
        return sol.x

    if sampler.stochastic:
        with pytest.raises(ValueError, match="needs a PRNG key"):
            run(None)
        eager = check(run(jax.random.key(1)))
    else:
        eager = check(run(None))
    traces.clear()
    jitted = jax.jit(run)
    a, b, c = (check(jitted(jax.random.key(i))) for i in (1, 1, 2))
    assert len(traces) == 1  # one compile per shape
    np.testing.assert_array_equal(a, b)  # the same key, the same sample
    if sampler.stochastic:
        assert not np.allclose(a, c)
    else:
        np.testing.assert_array_equal(c, a)
    # eagerly (the driver's own jit) against inside the user's jit: measured equal bit for bit
    # for every sampler here; fusion may round differently elsewhere
    np.testing.assert_allclose(eager, a, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "sampler",
    [S.unipc(2, lower_order_final=False), S.unipc(3, variant="bh1")],
    ids=["unipc-2-all-second-order", "unipc-3-bh1"],
)
def test_unipc_table_rebuilds_the_loop_history(sampler, x64):
    """UniPC's tabulated weights (each step's history rebuilt from the grid: earlier lambdas and
    the order of the last prediction) equal what its own loop carries, on a 9-step grid with the
    denoising step (which sets the last steps' lower order) and on the linear path, whose first
    time has lambda = -inf (no correction of that step)."""
    for path, target in ((PATH, "eps"), (LINEAR, "velocity")):
        field = DATA.field(path, target)
        x = jax.random.normal(jax.random.key(0), (6, 2))
        ts = sampler.grid(path, 9, 1.0, sampler.t_end)
        sol = jd.sample(None, path, field, x_init=x, sampler=sampler, ts=ts, denoise=True)
        full = jnp.concatenate([ts, jnp.zeros((1,))])
        state = sampler.init(path, field, x, full)
        step = jax.jit(
            lambda st, t, s, path=path, field=field: sampler.step(None, path, field, st, t, s)
        )
        for i in range(9):
            state = step(state, ts[i], ts[i + 1])
        x_end = jd.denoise(path, field, state.x, ts[-1])
        np.testing.assert_allclose(x_end, sol.x, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("path_name", ["vp", "linear"])
@pytest.mark.parametrize("eta", [0.0, 1.0, lambda t: 2.0 * t], ids=["ode", "sde", "eta-of-t"])
def test_euler_written_out_is_diffrax_euler(path_name, eta, x64):
    """``ode()``/``sde()`` write diffrax's Euler(--Maruyama) update out on tabulated
    coefficients: for every target they equal ``integrate`` (diffrax's own ``Euler.step``) of
    the reverse drift and diffusion, with the same increments."""
    path = {"vp": PATH, "linear": LINEAR}[path_name]
    sampler = S.ode() if eta == 0.0 else S.sde(eta=eta)
    x = jax.random.normal(jax.random.key(0), (6, 2))
    ts, key = jnp.linspace(0.9, 0.05, 9), jax.random.key(1)

    @jax.jit  # one program for the five targets (each apart: a compile for each solve)
    def solves(x):
        out = {}
        for target in jd.TARGETS:
            field = DATA.field(path, target)
            sol = jd.sample(key, path, field, x_init=x, sampler=sampler, ts=ts, denoise=False)
            ref = jd.integrate(
                lambda x, t, f=field: jd.reverse_drift(path, f, x, t, eta=eta), x, ts=ts,
                diffusion=None if eta == 0.0 else (lambda x, t: jd.reverse_diffusion(path, t, eta)),
                key=None if eta == 0.0 else jax.random.split(key, 4)[1], solver=diffrax.Euler(),
            )  # fmt: skip
            out[target] = sol.x, ref.x
        return out

    for target, (x_sampler, x_diffrax) in solves(x).items():
        np.testing.assert_allclose(x_sampler, x_diffrax, rtol=1e-9, atol=1e-9, err_msg=target)


@pytest.mark.parametrize("name, sampler, steps", SAMPLERS, ids=IDS)
def test_vmap_and_own_loop_match(name, sampler, steps, x64):
    """``jit(vmap(sample))`` from ``t_start = 0.5`` over two starts and two keys evaluates the
    field no later than 0.5 and equals, item for item, ``init`` and ``step`` in a Python loop of
    one's own on the sampler's grid from 0.5 (each step computing its own coefficients, where the
    driver tabulates them before its scan), key for key, the denoising step included. (That the
    start is drawn at ``sigma(t_start)`` is the driver's, tested in ``test_sample``.)"""
    seen = []
    path, make = setup(name)
    field = make(DATA)
    x_init = jax.random.normal(jax.random.key(0), (2, 5, 2), jnp.float64)
    keys = jax.random.split(jax.random.key(1), 2)

    def run(key, x):
        return jd.sample(key, path, _counting(field, None, seen), x_init=x, sampler=sampler,
                         steps=STEPS, t_start=0.5).x  # fmt: skip

    batched = jax.jit(jax.vmap(run))(keys, x_init)
    assert max(seen) <= 0.5 + 1e-6  # (annealed Langevin's first evaluation is at the next level)
    ts = sampler.grid(path, STEPS, 0.5, sampler.t_end)
    # the grid (the driver's, as the loop's equality below shows) starts at t_start itself, where
    # the driver draws a start from sigma(t_start) when no x_init is given
    assert float(ts[0]) == 0.5
    full = jnp.concatenate([ts, jnp.zeros((1,))]) if sampler.denoise else ts
    step = jax.jit(lambda k, state, t, s: sampler.step(k, path, field, state, t, s))
    for i in range(2):
        step_keys = jax.random.split(jax.random.split(keys[i], 4)[1], STEPS)
        state = sampler.init(path, field, x_init[i], full)
        for j in range(STEPS):
            state = step(step_keys[j] if sampler.stochastic else None, state, ts[j], ts[j + 1])
        x = jd.denoise(path, field, state.x, ts[-1]) if sampler.denoise else state.x
        np.testing.assert_allclose(batched[i], x, rtol=1e-9, atol=1e-9)


DETERMINISTIC = [case for case in SAMPLERS if not case[1].stochastic]


@pytest.mark.parametrize("name, sampler, steps", DETERMINISTIC, ids=[c[0] for c in DETERMINISTIC])
def test_gradients_match_finite_differences(name, sampler, steps, x64):
    """d/dm of the mean sample of N(m, 0.5^2) from fixed noise (about 1: the sample moves with m)."""
    x1 = jax.random.normal(jax.random.key(0), (16, 1), jnp.float64)
    path, make = setup(name)

    def mean_sample(m):
        data = jd.GaussianMixture(jnp.ones(1), jnp.reshape(m, (1, 1)), jnp.full((1, 1, 1), 0.25))
        sol = jd.sample(None, path, make(data), x_init=x1, sampler=sampler, steps=20)
        return sol.x.mean()

    g = jax.jit(jax.grad(mean_sample))(1.0)
    forward = jax.jit(mean_sample)
    fd = (forward(1.0 + 1e-5) - forward(1.0 - 1e-5)) / 2e-5
    assert float(g) == pytest.approx(float(fd), rel=1e-6)
    assert float(g) == pytest.approx(1.0, abs=0.05)


@pytest.fixture(scope="module")
def true_samples():
    return DATA.sample(jax.random.key(123), N)


@pytest.mark.parametrize("name, sampler, steps", SAMPLERS, ids=IDS)
def test_recovers_the_mixture_in_float32_and_bfloat16(name, sampler, steps, true_samples):
    """At the stated steps the float32 sample is within ``ED_BOUND`` of the mixture. From the same
    start and keys in bfloat16 (the field called in bfloat16, the state integrated in float32) the
    sample stays bfloat16 and lands where float32 does, sample by sample: the median distance is
    within 0.01 and the 99th percentile within 0.1 (measured 0.004-0.007 and 0.008-0.039: output
    rounding alone, spacing 2^-7 at |x| in [1, 2), gives ~0.003; a few samples near a boundary
    between modes go to the other one)."""
    path, make = setup(name)
    field = make(DATA)
    x = float(path.sigma(1.0)) * jax.random.normal(jax.random.key(0), (N, 2))
    draw = lambda x: jd.sample(jax.random.key(1), path, field, x_init=x, sampler=sampler,
                               steps=steps)  # fmt: skip
    # both starts in one program: one compile (the two dtypes are two programs either way)
    sol, half = jax.jit(lambda x: (draw(x), draw(x.astype(jnp.bfloat16)).x))(x)
    ed = float(jd.energy_distance(sol.x, true_samples))
    assert ed < ED_BOUND, (name, int(sol.nfe), ed)
    assert half.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(half)))
    d = np.abs(np.asarray(half.astype(jnp.float32)) - np.asarray(sol.x)).max(-1)
    assert np.median(d) < 0.01 and np.quantile(d, 0.99) < 0.1, (np.median(d), np.quantile(d, 0.99))


def test_forward_mode_through_an_adaptive_ode_solve_with_diffraxs_forward_adjoint():
    """README: jvp through an adaptive solve takes adjoint=diffrax.ForwardMode() (the default
    adjoint is reverse mode only); its tangent equals the gradient's projection."""
    data = jd.GaussianMixture.isotropic(jnp.array([[2.0, 0.0], [-2.0, 0.0]]), std=0.3)
    path = jd.linear_path()
    field = data.field(path, "velocity")
    x = jax.random.normal(jax.random.key(0), (4, 2))
    v = jax.random.normal(jax.random.key(1), (4, 2))

    def run(x, adjoint=None):
        sampler = jd.samplers.ode(diffrax.Tsit5(), rtol=1e-6, atol=1e-6, adjoint=adjoint)
        return jd.sample(None, path, field, x_init=x, sampler=sampler, steps=10).x.sum()

    _, tangent = jax.jvp(lambda x: run(x, diffrax.ForwardMode()), (x,), (v,))
    np.testing.assert_allclose(float(tangent), float(jnp.vdot(jax.grad(run)(x), v)), rtol=1e-4)
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(run, (x,), (v,))
