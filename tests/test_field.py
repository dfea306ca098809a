"""Fields from every network library: Flax linen, Flax NNX, Equinox and a plain function of a params
pytree each become a Field and a trainable loss in one line, train a few steps (the loss falls) and
sample. Plus the Field contract: a bare function is refused, params are pytree leaves."""

import diffrax
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


def test_reschedule_gives_the_exact_field_of_another_path(x64):
    """A field trained on one path used on another (reschedule): the mixture oracle's field of
    any target on the VP, linear, cosine and VE paths, moved to another, equals that path's own
    exact field (float64, within the trained path's log-SNR range: measured 1.1e-13 relative;
    float32 3.3e-5), under jit and with a gradient in x; samples of a VP eps field moved to the linear path match the linear
    velocity field's from the same noise."""
    from tests.test_oracles import POINTS, TIMES, mixture

    mix = mixture()
    x, t = jnp.asarray(POINTS), jnp.asarray(TIMES)
    paths = {"vp": jd.vp_path(), "linear": jd.linear_path(), "cosine": jd.cosine_path(),
             "ve": jd.ve_path(0.01, 50.0)}  # fmt: skip
    for (a, pa), (b, pb) in ((p, q) for p in paths.items() for q in paths.items() if p != q):
        lam = pb.log_snr(t)  # times whose log-SNR the trained path reaches
        inside = (lam < pa.log_snr(0.0)) & (lam > pa.log_snr(1.0))
        for src, dst in (("eps", "velocity"), ("velocity", "x0"), ("x0", "score"), ("v", "eps")):
            moved = jd.reschedule(mix.field(pa, src), pa, pb, dst)
            got, want = moved(x, t), mix.field(pb, dst)(x, t)
            np.testing.assert_allclose(got[inside], want[inside], rtol=1e-7, atol=1e-7,
                                       err_msg=f"{a} -> {b}, {src} -> {dst}")  # fmt: skip
    vp, linear = paths["vp"], paths["linear"]
    moved = jd.reschedule(mix.field(vp, "eps"), vp, linear, "velocity")
    assert moved.target == "velocity"
    assert jd.reschedule(mix.field(vp, "eps"), vp, linear).target == "eps"
    np.testing.assert_allclose(
        jax.jit(lambda f, y, s: f(y, s))(moved, x, t), moved(x, t), rtol=1e-12
    )
    jac = jax.vmap(jax.jacfwd(lambda y, s: moved(y[None], s[None])[0]))(x, t)
    exact = jax.vmap(jax.jacfwd(lambda y, s: mix.field(linear, "velocity")(y[None], s[None])[0]))
    np.testing.assert_allclose(jac, exact(x, t), rtol=1e-6, atol=1e-6)
    ts = jnp.linspace(0.99, 1e-3, 41)  # VP's log-SNR reaches -10.05, the linear path's 0.99 -9.2
    kw = dict(ts=ts, sampler=jd.samplers.ode(diffrax.Heun()))
    a = jd.sample(jax.random.key(0), linear, moved, (256, 2), **kw).x
    b = jd.sample(jax.random.key(0), linear, mix.field(linear, "velocity"), (256, 2), **kw).x
    np.testing.assert_allclose(a, b, atol=1e-8)
    labelled = jd.Field(lambda p, y, s, c: p * y + c[:, None], "eps", jnp.asarray(0.5))
    same = jd.reschedule(labelled, vp, vp)  # to its own path: the field itself, labels passed on
    np.testing.assert_allclose(same(x, t, t), labelled(x, t, t), rtol=1e-9)
    with pytest.raises(ValueError, match="reschedule's path needs a GaussianPath"):
        jd.reschedule(mix.field(vp, "eps"), vp, jd.brownian_bridge(0.5))
