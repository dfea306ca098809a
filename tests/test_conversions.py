"""Target conversions through the (x0, eps) hub: round trips, definitions, errors."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd
from tests.test_paths import PATHS

PAIRS = list(itertools.permutations(jd.TARGETS, 2))


def _batch(path, n=6, d=3, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    x0 = jax.random.normal(k1, (n, d))
    eps = jax.random.normal(k2, (n, d))
    t = jnp.linspace(0.05, 0.95, n)  # per-sample t
    return path.interpolate(x0, eps, t), t, x0, eps


@pytest.mark.parametrize("name", PATHS)
def test_every_pair_round_trips(name, x64):
    path = PATHS[name]()
    x, t, x0, eps = _batch(path)
    for src, dst in PAIRS:
        value = jd.from_x0_eps(path, x, t, x0, eps, src)
        there = jd.convert(path, x, t, value, src=src, dst=dst)
        back = jd.convert(path, x, t, there, src=dst, dst=src)
        np.testing.assert_allclose(back, value, rtol=1e-9, atol=1e-9, err_msg=f"{src}->{dst}")
        # and the converted value is the dst target of the same (x0, eps)
        np.testing.assert_allclose(
            there, jd.from_x0_eps(path, x, t, x0, eps, dst), rtol=1e-9, atol=1e-9
        )


@pytest.mark.parametrize("name", PATHS)
def test_hub_matrix_is_to_x0_eps(name, x64):
    """``x0 = h00 x + h01 value``, ``eps = h10 x + h11 value`` for every target."""
    path = PATHS[name]()
    x, t, x0, eps = _batch(path, seed=2)
    for target in jd.TARGETS:
        value = jd.from_x0_eps(path, x, t, x0, eps, target)
        h00, h01, h10, h11 = (h[:, None] for h in jd.hub_matrix(path, t, target))
        np.testing.assert_allclose(h00 * x + h01 * value, x0, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(h10 * x + h11 * value, eps, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["vp", "ve", "linear"])
def test_targets_match_their_definitions(name, x64):
    path = PATHS[name]()
    x, t, x0, eps = _batch(path, seed=1)
    a, s = path.alpha(t)[:, None], path.sigma(t)[:, None]
    np.testing.assert_allclose(jd.from_x0_eps(path, x, t, x0, eps, "score"), -eps / s)
    np.testing.assert_allclose(
        jd.from_x0_eps(path, x, t, x0, eps, "score"), path.conditional_score(x, x0, t), rtol=1e-10
    )
    np.testing.assert_allclose(
        jd.from_x0_eps(path, x, t, x0, eps, "velocity"),
        path.conditional_velocity(x, x0, t),
        rtol=1e-10,
    )
    np.testing.assert_allclose(jd.from_x0_eps(path, x, t, x0, eps, "v"), a * eps - s * x0)
    x0_back, eps_back = jd.to_x0_eps(path, x, t, jd.from_x0_eps(path, x, t, x0, eps, "v"), "v")
    np.testing.assert_allclose(x0_back, x0, rtol=1e-10)
    np.testing.assert_allclose(eps_back, eps, rtol=1e-10)


def test_flow_matching_velocity_is_eps_minus_x0_and_maps_to_meta_convention(x64):
    """On the linear path u = eps - x0; with tau = 1 - t (t = 0 noise) the velocity is x0 - eps."""
    path = jd.linear_path()
    x, t, x0, eps = _batch(path, seed=2)
    u = jd.from_x0_eps(path, x, t, x0, eps, "velocity")
    np.testing.assert_allclose(u, eps - x0, rtol=1e-12)
    tau = 1.0 - t
    x_meta = (
        tau[:, None] * x0 + (1 - tau[:, None]) * eps
    )  # Lipman et al.: x_tau = tau x1 + (1-tau) x0
    np.testing.assert_allclose(x_meta, x, rtol=1e-12)
    np.testing.assert_allclose(-u, x0 - eps, rtol=1e-12)


def test_eps_score_conversion_is_finite_where_alpha_is_zero(x64):
    path = jd.linear_path()
    x = jnp.ones((2, 2))
    score = jd.convert(path, x, 1.0, x, src="eps", dst="score")
    np.testing.assert_allclose(score, -x)  # sigma_1 = 1


def test_scalar_and_per_sample_t_agree(x64):
    path = jd.cosine_path()
    x, _, x0, eps = _batch(path, seed=3)
    per_sample = jd.convert(path, x, jnp.full((6,), 0.3), eps, src="eps", dst="velocity")
    scalar = jd.convert(path, x, 0.3, eps, src="eps", dst="velocity")
    np.testing.assert_allclose(per_sample, scalar, rtol=1e-12)


def test_conversion_errors():
    path = jd.vp_path()
    x = jnp.zeros((4, 2))
    # Literal-typed: the test suite's type checker answers first; users get our ValueError.
    with pytest.raises(TypeError, match="src"):
        jd.convert(path, x, 0.5, x, src="noise", dst="score")
    with pytest.raises(ValueError, match=r"target must be one of \('score', 'eps'"):
        jd.conversions._check_target("noise")
    with pytest.raises(
        ValueError, match=r"the 'eps' prediction has shape \(4, 3\) but x has shape"
    ):
        jd.convert(path, x, 0.5, jnp.zeros((4, 3)), src="eps", dst="x0")
    with pytest.raises(ValueError, match="prefix of x's shape"):
        jd.convert(path, x, jnp.full((3,), 0.5), x, src="eps", dst="x0")


@pytest.mark.parametrize(
    ("path", "t", "src", "dst", "divisor"),
    [
        (jd.vp_path(), 0.0, "x0", "eps", "sigma_t"),
        (jd.vp_path(), 0.0, "eps", "score", "sigma_t"),
        (jd.linear_path(), 1.0, "eps", "x0", "alpha_t"),
        (jd.linear_path(), 1.0, "score", "velocity", "alpha_t"),
        (jd.cosine_path(), 1.0, "eps", "v", "alpha_t"),
        (jd.linear_path(), [0.5, 0.0], "x0", "score", "sigma_t"),
    ],
)
def test_a_conversion_that_divides_by_zero_at_a_concrete_time_raises(path, t, src, dst, divisor):
    """At the endpoint where a divisor vanishes the conversion is undefined (it gave inf or NaN):
    a ``t`` known at trace time raises and names the coefficient (a traced one cannot: the module
    docstring says so); the same conversion just inside the interval is finite, and the
    conversions that divide by nothing there go through."""
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match=f"converting '{src}' to '{dst}' divides by {divisor}, which is 0"):  # fmt: skip
        jd.convert(path, x, jnp.asarray(t), x, src=src, dst=dst)
    # to_x0_eps stops at the hub (x0, eps): only the source's own divisor counts
    if {"eps": "alpha_t", "score": "alpha_t", "x0": "sigma_t"}[src] == divisor:
        with pytest.raises(ValueError, match=f"'{src}' to \\(x0, eps\\) divides by {divisor}"):
            jd.to_x0_eps(path, x, jnp.asarray(t), x, src)
    else:
        assert bool(jnp.isfinite(jnp.stack(jd.to_x0_eps(path, x, jnp.asarray(t), x, src))).all())
    traced = jax.jit(lambda t: jd.convert(path, x, t, x, src=src, dst=dst))(jnp.asarray(t))
    assert not bool(jnp.isfinite(traced).all())  # traced t: no check, the documented inf / NaN
    inside = jnp.clip(jnp.asarray(t), 1e-3, 1 - 1e-3)
    assert bool(jnp.isfinite(jd.convert(path, x, inside, x, src=src, dst=dst)).all())
    for s, d in (("eps", "score"), ("v", "x0"), (dst, dst)):  # sigma only / no divisor / identity
        if not (divisor == "sigma_t" and "score" in (s, d)):
            assert bool(jnp.isfinite(jd.convert(path, x, jnp.asarray(t), x, src=s, dst=d)).all())


@pytest.mark.parametrize(
    ("path", "src", "dst"),
    [
        (jd.vp_path(), "velocity", "x0"),  # sigma' ~ 1/sqrt(t): det = inf, it gave NaN
        (jd.vp_path(), "x0", "velocity"),
        (jd.cosine_path(0.0), "eps", "velocity"),  # -alpha alpha' / sigma = 0/0, it gave NaN
    ],
)
def test_a_velocity_conversion_where_the_path_has_no_finite_derivative_raises(path, src, dst):
    """At t = 0 on VP paths sigma_t' is infinite, so the velocity is undefined: a concrete t
    raises and says why; just inside the interval the conversion is finite."""
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="alpha_t' and sigma_t', which are not finite at t = 0"):
        jd.convert(path, x, 0.0, x, src=src, dst=dst)
    assert bool(jnp.isfinite(jd.convert(path, x, 1e-3, x, src=src, dst=dst)).all())


def test_path_methods_check_a_concrete_time():
    """t outside [0, 1] is an error wherever it is known at trace time (it gave alpha(2) = -1 on
    the linear path); a traced t is left to the sampler's and the loss's own checks."""
    lin, x = jd.linear_path(), jnp.ones((2, 3))
    for fn in (
        lambda t: lin.alpha(t),
        lambda t: lin.d_sigma(t),
        lambda t: lin.interpolate(x, x, t),
        lambda t: jd.convert(lin, x, t, x, src="eps", dst="x0"),
        lambda t: jd.vp_path().log_snr(jnp.array([0.5, t])),
    ):
        for bad in (1.5, -0.5, float("nan")):
            with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
                fn(bad)
        assert bool(jnp.isfinite(fn(0.5)).all())
    assert float(jax.jit(lin.alpha)(0.25)) == 0.75
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):  # a constant under jit
        jax.jit(lambda x: lin.interpolate(x, x, 2.0))(x)
    # check_time reads a constant before converting it (jnp.asarray under jit is traced): the
    # error comes when tracing (eval_shape runs nothing), not when the program runs
    with pytest.raises(ValueError, match=r"t must lie in \[0.0, 1.0\] .*got t = \[2.0\]"):
        jax.eval_shape(lambda x: lin.sample(jax.random.key(0), x, 2.0), x)
    with pytest.raises(ValueError, match=r"t_end must lie in \[0.0, 1.0\] .*got t_end = \[-0.1\]"):
        jax.eval_shape(lambda: jd.uniform_grid(8, t_end=-0.1))
