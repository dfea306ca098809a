"""Audit of the training loop, the image data path, the diffusers port and the digits helpers:
each test failed before its fix."""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdiff import loader as LD
from jaxdiff.train import (
    adamw_cosine,
    ema_update,
    init_train_state,
    make_train_chunk,
    make_train_step,
)
from tests.net_helpers import perturb


def _square_loss(p, key, batch):
    return jnp.sum((p["w"].astype(jnp.float32) - batch) ** 2)


def test_bfloat16_params_keep_their_dtype_in_the_ema_and_train_in_a_chunk():
    """A float32 EMA decay promoted bfloat16 EMA leaves to float32, and the chunk's scan refused
    the changed carry (TypeError). Now the EMA is float32 from the start, keeps its dtype, and
    equals the formula."""
    params = {"w": jnp.ones((3,), jnp.bfloat16)}
    opt = optax.sgd(0.1)
    step = make_train_step(_square_loss, opt, ema_decay=0.5, ema_warmup=False)
    chunk = make_train_chunk(step, lambda k: jnp.zeros((3,)), 2)
    state, losses = chunk(init_train_state(params, opt, jax.random.key(0)))
    assert state.ema["w"].dtype == jnp.float32 and state.params["w"].dtype == jnp.bfloat16
    # w: 1 -> 0.8 -> 0.64 (sgd on sum w^2, lr 0.1); ema: 0.5 * 1 + 0.5 * 0.8 = 0.9, then
    # 0.5 * 0.9 + 0.5 * 0.64 = 0.77 (bfloat16: 8 bits of mantissa, 0.4% per rounding)
    np.testing.assert_allclose(np.asarray(state.params["w"], np.float32), 0.64, rtol=1e-2)
    np.testing.assert_allclose(np.asarray(state.ema["w"], np.float32), 0.77, rtol=1e-2)
    np.testing.assert_allclose(np.asarray(losses), [3.0, 3 * 0.64], rtol=1e-2)


def test_a_bfloat16_ema_moves():
    """A bfloat16 EMA at decay 0.999 stood still: 0.001 of the gap is below half of bfloat16's
    spacing (2^-8 relative). 1000 updates from 1 towards 2 give 2 - 0.999^1000 = 1.6323."""
    params = {"w": jnp.ones((3,), jnp.bfloat16), "n": jnp.arange(3)}
    state = init_train_state(params, optax.sgd(0.1), jax.random.key(0))
    assert state.ema["w"].dtype == jnp.float32 and state.ema["n"].dtype == params["n"].dtype
    target = {"w": jnp.full((3,), 2.0, jnp.bfloat16), "n": params["n"]}
    ema = jax.lax.fori_loop(0, 1000, lambda i, e: ema_update(e, target, 0.999), state.ema)
    np.testing.assert_allclose(np.asarray(ema["w"]), 2 - 0.999**1000, rtol=1e-4)
    np.testing.assert_array_equal(ema["n"], [0, 1, 2])  # an integer leaf was truncated to [0, 0, 1]
    state.params["w"].delete()  # the EMA is a copy, never an alias of the caller's params
    assert float(state.ema["w"][0]) == 1.0


def test_adamw_cosine_warmup_must_end_before_the_run_and_one_step_learns():
    """warmup_steps >= total_steps gave a schedule that never decays (20 of 10: the rate ended at
    0.55 of the peak, not end_factor); total_steps = 1 had its only step at rate 0."""
    with pytest.raises(
        ValueError, match=r"warmup_steps must lie in \[0, total_steps = 10\); got 2"
    ):
        adamw_cosine(1.0, 10, warmup_steps=20)
    with pytest.raises(ValueError, match="got 10"):
        adamw_cosine(1.0, 10, warmup_steps=10)
    opt = adamw_cosine(0.1, 1, weight_decay=0.0, clip_norm=None)
    params = {"w": jnp.ones((2,))}
    step = jax.jit(make_train_step(_square_loss, opt))
    state, _ = step(init_train_state(params, opt, jax.random.key(0)), jnp.zeros((2,)))
    # Adam's first step moves each weight by lr * sign(grad) = 0.1 (up to eps = 1e-8)
    np.testing.assert_allclose(np.asarray(state.params["w"]), 0.9, atol=1e-6)
    # the default warmup of a longer run is unchanged: 5%, from rate 0 at step 0
    sched = optax.warmup_cosine_decay_schedule(0.0, 1.0, 5, 100, 0.05)
    assert float(sched(0)) == 0.0 and abs(float(sched(100)) - 0.05) < 1e-7


def test_a_scalar_batch_leaf_on_a_mesh_is_a_clear_error():
    from jaxdiff.train import data_mesh

    step = make_train_step(_square_loss, optax.sgd(0.1))
    with pytest.raises(ValueError, match="needs a batch axis"):
        make_train_chunk(step, lambda k: (jnp.zeros((4, 3)), jnp.float32(1.0)), 2, mesh=data_mesh())


def test_loader_process_index_outside_the_processes_is_an_error():
    """process_index = process_count gave empty batches (shape (0, ...)) silently."""
    src = LD.ArraySource(np.zeros((5, 2, 2, 1), np.uint8))
    for index in (2, -1):
        with pytest.raises(ValueError, match=rf"process_index must lie in \[0, .*got {index}"):
            LD.ImageLoader(src, 4, process_index=index, process_count=2)
    assert LD.ImageLoader(src, 4, process_index=1, process_count=2).batch(0).shape == (2, 2, 2, 1)


def test_labels_past_int32_are_an_error_not_wrapped():
    """int64 label 2**40 became 0 (astype int32)."""
    with pytest.raises(ValueError, match="labels must be < 2\\*\\*31"):
        LD.ArraySource(np.zeros((2, 2, 2, 1), np.uint8), np.array([1, 2**40], np.int64))
    src = LD.ArraySource(np.zeros((2, 2, 2, 1), np.uint8), np.array([1, 4], np.int64))
    assert src.labels.dtype == np.int32 and src.labels.tolist() == [1, 4] and src.num_classes == 5


def test_next_on_a_closed_prefetcher_raises_instead_of_hanging():
    it = LD.prefetch((np.zeros(2) for _ in range(100)), size=1)
    next(it)
    deadline = time.monotonic() + 10
    while not it._queue.full() and time.monotonic() < deadline:  # one batch queued at close
        time.sleep(0.01)
    it.close()
    out = []

    def consume():
        try:
            for _ in range(5):
                next(it)
        except RuntimeError as err:
            out.append(str(err))

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "next() hung on a closed Prefetcher"
    assert out == ["next() on a closed Prefetcher"]
    assert it.count == 1 and it._queue.empty()  # the queued batch was returned after close()


def test_folder_of_mixed_grayscale_and_colour_files(tmp_path):
    """A grayscale first file made every RGB file grayscale silently; a 16-bit grayscale file in
    an RGB folder was clipped at 255 (level 1000 -> 255, not 1000 / 257 = 4)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    gray_first = tmp_path / "g"
    gray_first.mkdir()
    Image.fromarray(rgb[..., 0]).save(gray_first / "a.png")
    Image.fromarray(rgb).save(gray_first / "b.png")
    with pytest.raises(ValueError, match="b.png is a RGB image in a folder read as grayscale"):
        LD.ImageFolder(gray_first, threads=1)  # when opened (the stop-42 review's P5), not read
    colour_first = tmp_path / "c"
    colour_first.mkdir()
    Image.fromarray(rgb).save(colour_first / "a.png")
    Image.fromarray(np.full((4, 4), 1000, np.uint16)).save(colour_first / "b.png")
    rgba = np.concatenate([rgb, np.full((4, 4, 1), 9, np.uint8)], -1)
    Image.fromarray(rgba).save(colour_first / "c.png")
    Image.fromarray(rgb[..., 1]).save(colour_first / "d.png")
    images, _ = LD.ImageFolder(colour_first, threads=1).read(np.arange(4))
    assert images.shape == (4, 4, 4, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[0], rgb)
    np.testing.assert_array_equal(images[1], 4)  # round(1000 / 257) in all three channels
    np.testing.assert_array_equal(images[2], rgb)  # alpha dropped
    np.testing.assert_array_equal(images[3], np.repeat(rgb[..., 1:2], 3, -1))


def test_to_diffusers_refuses_params_of_another_image_shape_or_config():
    """to_diffusers(params, model) with the default shape (32, 32, 3) for params of 8x8x1 images
    gave 114 of 144 tensors, the down blocks' attention named mid_block's, and a conv_in of 1
    input channel for a 3-channel model."""
    from jaxdiff.nets import UNet, from_diffusers, to_diffusers

    model = UNet(channels=(8, 16), heads=2, attention_resolutions=(4,))
    shape = (8, 8, 1)
    # Random values in every leaf (the port must carry each tensor to its own place): the shapes
    # from eval_shape and numpy noise, where an eager init plus a jax.random draw per leaf took
    # ~27 s of per-shape compilation on a 2-core CPU.
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *shape)), jnp.zeros((1,)))
    params = perturb(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes), 1.0, seed=1)
    state = to_diffusers(params, model, shape)
    assert len(state) == 144
    back = from_diffusers(state, model, shape)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), params, back))
    with pytest.raises(ValueError, match="params with no diffusers counterpart"):
        to_diffusers(params, model, (32, 32, 1))  # no attention at 32x32 and 16x16
    with pytest.raises(ValueError, match=r"Conv_0/kernel has shape \(3, 3, 1, 8\)"):
        to_diffusers(params, model)
    with pytest.raises(ValueError, match="the {'params': ...} dict"):
        to_diffusers(params["params"], model, shape)


def test_digits_accuracy_checks_label_and_image_shapes():
    """(n, 1) labels broadcast against (n,) predictions: accuracy 0.102 instead of 0.993."""
    from jaxdiff.data import load_digits
    from jaxdiff.digits import classifier_accuracy, classifier_features, load_classifier, tile

    params = load_classifier()
    x, y = load_digits("test")
    acc = float(classifier_accuracy(params, x, y))
    assert acc >= 0.97
    assert float(classifier_accuracy(params, x, np.asarray(y)[:, None])) == acc
    with pytest.raises(ValueError, match=r"labels must be \(10,\).*got shape \(1,\)"):
        classifier_accuracy(params, x[:10], np.asarray(y)[:1])
    with pytest.raises(ValueError, match=r"got shape \(3, 8, 8, 3\)"):
        classifier_features(params, np.zeros((3, 8, 8, 3), np.float32))
    assert jax.jit(classifier_features)(params, x[:3]).shape == (3, 64)
    with pytest.raises(ValueError, match="at least one image"):
        tile(np.zeros((0, 8, 8)))
    laid = tile(np.ones((3, 1, 1)), cols=2, fill=0.0)  # an odd count: the last row half empty
    np.testing.assert_array_equal(laid, [[1, 0, 1], [0, 0, 0], [1, 0, 0]])


@pytest.mark.parametrize(
    ("loss", "target"),
    [("fm", "x0"), ("eps", "x0"), ("v", "x0"), ("dsm", "x0"), ("dsm", "v"), ("dsm", "velocity")],
)
def test_fm_recipes_whose_loss_is_infinite_at_t0_build(loss, target):
    """build took t_min = 0 on the fm path from the network's target alone: these configs,
    accepted by resolve, were refused by the loss (after the CLI had made the run folder) with a
    remedy no flag offers. They train from t = 1e-3 now, as flow_matching_loss does."""
    from jaxdiff import experiment as E

    c = E.resolve({"path": "fm", "loss": loss, "target": target, "width": 16, "depth": 1})
    setup = E.build(c)
    state, _ = E.init_state(c, setup)
    value = setup.loss(state.params, jax.random.key(0), setup.sample_batch(jax.random.key(1)))
    assert np.isfinite(float(value))


def test_bad_step_counts_and_rates_are_refused():
    """learning_rate=inf gave NaN parameters after one step; fractional step counts were
    truncated (train(num_steps=2.5) ran 2 steps), total_steps=True was 1."""
    from jaxdiff.train import train

    with pytest.raises(ValueError, match="learning_rate must be a finite number > 0; got inf"):
        adamw_cosine(float("inf"))
    with pytest.raises(ValueError, match="total_steps must be a positive integer; got 2.5"):
        adamw_cosine(1e-3, 2.5)
    with pytest.raises(ValueError, match="total_steps must be a positive integer; got True"):
        adamw_cosine(1e-3, True)
    with pytest.raises(ValueError, match="warmup_steps must be an integer >= 0; got 1.5"):
        adamw_cosine(1e-3, 10, warmup_steps=1.5)
    step = make_train_step(lambda p, k, b: jnp.sum((p["w"] - b) ** 2), optax.sgd(0.1))
    with pytest.raises(ValueError, match="num_steps must be a positive integer; got 2.5"):
        make_train_chunk(step, lambda k: jnp.zeros((4, 2)), 2.5)
    state = init_train_state({"w": jnp.zeros(2)}, optax.sgd(0.1), jax.random.key(0))
    chunk = lambda k: make_train_chunk(step, lambda key: jnp.zeros((4, 2)), k)  # noqa: E731
    with pytest.raises(ValueError, match="num_steps must be an integer >= 0; got 2.5"):
        train(state, chunk, 2.5, progress=False)


def test_a_nan_loss_names_the_step_it_appeared_at():
    """The error named the chunk's last step (50) where the loss first was NaN at step 4; the
    chunk donates its input state, so it could not be rerun to find the step."""
    from jaxdiff.train import train

    def loss(p, k, b):  # finite for the first 3 updates, then NaN
        return jnp.where(p["n"] >= 3.0, jnp.nan, 0.0) + 0.0 * jnp.sum(b)

    opt = optax.GradientTransformation(
        lambda p: (), lambda g, s, p=None: (jax.tree.map(lambda v: jnp.ones_like(v), g), s)
    )  # every update adds 1 to n
    step = make_train_step(loss, opt)
    state = init_train_state({"n": jnp.zeros(())}, opt, jax.random.key(0))
    chunk = lambda k: make_train_chunk(step, lambda key: jnp.zeros((2, 1)), k)  # noqa: E731
    with pytest.raises(FloatingPointError, match="the loss became nan at step 4$"):
        train(state, chunk, 50, chunk_size=50, progress=False)


def test_score_matching_defaults_to_sigma_squared_weighting():
    """The CLI's --loss dsm weighted the score error by 1 (t = 1e-3 ~9,000 times t = 1 on VP),
    where jd.score_matching_loss and the docs use Song et al.'s lambda = sigma^2."""
    from jaxdiff import experiment as E

    assert E.resolve({"path": "vp", "loss": "dsm"})["weighting"] == "sigma2"
    assert E.resolve({"path": "vp", "loss": "eps"})["weighting"] == "unit"
    assert E.resolve({"path": "vp", "loss": "dsm", "weighting": "unit"})["weighting"] == "unit"
