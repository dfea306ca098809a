"""Checks that held eagerly and vanished under ``jit`` (the audit of stop 54): a traced value gave
finite wrong numbers with no error. Each test fails without its fix."""

import functools

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd

PATH = jd.vp_path()
FIELD = jd.Field(lambda x, t: 0.5 * x, "eps")  # any finite field will do


def test_traced_tolerances_are_checked_when_the_solve_runs():
    def draw(rtol, atol=1e-5):
        sampler = jd.samplers.ode(diffrax.Tsit5(), rtol=rtol, atol=atol)
        return jd.sample(jax.random.key(0), PATH, FIELD, (4, 2), sampler=sampler).x

    with pytest.raises(ValueError, match=r"rtol must be a finite number >= 0; got rtol = -1.0"):
        draw(-1.0)
    assert np.all(np.isfinite(jax.jit(draw)(1e-5)))
    with pytest.raises(Exception, match="rtol must be a finite number >= 0"):
        jax.block_until_ready(jax.jit(draw)(-1.0))  # solved with rtol -1 before
    with pytest.raises(Exception, match="atol must be a finite number >= 0"):
        jax.block_until_ready(jax.jit(lambda a: draw(1e-3, a))(jnp.nan))
    with pytest.raises(Exception, match="rtol and atol cannot both be 0"):
        jax.block_until_ready(jax.jit(lambda a: draw(0.0, a))(0.0))

    def logp(rtol):
        return jd.log_likelihood(PATH, FIELD, jnp.ones((4, 2)), rtol=rtol, atol=1e-5).logp

    with pytest.raises(Exception, match="rtol must be a finite number >= 0"):
        jax.block_until_ready(jax.jit(logp)(-1.0))


def test_an_eta_function_of_a_traced_value_is_checked_at_each_evaluation():
    def run(e):
        sampler = jd.samplers.ddim(lambda t: e + 0 * t)
        return jd.sample(jax.random.key(0), PATH, FIELD, (4, 2), sampler=sampler, steps=4).x

    assert np.all(np.isfinite(jax.jit(run)(0.5)))
    with pytest.raises(Exception, match=r"eta must lie in \[0, 1.0\]"):
        jax.block_until_ready(jax.jit(run)(2.0))  # its noise term was clipped silently
    scale = jax.jit(lambda e: jd.reverse_diffusion(PATH, 0.5, lambda t: e * jnp.ones_like(t)))
    assert float(scale(1.0)) == pytest.approx(float(PATH.diffusion(0.5)), rel=1e-6)
    with pytest.raises(Exception, match=r"eta must lie in \[0, inf\)"):
        jax.block_until_ready(scale(-1.0))  # a negative noise scale before


@pytest.mark.parametrize(
    "make",
    [
        jd.samplers.ddim,
        lambda e: jd.samplers.sde(eta=e),
        lambda e: jd.samplers.dpm_solver_pp(2, eta=e),
    ],
)
def test_an_eta_function_of_t_alone_is_refused_at_trace_time_under_jit(make):
    """Under an outer jit the probe of a callable eta was staged (a tracer), so an eta(t) of t
    alone was checked only when the program ran (a callback error from inside the run); it is
    known while tracing and refused then, naming the times where it leaves its range."""
    eta = lambda t: jnp.where(t > 0.5, -1.0, 0.0)  # noqa: E731

    def run(x):
        return jd.sample(jax.random.key(0), PATH, FIELD, x_init=x, sampler=make(eta), steps=4).x

    with pytest.raises(ValueError, match=r"got eta\(t\) = -1 at t = 0.5312"):
        jax.jit(run).trace(jnp.ones((4, 2)))  # tracing alone: nothing runs


def test_consistency_scalings_with_a_traced_t_min_refuse_times_below_it():
    scalings = jax.jit(lambda m, t: jd.consistency_scalings(t, t_min=m))
    c_skip, c_out = scalings(0.1, 0.1)
    assert (float(c_skip), float(c_out)) == (1.0, 0.0)
    with pytest.raises(Exception, match=r"t must lie in \[t_min, 1\]"):
        jax.block_until_ready(scalings(0.1, 0.05))  # c_out = -0.05 before


def test_var_weight_is_checked_under_jit_and_by_the_ancestral_sampler():
    x = jnp.ones((4, 2))
    var = jax.jit(lambda w: jd.reverse_mean_var(PATH, x, x, 0.5, 0.1, var_weight=w)[1])
    post = jd.reverse_mean_var(PATH, x, x, 0.5, 0.1)[1]
    np.testing.assert_allclose(var(0.0), post, rtol=1e-6)
    for bad, what in ((-1.0, "lie in"), (jnp.nan, "be finite")):
        with pytest.raises(Exception, match=f"var_weight must {what}"):
            jax.block_until_ready(var(bad))  # -1 gave 0.0116 for the bounds 0.103 and above
    with pytest.raises(ValueError, match=r"var_weight must lie in \[0, 1\]"):
        jd.samplers.ancestral(var_weight=1.5)  # accepted before: only >= 0 was checked


def test_sinkhorn_names_a_non_finite_point():
    # a NaN point was reported as "did not converge in 2000 iterations" (tol=None: paired)
    x0 = jnp.ones((4, 2)).at[1, 0].set(jnp.nan)
    x1 = jax.random.normal(jax.random.key(0), (4, 2))
    for coupling in (jd.sinkhorn_ot(0.5), jd.sinkhorn_ot(0.5, tol=None)):
        with pytest.raises(ValueError, match=r"sinkhorn_ot's x0 \(the data batch\) contains non"):
            coupling(jax.random.key(1), x0, x1)
        pair = jax.jit(lambda a, b, c=coupling: c(jax.random.key(1), a, b))
        with pytest.raises(Exception, match=r"sinkhorn_ot's x1 \(the source batch\)"):
            jax.block_until_ready(pair(x1, x0))


def test_langevin_takes_one_step_size_per_sample():
    # a (batch,) step_size lined up with the features: with batch == d every sample used the
    # steps of the coordinates (0.62 off), else a bare broadcasting error
    x = jax.random.normal(jax.random.key(0), (4, 4))
    steps = jnp.array([0.1, 0.2, 0.3, 0.4])
    run = functools.partial(jd.langevin, jax.random.key(1), lambda x: -x, x, steps=3)
    got = run(step_size=steps)
    for b in range(4):  # the same key draws the same noise for the whole batch
        np.testing.assert_allclose(got[b], run(step_size=float(steps[b]))[b], rtol=1e-6)
    with pytest.raises(ValueError, match=r"step_size has shape \(3,\); expected a scalar"):
        run(step_size=steps[:3])
