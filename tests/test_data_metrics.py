"""Toy data sets, the digits split, and the new metrics against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd
from jaxdiff.data import TOY_DATASETS, eight_gaussians_mixture, load_digits


@pytest.mark.parametrize("name", list(TOY_DATASETS))
def test_toy_sets_are_deterministic_centred_and_bounded(name):
    x = TOY_DATASETS[name](jax.random.key(0), 20_000)
    assert x.shape == (20_000, 2) and x.dtype == jnp.float32
    np.testing.assert_array_equal(x, TOY_DATASETS[name](jax.random.key(0), 20_000))
    assert float(jnp.abs(x.mean(0)).max()) < 0.1 and float(jnp.abs(x).max()) < 4.0


@pytest.mark.parametrize("name", list(TOY_DATASETS))
def test_toy_sets_check_their_arguments(name):
    """A negative count gave MLIR's raw "Invalid type", and a NaN noise a set of NaN; a count
    of 0 is an empty set."""
    fn = TOY_DATASETS[name]
    assert fn(jax.random.key(0), 0).shape == (0, 2)
    for n in (-1, True):  # 3.5: the suite's type checker refuses it first
        with pytest.raises(ValueError, match=f"n must be an integer >= 0.*got {n!r}"):
            fn(jax.random.key(0), n)
    if name in ("moons", "spirals", "rings"):
        with pytest.raises(ValueError, match="noise must be finite; got noise = nan"):
            fn(jax.random.key(0), 4, noise=float("nan"))
        with pytest.raises(ValueError, match="noise must be >= 0; got noise = -0.1"):
            fn(jax.random.key(0), 4, noise=-0.1)
    with pytest.raises(ValueError, match="noise must be finite and >= 0 .*got -1.0"):
        jd.data.shapes(2, noise=-1.0)
    with pytest.raises(ValueError, match="size must be a positive integer; got 0"):
        jd.data.shapes(2, 0)


def test_toy_sets_have_their_shapes():
    key = jax.random.key(1)
    r = jnp.linalg.norm(jd.data.rings(key, 20_000), axis=1)
    near = jnp.min(jnp.abs(r[:, None] - jnp.array([0.7, 1.4, 2.1])[None]), axis=1)
    assert float(jnp.mean(near < 0.3)) > 0.99  # noise 0.08: 3.75 sigma
    cb = jd.data.checkerboard(key, 20_000)
    assert bool(((jnp.floor(cb[:, 0]) + jnp.floor(cb[:, 1])) % 2 == 0).all())
    g = eight_gaussians_mixture()
    x = jd.data.eight_gaussians(key, 20_000)
    assert float(jnp.mean(g.log_prob(x))) == pytest.approx(
        float(jnp.mean(g.log_prob(g.sample(key, 20_000)))), abs=0.05
    )


def test_digits_split():
    x, y = load_digits("train")
    xt, yt = load_digits("test")
    assert x.shape == (1500, 8, 8, 1) and xt.shape == (297, 8, 8, 1)
    assert x.min() == -1.0 and x.max() == 1.0 and set(np.unique(y)) == set(range(10))
    rows = {r.tobytes() for r in x.reshape(1500, -1)}
    assert (
        sum(r.tobytes() in rows for r in xt.reshape(297, -1)) < 3
    )  # no overlap (up to duplicates)
    with pytest.raises(ValueError, match="split"):
        load_digits("val")


def test_frechet_distance_matches_the_gaussian_closed_form(x64):
    # N(m1, diag(c1)) vs N(m2, diag(c2)): |m1 - m2|^2 + sum (sqrt(c1) - sqrt(c2))^2.
    m1, m2 = jnp.array([0.0, 1.0, -1.0]), jnp.array([0.5, 1.0, 0.0])
    c1, c2 = jnp.array([1.0, 4.0, 0.25]), jnp.array([2.0, 1.0, 0.25])
    exact = jnp.sum((m1 - m2) ** 2) + jnp.sum((jnp.sqrt(c1) - jnp.sqrt(c2)) ** 2)
    from jaxdiff.metrics import frechet_distance_from_stats

    np.testing.assert_allclose(
        frechet_distance_from_stats(m1, jnp.diag(c1), m2, jnp.diag(c2)), exact, rtol=1e-10
    )
    # a rotated pair: the distance is rotation invariant
    q = jnp.linalg.qr(jax.random.normal(jax.random.key(0), (3, 3)))[0]
    rot = frechet_distance_from_stats(
        q @ m1, q @ jnp.diag(c1) @ q.T, q @ m2, q @ jnp.diag(c2) @ q.T
    )
    np.testing.assert_allclose(rot, exact, rtol=1e-8)
    x = m1[None] + jnp.sqrt(c1)[None] * jax.random.normal(jax.random.key(1), (200_000, 3))
    y = m2[None] + jnp.sqrt(c2)[None] * jax.random.normal(jax.random.key(2), (200_000, 3))
    np.testing.assert_allclose(jd.frechet_distance(x, y), exact, rtol=0.02)


def test_nearest_neighbour_and_memorization():
    train = jax.random.normal(jax.random.key(0), (500, 4))
    x = jax.random.normal(jax.random.key(1), (300, 4))
    brute = jnp.min(jnp.linalg.norm(x[:, None] - train[None], axis=-1), axis=1)
    np.testing.assert_allclose(
        jd.nearest_neighbour_distance(x, train, block=128), brute, rtol=1e-4, atol=1e-5
    )
    held = jax.random.normal(jax.random.key(2), (300, 4))
    assert 0.8 < float(jd.memorization_ratio(x, train, held)) < 1.25
    copies = train[:300] + 1e-3
    assert float(jd.memorization_ratio(copies, train, held)) < 0.01
