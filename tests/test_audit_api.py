"""Stop 56's sweep of bad input to the public API: each test fails on the code before it.

A weighting converted to a misspelt target, shapes that were broadcast or failed inside
broadcasting, swapped or out-of-range times of the few-step targets, empty inputs and grids."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd
from jaxdiff.likelihood import divergence

VP = jd.vp_path()
X = jnp.ones((4, 3))
T = jnp.full((4,), 0.5)


def test_weight_as_refuses_an_unknown_target():
    # "foo" fell through to the velocity's gain: 1.7357682 where "eps" is 47.59. The suite's
    # type checker refuses the Literal hint first, so a plain interpreter runs it, as a user's would
    code = (
        "import jaxdiff as jd\n"
        "try:\n"
        "    jd.weight_as(jd.edm_weight(), jd.vp_path(), 0.5, 'foo')\n"
        "except ValueError as err:\n"
        "    print(err)\n"
        "print(float(jd.weight_as(jd.edm_weight(), jd.vp_path(), 0.5, 'eps')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    error, value = out.stdout.strip().splitlines()
    assert error.startswith("regress must be one of") and "got 'foo'" in error, error
    assert float(value) == pytest.approx(47.59, rel=1e-3)


def test_from_x0_eps_checks_both_shapes():
    # an eps target returned eps's (4, 2) or (3,); "v" raised a raw broadcasting TypeError
    with pytest.raises(ValueError, match=r"eps has shape \(4, 2\); it must broadcast to x's"):
        jd.from_x0_eps(VP, X, T, X, jnp.ones((4, 2)), "eps")
    with pytest.raises(ValueError, match=r"x0 has shape \(5, 3\); it must broadcast to x's"):
        jd.from_x0_eps(VP, X, T, jnp.ones((5, 3)), X, "v")
    with pytest.raises(ValueError, match=r"x0 has shape \(4, 2\)"):  # shapes: at trace time
        jax.jit(lambda x0: jd.from_x0_eps(VP, X, T, x0, X, "v"))(jnp.ones((4, 2)))
    np.testing.assert_allclose(jd.from_x0_eps(VP, X, T, X, 0 * X, "x0"), X)
    # one x0 or eps for all samples broadcasts to x's shape (a scalar x0 was refused for a while)
    assert jd.from_x0_eps(VP, X, T, X, jnp.ones(3), "eps").shape == X.shape
    np.testing.assert_allclose(
        jd.from_x0_eps(VP, X, T, 0.0, X, "v"), jd.from_x0_eps(VP, X, T, 0 * X, X, "v")
    )


def test_the_few_step_targets_check_their_times():
    u = lambda z, t, r: z * t[:, None]  # noqa: E731
    with pytest.raises(ValueError, match="a reverse step goes from t to an earlier s"):
        jd.progressive_target(VP, lambda z, t: -z, "eps", X, jnp.full(4, 0.3), jnp.full(4, 0.5))
    target = jax.jit(lambda t, s: jd.progressive_target(VP, lambda z, t: -z, "eps", X, t, s))
    assert np.all(np.isfinite(target(jnp.full(4, 0.5), jnp.full(4, 0.3))))
    with pytest.raises(Exception, match="a reverse step goes from t to an earlier s"):
        jax.block_until_ready(target(jnp.full(4, 0.3), jnp.full(4, 0.5)))  # when it runs
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        jd.meanflow_target(u, X, jnp.full(4, 2.0), jnp.full(4, 0.5), X)
    with pytest.raises(ValueError, match="expected r <= t"):
        jd.meanflow_target(u, X, jnp.full(4, 0.3), jnp.full(4, 0.5), X)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        jd.shortcut_target(u, X, jnp.full(4, 2.0), jnp.full(4, 0.1))
    with pytest.raises(ValueError, match="expected 0 < d"):
        jd.shortcut_target(u, X, jnp.full(4, 0.5), jnp.full(4, -0.1))
    with pytest.raises(ValueError, match="expected d <= t"):
        jd.shortcut_target(u, X, jnp.full(4, 0.5), jnp.full(4, 0.6))
    # valid times, traced ones too (their checks are the losses' draws)
    assert jd.shortcut_target(u, X, jnp.full(4, 0.5), jnp.full(4, 0.5))[1].shape == X.shape
    traced = jax.jit(lambda t, r: jd.meanflow_target(u, X, t, r, X)[1])
    # d/dt (z t) = v t + z = 1.5: the target 1 - (0.5 - 0.2) 1.5
    np.testing.assert_allclose(traced(jnp.full(4, 0.5), jnp.full(4, 0.2)), 0.55 * X, rtol=1e-6)


def test_shapes_are_named_not_broadcast():
    with pytest.raises(ValueError, match=r"eps has shape \(3,\) but x has shape \(4, 3\)"):
        jd.ddim_step(VP, X, jnp.ones(3), 0.5, 0.3)  # was broadcast over the batch
    with pytest.raises(ValueError, match=r"eps has shape \(4, 2\)"):
        jd.ddim_step(VP, X, jnp.ones((4, 2)), 0.5, 0.3)
    with pytest.raises(ValueError, match=r"x0 has shape \(4, 2\) but x has shape \(4, 3\)"):
        jd.posterior(VP, X, jnp.ones((4, 2)), 0.5, 0.3)
    with pytest.raises(ValueError, match=r"x \(shape \(4, 3\)\), mean \(shape \(4, 2\)\) and"):
        jd.discretized_gaussian_log_prob(0 * X, jnp.zeros((4, 2)), 1.0)
    # a scalar or per-sample mean still broadcasts, and one x against a batch of means
    assert jd.discretized_gaussian_log_prob(0 * X, jnp.zeros((4, 1)), 0.5).shape == X.shape
    assert jd.discretized_gaussian_log_prob(X[0], X, 0.1).shape == X.shape
    with pytest.raises(ValueError, match=r"probes must have shape \(K, \*x.shape\)"):
        divergence(lambda x: 3.0 * x, X, jnp.ones((5, 4, 2)))
    with pytest.raises(ValueError, match=r"fn\(x\) must have x's shape \(4, 3\); got \(4, 2\)"):
        divergence(lambda x: x[:, :2], X)


def test_empty_and_flattened_inputs():
    with pytest.raises(ValueError, match=r"ts must be a 1-D grid .* got shape \(0,\)"):
        jd.forward_chain(jax.random.key(0), VP, X, jnp.zeros((0,)))  # failed inside lax.scan
    for n in (-5, 0, 1):  # NumPy's error, or "no positive finite mass"
        with pytest.raises(ValueError, match="num_points must"):
            jd.importance_time(VP, jd.unit_weight, regress="eps", num_points=n)
    with pytest.raises(ValueError, match=r"betas must be 1-D .* got shape \(2, 2\)"):
        jd.alpha_bars(jnp.full((2, 2), 0.1))  # cumsum flattened it to 4 steps
    # an empty batch through dynamic thresholding: ZeroDivisionError in a reshape before
    field = jd.dynamic_thresholding(jd.Field(lambda x, t: -x, "eps"), VP)
    assert jd.evaluate(field, jnp.ones((0, 3)), 0.5).shape == (0, 3)


def test_langevin_names_a_step_per_coordinate():
    with pytest.raises(ValueError, match=r"one per coordinate: \(1, \*event\)"):
        jd.langevin(jax.random.key(0), lambda x: -x, X, step_size=jnp.full((3,), 0.1), steps=2)
    out = jd.langevin(jax.random.key(0), lambda x: -x, X, step_size=jnp.full((1, 3), 0.1), steps=2)
    assert out.shape == X.shape


def test_api_review_misuses_get_named_errors():
    """An API review (stop 58) found three natural misuses that failed without naming the cause:
    an integer sample shape ('int' object is not iterable; the data sets take an integer n), a
    Field given to consistency_function (it went through and failed deep in the network on its
    params), and log_likelihood with a fixed-step solver (its message said to drop rtol/atol, then
    asked for a steps= log_likelihood has not)."""
    import subprocess
    import sys

    import diffrax

    # the suite's type checker refuses an int shape before jaxdiff's message: run without it
    script = (
        "import jax, jaxdiff as jd\n"
        "data = jd.GaussianMixture.isotropic(jax.numpy.array([[1.0, 0.0]]), std=0.5)\n"
        "path = jd.linear_path()\n"
        "for call in (lambda: jd.sample(jax.random.key(0), path, data.field(path, 'velocity'), 64),\n"
        "             lambda: jd.reflow_pairs(jax.random.key(0), path, data.field(path, 'velocity'), 64)):\n"
        "    try:\n"
        "        call()\n"
        "    except TypeError as err:\n"
        "        print(str(err).splitlines()[0])\n"
    )  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    ).stdout.splitlines()
    assert len(out) == 2 and all("e.g. (64, 2) for 64 points" in line for line in out), out
    net = jd.Field(lambda p, x, t: x, "x0", ())
    with pytest.raises(TypeError, match="pass field.apply"):
        jd.consistency_function(net)
    data = jd.GaussianMixture.isotropic(jnp.array([[1.0, 0.0]]), std=0.5)
    path = jd.vp_path()
    with pytest.raises(ValueError, match="log_likelihood's solve is adaptive"):
        jd.log_likelihood(path, data.field(path, "eps"), jnp.ones((2, 2)), solver=diffrax.Euler())
