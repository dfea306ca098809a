"""Training conv nets in the chunked loop: the compiled chunk holds only canonical convolutions
(the guard against XLA:CPU's slow path inside ``lax.scan``), chunked, unchunked and resumed runs
agree bit for bit, and a bfloat16 run follows the float32 loss curve."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd
from jaxdiff import losses as L
from jaxdiff.data import load_digits
from jaxdiff.nets import MLP, UNet, init_params
from jaxdiff.train import adamw_cosine, init_train_state, make_train_chunk, make_train_step, train

CANONICAL = "b01f_01io->b01f"  # NHWC x HWIO -> NHWC: what XLA:CPU runs through Eigen/XNNPACK


def _conv_layouts(compiled_hlo: str) -> list[str]:
    return re.findall(r"convolution\(.*?dim_labels=([^,\s}]+)", compiled_hlo)


def _same(a, b) -> bool:
    leaves = zip(jax.tree.leaves((a.params, a.ema, a.opt_state)), jax.tree.leaves((b.params, b.ema, b.opt_state)), strict=True)  # fmt: skip
    return all(bool(jnp.array_equal(x, y)) for x, y in leaves)


@functools.cache
def _digits():
    return jnp.asarray(load_digits("train")[0])


def _dropout_loss(model, path):
    """The loss of ``model`` with dropout on: a dropout key split off the loss key."""

    def loss(params, key, batch):
        key, drop = jax.random.split(key)
        apply = functools.partial(model.apply, rngs={"dropout": drop})
        return L.eps_loss(jd.Field(apply, "eps"), path)(params, key, batch)

    return loss


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's convolution layouts")
def test_the_layout_check_sees_the_slow_gradient_layouts():
    # control for the test below: lax's own gradients of a convolution inside a scan compile
    # to non-canonical convolutions (kernel gradient f01b_i01o->01bf), the naive-loop path
    def loss(w, x):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip
        return jnp.mean(y**2)

    def body(w, _):
        return w - 0.1 * jax.grad(loss)(w, jnp.ones((2, 6, 6, 3))), None

    scan = jax.jit(lambda w: jax.lax.scan(body, w, None, length=3)[0])
    layouts = _conv_layouts(scan.lower(jnp.ones((3, 3, 3, 4))).compile().as_text())
    assert CANONICAL in layouts and set(layouts) != {CANONICAL}


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's convolution layouts")
def test_unet_chunks_are_canonical_and_bit_identical_chunked_and_resumed():
    images = _digits()
    model = UNet(channels=(4, 8), heads=1, dropout=0.1)
    params = init_params(model, jax.random.key(0), images[:1], jnp.zeros(1))
    opt = adamw_cosine(3e-3, 100, warmup_steps=2)
    step = make_train_step(_dropout_loss(model, jd.vp_path()), opt)

    def sample(key):
        return images[jax.random.randint(key, (16,), 0, images.shape[0])]

    def fresh():  # the chunks donate their input state: a new copy for every run
        return init_train_state(params, opt, jax.random.key(1))

    # compiled once ahead of time: the runs use the very program whose layouts are checked. One
    # chunk length (4: a scan XLA keeps as a loop); the chunk sizes' own bit-identity is the MLP
    # test's below (each U-Net chunk length costs a ~15 s compile)
    chunk = make_train_chunk(step, sample, 4).lower(fresh()).compile()

    def make_chunk(k):
        assert k == 4, k
        return chunk

    whole, hist = train(fresh(), make_chunk, 8, chunk_size=4, progress=False)  # chunks 4, 4
    part, _ = train(fresh(), make_chunk, 4, chunk_size=4, progress=False)  # 4, then resumed: 4
    resumed, _ = train(part, make_chunk, 8, chunk_size=4, progress=False)
    assert np.isfinite(hist).all() and int(whole.step) == 8
    assert _same(whole, resumed)
    # every convolution of the compiled training chunk (forward and both gradients, in the scan
    # body) is canonical; measured: 16 s/step with lax's gradients against 0.15 s/step here
    layouts = _conv_layouts(chunk.as_text())
    assert len(layouts) >= 3 * 10 and set(layouts) == {CANONICAL}, sorted(set(layouts))


def test_mlp_chunked_unchunked_resumed_and_plain_jit_are_bit_identical():
    model = MLP(width=16, depth=1)
    params = init_params(model, jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros(1))
    opt = adamw_cosine(1e-2, 100, warmup_steps=5)
    step = make_train_step(L.flow_matching_loss(jd.Field(model.apply, "velocity")), opt)

    def sample(key):
        return jd.data.checkerboard(key, 64)

    make_chunk = functools.cache(lambda k: make_train_chunk(step, sample, k))

    def fresh():  # the chunks donate their input state: a new copy for every run
        return init_train_state(params, opt, jax.random.key(1))

    whole, _ = train(fresh(), make_chunk, 12, chunk_size=12, progress=False)
    for size in (1, 5):  # scans of length 1 (no loop left after XLA), and 5 + 5 + 2
        assert _same(whole, train(fresh(), make_chunk, 12, chunk_size=size, progress=False)[0])
    part, _ = train(fresh(), make_chunk, 6, chunk_size=4, progress=False)
    assert _same(whole, train(part, make_chunk, 12, chunk_size=5, progress=False)[0])

    @jax.jit  # the same step as a plain jitted function, called from Python
    def plain(state):
        key, batch_key = jax.random.split(state.key)
        return step(state._replace(key=key), sample(batch_key))[0]

    state = fresh()
    for _ in range(12):
        state = plain(state)
    assert _same(whole, state)


def test_bfloat16_loss_curve_follows_float32():
    # 100 steps of the MLP on the 8x8 digits from the same seed, float32 and bfloat16
    # activations (float32 params, optimizer state and loss). Measured: the means over 20-step
    # windows agree to 0.01% (max per step 0.11%), while a second float32 seed differs by
    # 0.04-3.5% per window (mean 1.5%); UNet(channels=(16, 32)) on the digits: 0.07% (max per
    # step 0.6%) against 1-11% between seeds. Tolerance: 1% per window, and a mean gap under a
    # quarter of the seeds' (bfloat16 rounding must not look like another run).
    images = _digits().reshape(-1, 64)
    curves = {}
    for name, dtype in (("f32", None), ("bf16", jnp.bfloat16), ("seed", None)):
        model = MLP(width=128, depth=3, dtype=dtype)
        params = init_params(model, jax.random.key(0), images[:1], jnp.zeros(1))
        opt = adamw_cosine(3e-3, 100, warmup_steps=5)
        step = make_train_step(L.eps_loss(jd.Field(model.apply, "eps"), jd.vp_path()), opt)
        chunk = make_train_chunk(
            step, lambda key: images[jax.random.randint(key, (64,), 0, images.shape[0])], 100
        )
        state = init_train_state(params, opt, jax.random.key(2 if name == "seed" else 1))
        state, losses = chunk(state)
        assert {p.dtype for p in jax.tree.leaves((state.params, state.opt_state, losses))} <= {
            jnp.dtype(jnp.float32),
            jnp.dtype(jnp.int32),
        }
        curves[name] = np.asarray(losses).reshape(5, 20).mean(axis=1)
    assert curves["f32"][-1] < 0.5 * curves["f32"][0]  # it trains
    bf16_gap = np.abs(curves["bf16"] / curves["f32"] - 1)
    seed_gap = np.abs(curves["seed"] / curves["f32"] - 1)
    assert bf16_gap.max() < 0.01, bf16_gap
    assert bf16_gap.mean() < 0.25 * seed_gap.mean(), (bf16_gap, seed_gap)
