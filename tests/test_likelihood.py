"""PF-ODE log-likelihoods against the closed-form log-density of the Gaussian mixture, Hutchinson's
estimator's bias, and gradients w.r.t. inputs and parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd

T0 = 1e-3


def _mix():  # built inside the x64 tests, so the oracle computes in float64
    return jd.GaussianMixture.isotropic(jnp.array([[1.5, 0.0], [-1.0, 1.0]]), std=0.5)


@pytest.mark.parametrize(
    "make, target",
    [(jd.vp_path, "eps"), (lambda: jd.ve_path(0.01, 20.0), "score"), (jd.linear_path, "velocity")],
)
def test_exact_divergence_matches_the_closed_form(make, target, x64):
    path, mix = make(), _mix()
    x = mix.sample(jax.random.key(0), 64)
    exact = mix.marginal_log_prob(path, x, T0)
    kw = dict(t_start=T0, rtol=1e-8, atol=1e-8)
    # with the exact p_1 as the prior, only the ODE solve is left: tight
    exact_prior = lambda z: mix.marginal_log_prob(path, z, 1.0)  # noqa: E731
    out = jd.log_likelihood(path, mix.field(path, target), x, prior_logp=exact_prior, **kw)
    # the default prior N(0, sigma_1^2) on the same solve: measured MAE 2e-9 (linear: p_1 is
    # exactly N(0, I)), 2.8e-3 (VP: alpha_1 = e^-5), 2.1e-2 on VE (alpha = 1: p_1 keeps the means)
    default = out.delta + path.prior_logp(out.z)
    if path.alpha(1.0) < 1.0:
        assert float(jnp.mean(jnp.abs(default - exact))) < 0.01
    np.testing.assert_allclose(out.logp, exact, atol=1e-5)


@pytest.mark.parametrize("probe", [jax.random.normal, jax.random.rademacher])
def test_hutchinson_is_unbiased_within_its_standard_error(probe, x64):
    path, MIX = jd.vp_path(), _mix()
    x = jnp.repeat(MIX.sample(jax.random.key(1), 2), 500, axis=0)
    kw = dict(t_start=T0, rtol=1e-6, atol=1e-6)

    @jax.jit  # both solves in one program: one compile instead of two eager ones
    def solves(x):
        exact = jd.log_likelihood(path, MIX.field(path, "eps"), x[::500], **kw).logp
        est = jd.log_likelihood(path, MIX.field(path, "eps"), x, key=jax.random.key(2),
                                num_probes=1, probe=lambda k, s, d: probe(k, s, d), **kw).logp  # fmt: skip
        return exact, est

    exact, est = solves(x)
    est = est.reshape(2, 500)
    mean, se = est.mean(axis=1), est.std(axis=1) / np.sqrt(500)
    assert bool(jnp.all(se > 0))  # a real estimator, not the exact trace
    assert bool(jnp.all(jnp.abs(mean - exact) < 4 * se)), (mean, exact, se)


def test_gradients_wrt_inputs_and_params_match_finite_differences(x64):
    path, MIX = jd.linear_path(), _mix()
    x = MIX.sample(jax.random.key(3), 4)

    def logp(x, shift):
        data = jd.GaussianMixture(MIX.weights, MIX.means + shift, MIX.covs)
        out = jd.log_likelihood(path, data.field(path, "velocity"), x, t_start=T0, rtol=1e-9,
                                atol=1e-9)  # fmt: skip
        return jnp.sum(out.logp)

    gx, gs = jax.jit(jax.grad(logp, argnums=(0, 1)))(x, 0.0)
    f = jax.jit(logp)
    e = jnp.zeros_like(x).at[0, 0].set(1e-5)
    np.testing.assert_allclose(gx[0, 0], (f(x + e, 0.0) - f(x - e, 0.0)) / 2e-5, rtol=1e-5)
    np.testing.assert_allclose(gs, (f(x, 1e-5) - f(x, -1e-5)) / 2e-5, rtol=1e-5)
    # and grad_x log p_{t0}(x) is the score of the closed form
    np.testing.assert_allclose(gx, MIX.score(path, x, T0), rtol=1e-4, atol=1e-4)
    assert bool(jnp.all(jnp.isfinite(gx)))


def test_likelihood_checks_hold_under_jit():
    path, mix = jd.vp_path(), _mix()
    field, x = mix.field(path, "eps"), jnp.ones((4, 2))
    with pytest.raises(ValueError, match=r"t_start must lie in"):
        jd.log_likelihood(path, field, x, t_start=1.1)
    run = jax.jit(lambda t0: jd.log_likelihood(path, field, x, t_start=t0, rtol=1e-3).logp)
    with pytest.raises(Exception, match=r"t_start must lie in"):
        run(1.1).block_until_ready()
    with pytest.raises(Exception, match=r"t_start < t_end"):
        jax.jit(lambda t1: jd.log_likelihood(path, field, x, t_end=t1).logp)(
            1e-6
        ).block_until_ready()
    with pytest.raises(ValueError, match="cannot both be 0"):
        jd.log_likelihood(path, field, x, rtol=0.0, atol=0.0)
    assert bool(jnp.all(jnp.isfinite(run(1e-3))))


def test_half_precision_data_is_scored_in_float32():
    path, mix = jd.vp_path(), _mix()
    x = mix.sample(jax.random.key(4), 16)
    score = lambda x: jd.log_likelihood(path, mix.field(path, "eps"), x, t_start=T0)  # noqa: E731
    # both in one program: one compile instead of two eager ones
    half, full = jax.jit(lambda x: (score(x.astype(jnp.bfloat16)), score(x)))(x)
    assert half.logp.dtype == jnp.float32
    # the bfloat16 rounding of x (relative 2^-8) moves log p by |score| |dx| ~ 0.01-0.05 nats
    np.testing.assert_allclose(half.logp, full.logp, atol=0.1)


def test_a_fixed_grid_of_steps_converges_at_the_solvers_order():
    """steps=N (no rtol/atol) solves on N uniform steps with any diffrax solver: Euler's error
    halves and Heun's quarters as N doubles (measured ratios 1.9-2.2 and 4.2-4.4 from 16 steps),
    the count of evaluations is static, and it runs under jit. Before, a solver without an error
    estimate was refused and there was no fixed-step mode."""
    import diffrax

    path, mix = jd.linear_path(), _mix()
    x = mix.sample(jax.random.key(0), 128)
    field = mix.field(path, "velocity")
    ref = jd.log_likelihood(path, field, x, rtol=1e-7, atol=1e-7).logp
    for solver, order in ((diffrax.Euler(), 1), (diffrax.Heun(), 2)):
        errs = []
        for n in (32, 64):
            out = jd.log_likelihood(path, field, x, steps=n, solver=solver)
            assert int(out.num_steps) == n and int(out.nfe) == n * order
            errs.append(float(jnp.max(jnp.abs(out.logp - ref))))
        assert 2**order * 0.8 < errs[0] / errs[1] < 2**order * 1.25, (solver, errs)
    heun = jax.jit(lambda y: jd.log_likelihood(path, field, y, steps=64, solver=diffrax.Heun()))
    np.testing.assert_allclose(heun(x).logp, ref, atol=5e-3)  # measured 1.5e-3
    one = jd.log_likelihood(path, field, x[:8], atol=1e-3)  # the tolerance not given is 1e-5
    both = jd.log_likelihood(path, field, x[:8], atol=1e-3, rtol=1e-5)  # (it was integrate's 1e-3)
    np.testing.assert_array_equal(one.logp, both.logp)
    assert int(one.nfe) == int(both.nfe)
    with pytest.raises(ValueError, match=r"Euler has no error estimate.*or pass steps=N"):
        jd.log_likelihood(path, field, x, solver=diffrax.Euler())
    with pytest.raises(ValueError, match="steps must be"):
        jd.log_likelihood(path, field, x, steps=0, solver=diffrax.Euler())


def test_an_eager_repeat_reuses_the_compiled_solve():
    """log_likelihood's solve runs as one kept program (as jd.sample's): an eager repeat on new
    data and new params reuses it (every call had compiled diffrax's solve anew, 5-7 s on CPU),
    with the numbers of a jitted call, and a Hutchinson repeat with another key too."""
    from jaxdiff import _programs

    path, mix = jd.linear_path(), _mix()
    net = jd.Field(lambda p, x, t: p * x + t[:, None], "velocity", jnp.asarray(0.5))
    x = mix.sample(jax.random.key(0), 16)
    _programs.clear()
    a = jd.log_likelihood(path, net, x).logp
    b = jd.log_likelihood(path, net.bind(jnp.asarray(-0.3)), 2.0 * x).logp
    h1 = jd.log_likelihood(
        path, mix.field(path, "velocity"), x, key=jax.random.key(1), num_probes=2
    )
    h2 = jd.log_likelihood(
        path, mix.field(path, "velocity"), x, key=jax.random.key(2), num_probes=2
    )
    assert len(_programs._cache) == 2 and not np.allclose(h1.logp, h2.logp)
    jitted = jax.jit(lambda f, y: jd.log_likelihood(path, f, y).logp)
    np.testing.assert_allclose(a, jitted(net, x), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(
        b, jitted(net.bind(jnp.asarray(-0.3)), 2.0 * x), rtol=1e-6, atol=1e-5
    )
