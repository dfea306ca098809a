"""Audit (composition under jit / vmap / grad): guidance, couplings, few-step, inverse, metrics."""

import jax
import jax.numpy as jnp
import numpy as np

import jaxdiff as jd


def test_nearest_neighbour_distance_gradient_is_finite_at_a_copy():
    # Old code: sqrt(max(d2, 0)) at a sample equal to a reference point (d2 = 0) had slope
    # inf * 0: the gradient of nearest_neighbour_distance (and of memorization_ratio) was all NaN
    # ([[nan, nan, nan], [nan, nan, nan]]). It is now 0 there (a subgradient of |x - r|) and
    # unchanged elsewhere.
    ref = jax.random.normal(jax.random.key(1), (20, 3))
    nn = jd.nearest_neighbour_distance
    copies = ref[:2]
    np.testing.assert_allclose(nn(copies, ref), 0.0, atol=1e-6)
    grad = jax.grad(lambda z: jnp.sum(nn(z, ref)))(copies)
    np.testing.assert_allclose(grad, 0.0, atol=1e-6)
    jit_grad = jax.jit(jax.grad(lambda z: jnp.sum(nn(z, ref))))(copies)
    np.testing.assert_allclose(jit_grad, 0.0, atol=1e-6)
    # away from a copy: the unit vector to the nearest point (0.3 along the first axis)
    moved = copies + jnp.array([[0.3, 0.0, 0.0]])
    grad = jax.grad(lambda z: jnp.sum(nn(z, ref)))(moved)
    np.testing.assert_allclose(grad, np.tile([1.0, 0.0, 0.0], (2, 1)), atol=1e-5)
    samples = jnp.concatenate([ref[:3], ref[3:6] + 0.5])
    g = jax.grad(lambda z: jd.memorization_ratio(z, ref, ref[5:] + 0.2))(samples)
    assert bool(jnp.all(jnp.isfinite(g)))
