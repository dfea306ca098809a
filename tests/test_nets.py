"""Flax networks: shapes, time broadcasting, labels and the null label, embeddings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.nets import (
    MLP,
    UNet,
    batch_times,
    fourier_embedding,
    init_params,
    sinusoidal_embedding,
)


def test_sinusoidal_embedding_values():
    emb = sinusoidal_embedding(jnp.array([0.0, 0.5]), 8, scale=1000.0)
    np.testing.assert_allclose(emb[0], [0, 0, 0, 0, 1, 1, 1, 1], atol=1e-7)
    freqs = np.exp(-np.log(1e4) * np.arange(4) / 4)
    np.testing.assert_allclose(emb[1, :4], np.sin(500.0 * freqs), rtol=1e-4, atol=1e-5)


def test_fourier_embedding_is_a_fixed_function_of_t():
    t = jnp.linspace(0, 1, 5)
    a, b = fourier_embedding(t, 16), fourier_embedding(t, 16)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(jnp.sum(a[:, :8] ** 2 + a[:, 8:] ** 2, axis=1), 8.0, rtol=1e-5)


def test_batch_times_broadcasts_and_rejects_bad_shapes():
    np.testing.assert_array_equal(batch_times(0.5, 3), [0.5, 0.5, 0.5])
    np.testing.assert_allclose(batch_times(jnp.array([0.1, 0.2]), 2), [0.1, 0.2], rtol=1e-7)
    with pytest.raises(ValueError, match="scalar or have shape"):
        batch_times(jnp.ones(3), 2)


@pytest.mark.parametrize("shape", [(5, 2), (5, 7), (5, 8, 8, 1)])
def test_mlp_any_shape_and_scalar_time_equals_per_sample_time(shape):
    model = MLP(width=32, depth=2)
    x = jax.random.normal(jax.random.key(0), shape)
    params = model.init(jax.random.key(1), x, 0.3)
    # perturb the zero-initialised output layer so the output depends on the inputs
    params = jax.tree.map(lambda p: p + 0.1, params)
    out = model.apply(params, x, 0.3)
    assert out.shape == shape
    np.testing.assert_allclose(out, model.apply(params, x, jnp.full(5, 0.3)), rtol=1e-6)
    assert not np.allclose(out, model.apply(params, x, 0.7))


def test_labels_and_null_label():
    model = MLP(width=32, depth=1, num_classes=10)
    x = jnp.ones((3, 2))
    params = model.init(jax.random.key(0), x, 0.5, jnp.zeros(3, jnp.int32))
    params = jax.tree.map(lambda p: p + 0.1 * jnp.arange(p.size).reshape(p.shape) / p.size, params)
    unconditional = model.apply(params, x, 0.5)
    null = model.apply(params, x, 0.5, jnp.full(3, 10))
    np.testing.assert_allclose(unconditional, null, rtol=1e-6)
    assert not np.allclose(model.apply(params, x, 0.5, jnp.array([1, 2, 3])), null)
    with pytest.raises(ValueError, match="without num_classes"):
        MLP(width=8, depth=1).init(jax.random.key(0), x, 0.5, jnp.zeros(3, jnp.int32))


@pytest.mark.parametrize(("size", "channels"), [(8, (16, 32)), (28, (16, 32, 32))])
def test_unet_shapes(size, channels):
    model = UNet(channels=channels, num_classes=10)
    x = jax.random.normal(jax.random.key(0), (2, size, size, 1))
    labels = jnp.array([3, 10])
    params = init_params(model, jax.random.key(1), x, 0.5, labels)
    out = jax.jit(model.apply)(params, x, jnp.array([0.2, 0.9]), labels)
    assert out.shape == x.shape
    with pytest.raises(ValueError, match="images"):
        model.apply(params, x[..., 0], 0.5)


def test_apply_composes_with_vmap_and_grad():
    model = MLP(width=16, depth=1)
    x = jnp.ones((4, 2))
    params = model.init(jax.random.key(0), x, 0.5)
    per_time = jax.vmap(lambda t: model.apply(params, x, t))(jnp.linspace(0, 1, 3))
    assert per_time.shape == (3, 4, 2)
    grads = jax.grad(lambda p: jnp.sum(model.apply(p, x, 0.5) ** 2))(params)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
