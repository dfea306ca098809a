"""Reflow and straightness on Gaussian data, where everything has a closed form: the pairs are the
exact flow map, the straightness of the flow-matching flow is an integral of sigma_t'^2, and the
reflowed flow of exact pairs is straight (S = 0) and zeroes flow matching on those pairs (reflow is
flow matching with the source points given in the batch)."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import quad  # scipy comes with scikit-learn, a test dependency

import jaxdiff as jd

MU = jnp.array([[2.0, -1.0]])
S = 0.5  # data N(MU, S^2 I) on the linear path; the flow map from noise is x0 = MU + S x1
PATH = jd.linear_path()


def _sigma(t):
    return np.sqrt((1 - t) ** 2 * S**2 + t**2)


def _oracle():
    return jd.GaussianMixture.isotropic(MU, std=S).field(PATH, "velocity")


def test_pairs_are_the_exact_flow_map(x64):
    pairs = jd.reflow_pairs(jax.random.key(0), PATH, _oracle(), (512, 2), steps=20,
                            solver=diffrax.Tsit5())  # fmt: skip
    x0, x1 = pairs["x0"], pairs["x1"]
    # the ODE stops at t_end = 1e-3, where x_t = (1 - t) MU + sigma_t x1 (2.1e-3 from the flow
    # map's end, which the pairs held until stop 53), and the denoising step (an Euler step to 0
    # for a velocity on the linear path) lands on x0 = MU + S x1, the end at t = 0
    np.testing.assert_allclose(x0, MU + S * x1, atol=1e-5)


def test_straightness_of_the_gaussian_flow_matches_its_closed_form(x64):
    """x_t = (1 - t) MU + sigma_t x1, so dx/dt - (x1 - x0) = (sigma_t' - (1 - S)) x1 and
    S = d (int_0^1 sigma'^2 dt - (1 - S)^2) in d = 2 dimensions."""
    dsigma = lambda t: (t - (1 - t) * S**2) / _sigma(t)  # noqa: E731
    want = 2 * (quad(lambda t: dsigma(t) ** 2, 0, 1)[0] - (1 - S) ** 2)
    x1 = jax.random.normal(jax.random.key(1), (20_000, 2))
    got = float(jd.straightness(_oracle(), x1, steps=400).value)
    # Monte Carlo: E|x1|^2 over 20,000 draws has relative sd 1/sqrt(20,000) = 0.7%; the Riemann
    # sum with 400 Euler steps adds O(1/400)
    assert abs(got / want - 1) < 0.03, (got, want)
    assert want > 0.1


def test_exact_pairs_give_a_straight_flow_and_zero_flow_matching_loss(x64):
    """For pairs x0 = MU + S x1 the rectified flow is x_t = (1 - t) x0 + t x1 with velocity
    v(z, t) = x1 - x0 = (1 - S) x1 - MU, x1 = (z - (1 - t) MU) / ((1 - t) S + t)."""

    def v(p, z, t):
        t = t[:, None]
        return (1 - S) * (z - (1 - t) * MU) / ((1 - t) * S + t) - MU + p

    net = jd.Field(v, "velocity")
    x1 = jax.random.normal(jax.random.key(2), (4096, 2))
    x0 = MU + S * x1
    pairs = {"x0": x0, "x1": x1}
    loss = jax.jit(jd.flow_matching_loss(net, PATH))
    assert float(loss(0.0, jax.random.key(3), pairs)) < 1e-24
    np.testing.assert_allclose(float(loss(0.1, jax.random.key(3), pairs)), 0.01, rtol=1e-9)
    assert float(jd.straightness(net.bind(0.0), x1).value) < 1e-20
    # the marginal FM field is not the reflowed one, so its loss on the pairs is clearly positive
    fm = jd.Field(lambda p, z, t: _oracle()(z, t), "velocity")
    assert float(jax.jit(jd.flow_matching_loss(fm, PATH))(None, jax.random.key(3), pairs)) > 0.05


def test_reflow_pairs_train_flow_matching_on_the_given_noise():
    """The loss on a pairs batch uses the batch's x1, not fresh noise: with x1 = x0 + 1 the
    conditional velocity on the linear path is x1 - x0 = 1 whatever t, so the field v = 1 has loss
    exactly 0 and v = 0 loss 1."""
    x0 = jax.random.normal(jax.random.key(4), (256, 2))
    pairs = {"x0": x0, "x1": x0 + 1.0}
    net = jd.Field(lambda c, z, t: jnp.full_like(z, c), "velocity")
    loss = jd.flow_matching_loss(net, PATH)
    assert float(loss(1.0, jax.random.key(5), pairs)) < 1e-12
    np.testing.assert_allclose(float(loss(0.0, jax.random.key(5), pairs)), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="source points have shape"):
        loss(1.0, jax.random.key(5), {"x0": x0, "x1": x0[:10]})


def test_reflow_pairs_of_given_source_points(x64):
    """x1= (the usability audit's U5: a flow from another source could not be reflowed): the
    pairs start from the points given, along the same exact flow map."""
    x1 = jax.random.normal(jax.random.key(3), (64, 2))
    pairs = jd.reflow_pairs(None, PATH, _oracle(), x1=x1, steps=20, solver=diffrax.Tsit5())
    np.testing.assert_array_equal(pairs["x1"], x1)
    np.testing.assert_allclose(pairs["x0"], MU + S * x1, atol=1e-5)
    with pytest.raises(ValueError, match="exactly one of shape"):
        jd.reflow_pairs(jax.random.key(0), PATH, _oracle(), (64, 2), x1=x1)


def test_straightness_prints_its_numbers_not_its_points():
    """repr(Straightness) printed every row of x0 (thousands of lines for 2,000 points; the
    usability audit's U9): it prints the two numbers and x0's dtype and shape."""
    s = jd.straightness(jd.Field(lambda x, t: -x, "velocity"), jnp.ones((2000, 2)), steps=4)
    text = repr(s)
    assert text == (
        f"Straightness(value={float(s.value):.6g}, relative={float(s.relative):.6g}, "
        "x0=<float32[2000, 2]>)"
    )
    assert len(text) < 100 and s.x0.shape == (2000, 2)  # the points are all still there
