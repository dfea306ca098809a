"""Fields from every network library: Flax linen, Flax NNX, Equinox and a plain function of a params
pytree each become a Field and a trainable loss in one line, train a few steps (the loss falls) and
sample. Plus the Field contract: a bare function is refused, params are pytree leaves."""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxdiff as jd

PATH = jd.linear_path()
STEPS = 300


def _features(x, t):
    return jnp.concatenate([x, jnp.broadcast_to(t, x.shape[:1])[:, None]], axis=-1)


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, t):
        h = nn.silu(nn.Dense(64)(_features(x, t)))
        return nn.Dense(2)(h)


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(3, 64, rngs=rngs)
        self.b = nnx.Linear(64, 2, rngs=rngs)

    def __call__(self, x, t):
        return self.b(jax.nn.silu(self.a(_features(x, t))))


class EqxNet(eqx.Module):
    a: eqx.nn.Linear
    b: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.a, self.b = eqx.nn.Linear(3, 64, key=k1), eqx.nn.Linear(64, 2, key=k2)

    def __call__(self, x, t):
        h = jax.vmap(self.a)(_features(x, t))
        return jax.vmap(self.b)(jax.nn.silu(h))


def plain_apply(params, x, t):
    return jax.nn.silu(_features(x, t) @ params["w1"] + params["b1"][None]) @ params["w2"]


def linen_field():
    model = LinenNet()
    params = model.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros(1))
    return jd.Field(model.apply, "velocity", params)


def nnx_field():
    graphdef, state = nnx.split(NNXNet(nnx.Rngs(0)))
    return jd.Field(lambda s, x, t: nnx.merge(graphdef, s)(x, t), "velocity", state)


def eqx_field():
    params, static = eqx.partition(EqxNet(jax.random.key(0)), eqx.is_array)
    return jd.Field(lambda p, x, t: eqx.combine(p, static)(x, t), "velocity", params)


def plain_field():
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {
        "w1": jax.random.normal(k1, (3, 64)) / 2,
        "b1": jnp.zeros(64),
        "w2": jax.random.normal(k2, (64, 2)) / 8,
    }
    return jd.Field(plain_apply, "velocity", params)


@pytest.mark.parametrize("make", [linen_field, nnx_field, eqx_field, plain_field],
                         ids=["linen", "nnx", "equinox", "plain"])  # fmt: skip
def test_every_network_library_trains_and_samples(make):
    field = make()
    loss = jd.flow_matching_loss(field, PATH)  # one line: the network's loss
    opt = optax.adam(1e-2)

    @jax.jit
    def train(params, key):
        def step(carry, k):
            params, opt_state = carry
            k_data, k_loss = jax.random.split(k)  # independent data and loss noise
            batch = jd.data.eight_gaussians(k_data, 256)
            value, grads = jax.value_and_grad(loss)(params, k_loss, batch)
            updates, opt_state = opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), value

        (params, _), values = jax.lax.scan(
            step, (params, opt.init(params)), jax.random.split(key, STEPS)
        )
        return params, values

    params, values = train(field.params, jax.random.key(1))
    # the flow-matching loss on 8 gaussians falls from ~3.0 towards its floor ~2 (measured 2.27
    # after 300 steps for each library; the minibatch noise of a mean over 10 steps is ~0.03)
    assert float(values[-10:].mean()) < 0.85 * float(values[:5].mean()), values
    trained = field.bind(params)
    sol = jax.jit(lambda k: jd.sample(k, PATH, trained, (512, 2), steps=20))(jax.random.key(2))
    assert sol.x.shape == (512, 2) and bool(jnp.all(jnp.isfinite(sol.x)))
    assert int(sol.nfe) == 20
    # the samples moved towards the data: energy distance at most half the prior's (measured:
    # the prior's is ~0.8, trained samples ~0.1-0.2)
    data = jd.data.eight_gaussians(jax.random.key(3), 512)
    prior = jax.random.normal(jax.random.key(2), (512, 2))
    ed, ed_prior = jd.energy_distance(sol.x, data), jd.energy_distance(prior, data)
    assert float(ed) < 0.5 * float(ed_prior), (float(ed), float(ed_prior))


def test_field_is_a_pytree_of_its_params():
    field = plain_field()
    leaves = jax.tree.leaves(field)
    assert len(leaves) == 3  # the params, not the function or the target
    doubled = jax.tree.map(lambda v: 2 * v, field)
    assert doubled.target == "velocity"
    np.testing.assert_allclose(doubled.params["w1"], 2 * field.params["w1"])
    out = jax.jit(lambda f, x: f(x, jnp.zeros(4)))(field, jnp.ones((4, 2)))  # through jit as an arg
    np.testing.assert_allclose(out, plain_apply(field.params, jnp.ones((4, 2)), jnp.zeros(4)))
    grads = jax.grad(lambda f: jnp.sum(f(jnp.ones((4, 2)), jnp.zeros(4))))(field)
    assert isinstance(grads, jd.Field) and grads.params["w2"].shape == (64, 2)


def test_field_errors():
    with pytest.raises(TypeError, match="bare function"):
        jd.as_field(lambda x, t: x)
    with pytest.raises((TypeError, ValueError), match="target"):
        jd.Field(lambda x, t: x, "noise")
    with pytest.raises(TypeError):  # (the suite's type checker answers first: "callable")
        jd.Field(3.0, "eps")


def test_several_batch_axes_reach_a_one_axis_network_flattened():
    """``t`` of shape ``x.shape[:2]`` through evaluate (with labels), predict, denoise, predict_as
    and reverse_drift: the network (written for one batch axis, and asserting it) sees the
    flattened batch; every output equals the same call on each row of the first axis."""
    path = jd.vp_path()

    def apply(params, x, t, labels=None):
        assert x.ndim == 2 and t.shape == x.shape[:1], (x.shape, t.shape)
        if labels is not None:
            assert labels.shape == t.shape, labels.shape
            t = t + labels / 4
        return jnp.tanh(x @ params + t[:, None])

    params = jnp.array([[0.5, -0.3], [0.2, 0.8]])
    field = jd.Field(apply, "eps", params)

    @jax.jit
    def every(x, t, labels):
        return (
            jd.evaluate(field, x, t, labels),
            jd.predict(path, field, x, t)[0],
            jd.denoise(path, field, x, t),
            jd.predict_as(path, field, x, t, "velocity"),
            jd.reverse_drift(path, field, x, t, eta=1.0),
        )

    x = jax.random.normal(jax.random.key(0), (4, 3, 2))
    t = jax.random.uniform(jax.random.key(1), (4, 3), minval=0.05, maxval=0.95)
    labels = jnp.arange(12.0).reshape(4, 3) % 3
    whole = every(x, t, labels)
    rows = jax.vmap(every)(x, t, labels)  # each row: one batch axis of 3
    assert [w.shape for w in whole] == [(4, 3, 2)] * 5
    for w, r in zip(whole, rows, strict=True):
        np.testing.assert_allclose(w, r, rtol=1e-6, atol=1e-6)
    flat = apply(params, x.reshape(12, 2), t.reshape(12), labels.reshape(12)).reshape(4, 3, 2)
    np.testing.assert_allclose(whole[0], flat, rtol=1e-6)
    eps = apply(params, x.reshape(12, 2), t.reshape(12)).reshape(4, 3, 2)
    a, s = path.alpha(t)[..., None], path.sigma(t)[..., None]
    np.testing.assert_allclose(whole[2], (x - s * eps) / a, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"t has shape \(4, 2\).*x has shape \(4, 3, 2\)"):
        jd.denoise(path, field, x, t[:, :2])
    with pytest.raises(ValueError, match=r"t has shape \(3,\); expected a scalar"):
        jd.predict(path, field, x, t[0])
    with pytest.raises(ValueError, match=r"t has shape \(4, 2\).*before at least one event"):
        jd.denoise(path, field, x[..., 0], t[:, :2])  # t[:, None]-like: no event axis left
    # pytrees and keywords of per-sample arrays are flattened with x
    pairs = jd.Field(lambda x, t, c, scale=1.0: x * c["a"][:, None] * scale[:, None], "eps")
    got = jd.evaluate(pairs, x, t, {"a": labels}, scale=t)
    np.testing.assert_allclose(got, x * labels[..., None] * t[..., None], rtol=1e-6)
