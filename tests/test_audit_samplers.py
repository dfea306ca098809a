"""Audit regressions for the samplers (jaxdiff/samplers, jaxdiff/sample.py, jaxdiff/_engine.py)."""

import functools

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd

S = jd.samplers
PATH = jd.vp_path()
GAUSS = jd.GaussianMixture(jnp.ones(1), jnp.array([[1.5, -0.5]]), (0.25 * jnp.eye(2))[None])


@pytest.mark.parametrize("factory", [S.dpm_solver_2s, S.dpm_solver_sde])
def test_singlestep_eta_of_t(factory):
    # eta as a function of t (accepted by check_eta, as for sde/dpm_solver_pp) was multiplied as
    # a number: TypeError "unsupported operand type(s) for *: 'function'". A constant function
    # must give the sample of the constant, key for key.
    field = GAUSS.field(PATH, "eps")
    key = jax.random.key(0)
    a = jd.sample(key, PATH, field, (64, 2), sampler=factory(eta=lambda t: 0.5 + 0.0 * t), steps=8)
    b = jd.sample(key, PATH, field, (64, 2), sampler=factory(eta=0.5), steps=8)
    np.testing.assert_allclose(np.asarray(a.x), np.asarray(b.x), atol=1e-5)


def test_dpm_solver_pp_eta_zero_function_from_alpha_zero():
    # on the linear path t = 1 has alpha = 0, so the first step's h is inf; an eta(t) that is 0
    # there made e * h = 0 * inf = NaN and the run failed ("x contains non-finite values"),
    # though eta(t) = 0 is the ODE. It must equal dpm_solver_pp(2) (eta = 0) from the same start.
    lin = jd.linear_path()
    field = GAUSS.field(lin, "velocity")
    x_init = jax.random.normal(jax.random.key(1), (64, 2))

    @jax.jit  # the three runs in one program: one compile instead of three eager ones
    def runs(x_init):
        ode = jd.sample(None, lin, field, x_init=x_init, sampler=S.dpm_solver_pp(2), steps=12)
        fn = jd.sample(jax.random.key(2), lin, field, x_init=x_init, steps=12,
                       sampler=S.dpm_solver_pp(2, eta=lambda t: 0.0 * t))  # fmt: skip
        # noise only below t = 0.5 (0 at t = 1): finite, and the data's mean and std within 0.03
        sol = jd.sample(jax.random.key(3), lin, field, (4000, 2), steps=30,
                        sampler=S.dpm_solver_pp(2, eta=lambda t: jnp.where(t > 0.5, 0.0, 1.0)))  # fmt: skip
        return ode, fn, sol

    ode, fn, sol = runs(x_init)
    np.testing.assert_allclose(np.asarray(fn.x), np.asarray(ode.x), atol=1e-5)
    np.testing.assert_allclose(np.asarray(sol.x.mean(0)), [1.5, -0.5], atol=0.03)
    np.testing.assert_allclose(np.asarray(sol.x.std(0)), [0.5, 0.5], atol=0.03)


@pytest.mark.parametrize("make", [lambda: jd.samplers.ddim(), lambda: jd.samplers.ancestral()])
def test_ddim_and_ancestral_default_grid_follows_default_grid(make):
    """ddim() and ancestral() drew their default grid uniform in t on every path. On EDM's
    sigma = 80 t (alpha constant), where jd.default_grid gives Karras' grid, 40 DDIM steps from the
    exact x0 field of a two-point mixture left an energy distance of 0.2355 to the data (a
    usability audit; noise floor ~0.003), 100x Karras'. The default grid is default_grid's now,
    ending at 0, and on VP it is still uniform."""
    sampler = make()
    edm = jd.GaussianPath(lambda t: jnp.ones_like(t), lambda t: 80.0 * t)
    np.testing.assert_allclose(sampler.grid(edm, 40, 1.0, 0.0), jd.default_grid(edm, 40, 1.0, 0.0))
    np.testing.assert_allclose(sampler.grid(jd.vp_path(), 4, 1.0, 0.0), [1.0, 0.75, 0.5, 0.25, 0.0])
    data = jd.GaussianMixture.isotropic(jnp.array([[2.0, 0.0], [-2.0, 0.0]]), std=0.3)
    n = 2000
    sol = jd.sample(
        jax.random.key(0), edm, data.field(edm, "x0"), (n, 2), sampler=sampler, steps=40
    )
    ed = float(jd.energy_distance(sol.x, data.sample(jax.random.key(1), n)))
    assert ed < 0.02, ed  # uniform steps: 0.24 (two samples of n = 2000: |ED| < ~0.005)


@pytest.mark.parametrize("path", [jd.linear_path(), jd.cosine_path()], ids=["linear", "cosine"])
def test_pc_euler_maruyama_starts_inside_where_g_is_infinite_at_one(path):
    # The stop-42 sampler review's S2: pc(euler_maruyama_predictor) started at t = 1 with an x0,
    # v or velocity field, where g(t)^2 is infinite (alpha_1 = 0), and failed at the end with a
    # generic non-finite error. It starts at 1 - 1e-3 now, refuses a grid from 1 by name, and
    # samples the mixture (measured at 200 steps, 4,000 samples: |x_0| 2.000-2.001, std 0.302).
    data = jd.GaussianMixture.isotropic(jnp.array([[2.0, 0.0], [-2.0, 0.0]]), std=0.3)
    sampler = S.pc(S.euler_maruyama_predictor, corrector_steps=1)
    for target in ("x0", "velocity"):
        field = data.field(path, target)
        x = jd.sample(jax.random.key(0), path, field, (4000, 2), sampler=sampler, steps=200).x
        assert abs(float(jnp.abs(x[:, 0]).mean()) - 2.0) < 0.02
        assert abs(float(x[:, 1].std()) - 0.3) < 0.015
    with pytest.raises(ValueError, match="g.t.\\^2, which is not finite at the grid's first time"):
        jd.sample(jax.random.key(0), path, field, (8, 2), sampler=sampler, t_start=1.0)
    # wrapped (functools.partial) or a predictor of one's own: it starts inside too (the review)
    own = S.pc(lambda *a: S.euler_maruyama_predictor(*a), corrector_steps=0)
    for pred_sampler in (S.pc(functools.partial(S.euler_maruyama_predictor)), own):
        x = jd.sample(jax.random.key(0), path, field, (2000, 2), sampler=pred_sampler, steps=100).x
        assert abs(float(jnp.abs(x[:, 0]).mean()) - 2.0) < 0.03


def test_pc_corrector_takes_no_step_where_the_score_is_zero():
    # An untrained network whose output layer starts at zero predicts eps = 0, so score = 0: the
    # signal-to-noise rule's step 2 a (snr |z| / |score|)^2 was infinite, and pc() raised "the
    # sample contains non-finite values" (score_sde's loop gives NaN). The corrector now skips
    # (no signal to correct with): pc() equals its predictor alone, key for key; a nonzero score
    # still corrects.
    zero = jd.Field(lambda x, t: jnp.zeros_like(x), "eps")

    @jax.jit
    def runs(key):
        draw = lambda f, n: jd.sample(key, PATH, f, (16, 2), sampler=S.pc(corrector_steps=n),  # noqa: E731
                                      steps=5).x  # fmt: skip
        return draw(zero, 1), draw(zero, 0), draw(GAUSS.field(PATH, "eps"), 1), draw(GAUSS.field(PATH, "eps"), 0)  # fmt: skip

    with_corrector, predictor_only, corrected, uncorrected = runs(jax.random.key(0))
    assert bool(jnp.all(jnp.isfinite(with_corrector)))
    np.testing.assert_array_equal(with_corrector, predictor_only)
    assert float(jnp.abs(corrected - uncorrected).max()) > 1e-2

    def mean(scale, n):  # a field c * eps_exact: at c = 0 the gradient through the norms was NaN
        field = jd.Field(lambda x, t: scale * GAUSS.field(PATH, "eps")(x, t), "eps")
        x = jd.sample(jax.random.key(1), PATH, field, (16, 2), sampler=S.pc(corrector_steps=n),
                      steps=3).x  # fmt: skip
        return jnp.mean(x)

    grads = jax.jit(jax.grad(mean), static_argnums=1)
    g1, g0 = grads(0.0, 1), grads(0.0, 0)
    assert bool(jnp.isfinite(g1)) and float(g1) == float(g0)  # no corrector step: no gradient


def test_ddim_step_checks_a_known_t():
    # The stop-42 review's D8: a deterministic DDIM step reads the path at s only, so t = 1.5
    # went through even eagerly
    x = jnp.ones((2, 2))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\].*got t = \[1.5\]"):
        jd.ddim_step(PATH, x, x, 1.5, 0.75)
    assert jd.ddim_step(PATH, x, x, 0.9, 0.75).shape == (2, 2)


def test_unipc_keeps_what_a_hook_did_to_x():
    # UniPC's corrector rebuilt x from the previous corrected sample, giving the hooked x no
    # weight after the first step: a hook's move reached the result only through the network
    # call, and UniPC returned about the unhooked answer (1.55 off the exact hooked flow).
    mu, sd = jnp.array([[1.0, -0.5]]), 0.5
    field = jd.GaussianMixture.isotropic(mu, std=sd).field(PATH, "x0")
    x1 = jax.random.normal(jax.random.key(0), (4, 2))

    def flow(x, t1, t2):  # the exact probability-flow map of N(mu, sd^2 I) data
        a1, a2 = PATH.alpha(t1), PATH.alpha(t2)
        s1 = jnp.sqrt(a1**2 * sd**2 + PATH.sigma_sq(t1))
        s2 = jnp.sqrt(a2**2 * sd**2 + PATH.sigma_sq(t2))
        return a2 * mu + s2 / s1 * (x - a1 * mu)

    ts = jnp.concatenate([jnp.linspace(1.0, 0.5, 21), jnp.linspace(0.5, 0.01, 21)[1:]])

    def hook(key, state, t):  # +3 at t = 0.5
        return state._replace(x=jnp.where(jnp.abs(t - 0.5) < 1e-6, state.x + 3.0, state.x))

    want = flow(flow(x1, 1.0, 0.5) + 3.0, 0.5, ts[-1])
    for sampler, tol in ((S.unipc(2), 0.03), (S.dpm_solver_pp(2), 0.01)):  # 0.014, 0.0045
        got = jd.sample(jax.random.key(1), PATH, field, sampler=sampler, ts=ts, x_init=x1,
                        hook=hook, denoise=False).x  # fmt: skip
        assert float(jnp.abs(got - want).max()) < tol, sampler.name


def test_save_ts_refuses_nan_empty_and_2d_times():
    # a NaN time matched no grid point and saved the start state under its NaN label; a (1, k)
    # save_ts mixed up the slots (2.0238, the state at no grid time); [] raised an IndexError
    field = GAUSS.field(PATH, "eps")
    ts = jnp.linspace(1.0, 1e-3, 11)

    def draw(save_ts):
        return jd.sample(None, PATH, field, sampler=S.dpm_solver_pp(2), ts=ts,
                         x_init=jnp.ones((4, 2)), save_ts=jnp.asarray(save_ts),
                         denoise=False).xs  # fmt: skip

    with pytest.raises(ValueError, match=r"save_ts contains non-finite values"):
        draw([float(ts[2]), float("nan")])
    for bad, shape in (([], r"\(0,\)"), ([[1.0, float(ts[2])]], r"\(1, 2\)")):
        with pytest.raises(ValueError, match=rf"non-empty 1-D array of times; got shape {shape}"):
            draw(bad)
    with pytest.raises(Exception, match=r"save_ts contains non-finite values"):
        jax.block_until_ready(jax.jit(draw)(jnp.array([jnp.nan, 1.0])))  # "same time twice"
    np.testing.assert_array_equal(draw([float(ts[3])])[0], draw(ts)[3])


def test_an_adaptive_sde_names_the_solvers_that_can_take_it():
    """sde(Tsit5(), rtol=...) failed inside diffrax ("the order of convergence ... has not been
    specified"), and the refusal of ShARK suggested Tsit5 or Dopri5, which fail that way."""
    import diffrax

    with pytest.raises(ValueError, match=r"on an SDE need a solver with a strong order; Tsit5"):
        jd.samplers.sde(diffrax.Tsit5(), rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match=r"ShARK has no error estimate; use diffrax.Heun\(\) or"):
        jd.samplers.sde(diffrax.ShARK(), rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match=r"Euler has no error estimate; use diffrax.Tsit5\(\)"):
        jd.samplers.ode(diffrax.Euler(), rtol=1e-3, atol=1e-3)
    jd.samplers.sde(diffrax.Heun(), rtol=1e-3, atol=1e-3)  # accepted


@pytest.mark.parametrize("solver", ["Heun", "Midpoint", "Ralston"])
def test_written_out_runge_kutta_steps_are_diffraxs(solver, monkeypatch):
    # ode(Heun()) ran diffrax's generic step (a loop over stages, error estimate, interpolation
    # bookkeeping): 2-3x a hand-written scan at batch 1-16. Its tableau is written out now, with
    # diffrax's result (to float32 rounding) and one loop in the program: the scan's
    import diffrax

    from jaxdiff.samplers import continuous

    data = jd.GaussianMixture.isotropic(jnp.array([[2.0, 0.0], [-2.0, 0.0]]), std=0.3)
    for path, target in ((jd.vp_path(), "eps"), (jd.linear_path(), "velocity")):
        field = data.field(path, target)
        x = 0.999 * jax.random.normal(jax.random.key(0), (8, 2))

        def run(x, field=field, path=path):  # the sampler built now: with _WRITTEN_OUT or not
            sampler = S.ode(getattr(diffrax, solver)())
            return jd.sample(None, path, field, x_init=x, sampler=sampler, steps=12)

        ours = run(x)
        assert "while" not in str(jax.make_jaxpr(lambda x: run(x).x)(x))
        with monkeypatch.context() as m:
            m.setattr(continuous, "_WRITTEN_OUT", ())
            theirs = run(x)
            assert "while" in str(jax.make_jaxpr(lambda x: run(x).x)(x))
        np.testing.assert_allclose(ours.x, theirs.x, rtol=0, atol=2e-6)
        assert int(ours.nfe) == int(theirs.nfe) == 24
        half = run(x.astype(jnp.bfloat16)).x  # a half-precision state stays so
        assert half.dtype == jnp.bfloat16
        np.testing.assert_allclose(half.astype(jnp.float32), ours.x, atol=0.1)


def test_log_snr_samplers_converge_past_the_first_step_from_pure_noise():
    """On the linear path alpha(1) = 0: the log-SNR grid's first step runs from lambda = -inf to
    EDM's sigma / alpha = 80 at every step count, and taken at first order (DDIM's step, UniPC
    left uncorrected, 2S's point one e-fold above) it left an error no step count removed:
    2.3e-4 at 512 steps for unipc(3) and dpm_solver_pp(3), and orders 0.6-1.1 between 256 and
    512 steps for the second-order ones (a review of the samplers' orders). In u = alpha / sigma
    the step is second order now (a trapezoid, or 2S's point at u / 2), at no extra evaluation."""
    mix = jd.GaussianMixture(
        jnp.array([0.3, 0.5, 0.2]),
        jnp.array([[2.0, 0.0], [-1.5, 1.0], [0.0, -2.0]]),
        jnp.array([[[0.3, 0.1], [0.1, 0.2]], [[0.15, 0.0], [0.0, 0.4]],
                   [[0.25, -0.05], [-0.05, 0.25]]]),
    )  # fmt: skip
    lin = jd.linear_path()
    with jax.enable_x64(True):
        field = mix.field(lin, "velocity")
        x_init = jax.random.normal(jax.random.key(0), (8, 2), jnp.float64)
        exact = S.ode(diffrax.Dopri8(), rtol=1e-12, atol=1e-12, max_steps=100_000)
        ref = jd.sample(None, lin, field, x_init=x_init, sampler=exact, steps=100).x

        def err(sampler, steps):
            x = jd.sample(None, lin, field, x_init=x_init, sampler=sampler, steps=steps,
                          denoise=False).x  # fmt: skip
            return float(jnp.abs(x - ref).max())

        # third order: 1.2e-6 and 3.5e-6 at 512 steps (2.3e-4 before)
        for third in (S.unipc(3), S.dpm_solver_pp(3)):
            assert err(third, 512) < 1e-5, third.name
        # second order: measured orders 1.98-1.99 (0.64, 1.1 before), 3.2 for unipc(2)
        for second in (S.dpm_solver_pp(2), S.dpm_solver_2s(eta=0.0), S.dpm_solver_sde(eta=0.0),
                       S.dpm_solver_sde(eta=0.0, r=1.0), S.unipc(2, variant="bh1")):  # fmt: skip
            order = np.log2(err(second, 256) / err(second, 512))
            assert order > 1.8, (second.name, order)


@pytest.mark.parametrize("factory", [S.dpm_solver_2s, S.dpm_solver_sde])
def test_singlestep_last_step_to_zero_returns_x0_hat_at_t_in_a_loop_of_ones_own(factory):
    """A step to sigma = 0 discards its second evaluation, but it was taken at t = 0, where an
    "x0" field's conversion divides by sigma = 0: in the README's loop of one's own the step
    raised "converting 'x0' to (x0, eps) divides by sigma_t" (a review against k-diffusion).
    dpm_solver_sde also mixed that evaluation into its last step. Both return x0_hat at t, as
    k-diffusion's samplers do on their last step."""
    field = jd.Field(lambda x, t: 0.5 * x + jnp.tanh(x + t[:, None]), "x0")  # not the identity
    x = jax.random.normal(jax.random.key(0), (16, 2))
    ts = jnp.array([1.0, 0.4, 0.0])
    for eta in (0.0, 1.0):
        sampler = factory(eta=eta)
        state = sampler.init(PATH, field, x, ts)
        for k, t, s in zip(jax.random.split(jax.random.key(1), 2), ts[:-1], ts[1:], strict=True):
            before = state.x
            state = sampler.step(k, PATH, field, state, t, s)
        want = field(before, jnp.full((16,), ts[1]))  # x0_hat at t = 0.4
        np.testing.assert_allclose(np.asarray(state.x), np.asarray(want), rtol=1e-6, atol=1e-6)
        run = functools.partial(jd.sample, jax.random.key(1), PATH, field, sampler=sampler)
        grad = jax.grad(lambda x, run=run: run(x_init=x, ts=ts, denoise=False).x.sum())(x)
        assert np.isfinite(np.asarray(grad)).all()
