"""Measurement operators and the exact posterior oracle (no sampling of the diffusion).

Operators: the dot-product test ``<A x, y> = <x, A^T y>`` (float64, to 1e-12), the dense matrix,
``gram_solve`` and ``pinv`` against dense linear algebra. The oracle ``GaussianMixture.posterior``:
a single Gaussian against brute-force conditioning of the joint Gaussian of ``(x0, y)``; a
mixture against self-normalised importance weighting of prior samples (within 4 standard
errors); batching over measurements by ``vmap`` without batching its ``eigh``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd

KEY = jax.random.key(0)


def operators():
    mask = np.zeros((4, 6), bool)
    mask[1:3, ::2] = True
    mat = np.asarray(jax.random.normal(KEY, (3, 24)))
    return {
        "matrix": jd.matrix_operator(mat, (4, 6)),
        "mask": jd.mask_operator(mask),
        "subsample": jd.subsample_operator((4, 6), 2),
        "subsample-rgb": jd.subsample_operator((4, 6, 3), 2),
        "blur": jd.blur_operator((4, 6), 0.8),
        "linear": jd.linear_operator(lambda x: jnp.cumsum(x.reshape(-1))[::5], (4, 6)),
    }


OPS = operators()


@pytest.mark.parametrize("name", OPS)
def test_transpose_passes_the_dot_product_test(name, x64):
    op = operators()[name]  # rebuilt under x64
    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (5, *op.in_shape), jnp.float64)
    y = jax.random.normal(ky, (5, op.out_dim), jnp.float64)
    ax, aty = op.forward(x), op.transpose(y)
    assert ax.shape == (5, op.out_dim) and aty.shape == x.shape
    lhs = jnp.sum(ax * y, axis=1)
    rhs = jnp.sum((x * aty).reshape(5, -1), axis=1)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-12, atol=1e-12)
    mat = op.matrix()  # the dense matrix agrees with forward
    np.testing.assert_allclose(ax, x.reshape(5, -1) @ mat.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", OPS)
def test_gram_solve_and_pseudo_inverse(name, x64):
    op = operators()[name]
    mat = np.asarray(op.matrix())
    gram = mat @ mat.T
    v = np.asarray(jax.random.normal(jax.random.key(2), (3, op.out_dim), jnp.float64))
    r2 = np.array([0.3, 1.0, 2.0])  # one per sample, and a scalar noise
    got = op.gram_solve(v, r2, 0.05)
    want = np.stack(
        [
            np.linalg.solve(r * gram + 0.05 * np.eye(op.out_dim), vi)
            for r, vi in zip(r2, v, strict=True)
        ]
    )
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)
    if np.linalg.matrix_rank(gram) == op.out_dim:  # A A^+ = I on a full-row-rank A
        np.testing.assert_allclose(op.forward(op.pinv(v)), v, rtol=1e-9, atol=1e-9)


def test_operators_take_any_batch_axes_and_check_shapes():
    op = OPS["subsample"]
    x = jnp.ones((2, 3, 4, 6))
    assert op.forward(x).shape == (2, 3, 6) and op.transpose(op.forward(x)).shape == x.shape
    with pytest.raises(ValueError, match=r"A takes x of shape \(\.\.\., \*\(4, 6\)\)"):
        op.forward(jnp.ones((2, 6, 4)))
    with pytest.raises(ValueError, match=r"A\^T takes y of shape \(\.\.\., 6\)"):
        op.transpose(jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="divisible by factor = 3"):
        jd.subsample_operator((4, 6), 3)
    with pytest.raises(ValueError, match="factor must be a positive integer; got -2"):
        jd.subsample_operator((4, 6), -2)  # divided evenly, and pooled nothing
    with pytest.raises(ValueError, match="mask must be concrete"):
        jax.jit(lambda m: jd.mask_operator(m).out_dim)(jnp.ones(3, bool))
    with pytest.raises(ValueError, match="selects no entry"):
        jd.mask_operator(np.zeros(3, bool))
    with pytest.raises(
        ValueError, match=r"mask must be boolean \(or 0/1\); got values such as \[0.5"
    ):
        jd.mask_operator(np.array([0.5, 0.0, 1.0]))  # 0.5 read as True
    assert jd.mask_operator(np.array([0, 1, 1])).out_dim == 2
    with pytest.raises(ValueError, match="matrix contains non-finite values"):
        jd.matrix_operator(np.array([[1.0, np.nan]]))
    with pytest.raises(Exception, match="matrix contains non-finite values"):  # when it runs
        jax.jit(lambda m: jd.matrix_operator(m).forward(jnp.ones(2)))(jnp.array([[1.0, jnp.nan]])).block_until_ready()  # fmt: skip
    with pytest.raises(ValueError, match=r"M has 24 columns"):
        jd.matrix_operator(np.ones((2, 24)), (5, 5))


def test_measurement_checks_eagerly_and_under_jit():
    op = jd.matrix_operator(jnp.eye(2))
    with pytest.raises(ValueError, match=r"y must have shape \(2,\) or \(batch, 2\)"):
        jd.Measurement(op, jnp.ones(3), 0.1)
    with pytest.raises(ValueError, match="sigma_y must be >= 0"):
        jd.Measurement(op, jnp.ones(2), -0.1)
    with pytest.raises(TypeError, match="LinearOperator"):
        jd.Measurement(jnp.eye(2), jnp.ones(2), 0.1)
    meas = jd.Measurement(op, jnp.ones((3, 2)), 0.1)
    with pytest.raises(ValueError, match="y holds 3 measurements but x has 4 samples"):
        meas.residual(jnp.ones((4, 2)))
    traced = jax.jit(lambda s: jd.Measurement(op, jnp.ones(2), s).sigma_y)  # checked where used
    with pytest.raises(Exception, match="sigma_y must be finite and >= 0"):
        jax.block_until_ready(traced(-0.1))
    assert float(traced(0.1)) == pytest.approx(0.1)


def test_measure_draws_the_noise_it_says():
    op = jd.matrix_operator(jnp.array([[1.0, 2.0]]))
    x0 = jnp.ones((20000, 2))
    meas = jd.measure(jax.random.key(3), op, x0, 0.5)
    resid = meas.y[:, 0] - 3.0
    # std of 20000 draws of N(0, 0.25): standard error of the mean 0.0035, of the std 0.0025
    assert abs(float(resid.mean())) < 0.015 and float(resid.std()) == pytest.approx(0.5, abs=0.01)


# --- the exact posterior -------------------------------------------------------------------


def test_single_gaussian_posterior_is_brute_force_conditioning(x64):
    kl, km, ka, ky = jax.random.split(jax.random.key(4), 4)
    d, m, sy = 5, 3, 0.4
    low = np.asarray(jax.random.normal(kl, (d, d), jnp.float64))
    cov = low @ low.T + 0.5 * np.eye(d)
    mu = np.asarray(jax.random.normal(km, (d,), jnp.float64))
    a = np.asarray(jax.random.normal(ka, (m, d), jnp.float64))
    y = np.asarray(jax.random.normal(ky, (m,), jnp.float64))
    # the joint Gaussian of (x0, y) conditioned on y
    s_xy, s_yy = cov @ a.T, a @ cov @ a.T + sy**2 * np.eye(m)
    mean = mu + s_xy @ np.linalg.solve(s_yy, y - a @ mu)
    post_cov = cov - s_xy @ np.linalg.solve(s_yy, s_xy.T)
    prior = jd.GaussianMixture(jnp.ones(1), jnp.asarray(mu)[None], jnp.asarray(cov)[None])
    for A in (jnp.asarray(a), jd.matrix_operator(a)):
        post = prior.posterior(A, y, sy)
        np.testing.assert_allclose(post.means[0], mean, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(post.covs[0], post_cov, rtol=1e-10, atol=1e-10)
        assert float(post.weights[0]) == 1.0


def mixture_2d():
    means = jnp.array([[-2.0, 1.0], [1.5, 2.0], [1.0, -2.0]])
    angles, scales = (0.3, 1.2, -0.5), ((0.5, 0.1), (0.4, 0.15), (0.3, 0.2))
    covs = []
    for angle, (u, v) in zip(angles, scales, strict=True):
        c, s = np.cos(angle), np.sin(angle)
        rot = np.array([[c, -s], [s, c]])
        covs.append(rot @ np.diag([u, v]) @ rot.T)
    return jd.GaussianMixture(jnp.array([0.5, 0.3, 0.2]), means, jnp.asarray(np.stack(covs)))


def test_mixture_posterior_matches_importance_weighting(x64):
    prior = mixture_2d()
    a, y, sy = jnp.array([[1.0, 0.5]]), jnp.array([0.5]), 0.5
    post = prior.posterior(a, y, sy)
    x, labels = prior.sample_labeled(jax.random.key(5), 100_000)
    logw = -0.5 * jnp.sum((y[None] - x @ a.T) ** 2, axis=1) / sy**2
    w = np.array(jnp.exp(logw - logw.max()))
    w /= w.sum()
    ess = 1.0 / np.sum(w**2)  # ~3e4 effective samples
    for k in range(3):
        in_k = np.asarray(labels == k)
        wk = w[in_k].sum()
        se = np.sqrt(wk * (1 - wk) / ess)  # delta method for a self-normalised estimate
        assert abs(wk - float(post.weights[k])) < 4 * se + 1e-4, (k, wk, post.weights)
        mean_k = (w[in_k, None] * np.asarray(x)[in_k]).sum(0) / wk
        var_k = np.diag(np.asarray(post.covs[k]))
        se_mean = np.sqrt(var_k / (ess * wk))
        assert np.all(np.abs(mean_k - np.asarray(post.means[k])) < 4 * se_mean + 1e-4), k
    # the weights move with y: component 2 dominates here, component 0 in the prior
    assert float(post.weights[2]) > 0.5 > float(prior.weights[2])


def test_posterior_batches_over_measurements_by_vmap_without_a_batched_factorisation():
    prior = mixture_2d()
    a = jnp.array([[1.0, 0.5]])
    ys = jnp.array([[-1.0], [0.5], [2.0], [0.0], [1.0]])
    batched = jax.vmap(lambda y: prior.posterior(a, y, 0.3))(ys)
    assert batched.means.shape == (5, 3, 2) and batched.weights.shape == (5, 3)
    for i in range(5):
        one = prior.posterior(a, ys[i], 0.3)
        np.testing.assert_allclose(batched.means[i], one.means, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(batched.weights[i], one.weights, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(batched.covs[i], one.covs, rtol=1e-5, atol=1e-7)
    jaxpr = str(jax.make_jaxpr(jax.vmap(lambda y: prior.posterior(a, y, 0.3)))(ys))
    factors = [line for line in jaxpr.splitlines() if "cholesky" in line or "triangular" in line]
    assert factors and all("[5," not in line for line in factors), factors  # (K, m, m) only


def test_posterior_weights_never_underflow_and_inputs_are_checked():
    prior = jd.GaussianMixture.isotropic(jnp.array([[0.0], [50.0]]), 0.1)
    post = prior.posterior(jnp.ones((1, 1)), jnp.zeros(1), 0.1)  # the far component: weight e^-1e5
    assert float(post.weights[1]) > 0 and float(post.weights[0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"A must be \(m, 1\)"):
        prior.posterior(jnp.ones((1, 2)), jnp.zeros(1), 0.1)
    with pytest.raises(ValueError, match=r"y must have shape \(1,\)"):
        prior.posterior(jnp.ones((1, 1)), jnp.zeros((4, 1)), 0.1)
    with pytest.raises(ValueError, match="sigma_y must be > 0"):
        prior.posterior(jnp.ones((1, 1)), jnp.zeros(1), 0.0)
    with pytest.raises(Exception, match="sigma_y must be finite and > 0"):
        jax.block_until_ready(
            jax.jit(lambda s: prior.posterior(jnp.ones((1, 1)), jnp.zeros(1), s).means)(-1.0)
        )


def test_responsibilities_average_to_the_weights():
    prior = mixture_2d()
    x = prior.sample(jax.random.key(6), 20000)
    est = prior.responsibilities(x).mean(0)
    # each mean of 20000 bounded terms: standard error below 0.0035
    np.testing.assert_allclose(est, prior.weights, atol=0.015)


def test_operator_and_measurement_reject_bad_inputs():
    # A NaN y was stored and every posterior field came out NaN; an affine fn gave an operator
    # whose forward added 1 and whose transpose (jax.linear_transpose) ignored it; blur size 0 or
    # -3 failed in XLA's lowering with a verifier error.
    op = jd.matrix_operator(jnp.eye(2))
    for bad in (jnp.nan, jnp.inf):
        with pytest.raises(ValueError, match="y contains non-finite"):
            jd.Measurement(op, jnp.array([1.0, bad]), 0.1)
    with pytest.raises(ValueError, match=r"fn must be linear: fn\(0\) must be 0; got .*\[1.0\]"):
        jd.linear_operator(lambda x: x.sum() + 1.0, (3,))
    lin = jd.linear_operator(lambda x: 2.0 * x.sum(), (3,))
    np.testing.assert_allclose(lin.transpose(jnp.ones((1,))), [2.0, 2.0, 2.0])
    for size in (0, -3):
        with pytest.raises(ValueError, match="size must be a positive integer"):
            jd.blur_operator((4, 4), 0.8, size=size)
