"""Audit of the networks' embeddings and the metrics: regression tests for the bugs found.

Each test states what the code did before the fix."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.metrics import frechet_distance, frechet_distance_from_stats, mmd
from jaxdiff.nets import (
    LabelEmbedding,
    TimeEmbedding,
    fourier_embedding,
    sinusoidal_embedding,
)


def _diffusers_timestep_embedding(t, dim, shift, scale=1000.0, max_period=1e4):
    """diffusers' ``get_timestep_embedding`` (flip_sin_to_cos=False) in NumPy float64."""
    half = dim // 2
    freqs = np.exp(-math.log(max_period) * np.arange(half) / (half - shift))
    args = scale * np.asarray(t, np.float64)[:, None] * freqs[None, :]
    emb = np.concatenate([np.sin(args), np.cos(args)], axis=-1)
    return np.pad(emb, ((0, 0), (0, dim % 2)))


def test_sinusoidal_embedding_odd_dim_pads_a_zero_feature_like_diffusers():
    # before: dim = 7 gave 6 features (shape (4, 6)), and TimeEmbedding(features=7) a first
    # Dense of 6 inputs where diffusers' linear_1 has 7
    t = np.array([0.0, 0.1, 0.5, 0.999])
    for dim, shift in [(7, 0.0), (7, 1.0), (8, 1.0)]:
        emb = np.asarray(sinusoidal_embedding(jnp.asarray(t, jnp.float32), dim, shift=shift))
        assert emb.shape == (4, dim)
        ref = _diffusers_timestep_embedding(t, dim, shift)
        np.testing.assert_allclose(emb, ref, atol=3e-5)  # float32 sin(1000 t): ~1e-5
    params = TimeEmbedding(16, "sinusoidal", features=7).init(jax.random.key(0), jnp.zeros(3))
    assert params["params"]["Dense_0"]["kernel"].shape == (7, 16)


def test_fourier_embedding_odd_dim_gives_dim_features():
    # before: dim = 5 gave shape (3, 4)
    t = jnp.array([0.0, 0.3, 1.0])
    emb = fourier_embedding(t, 5, scale=2.0)
    assert emb.shape == (3, 5)
    np.testing.assert_array_equal(emb[:, 4], 0.0)
    np.testing.assert_array_equal(emb[:, :4], fourier_embedding(t, 4, scale=2.0))


def test_sinusoidal_embedding_rejects_degenerate_dims():
    t = jnp.array([0.0, 0.5])
    # before: dim = 2 with DDPM's shift = 1 divided 0 by 0: every feature NaN, no error
    with pytest.raises(ValueError, match="shift"):
        sinusoidal_embedding(t, 2, shift=1.0)
    # before: dim = 1 gave shape (2, 0), no features at all
    with pytest.raises(ValueError, match="dim"):
        sinusoidal_embedding(t, 1)
    with pytest.raises(ValueError, match="dim"):
        fourier_embedding(t, 1)
    # dim = 2 with shift 0 is fine: [sin(1000 t), cos(1000 t)]
    np.testing.assert_allclose(
        sinusoidal_embedding(t, 2), [[0.0, 1.0], [np.sin(500.0), np.cos(500.0)]], atol=1e-4
    )


def test_label_embedding_rejects_float_labels_by_name():
    # before: flax's "Input type must be an integer or unsigned integer." (labels not named)
    emb = LabelEmbedding(3, 4)
    params = emb.init(jax.random.key(0), jnp.array([0, 1]), 2)
    with pytest.raises(ValueError, match="labels must be integer"):
        emb.apply(params, jnp.array([0.0, 1.0]), 2)


def test_frechet_distance_of_one_feature_matches_closed_form(x64):
    # before: d = 1 raised TypeError (jnp.cov of one feature is a scalar, eigh needs a matrix)
    rng = np.random.default_rng(0)
    x = rng.normal(0.3, 1.0, size=(50, 1))
    y = rng.normal(-0.2, 2.0, size=(40, 1))
    value = float(frechet_distance(x, y))
    sx, sy = np.std(x, ddof=1), np.std(y, ddof=1)
    expected = (x.mean() - y.mean()) ** 2 + (sx - sy) ** 2  # W2^2 of two 1-D Gaussians
    np.testing.assert_allclose(value, expected, rtol=1e-10)
    # n = 2, float32
    np.testing.assert_allclose(
        float(frechet_distance(np.float32([[0.0], [1.0]]), np.float32([[0.0], [3.0]]))),
        1.0 + (np.sqrt(0.5) - np.sqrt(4.5)) ** 2,
        rtol=1e-5,
    )


def test_frechet_gradient_is_finite_at_repeated_eigenvalues(x64):
    # before: the root of cov_x came from eigh's eigenvectors, whose derivative divides by
    # eigenvalue gaps: the gradient in cov_x at cov_x = I was NaN in every entry, and the
    # gradient of frechet_distance with two constant features NaN everywhere
    # every gradient and value jitted: eagerly, each of eigh's, sqrtm's and their derivatives'
    # ops compiled on its own (21.5 s for this test against 9 s jitted on a 2-core CPU)
    grad = jax.jit(jax.grad(frechet_distance_from_stats, argnums=(1, 3)))
    gx, gy = grad(jnp.zeros(3), jnp.eye(3), jnp.ones(3), 2.0 * jnp.eye(3))
    # FD = 3 + tr(Cx) + tr(Cy) - 2 tr (Cx^1/2 Cy Cx^1/2)^1/2; d/dCx = I - Cx^-1/2 (..)^1/2 Cx^-1/2
    np.testing.assert_allclose(gx, (1.0 - math.sqrt(2.0)) * np.eye(3), atol=1e-6)
    np.testing.assert_allclose(gy, (1.0 - 1.0 / math.sqrt(2.0)) * np.eye(3), atol=1e-6)

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 3)), 1.5 * rng.normal(size=(25, 3))
    xc = np.concatenate([x, np.full((30, 2), 2.0)], axis=1)
    yc = np.concatenate([y, np.full((25, 2), 2.0)], axis=1)
    grad_fd = jax.jit(jax.grad(frechet_distance))
    g = np.asarray(grad_fd(jnp.asarray(xc), jnp.asarray(yc)))
    g_ref = np.asarray(grad_fd(jnp.asarray(x), jnp.asarray(y)))
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g[:, :3], g_ref, atol=1e-12)  # the constant features change nothing
    np.testing.assert_allclose(g[:, 3:], 0.0, atol=1e-12)

    # the hand-written derivative agrees with central differences away from degeneracy
    a, b = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    cy, cx = a @ a.T + 0.1 * np.eye(4), b @ b.T + 0.2 * np.eye(4)
    direction = rng.normal(size=(4, 4))
    direction = direction + direction.T

    @jax.jit
    def f(c):
        return frechet_distance_from_stats(jnp.zeros(4), c, jnp.ones(4), jnp.asarray(cy))

    h = 1e-6
    fd = (float(f(cx + h * direction)) - float(f(cx - h * direction))) / (2 * h)
    analytic = float(jnp.sum(jax.jit(jax.grad(f))(jnp.asarray(cx)) * direction))
    np.testing.assert_allclose(analytic, fd, rtol=1e-6)


def test_mmd_rejects_an_empty_list_of_bandwidths():
    # before: bandwidths = [] summed no kernel and returned MMD 0.0 for any x and y
    x = np.zeros((5, 2))
    with pytest.raises(ValueError, match="bandwidths"):
        mmd(x, x + 10.0, [])


def test_frechet_distance_from_stats_rejects_non_finite_means():
    # before: a NaN in mu_x returned NaN silently (only the covariances were checked)
    with pytest.raises(ValueError, match="mu_x"):
        frechet_distance_from_stats(np.array([np.nan, 0.0]), np.eye(2), np.ones(2), np.eye(2))
    with pytest.raises(ValueError, match="mu_y"):
        frechet_distance_from_stats(np.zeros(2), np.eye(2), np.array([np.inf, 0.0]), np.eye(2))
    np.testing.assert_allclose(
        float(frechet_distance_from_stats(np.zeros(2), np.eye(2), np.ones(2), np.eye(2))), 2.0
    )


def test_attention_heads_must_divide_the_channels():
    # heads = 4 on 6 channels silently fell back to one head (the model had other attention)
    from jaxdiff.nets.unet import SelfAttention

    x = jnp.ones((1, 4, 4, 6))
    with pytest.raises(ValueError, match="heads = 4 must divide the 6 channels"):
        SelfAttention(heads=4, groups=2).init(jax.random.key(0), x)
    params = SelfAttention(heads=3, groups=2).init(jax.random.key(0), x)
    assert params["params"]["MultiHeadDotProductAttention_0"]["query"]["kernel"].shape == (6, 3, 2)
