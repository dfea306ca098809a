"""Flax networks: shapes, time broadcasting, labels and the null label, embeddings, the
convolution with fast gradients, the U-Net configs, dropout and bfloat16."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.nets import (
    MLP,
    TwoTimeMLP,
    TwoTimeUNet,
    UNet,
    batch_times,
    ddpm_cifar10,
    fourier_embedding,
    init_params,
    sinusoidal_embedding,
    small_unet,
)
from tests.net_helpers import perturb


def _normal(seed, shape):
    """Standard normal test inputs, drawn by numpy: an eager ``jax.random.normal`` compiles one
    XLA program per shape (1-6 s each on a loaded 2-core CPU)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


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
    x = _normal(0, shape)

    params = init_params(model, jax.random.key(1), x, 0.3)

    @jax.jit  # one program: eagerly, each op is compiled on its own
    def outputs(params, x):
        # perturb the zero-initialised output layer so the output depends on the inputs
        params = jax.tree.map(lambda p: p + 0.1, params)
        apply = functools.partial(model.apply, params, x)
        return apply(0.3), apply(jnp.full(5, 0.3)), apply(0.7)

    out, per_sample, other = outputs(params, x)
    assert out.shape == shape
    np.testing.assert_allclose(out, per_sample, rtol=1e-6)
    assert not np.allclose(out, other)


def test_labels_and_null_label():
    model = MLP(width=32, depth=1, num_classes=10)
    x = jnp.ones((3, 2))

    params = init_params(model, jax.random.key(0), x, 0.5, jnp.zeros(3, jnp.int32))

    @jax.jit  # one program: eagerly, each op is compiled on its own
    def outputs(params, x):
        params = jax.tree.map(
            lambda p: p + 0.1 * jnp.arange(p.size).reshape(p.shape) / p.size, params
        )
        return (model.apply(params, x, 0.5), model.apply(params, x, 0.5, jnp.full(3, 10)),
                model.apply(params, x, 0.5, jnp.array([1, 2, 3])))  # fmt: skip

    unconditional, null, labelled = outputs(params, x)
    np.testing.assert_allclose(unconditional, null, rtol=1e-6)
    assert not np.allclose(labelled, null)
    with pytest.raises(ValueError, match="without num_classes"):
        MLP(width=8, depth=1).init(jax.random.key(0), x, 0.5, jnp.zeros(3, jnp.int32))


@pytest.mark.parametrize(("size", "channels"), [(8, (16, 32)), (28, (16, 32, 32))])
def test_unet_shapes(size, channels):
    model = UNet(channels=channels, num_classes=10)
    x = _normal(0, (2, size, size, 1))
    labels = jnp.array([3, 10])
    # only the shapes matter here: the parameters' from eval_shape, zeros (compiling the
    # initialiser took longer than the forward pass)
    shapes = jax.eval_shape(model.init, jax.random.key(1), x, 0.5, labels)
    params = jax.tree.map(lambda p: np.zeros(p.shape, p.dtype), shapes)
    out = jax.jit(model.apply)(params, x, jnp.array([0.2, 0.9]), labels)
    assert out.shape == x.shape
    with pytest.raises(ValueError, match="images"):
        model.apply(params, x[..., 0], 0.5)


def test_apply_composes_with_vmap_and_grad():
    model = MLP(width=16, depth=1)
    x = jnp.ones((4, 2))
    params = init_params(model, jax.random.key(0), x, 0.5)

    @jax.jit  # vmap and grad under one jit (eagerly, each op is compiled on its own)
    def transforms(params):
        per_time = jax.vmap(lambda t: model.apply(params, x, t))(jnp.linspace(0, 1, 3))
        return per_time, jax.grad(lambda p: jnp.sum(model.apply(p, x, 0.5) ** 2))(params)

    per_time, grads = transforms(params)
    assert per_time.shape == (3, 4, 2)
    assert jax.tree.structure(grads) == jax.tree.structure(params)


# --- convolutions, the U-Net configs, dropout and mixed precision -------------------------------


def _lax_conv(x, w, stride, pads):
    """The reference: ``lax``'s ``NHWC x HWIO`` convolution with explicit padding."""
    dn = ("NHWC", "HWIO", "NHWC")
    return jax.lax.conv_general_dilated(x, w, (stride, stride), pads, dimension_numbers=dn)


@pytest.mark.parametrize(
    ("size", "k", "stride", "padding"),
    [((8, 8), 3, 1, "SAME"), ((7, 9), 3, 2, "SAME"), ((9, 9), 3, 1, "VALID"), ((10, 11), 3, 2, 1),
     ((6, 6), 1, 1, "SAME")],
)  # fmt: skip
def test_conv2d_and_its_gradients_equal_lax_in_and_out_of_a_scan(size, k, stride, padding):

    from jaxdiff.nets.conv import _pads, conv2d

    x = _normal(0, (3, *size, 4))
    w = _normal(1, (k, k, 4, 5))
    pads = _pads(padding, x.shape, (k, k), (stride, stride))

    def ref(x, w):
        return _lax_conv(x, w, stride, pads)

    def ours(x, w):
        return conv2d(x, w, stride, padding)

    def grad(f, x, w, g):
        return jax.grad(lambda a, b: jnp.sum(f(a, b) * g), (0, 1))(x, w)

    @jax.jit
    def both(x, w, g):
        def body(carry, _):  # gradients inside a while loop, where XLA:CPU's slow path was
            return carry, (grad(ours, x, w, g), grad(ref, x, w, g))

        return ours(x, w), ref(x, w), jax.lax.scan(body, 0, None, length=1)[1]

    y = jax.eval_shape(ref, x, w)
    y_ours, y_ref, (g_ours, g_ref) = both(x, w, _normal(2, y.shape))
    np.testing.assert_allclose(y_ours, y_ref, rtol=1e-6, atol=1e-5)
    for a, b in zip(g_ours, g_ref, strict=True):  # same sums in the same order: equal to rounding
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(("stride", "padding"), [(1, "SAME"), (2, "SAME"), (2, 1)])
def test_conv2d_under_forward_mode_vmap_and_second_derivatives_equals_lax(stride, padding):
    """The primitive behind ``conv2d`` is bilinear: its JVP, its batching rule and derivatives of
    its (canonical) transposes agree with ``lax``'s convolution. A ``custom_vjp`` (the earlier
    design) failed ``jax.jvp`` and ``jax.linearize``, which the likelihood and MeanFlow need."""

    from jaxdiff.nets.conv import _pads, conv2d

    x = _normal(0, (2, 6, 7, 3))
    w = _normal(1, (3, 3, 3, 4))
    pads = _pads(padding, x.shape, (3, 3), (stride, stride))

    def ref(x, w):
        return _lax_conv(x, w, stride, pads)

    def ours(x, w):
        return conv2d(x, w, stride, padding)

    def transforms(conv):
        loss = lambda x, w: jnp.sum(jnp.tanh(conv(x, w)))  # noqa: E731
        tangent = lambda w: jax.jvp(lambda x: jnp.tanh(conv(x, w)), (x,), (x,))[1]  # noqa: E731
        return (
            jax.jvp(conv, (x, w), (-x, 2 * w)),
            jax.vmap(conv, (0, None))(jnp.stack([x, -x]), w),
            jax.vmap(conv, (None, 0))(x, jnp.stack([w, -w])),
            jax.vmap(jax.grad(loss, (0, 1)), (None, 0))(x, jnp.stack([w, -w])),
            jax.grad(lambda w: jnp.sum(tangent(w) ** 2))(w),  # reverse over forward (MeanFlow)
            jax.jvp(lambda w: jax.grad(loss, (0, 1))(x, w), (w,), (w,)),  # forward over reverse
            jax.vmap(jax.linearize(lambda x: conv(x, w), x)[1])(jnp.stack([x, 2 * x])),
        )

    got, want = jax.jit(lambda: transforms(ours))(), jax.jit(lambda: transforms(ref))()
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("size", "stride", "padding"), [((7, 9), 2, "SAME"), ((8, 8), 1, 1)])
def test_conv2d_transposes_on_other_backends_equal_the_cpu_ones(size, stride, padding):
    """Off CPU the primitive's transposes are JAX's own rules (``lax.platform_dependent``); run
    here directly, they give the CPU branch's canonical gradients."""
    from jaxdiff.nets.conv import _dw_canonical, _dw_lax, _dx_canonical, _dx_lax, _pads

    x = _normal(0, (2, *size, 3))
    w = _normal(1, (3, 3, 3, 5))
    strides, pads = (stride, stride), _pads(padding, x.shape, (3, 3), (stride, stride))
    g = _normal(2, jax.eval_shape(lambda: _lax_conv(x, w, stride, pads)).shape)
    for canonical, other, operand, shape in ((_dx_canonical, _dx_lax, w, x.shape),
                                             (_dw_canonical, _dw_lax, x, w.shape)):  # fmt: skip
        a = canonical(strides, pads, shape, operand, g)
        b = other(strides, pads, shape, operand, g)
        assert a.shape == b.shape == shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_unet_divergence_forward_mode_equals_reverse_mode():
    """The likelihood's divergence runs the U-Net in forward mode (``jax.linearize``, one JVP per
    pixel); it equals the trace of the Jacobian built in reverse mode (the canonical transposes),
    for each image of the batch."""
    from jaxdiff.likelihood import divergence

    model = UNet(channels=(4,), heads=1, attention_resolutions=(4,))
    x = _normal(0, (2, 4, 4, 1))
    params = _perturbed(model, x)
    fn = lambda x: model.apply(params, x, 0.4)  # noqa: E731
    value, div = jax.jit(lambda x: divergence(fn, x))(x)
    jac = jax.jit(jax.jacrev(fn))(x).reshape(2, 16, 2, 16)
    reverse = jnp.stack([jnp.trace(jac[i, :, i, :]) for i in range(2)])
    np.testing.assert_allclose(value, jax.jit(fn)(x), rtol=1e-6, atol=1e-6)  # eager: 1 compile/op
    np.testing.assert_allclose(div, reverse, rtol=1e-4, atol=1e-4)
    assert float(jnp.min(jnp.abs(div))) > 1e-2  # a real divergence, not zeros


def test_conv_layer_equals_flax_conv_with_the_same_params():
    from jaxdiff.nets import Conv

    x = _normal(0, (2, 8, 8, 3))
    for stride in (1, 2):
        ours, flax_conv = Conv(5, strides=stride), nn.Conv(5, (3, 3), strides=stride)
        params = ours.init(jax.random.key(1), x)
        params = jax.tree.map(lambda p: p + 0.1, params)  # a nonzero bias
        assert jax.tree.map(jnp.shape, params) == jax.tree.map(
            jnp.shape, jax.eval_shape(flax_conv.init, jax.random.key(1), x)
        )
        got, want = jax.jit(
            lambda p, ours=ours, ref=flax_conv: (ours.apply(p, x), ref.apply(p, x))
        )(params)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="conv2d takes"):
        Conv(5).init(jax.random.key(0), x[0])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_group_norm_equals_flax(dtype):
    """The U-Net's group norm (per-channel sums first, fast on XLA:CPU) is flax's ``GroupNorm``:
    the same parameter tree, output and gradients (in x and in the parameters), in float32 and
    bfloat16, on activations with an offset (mean 3, std 0.5) and on 3-D inputs."""
    from jaxdiff.nets import GroupNorm

    for shape in ((4, 6, 5, 32), (3, 7, 16)):
        x = (3.0 + 0.5 * _normal(0, shape)).astype(dtype)
        ours, ref = GroupNorm(8, dtype=dtype), nn.GroupNorm(8, epsilon=1e-6, dtype=dtype)
        params = perturb(ref.init(jax.random.key(1), x), 1.0, seed=2)
        ours_init = jax.eval_shape(ours.init, jax.random.key(1), x)  # only its structure is used
        assert jax.tree.structure(ours_init) == jax.tree.structure(params)
        w = _normal(3, shape)
        outs = []
        for m in (ours, ref):
            loss = lambda p, x, m=m, w=w: jnp.sum(m.apply(p, x).astype(jnp.float32) * w)  # noqa: E731
            y, *grads = jax.jit(
                lambda p, x, m=m, loss=loss: (m.apply(p, x), *jax.grad(loss, argnums=(0, 1))(p, x))
            )(params, x)
            assert y.dtype == dtype
            outs.append((y, *grads))
        tol = 2e-5 if dtype == jnp.float32 else 2e-2
        for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]), strict=True):
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())
    for init in (GroupNorm(3).init, jax.jit(GroupNorm(3).init)):  # eagerly and under jit
        with pytest.raises(ValueError, match="3 groups do not divide the 32 channels"):
            init(jax.random.key(0), jnp.ones((1, 2, 2, 32)))


def test_group_norm_keeps_its_precision_far_from_zero():
    """``E[x^2] - mean^2`` (flax's one pass) lost the variance at an offset of 1e3 in float32:
    outputs off by 0.86 (3,227 at 1e4); two passes keep them within 2e-4 (2e-3 at 1e4) of the
    same activations without the offset. Measured: 6.7e-5 (1.4e-3) with XLA's default code
    generation (LLVM level 3), 1.24e-4 (1.4e-3) at the level 1 the tests compile with (another
    summation order; rounding 1e3 + x to float32 alone moves x by up to 3e-5)."""
    from jaxdiff.nets import GroupNorm

    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
    norm = GroupNorm(4)
    params = norm.init(jax.random.key(1), x)
    ref = norm.apply(params, x)
    for offset, tol in ((1e3, 2e-4), (1e4, 2e-3)):
        assert float(jnp.abs(norm.apply(params, x + offset) - ref).max()) < tol


def test_conv2d_refuses_padding_that_leaves_no_output():
    """A negative padding gave lax's raw error, and a kernel larger than the padded image an
    empty (1, 0, 0, c) output; an int pads both sides, and a batch of 0 passes through."""
    from jaxdiff.nets.conv import conv2d

    w = jnp.ones((3, 3, 2, 4))
    assert conv2d(jnp.ones((1, 5, 5, 2)), w, 1, 1).shape == (1, 5, 5, 4)
    assert conv2d(jnp.ones((0, 5, 5, 2)), w).shape == (0, 5, 5, 4)
    with pytest.raises(ValueError, match=r"leave an output of at least 1 x 1 \(got \(0, 0\)\)"):
        conv2d(jnp.ones((1, 2, 2, 2)), w, 1, "VALID")
    with pytest.raises(ValueError, match="padding must be >= 0"):
        conv2d(jnp.ones((1, 5, 5, 2)), w, 1, -3)
    with pytest.raises(ValueError, match="strides must be a positive integer"):
        conv2d(jnp.ones((1, 5, 5, 2)), w, 0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention_equals_flax_dot_product_attention(dtype):
    """The U-Net's attention (heads as a leading batch axis, fast on XLA:CPU) is flax's function:
    the same layer output with the same parameters, in float32 and bfloat16."""
    from jaxdiff.nets.unet import SelfAttention, _attention

    q, k, v = _normal(0, (3, 2, 24, 4, 8))
    x = _normal(1, (2, 4, 4, 16))
    layer = SelfAttention(heads=4, groups=8, dtype=dtype)
    flax_layer = nn.MultiHeadDotProductAttention(4, dtype=dtype, force_fp32_for_softmax=True)

    @jax.jit  # one program: eagerly, each op is compiled on its own
    def outputs(q, k, v, x):
        ref_fn = nn.dot_product_attention(q, k, v, force_fp32_for_softmax=True)
        params = jax.tree.map(lambda p: p + 0.05, layer.init(jax.random.key(2), x))  # out != 0
        h = (
            nn.GroupNorm(8, epsilon=1e-6, dtype=dtype)
            .apply({"params": params["params"]["GroupNorm_0"]}, x)
            .reshape(2, 16, 16)
        )
        mha = {"params": params["params"]["MultiHeadDotProductAttention_0"]}
        ref = x + flax_layer.apply(mha, h, h).reshape(x.shape)
        return _attention(q, k, v), ref_fn, layer.apply(params, x), ref

    ours_fn, ref_fn, ours, ref = outputs(q, k, v, x)
    np.testing.assert_allclose(ours_fn, ref_fn, rtol=1e-5, atol=1e-6)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(
        np.asarray(ours, np.float32), np.asarray(ref, np.float32), rtol=tol, atol=tol
    )


def test_chunked_attention_is_the_attention_under_every_transform():
    """On CPU the U-Net's attention runs the batch in chunks (a loop, the last chunk padded): the
    same values, gradients, JVP (what the likelihood's divergence uses) and vmap as in one piece."""
    from jaxdiff.nets.unet import _attention, _attention_chunked, _attention_math

    q, k, v = _normal(0, (3, 5, 6, 2, 4))
    two = functools.partial(_attention_chunked, chunk_bytes=2 * 4 * 2 * 6 * 6)  # 2 + 2 + (1 + pad)
    assert "scan" in str(jax.make_jaxpr(two)(q, k, v))
    assert "scan" not in str(jax.make_jaxpr(_attention_chunked)(q, k, v))  # fits: one piece
    loss = lambda f: lambda *qkv: jnp.sum(jnp.sin(f(*qkv)))  # noqa: E731
    tangents = tuple(_normal(i, q.shape) for i in (1, 2, 3))

    def transforms(fn, q, k, v):  # value, gradients, JVP
        return (fn(q, k, v), jax.grad(loss(fn), argnums=(0, 1, 2))(q, k, v),
                jax.jvp(fn, (q, k, v), tangents)[1])  # fmt: skip

    @jax.jit  # one program: eagerly, each op is compiled on its own
    def everything(q, k, v):
        batched = jax.vmap(two, in_axes=(None, None, 1), out_axes=1)(q, k, jnp.stack([v, 2 * v], 1))
        fns = (two, _attention, _attention_math)
        return [transforms(fn, q, k, v) for fn in fns], batched

    (*got, want), batched = everything(q, k, v)
    for value, grads, jvp in got:  # two, then _attention, against _attention_math
        np.testing.assert_allclose(value, want[0], rtol=1e-6, atol=1e-6)
        for a, b in zip(grads, want[1], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(jvp, want[2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batched[:, 1], 2 * want[0], rtol=1e-5, atol=1e-6)


def _count(model, shape, *args):
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape), jnp.zeros(1), *args)
    return sum(math.prod(p.shape) for p in jax.tree.leaves(params))


def test_parameter_counts_of_the_named_configs():
    # DDPM's CIFAR-10 network: the paper's "35.7M"; exactly diffusers' google/ddpm-cifar10-32
    # (UNet2DModel with the config in the docstring, counted with diffusers 0.42 + torch 2.13).
    assert _count(ddpm_cifar10(), (1, 32, 32, 3)) == 35_746_307
    # small_unet: the diffusers config in its docstring counts 1,192,387 too; 11 labels add
    # an 11 x 128 embedding.
    assert _count(small_unet(), (1, 32, 32, 3)) == 1_192_387
    labels = jnp.zeros(1, jnp.int32)
    assert _count(small_unet(num_classes=10), (1, 32, 32, 3), labels) == 1_192_387 + 11 * 128
    # the count does not depend on the compute dtype; params stay float32 under bfloat16
    params = jax.eval_shape(
        ddpm_cifar10(dtype=jnp.bfloat16).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)), 0.5
    )
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}


def _perturbed(model, x, *args):
    return perturb(init_params(model, jax.random.key(1), x, 0.5, *args), 0.1, seed=2)


def test_dropout_runs_only_with_a_dropout_rng():
    # one resolution, no attention: five residual blocks (1 down, 2 middle, 2 up) compile fast
    model = UNet(channels=(4,), attention=False, dropout=0.3, heads=1, num_classes=3)
    x, labels = _normal(0, (2, 8, 8, 1)), jnp.array([0, 3])
    params = _perturbed(model, x, labels)
    off = model.clone(dropout=0.0)
    k1, k2 = jax.random.key(3), jax.random.key(4)

    @jax.jit
    def outputs(params):
        return (
            model.apply(params, x, 0.5, labels),
            model.apply(params, x, 0.5, labels, rngs={"dropout": k1}, deterministic=True),
            model.apply(params, x, 0.5, labels, rngs={"dropout": k1}),
            model.apply(params, x, 0.5, labels, rngs={"dropout": k2}),
            off.apply(params, x, 0.5, labels, rngs={"dropout": k1}),
        )

    plain, det, a, b, off_a = outputs(params)
    np.testing.assert_array_equal(plain, det)  # deterministic=True overrides the rng
    scale = float(jnp.max(jnp.abs(plain)))
    assert float(jnp.max(jnp.abs(a - plain))) > 0.05 * scale  # dropout changed the output
    assert float(jnp.max(jnp.abs(a - b))) > 0.05 * scale  # and depends on the key
    np.testing.assert_array_equal(off_a, plain)  # dropout 0: the rng changes nothing


@pytest.mark.parametrize("net", ["mlp", "unet", "two_time_mlp", "two_time_unet"])
def test_bfloat16_forward_keeps_float32_params_and_output(net):
    if net.endswith("mlp"):
        mlp = TwoTimeMLP if net.startswith("two") else MLP
        model, x = mlp(width=32, depth=2), jax.random.normal(jax.random.key(0), (4, 2))
    else:
        unet = TwoTimeUNet if net.startswith("two") else UNet
        model = unet(channels=(4, 8), heads=1, attention_resolutions=(4,))
        x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    params = _perturbed(model, x)
    mixed = model.clone(dtype=jnp.bfloat16)
    out32, out16 = jax.jit(lambda p: (model.apply(p, x, 0.3), mixed.apply(p, x, 0.3)))(params)
    assert out16.shape == x.shape and out16.dtype == jnp.float32
    # bfloat16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2% per op); through a few
    # layers the output stays within 3% of float32's (measured 0.4-0.8%)
    err = float(jnp.max(jnp.abs(out16 - out32)) / jnp.max(jnp.abs(out32)))
    assert 0 < err < 0.03, err
    # the matmuls and convolutions really run in bfloat16
    jaxpr = str(jax.make_jaxpr(mixed.apply)(params, x, 0.3))
    heavy = "jaxdiff_conv2d" if net.endswith("unet") else "dot_general"
    lines = [line for line in jaxpr.splitlines() if heavy in line]
    assert lines and all("bf16[" in line for line in lines)


def test_from_diffusers_loads_a_unet2dmodel_and_to_diffusers_inverts_it():
    """A diffusers UNet2DModel in google/ddpm-cifar10-32's design (additive time embedding, one
    head, DDPM's freq_shift 1, 4 levels, attention at 16x16) at small widths, with class labels and
    random weights: from_diffusers gives a jaxdiff UNet computing the same function (step n ->
    t = n / 1000), from the current attention names and the old Hub ones (query, ..., proj_attn);
    to_diffusers returns the state dict exactly; a wrong key or config is a ValueError."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from jaxdiff.nets import UNet, from_diffusers, to_diffusers

    torch.manual_seed(0)
    net = diffusers.UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(32, 64, 64, 64), norm_num_groups=8, norm_eps=1e-6,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
        num_class_embeds=11,
    ).eval()  # fmt: skip
    with torch.no_grad():  # diffusers zero-initialises nothing, but move every weight anyway
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = {k: v.numpy() for k, v in net.state_dict().items()}
    model = UNet(channels=(32, 64, 64, 64), num_res_blocks=2, attention_resolutions=(16,), heads=1,
                 scale_shift=False, norm_groups=8, num_classes=10, freq_shift=1.0)  # fmt: skip
    params = from_diffusers(state, model)
    x = np.random.default_rng(0).standard_normal((3, 32, 32, 3), np.float32)
    steps, labels = np.array([3, 250, 999]), np.array([0, 7, 10])  # 10: diffusers' 11th class
    ours = np.asarray(jax.jit(model.apply)(params, x, steps / 1000, labels))
    with torch.no_grad():
        out = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(steps),
                  class_labels=torch.from_numpy(labels)).sample  # fmt: skip
    theirs = out.numpy().transpose(0, 2, 3, 1)
    assert np.abs(theirs).max() > 0.5
    np.testing.assert_allclose(ours, theirs, atol=2e-5 * np.abs(theirs).max(), rtol=0)
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {functools.reduce(lambda k, kv: k.replace(f".{kv[0]}.", f".{kv[1]}."),
                                old.items(), k): v for k, v in state.items()}  # fmt: skip
    assert any(".proj_attn." in k for k in renamed)
    again = from_diffusers(renamed, model)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), again, params))
    back = to_diffusers(params, model)
    assert back.keys() == state.keys()
    assert all(np.array_equal(back[k], state[k]) and back[k].flags.writeable for k in state)
    with pytest.raises(ValueError, match="has no mid_block.resnets.1.conv1.weight"):
        from_diffusers({k: v for k, v in state.items() if k != "mid_block.resnets.1.conv1.weight"},
                       model)  # fmt: skip
    with pytest.raises(ValueError, match="no jaxdiff parameter.*extra"):
        from_diffusers({**state, "extra": np.zeros(1)}, model)
    with pytest.raises(
        ValueError, match=r"conv_in.bias has shape \(32,\); jaxdiff expects \(16,\)"
    ):
        from_diffusers(state, model.clone(channels=(16, 64, 64, 64)))


def test_a_ported_diffusers_checkpoint_samples_as_diffusers_does_with_jaxdiffs_ddim():
    """The way to sample a diffusers DDPM checkpoint (e.g. google/ddpm-cifar10-32: eps network,
    1000 linear betas 1e-4..0.02) with jaxdiff: from_diffusers, the chain as jd.discrete_path,
    DDIM on diffusers' "leading" steps. diffusers' step k is the chain's t = (k + 1) / 1000 and the
    network's input k, so the field calls the network at t - 1 / 1000. Random weights, 5 steps:
    equal to diffusers' DDIMScheduler loop to float32 rounding."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    import jaxdiff as jd
    from jaxdiff.nets import UNet, from_diffusers

    torch.manual_seed(1)
    net = diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8, norm_eps=1e-6,
        down_block_types=("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D"),
        attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
    ).eval()  # fmt: skip
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = UNet(channels=(16, 32), attention_resolutions=(16,), heads=1, scale_shift=False,
                 norm_groups=8, freq_shift=1.0)  # fmt: skip
    state = {k: v.numpy() for k, v in net.state_dict().items()}
    params = from_diffusers(state, model, shape=(16, 16, 3))
    x = np.random.default_rng(1).standard_normal((2, 16, 16, 3), np.float32)
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                    beta_schedule="linear", clip_sample=False)  # fmt: skip
    sched.set_timesteps(5)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        for k in sched.timesteps:
            xt = sched.step(net(xt, k).sample, k, xt).prev_sample
    theirs = xt.numpy().transpose(0, 2, 3, 1)
    path = jd.discrete_path(jd.linear_betas(1000, 1e-4, 0.02))
    ts = jd.leading_timesteps(1000, 5)

    @jax.jit  # eagerly, the sample's set-up compiles op by op
    def ours(params, x):
        field = jd.Field(lambda p, x, t: model.apply(p, x, t - 1e-3), "eps", params)
        return jd.sample(None, path, field, x_init=x, sampler=jd.samplers.ddim(), ts=ts).x

    ours = ours(params, jnp.asarray(x))
    assert float(np.abs(theirs - x).max()) > 0.5  # the network moved the samples
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4 * np.abs(theirs).max(), rtol=0)


def test_the_time_features_do_not_take_the_data_dtype():
    """Time was cast to x's dtype: bfloat16 or float64 data got other Fourier frequencies
    (drawn in that dtype) and a rounded 1000 t, a different network (error 3.95 on an output of
    scale 2.7); now the features are float32 or wider whatever x's dtype."""
    m = MLP(width=16, depth=2, emb_dim=16, num_classes=3)
    x = jnp.round(_normal(0, (4, 2)) * 8) / 8  # exact in bfloat16
    p = perturb(init_params(m, jax.random.key(1), x, jnp.zeros(4), jnp.zeros(4, int)), 0.1)
    labels = jnp.array([0, 1, 2, 3])
    # jitted: an eager apply compiles each op of the network on its own (the dtypes are the same)
    apply = jax.jit(m.apply)
    ref = apply(p, x, 0.5, labels)
    low = apply(p, x.astype(jnp.bfloat16), 0.5, labels)
    assert low.dtype == jnp.bfloat16 and float(jnp.abs(ref).max()) > 0.1
    np.testing.assert_allclose(low.astype(jnp.float32), ref, atol=0.02 * float(jnp.abs(ref).max()))
    with jax.enable_x64(True):
        wide = jax.jit(m.apply)(p, x.astype(jnp.float64), 0.5, labels)
    np.testing.assert_allclose(wide, ref, rtol=1e-4, atol=1e-5)
    tiny = UNet(channels=(8, 8), heads=2, norm_groups=4)
    img = jnp.round(_normal(2, (2, 8, 8, 1)) * 8) / 8
    q = perturb(init_params(tiny, jax.random.key(3), img, jnp.zeros(2)), 0.1)
    apply = jax.jit(tiny.apply)
    ref = apply(q, img, 0.3)
    low = apply(q, img.astype(jnp.bfloat16), 0.3).astype(jnp.float32)
    np.testing.assert_allclose(low, ref, atol=0.03 * float(jnp.abs(ref).max()))


def test_out_of_range_labels_are_an_error():
    """A label past the null one gave NaN; -1 was taken as the null label (unconditional)."""
    m = MLP(width=8, depth=1, num_classes=3, emb_dim=8)
    x = jnp.ones((4, 2))
    p = init_params(m, jax.random.key(0), x, jnp.zeros(4), jnp.zeros(4, int))
    for bad, shown in ((jnp.array([0, 1, 2, 4]), "4"), (jnp.array([0, 1, 2, -1]), "-1")):
        # the values out of range are named (the first 8 labels were, all valid in a review's case)
        with pytest.raises(ValueError, match=rf"labels must lie in \[0, 3\].*got \[{shown}\] out"):
            m.apply(p, x, 0.5, bad)
        with pytest.raises(Exception, match=r"labels must lie in \[0, 3\]"):
            jax.jit(lambda lab: m.apply(p, x, 0.5, lab))(bad).block_until_ready()
    assert bool(jnp.all(jnp.isfinite(m.apply(p, x, 0.5, jnp.array([0, 1, 2, 3])))))


def test_diffusers_config_builds_the_same_network_and_from_diffusers_checks_a_config():
    """diffusers_config(model) builds a UNet2DModel that from_diffusers ports to the same function;
    a checkpoint with diffusers' defaults (flip_sin_to_cos=True, downsample_padding=1, norm_eps
    1e-5) has the same weight shapes and other outputs (1.67 off on a 2-level net): ported silently
    before, refused now when its config is given, naming each difference."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from jaxdiff.nets import UNet, diffusers_config, from_diffusers, small_unet

    def build(**kw):
        torch.manual_seed(0)
        net = diffusers.UNet2DModel(**kw).eval()
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
        return net, {k: v.numpy() for k, v in net.state_dict().items()}

    x = np.random.default_rng(0).standard_normal((2, 16, 16, 1), np.float32)
    steps = np.array([3, 999])
    models = (
        small_unet(channels=(16, 32), attention_resolutions=(8,), heads=2),  # scale-shift, heads
        UNet(channels=(8, 16), attention_resolutions=(16, 8), heads=1, scale_shift=False,
             norm_groups=4, freq_shift=1.0),
    )  # fmt: skip
    for model in models:
        net, state = build(**diffusers_config(model, (16, 16, 1)))
        params = from_diffusers(state, model, (16, 16, 1), config=net.config)
        ours = np.asarray(model.apply(params, x, steps / 1000))
        with torch.no_grad():
            theirs = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(steps))
        theirs = theirs.sample.numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(ours, theirs, atol=2e-5 * np.abs(theirs).max(), rtol=0)
    model = models[1]
    config = {**diffusers_config(model, (16, 16, 1))}
    for key in ("flip_sin_to_cos", "downsample_padding", "norm_eps"):
        del config[key]  # an older config.json: diffusers' defaults apply
    net, state = build(**config)
    from_diffusers(state, model, (16, 16, 1))  # the weights alone cannot tell
    with pytest.raises(ValueError, match=r"flip_sin_to_cos = True.*downsample_padding = 1.*"
                                         r"norm_eps = 1e-05"):  # fmt: skip
        from_diffusers(state, model, (16, 16, 1), config=config)
    with pytest.raises(ValueError, match=r"\[2, 4\] heads at widths \[8, 16, 16\]"):
        from_diffusers(state, model, (16, 16, 1), config={**net.config, "attention_head_dim": 4})
    assert diffusers_config(models[0], (16, 16, 1))["attention_head_dim"] == 16
