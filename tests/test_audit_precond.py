"""Audit of precond, weightings, straightness and guidance: endpoint derivatives of the EDM
scalings, edm_time's density and tail draws, straightness in low-precision dtypes, guidance
scales that are not finite."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import ndtr

import jaxdiff as jd
from jaxdiff.precond import edm_scalings
from jaxdiff.straightness import straightness
from jaxdiff.weightings import edm_time


def test_edm_scalings_time_derivative_is_finite_at_the_endpoints():
    # EDM's VE row, sigma = t: c_out = t s / sqrt(t^2 + s^2) has derivative 1 at t = 0 (it was
    # NaN: sqrt(sigma^2 s^2)); c_noise is clipped there, so its derivative is 0 (was NaN)
    ve = jd.GaussianPath(lambda t: jnp.ones_like(t), lambda t: t)
    for path in (ve, jd.linear_path()):
        _, d = jax.jvp(
            lambda t, path=path: jnp.stack(edm_scalings(path, t, 0.5)),
            (jnp.float32(0.0),),
            (jnp.float32(1.0),),
        )
        np.testing.assert_allclose(np.asarray(d[1]), 1.0, atol=1e-6)  # d c_out / dt
        np.testing.assert_allclose(np.asarray(d[3]), 0.0, atol=0)  # d c_noise / dt
    _, d = jax.jvp(
        lambda t: jnp.stack(edm_scalings(jd.linear_path(), t, 0.5)),
        (jnp.float32(1.0),),
        (jnp.float32(1.0),),
    )
    np.testing.assert_allclose(np.asarray(d[3]), 0.0, atol=0)  # alpha = 0: clipped
    # values unchanged: Table 1 at sigma = 0.5
    s = edm_scalings(ve, 0.5, 0.5)
    np.testing.assert_allclose(
        [float(c) for c in s],
        [0.5, 0.25 / np.sqrt(0.5), 1 / np.sqrt(0.5), 0.25 * np.log(0.5)],
        rtol=1e-6,
    )


def test_edm_time_pdf_is_zero_outside_its_interval():
    ts = edm_time(jd.vp_path(), t_min=0.2, t_max=0.6)
    g = jnp.linspace(0.0, 1.0, 100001)
    pdf = ts.pdf(g)
    assert bool(jnp.all(jnp.isfinite(pdf)))  # pdf(0) was NaN
    np.testing.assert_allclose(float(jnp.sum(pdf) * (g[1] - g[0])), 1.0, atol=1e-3)  # was 4.39
    assert float(ts.pdf(0.1)) == 0.0 and float(ts.pdf(0.7)) == 0.0


def test_edm_time_draws_follow_the_truncated_normal_in_its_tail():
    path = jd.vp_path()
    ts = edm_time(path, t_min=0.9, t_max=1.0)  # log sigma~ from 4.4 to 5.2 std above P_mean
    d = np.sort(np.asarray(ts(jax.random.key(0), (20000,))))
    grid = np.linspace(0.9, 1.0, 2001)
    z = (-0.5 * np.asarray(path.log_snr(jnp.asarray(grid))) + 1.2) / 1.2
    cdf = np.asarray(ndtr(-z[0]) - ndtr(-jnp.asarray(z)))  # upper tail: no cancellation
    cdf = cdf / cdf[-1]
    ks = np.max(np.abs(np.searchsorted(d, grid) / d.size - cdf))
    assert ks < 0.015  # erf-based draws never passed t = 0.9924 (CDF there 0.98)
    far = edm_time(path, p_mean=30.0)  # all mass at t_max: the draws were all t_min
    assert float(jnp.min(far(jax.random.key(1), (8,)))) > 0.99


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.int32])
def test_straightness_of_a_straight_flow_in_low_precision(dtype):
    straight = jd.Field(lambda x, t: jnp.ones_like(x), "velocity")  # x(t) = x1 - (1 - t)
    r = straightness(straight, jnp.zeros((8, 2), dtype), steps=100)
    assert float(r.value) < 1e-6  # bfloat16 gave 0.096, int32 19602
    np.testing.assert_allclose(np.asarray(r.x0, np.float32), -1.0, atol=1e-2)  # bf16: -1.22
    assert r.x0.dtype == (dtype if dtype != jnp.int32 else jnp.float32)


def test_straightness_of_a_scalar_is_a_clear_error():  # was IndexError
    f = jd.Field(lambda x, t: x, "velocity")
    with pytest.raises(ValueError, match="batch axis"):
        straightness(f, jnp.ones(()), steps=2)


def test_guidance_scale_must_be_finite():
    f = jd.Field(lambda x, t, y: x * y[:, None], "eps")
    x, t = jnp.ones((1, 2)), jnp.full(1, 0.5)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale"):
            jd.classifier_free_guidance(f, jnp.array([2.0]), 0.0, bad)
        with pytest.raises(ValueError, match="scale"):
            jd.classifier_guidance(
                jd.Field(lambda x, t: x, "eps"), jd.vp_path(), lambda z, t: jnp.sum(z, -1), bad
            )
    g = jax.jit(lambda s: jd.classifier_free_guidance(f, jnp.array([2.0]), 0.0, s)(x, t))
    np.testing.assert_allclose(np.asarray(g(3.0)), 6.0)
    with pytest.raises(Exception, match="scale"):  # traced: the check stays alive
        jax.block_until_ready(g(jnp.nan))


def test_the_relative_straightness_of_a_flow_that_does_not_move_is_zero():
    """It was 0 / 0 = NaN: a zero velocity field is straight."""
    still = jd.Field(lambda x, t: jnp.zeros_like(x), "velocity")
    r = straightness(still, jnp.ones((4, 2)), steps=4)
    assert float(r.value) == 0.0 and float(r.relative) == 0.0
