"""Two-sample statistics against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

import jaxdiff as jd


def test_energy_distance_of_shifted_gaussians_matches_closed_form():
    """X ~ N(0, 1), Y ~ N(m, 1) in 1-D: ED = 2 E|Z_m| - 2 E|Z_0| with Z_m ~ N(m, 2)."""
    m, n = 1.0, 8000
    kx, ky = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (n, 1))
    y = m + jax.random.normal(ky, (n, 1))
    s = np.sqrt(2.0)
    e_abs = s * np.sqrt(2 / np.pi) * np.exp(-(m**2) / (2 * s**2)) + m * (1 - 2 * norm.cdf(-m / s))
    exact = 2 * e_abs - 2 * s * np.sqrt(2 / np.pi)
    # U-statistic standard error at n = 8000 is ~0.01 here
    assert float(jd.energy_distance(x, y)) == pytest.approx(exact, abs=0.04)
    assert abs(float(jd.energy_distance(x, jax.random.normal(ky, (n, 1))))) < 0.01


def test_mmd_matches_closed_form_for_gaussians():
    """E k(X, Y) = (h^2 / (h^2 + 2 s^2))^{d/2} exp(-|a - b|^2 / (2 (h^2 + 2 s^2))) for RBF k."""
    d, h, n = 2, 1.0, 6000
    a, b = jnp.zeros(d), jnp.array([0.7, 0.0])
    kx, ky = jax.random.split(jax.random.key(1))
    x = a[None] + jax.random.normal(kx, (n, d))
    y = b[None] + jax.random.normal(ky, (n, d))

    def ek(u, v):
        return (h**2 / (h**2 + 2)) ** (d / 2) * np.exp(-np.sum((u - v) ** 2) / (2 * (h**2 + 2)))

    exact = ek(a, a) + ek(b, b) - 2 * ek(a, b)
    assert float(jd.mmd(x, y, h)) == pytest.approx(exact, abs=0.005)  # SE ~ 1e-3
    two = jd.mmd(x, y, [0.5, 2.0])
    assert float(two) == pytest.approx(float(jd.mmd(x, y, 0.5) + jd.mmd(x, y, 2.0)), rel=1e-4)


def test_blocks_do_not_change_the_result():
    x = jax.random.normal(jax.random.key(2), (1000, 3))
    y = x[::-1] * 1.5 + 0.5
    np.testing.assert_allclose(
        jd.energy_distance(x, y, block=128), jd.energy_distance(x, y, block=1000), rtol=1e-5
    )
    np.testing.assert_allclose(jd.mmd(x, y, block=128), jd.mmd(x, y, block=1000), rtol=1e-4)


def test_shape_errors():
    with pytest.raises(ValueError, match=r"expected x \(n, d\) and y \(m, d\)"):
        jd.energy_distance(jnp.zeros((4, 2)), jnp.zeros((4, 3)))


def test_bad_samples_raise_instead_of_returning_nan():
    """One sample (the within-set U-statistics average over i != j: 0 / 0), NaN samples, a
    bandwidth <= 0 and an empty reference each raise with the value (they gave NaN or a
    ZeroDivisionError); under ``jit`` the non-finite check still fires, when the program runs."""
    x, one, nan = jnp.ones((4, 2)), jnp.ones((1, 2)), jnp.full((4, 2), jnp.nan)
    for stat in (jd.energy_distance, jd.mmd, jd.frechet_distance):
        with pytest.raises(ValueError, match="at least 2 samples in each set.*got 1 and 4"):
            stat(one, x)
        with pytest.raises(ValueError, match="x contains non-finite values"):
            stat(nan, x)
    for h in (0.0, [1.0, -1.0], jnp.nan):
        with pytest.raises(ValueError, match="bandwidths must be"):
            jd.mmd(x, x + 1, h)
    with pytest.raises(ValueError, match="reference contains non-finite values"):
        jd.memorization_ratio(x, nan, x)
    with pytest.raises(ValueError, match=r"n >= 1; got shapes \(4, 2\) and \(0, 2\)"):
        jd.nearest_neighbour_distance(x, jnp.zeros((0, 2)))
    with pytest.raises(Exception, match="y contains non-finite values"):
        jax.block_until_ready(jax.jit(jd.energy_distance)(x, nan))
    assert float(jd.energy_distance(jnp.zeros((2, 1)), jnp.ones((2, 1)))) == 2.0  # 2|0-1| - 0 - 0


def test_integer_and_far_from_origin_data_give_the_float_statistics():
    """uint8 pixels overflowed in |x|^2 (energy distance 3.5e-23 for -1.67, nearest neighbours
    0), and points at an offset of 1e4 lost their distances in float32 (0.0206 for -0.0041)."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (50, 16)).astype(np.uint8)
    b = rng.integers(0, 256, (40, 16)).astype(np.uint8)
    fa, fb = a.astype(np.float64), b.astype(np.float64)
    np.testing.assert_allclose(jd.energy_distance(a, b), jd.energy_distance(fa, fb), rtol=1e-5)
    np.testing.assert_allclose(
        jd.nearest_neighbour_distance(a[:3], b),
        np.sqrt(((fa[:3, None] - fb[None]) ** 2).sum(-1)).min(1),
        rtol=1e-5,
    )
    x = jax.random.normal(jax.random.key(0), (500, 2))
    y = jax.random.normal(jax.random.key(1), (500, 2))
    ref = float(jd.energy_distance(x, y))
    assert abs(float(jd.energy_distance(x + 1e4, y + 1e4)) - ref) < 1e-4
    np.testing.assert_allclose(jd.mmd(x + 1e3, y + 1e3), jd.mmd(x, y), rtol=1e-3, atol=1e-6)
    wide = jax.random.normal(jax.random.key(2), (100, 256))  # n < d: rounding gave -0.18
    assert float(jd.frechet_distance(wide, wide)) == 0.0
    with pytest.raises(ValueError, match="block must be a positive integer"):
        jd.energy_distance(x, y, block=0)  # a ZeroDivisionError


def test_frechet_distance_gradient_and_covariance_checks(x64):
    """With fewer points than dimensions the covariances are singular, their roots' eigenvectors
    not unique, and the gradient was NaN; the nuclear norm of ``A B^T`` gives the same value (within
    1e-7 of the covariance formula) and a finite gradient, equal to finite differences. A
    covariance that is not positive semi-definite was clipped silently; it is now an error."""
    from jaxdiff.metrics import frechet_distance_from_stats as from_stats

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 7)), rng.normal(size=(9, 7)) + 0.2
    stats = (x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    np.testing.assert_allclose(jd.frechet_distance(x, y), from_stats(*stats), rtol=1e-7)
    grad = jax.grad(jd.frechet_distance)(x, y)
    assert np.all(np.isfinite(grad))
    step = np.zeros_like(x)
    step[2, 3] = 1e-6
    fd = (jd.frechet_distance(x + step, y) - jd.frechet_distance(x - step, y)) / 2e-6
    np.testing.assert_allclose(grad[2, 3], fd, rtol=1e-5)
    eye, bad = np.eye(3), np.diag([1.0, -0.5, 1.0])
    assert float(from_stats(np.zeros(3), eye, np.ones(3), 4 * eye)) == pytest.approx(6.0)
    with pytest.raises(ValueError, match="cov_x must be a symmetric positive semi-definite"):
        from_stats(np.zeros(3), bad, np.zeros(3), eye)
    with pytest.raises(Exception, match="cov_y must be a symmetric positive semi-definite"):
        jax.block_until_ready(jax.jit(from_stats)(np.zeros(3), eye, np.zeros(3), bad))
    with pytest.raises(ValueError, match=r"shape \(d, d\); got shapes \(3,\), \(3,\), \(3, 3\)"):
        from_stats(np.zeros(3), eye, np.zeros(3), np.eye(2))


def test_memorization_ratio_of_held_out_copies_is_an_error():
    """Held-out data that are mostly copies of training points have median distance 0: the
    ratio was inf or NaN."""
    train = jax.random.normal(jax.random.key(0), (50, 3))
    with pytest.raises(ValueError, match="held_out's median distance .* must be > 0 .*; got 0.0"):
        jd.memorization_ratio(train[:10] + 0.1, train, train[:20])
    assert float(jd.memorization_ratio(train[:20], train, train[:20] + 0.1)) == 0.0


def _energy_gradient(x, y):
    """d/dx of 2 E|X - Y| - E|X - X'| - E|Y - Y'| (U-statistics), float64 numpy."""
    n, m = len(x), len(y)
    g = np.zeros_like(x)
    for i in range(n):
        d = x[i] - y
        g[i] += 2 * (d / np.linalg.norm(d, axis=1)[:, None]).sum(0) / (n * m)
        d = np.delete(x[i] - x, i, 0)
        g[i] -= 2 * (d / np.linalg.norm(d, axis=1)[:, None]).sum(0) / (n * (n - 1))
    return g


@pytest.mark.parametrize("gap", [1e-3, 1e-4, 1e-5])
def test_close_points_keep_the_energy_gradient_bounded(gap):
    """Distances come from |x|^2 + |y|^2 - 2 x.y, rounding noise for points closer than about
    sqrt(eps) |x|: sqrt's slope there gave gradients ~1e9 at a gap of 1e-4 (each pair's true
    slope is a unit vector). Now such a pair adds no slope: the gradient is off by at most that
    pair's unit vector, 2 / (n (n - 1)), and exact where the expansion resolves the gap."""
    rng = np.random.default_rng(0)
    x = np.repeat(rng.normal(size=(5, 3)), 2, 0)  # 5 pairs of points ...
    x[1::2, 0] += gap  # ... split by the gap
    y = rng.normal(size=(10, 3))
    g = jax.grad(jd.energy_distance)(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    err = np.abs(np.asarray(g) - _energy_gradient(x, y)).max()
    assert err < (1e-3 if gap >= 1e-3 else 2 / 90 + 1e-3), err  # was 1.1e9 at 1e-4


def test_nearest_neighbour_distance_resolves_small_gaps():
    """The nearest row is found by the expansion, its distance taken from the difference:
    distances below ~5e-3 at |x| ~ 12 read 0 (no slope) or 5x too large."""
    rng = np.random.default_rng(5)
    ref = rng.normal(size=(50, 16)).astype(np.float32) * 3
    q = ref[:4] + 1e-4 * np.eye(4, 16, dtype=np.float32)  # each row 1e-4 from a reference row
    d = jd.nearest_neighbour_distance(q, ref)
    np.testing.assert_allclose(d, 1e-4, rtol=1e-2)  # was [0, 0.0039, 0, 0]
    g = jax.grad(lambda a: jd.nearest_neighbour_distance(a, ref).sum())(jnp.asarray(q))
    np.testing.assert_allclose(np.linalg.norm(g, axis=1), 1.0, rtol=1e-2)  # unit slope


def test_frechet_distance_keeps_float32_accuracy_on_the_digits_features():
    """The cross term came from the square roots of the eigenvalues of C_x^(1/2) C_y C_x^(1/2),
    each off by sqrt(eps * largest): the digits' distance, a 200-fold cancellation of traces,
    was 0.6% off the float64 value in float32. Singular values of C_x^(1/2) C_y^(1/2) keep it."""
    import scipy.linalg as sl

    from jaxdiff.data import load_digits
    from jaxdiff.digits import classifier_features, digits_frechet_distance, load_classifier

    params = load_classifier()
    images = load_digits("train")[0]
    a, b = images[:700], images[700:1400]
    fa, fb = (np.asarray(classifier_features(params, v), np.float64) for v in (a, b))
    cx, cy = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    exact = np.sum((fa.mean(0) - fb.mean(0)) ** 2) + np.trace(cx + cy)
    exact -= 2 * np.trace(np.real(sl.sqrtm(cx @ cy)))  # 3.5416, of traces summing to 745
    value = float(digits_frechet_distance(params, a, b))
    assert abs(value - exact) < 2e-4 * exact, (value, exact)  # was 3.5200: 6e-3 off
