"""Second audit of paths, conversions and sde: regressions for the bugs it found."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd


def test_langevin_low_precision_state_does_not_round_steps_away():
    """A bfloat16 state rounded every update: N(2, 0.25) from 0, step 1e-4, 3000 steps gave mean
    1.10 (float32: 1.398 = 2 (1 - exp(-1.2)))."""
    mu, s2 = 2.0, 0.25

    def score(x):
        return -(x - mu) / s2

    x0 = jnp.zeros((4096,))
    ref = jd.langevin(jax.random.key(0), score, x0, step_size=1e-4, steps=3000)
    assert abs(float(ref.mean()) - 2.0 * (1.0 - np.exp(-1.2))) < 0.02
    for dtype in (jnp.bfloat16, jnp.float16):
        x = jd.langevin(jax.random.key(0), score, x0.astype(dtype), step_size=1e-4, steps=3000)
        assert x.dtype == dtype
        assert abs(float(x.astype(jnp.float32).mean()) - float(ref.mean())) < 5e-3


def test_langevin_stationary_gaussian():
    """N(2, 0.5^2): ULA's stationary law is N(2, s2 / (1 - h / (2 s2))) = N(2, 0.2525)."""
    x = jd.langevin(
        jax.random.key(3),
        lambda x: -(x - 2.0) / 0.25,
        jnp.zeros((20000,)),
        step_size=0.005,
        steps=1000,
    )
    assert abs(float(x.mean()) - 2.0) < 0.015  # 4 standard errors (0.0036)
    assert abs(float(x.var()) - 0.25 / (1 - 0.01)) < 0.01  # 4 s.e. (0.0025)


def test_t_from_log_snr_rejects_nan():
    """Bisection read a NaN log-SNR as t = 4e-19 (data time), silently."""
    path = jd.vp_path()
    with pytest.raises(ValueError, match="NaN"):
        path.t_from_log_snr(jnp.nan)
    out = jax.jit(path.t_from_log_snr)(jnp.array([jnp.nan, float(path.log_snr(0.5))]))
    assert np.isnan(float(out[0])) and abs(float(out[1]) - 0.5) < 1e-6


def test_transition_at_equal_times_is_identity_where_alpha_is_zero():
    """transition(x, 1, 1) on the linear path divided alpha_1 / alpha_1 = 0 / 0: mean NaN."""
    x = jnp.array([0.3, -1.0, 2.0])
    for path in (jd.linear_path(), jd.cosine_path()):
        mean, std = path.transition(x, 1.0, 1.0)
        np.testing.assert_allclose(mean, x, rtol=0, atol=0)
        assert float(std) == 0.0
    mean, std = jd.linear_path().transition(x, 0.3, 0.7)  # unchanged off the diagonal
    np.testing.assert_allclose(mean, x * 0.3 / 0.7, rtol=1e-6)
    np.testing.assert_allclose(std, np.sqrt(0.49 - (0.3 / 0.7) ** 2 * 0.09), rtol=1e-6)


def test_from_x0_eps_at_a_known_zero_divisor_raises():
    """from_x0_eps(vp, ., t=0, ., ., 'score') returned -inf silently (convert raised)."""
    path, one = jd.vp_path(), jnp.ones(2)
    with pytest.raises(ValueError, match="sigma_t"):
        jd.from_x0_eps(path, one, 0.0, one, one, "score")
    with pytest.raises(ValueError, match="not finite"):
        jd.from_x0_eps(path, one, 0.0, one, one, "velocity")
    np.testing.assert_allclose(jd.from_x0_eps(path, one, 0.0, one, one, "v"), [1.0, 1.0])
    s = float(path.sigma(0.5))
    np.testing.assert_allclose(jd.from_x0_eps(path, one, 0.5, one, one, "score"), -1 / s, rtol=1e-6)
