"""The precision policy: coefficients in max(float32, dtype of t), the state in the user's dtype.

References are mpmath at 50 digits with the naive formulas (no cancellation at that precision),
evaluated at the exact value of the rounded ``t`` the library sees, so the errors measured are the
library's, not ``t``'s rounding. float32's unit roundoff is 2^-24 (6e-8), bfloat16's 2^-8 (3.9e-3).
"""

import functools

import diffrax
import jax
import jax.numpy as jnp
import mpmath as mp
import numpy as np
import pytest

import jaxdiff as jd
from tests.test_paths import PATHS

mp.mp.dps = 50
HALF_PI = mp.pi / 2
TS = [1e-7, 1e-5, 1e-3, 0.5, 1 - 1e-3]
BUILT_IN = ["vp", "subvp", "ve", "linear", "cosine"]
METHODS = ["alpha", "sigma", "d_alpha", "d_sigma", "drift_coef", "diffusion_sq", "log_snr"]


def _vp_alpha(t):
    return mp.exp(-(mp.mpf("0.1") * t / 2 + (20 - mp.mpf("0.1")) * t**2 / 4))


COSINE_S = mp.mpf("0.008")


def _cosine_alpha(t, s=COSINE_S):
    return mp.cos(HALF_PI * (t + s) / (1 + s)) / mp.cos(HALF_PI * s / (1 + s))


REFERENCE = {  # (alpha, sigma), as PATHS builds them
    "vp": (_vp_alpha, lambda t: mp.sqrt(1 - _vp_alpha(t) ** 2)),
    "subvp": (_vp_alpha, lambda t: 1 - _vp_alpha(t) ** 2),
    "ve": (lambda t: mp.mpf(1), lambda t: mp.mpf("0.01") * (50 / mp.mpf("0.01")) ** t),
    "linear": (lambda t: 1 - t, lambda t: t),
    "cosine": (_cosine_alpha, lambda t: mp.sqrt(1 - _cosine_alpha(t) ** 2)),
}


@functools.cache
def _reference(name: str, t: float) -> dict[str, float]:
    alpha, sigma = REFERENCE[name]
    t = mp.mpf(t)
    a, s = alpha(t), sigma(t)
    f = mp.diff(lambda u: mp.log(alpha(u)), t)
    return {
        "alpha": a,
        "sigma": s,
        "d_alpha": mp.diff(alpha, t),
        "d_sigma": mp.diff(sigma, t),
        "drift_coef": f,
        "diffusion_sq": mp.diff(lambda u: sigma(u) ** 2, t) - 2 * f * s**2,
        "log_snr": mp.log(a**2 / s**2),
    }


# Relative tolerances in float32 (t of dtype float32 or bfloat16: coefficients are float32 both
# ways). Measured worst cases over TS: 1.4e-7 (about 1 ulp) for VP, sub-VP, linear and cosine;
# VE 1.2e-6, because sigma = exp(t log(5000)) rounds an argument near 8.5. log_snr is compared
# absolutely (its error is the SNR's relative error): measured 1.9e-6, about 1 ulp of |lambda| ~ 23.
RTOL_F32 = {"vp": 5e-7, "subvp": 5e-7, "linear": 5e-7, "cosine": 5e-7, "ve": 2e-6}
LOG_SNR_ATOL_F32 = 4e-6


def _check_against_reference(name, path, t_dtype, rtol, log_snr_atol):
    wide = jnp.float64 if t_dtype == jnp.float64 else jnp.float32
    ts = jnp.asarray(TS, wide).astype(t_dtype)
    ts = ts[ts < 1]  # bfloat16 rounds 1 - 1e-3 to 1, where alpha = 0 on linear and cosine
    values = jax.jit(lambda t: {m: getattr(path, m)(t) for m in METHODS})(ts)  # one compile
    errors = []
    for i, t_seen in enumerate(np.asarray(ts.astype(wide)).tolist()):
        ref = _reference(name, t_seen)  # at the t the library sees
        for method in METHODS:
            got, want = float(values[method][i]), ref[method]
            assert np.isfinite(got), f"{name}.{method}({t_seen}) = {got}"
            if method == "log_snr":
                err, tol = abs(got - float(want)), log_snr_atol
            elif want == 0:
                err, tol = abs(got), 0.0
            else:
                err, tol = float(abs((got - want) / want)), rtol
            if not err <= tol:
                errors.append(f"{method}({t_seen:g}): {err:.1e} > {tol:.0e}")
    assert not errors, f"{name} in {jnp.dtype(t_dtype).name}: " + "; ".join(errors)


@pytest.mark.parametrize("t_dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", BUILT_IN)
def test_coefficients_are_accurate_from_1e7_to_one(name, t_dtype):
    """alpha, sigma and their derivatives to a few float32 ulps at t in TS (VP sigma(1e-7) was 0)."""
    path = PATHS[name]()
    coef = path.sigma(jnp.asarray(1e-3, t_dtype))
    assert coef.dtype == jnp.float32  # bfloat16 t: coefficients in float32
    _check_against_reference(name, path, t_dtype, RTOL_F32[name], LOG_SNR_ATOL_F32)


@pytest.mark.parametrize("name", BUILT_IN)
def test_coefficients_are_accurate_in_float64(name, x64):
    """The same forms in float64: 1e-13 relative (measured below 1e-15, VE 2e-15)."""
    _check_against_reference(name, PATHS[name](), jnp.float64, 1e-13, 1e-12)


def test_small_t_sigma_is_not_rounded_away():
    """The issue's numbers: VP sigma(1e-3) was 0 in bfloat16, cosine sigma(1e-6) 0 in float32."""
    vp, cosine = jd.vp_path(), jd.cosine_path()
    assert float(vp.sigma(jnp.bfloat16(1e-3))) == pytest.approx(0.0104823, rel=1e-5)
    # cosine: sigma^2 ~ 2 phi^2 s t (1 + ...) for small t, phi = pi / (2 (1 + s))
    t = float(jnp.float32(1e-6))
    ref = float(REFERENCE["cosine"][1](mp.mpf(t)))
    assert float(cosine.sigma(jnp.float32(1e-6))) == pytest.approx(ref, rel=5e-7)
    assert float(vp.sigma(jnp.float32(1e-7))) == pytest.approx(
        float(REFERENCE["vp"][1](mp.mpf(float(jnp.float32(1e-7))))), rel=5e-7
    )


# --- the state keeps its dtype ---------------------------------------------------------------

HALF = [jnp.bfloat16, jnp.float16]


@pytest.mark.parametrize("dtype", HALF + [jnp.float32], ids=["bf16", "f16", "f32"])
def test_outputs_keep_the_data_dtype_and_coefficients_are_float32(dtype):
    path = jd.vp_path()

    def outputs(x, t):  # even a half-precision t gives float32 coefficients
        coefs = ["alpha", "sigma", "sigma_sq", "d_alpha", "d_sigma", "drift_coef", "log_snr"]
        out = {m: getattr(path, m)(t) for m in coefs}
        out["prior_logp"] = path.prior_logp(x)  # a reduction: accumulated in float32
        data = {
            "sample": path.sample(jax.random.key(0), x, t)[0],
            "interpolate": path.interpolate(x, x, t),
            "marginal": path.marginal(x, t)[0],
            "conditional_score": path.conditional_score(x, x, t),
            "conditional_velocity": path.conditional_velocity(x, x, t),
            "drift": path.drift(x, t),
            "transition": path.transition(x, 0.1, t)[0],
            "prior_sample": path.prior_sample(jax.random.key(0), (3,), x.dtype),
        }
        for src in jd.TARGETS:
            x0, eps = jd.to_x0_eps(path, x, t, x, src)
            data[f"to_x0_eps {src}"] = (x0, eps)
            data[f"from_x0_eps {src}"] = jd.from_x0_eps(path, x, t, x0, eps, src)
            for dst in jd.TARGETS:
                data[f"{src}->{dst}"] = jd.convert(path, x, t, x, src=src, dst=dst)
        return out, data

    x, t = jnp.ones((4, 2), dtype), jnp.full((4,), 0.3, dtype)
    coefs, data = jax.eval_shape(outputs, x, t)  # dtypes without compiling
    assert {k: v.dtype for k, v in coefs.items()} == {k: jnp.float32 for k in coefs}
    dtypes = {k: v.dtype for k, v in jax.tree_util.tree_leaves_with_path(data)}
    assert set(dtypes.values()) == {jnp.dtype(dtype)}, dtypes


BF16_ULP = 2.0**-8  # bfloat16's unit roundoff: one rounding to nearest


@pytest.mark.parametrize("t_dtype", [jnp.float32, jnp.bfloat16], ids=["t_f32", "t_bf16"])
@pytest.mark.parametrize("name", BUILT_IN)
def test_bfloat16_loss_ingredients_at_small_t_match_float32(name, t_dtype):
    """DSM / eps-loss ingredients on bfloat16 data at t = 1e-3 are finite and equal the float32
    computation on the same inputs up to one bfloat16 rounding: relative error <= 2^-8.

    (A bfloat16 x_t itself carries 2^-8 |x_t| of rounding, which a score at sigma = 0.01 amplifies
    by 1 / sigma^2: that is the data's precision, so both sides here start from the same x_t.)"""
    path = PATHS[name]()
    k1, k2 = jax.random.split(jax.random.key(3))
    x0 = jax.random.normal(k1, (64, 3)).astype(jnp.bfloat16)
    t = jnp.full((64,), 1e-3, t_dtype)  # per-sample, as a loss draws it
    xt, eps = path.sample(k2, x0, t)
    assert xt.dtype == eps.dtype == jnp.bfloat16

    def f32(a):
        return jnp.asarray(a).astype(jnp.float32)

    def close(got, want, what):
        got, want = f32(got), f32(want)
        assert bool(jnp.all(jnp.isfinite(got))), f"{what} is not finite"
        bound = BF16_ULP * jnp.abs(want) + 1e-30
        assert bool(jnp.all(jnp.abs(got - want) <= bound)), (
            f"{what}: {jnp.max(jnp.abs(got - want) / bound)}"
        )

    close(xt, path.interpolate(f32(x0), f32(eps), t), "sample")
    close(path.interpolate(x0, eps, t), path.interpolate(f32(x0), f32(eps), t), "interpolate")
    close(
        path.conditional_score(xt, x0, t),
        path.conditional_score(f32(xt), f32(x0), t),
        "conditional_score",
    )
    for dst in ["score", "x0", "v", "velocity"]:
        close(
            jd.convert(path, xt, t, eps, src="eps", dst=dst),
            jd.convert(path, f32(xt), t, f32(eps), src="eps", dst=dst),
            f"convert eps->{dst}",
        )
    # the DSM target -eps / sigma through the hub is the conditional score up to x_t's rounding
    score = jd.from_x0_eps(path, xt, t, x0, eps, "score")
    close(score, -f32(eps) / f32(path.sigma(t))[:, None], "score target")


def test_integer_x_is_promoted_and_t_keeps_its_dtype():
    """t's dtype never comes from x: an int32 x gave t = 0 (score -inf) before."""
    vp = jd.vp_path()
    x = jnp.ones((2, 2), jnp.int32)
    want = -1.0 / float(REFERENCE["vp"][1](mp.mpf(0.5)))  # -1.0420...

    def score(x):
        return jd.convert(vp, x, 0.5, x, src="eps", dst="score")

    for out in [score(x), jax.jit(score)(x)]:
        assert out.dtype == jnp.float32
        np.testing.assert_allclose(out, want, rtol=1e-6)
    x0, eps = jd.to_x0_eps(vp, x, 0.5, x, "eps")
    np.testing.assert_allclose(eps, 1.0)
    np.testing.assert_allclose(x0, (1 - float(vp.sigma(0.5))) / float(vp.alpha(0.5)), rtol=1e-6)
    v = jax.jit(lambda x: jd.from_x0_eps(vp, x, 0.5, x, x, "v"))(x)
    np.testing.assert_allclose(v, float(vp.alpha(0.5) - vp.sigma(0.5)), rtol=1e-6)
    # the path's own methods promote integers too
    assert vp.interpolate(x, x, 0.5).dtype == jnp.float32


def test_trigonometric_path_from_the_docstring_builds_in_float32():
    """cos(pi/2) rounds to -4.4e-8 in float32: within the validator's 8-ulp tolerance; alpha_1 reads
    0 exactly, and its derivative is untouched by the clamp."""
    path = jd.GaussianPath(lambda t: jnp.cos(0.5 * jnp.pi * t), lambda t: jnp.sin(0.5 * jnp.pi * t))
    assert float(jnp.cos(0.5 * jnp.pi * jnp.float32(1.0))) < 0  # the rounding the tolerance covers
    assert float(path.alpha(1.0)) == 0.0
    assert float(path.d_alpha(1.0)) == pytest.approx(-np.pi / 2, rel=1e-6)
    assert float(path.log_snr(1.0)) == -np.inf
    assert float(path.sigma(1.0)) == pytest.approx(1.0, rel=1e-7)
    # sigma_0 that rounds below 0 is read as 0 too
    flipped = jd.GaussianPath(
        lambda t: jnp.cos(0.5 * jnp.pi * t), lambda t: jnp.cos(0.5 * jnp.pi * (1.0 - t))
    )
    assert float(flipped.sigma(0.0)) == 0.0
    # beyond the tolerance (8 ulps, 9.5e-7 in float32) a negative alpha_1 still fails
    with pytest.raises(ValueError, match=r"alpha\(t\) must be > 0 on \[0, 1\) and >= 0 at 1"):
        jd.GaussianPath(
            lambda t: jnp.cos(0.5 * jnp.pi * t) - 2e-6, lambda t: jnp.sin(0.5 * jnp.pi * t)
        )


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "f16"])
def test_half_precision_conversions_round_trip(dtype):
    """Every pair round-trips on half-precision data to a few roundings (one per conversion)."""
    path = jd.cosine_path()
    x, t = jax.random.normal(jax.random.key(1), (32, 4)).astype(dtype), jnp.full((32,), 0.3)
    value = jax.random.normal(jax.random.key(2), (32, 4)).astype(dtype)
    ulp = float(jnp.finfo(dtype).eps) / 2
    for src in jd.TARGETS:
        for dst in jd.TARGETS:
            there = jd.convert(path, x, t, value, src=src, dst=dst)
            back = jd.convert(path, x, t, there, src=dst, dst=src).astype(jnp.float32)
            # conditioning of the 2x2 maps at t = 0.3 is < 10: 40 ulps of the larger of |x|, |value|
            scale = jnp.maximum(jnp.abs(x), jnp.abs(value)).astype(jnp.float32)
            assert bool(
                jnp.all(jnp.abs(back - value.astype(jnp.float32)) <= 40 * ulp * (1 + scale))
            )


def test_integrate_and_ddim_invert_run_half_precision_in_float32():
    # integrate kept a bfloat16 state: every Euler update of 1e-3 x rounded away (x(1) = 1.0 for
    # exp(-1) at 1000 steps) and the adaptive solve failed in diffrax's closure conversion;
    # ddim_invert's bfloat16 state drifted with the steps (0.027 at 100 steps, 0.19 at 400)
    for dtype in (jnp.bfloat16, jnp.float16):
        sol = jd.integrate(lambda x, t: -x, jnp.ones(3, dtype), t_start=0.0, t_end=1.0, steps=1000)
        assert sol.x.dtype == dtype
        assert abs(float(sol.x[0]) - 0.999**1000) < 2e-3  # Euler's 0.3677 to a bf16 ulp
        tsit = jd.integrate(lambda x, t: -x, jnp.ones(3, dtype), t_start=0.0, t_end=1.0,
                            solver=diffrax.Tsit5(), rtol=1e-4, atol=1e-4)  # fmt: skip
        assert tsit.x.dtype == dtype and abs(float(tsit.x[0]) - np.exp(-1)) < 2e-3
    mix = jd.GaussianMixture.isotropic(jnp.array([[2.0, 0.0], [-2.0, 0.5]]), std=0.3)
    path = jd.vp_path()
    field = mix.field(path, "eps")
    x = mix.sample(jax.random.key(0), 500).astype(jnp.bfloat16)
    z16 = jd.ddim_invert(path, field, x, steps=100, t_end=0.999).x
    z32 = jd.ddim_invert(path, field, x.astype(jnp.float32), steps=100, t_end=0.999).x
    assert z16.dtype == jnp.bfloat16
    assert float(jnp.abs(z16.astype(jnp.float32) - z32).mean()) < 0.006  # 0.0014 (bf16 field)


def test_bfloat16_grid_ends_give_a_float32_grid():
    grid = jd.uniform_grid(300, jnp.bfloat16(0.999), jnp.bfloat16(1e-3))  # 225 distinct times
    assert grid.dtype == jnp.float32 and np.unique(np.asarray(grid)).size == 301
