"""The library-facing parts of the ``images`` benchmark (not its timings): size overrides, that the
PyTorch side does the same work as jaxdiff (VP coefficients, the DDIM loop, diffusers' U-Net equal
tensor for tensor), and the grain pipeline and wait timer used to compare the loaders.
PyTorch, diffusers and grain are benchmark extras (``.[bench]``): those tests skip without them."""

import contextlib
import importlib
import io
import os
import time
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd


def _bench(name: str):
    """``benchmarks.<name>``, leaving ``EQX_ON_ERROR`` as it was: the benchmarks package sets it
    to ``nan``, which subprocesses started by other tests (the CLI's checks) would inherit."""
    before = os.environ.get("EQX_ON_ERROR")
    try:
        return importlib.import_module(f"benchmarks.{name}")
    finally:
        if before is None:
            os.environ.pop("EQX_ON_ERROR", None)
        else:
            os.environ["EQX_ON_ERROR"] = before


BI, IL = _bench("images"), _bench("images_loader")


def test_sizes_defaults_and_overrides():
    quick = BI.parse_sizes("", "quick")
    assert quick == BI.DEFAULTS["quick"] and quick is not BI.DEFAULTS["quick"]
    sz = BI.parse_sizes(
        "batch=64 cifar10.sample_steps=20;configs=cifar10 precision=float32,bfloat16", "gpu"
    )
    assert sz["small"]["batch"] == sz["cifar10"]["batch"] == 64
    assert sz["cifar10"]["sample_steps"] == 20
    assert sz["small"]["sample_steps"] == BI.DEFAULTS["gpu"]["small"]["sample_steps"]
    assert sz["configs"] == ["cifar10"] and sz["precision"] == ["float32", "bfloat16"]
    assert BI.parse_sizes("compile=none", "cpu")["compile"] == []
    assert BI.parse_sizes("compile=all", "quick")["compile"] == ["small", "cifar10"]
    assert BI.parse_sizes("configs= loader=0", "cpu")["configs"] == []
    assert BI.parse_sizes("", "gpu")["measure"] == ["train", "sample"]
    assert BI.parse_sizes("measure=sample", "gpu")["measure"] == ["sample"]
    assert BI.DEFAULTS["gpu"]["small"]["batch"] == 128  # the defaults were not mutated


@pytest.mark.parametrize(
    "spec, match",
    [
        ("batchsize=3", "unknown key 'batchsize'"),
        ("batch=many", "batch takes a int; got 'many'"),
        ("small.repeats=2", "unknown key 'small.repeats'"),
        ("configs=small,imagenet", r"configs must be among small, cifar10; got \['imagenet'\]"),
        ("precision=float16", "precision must be among"),
        ("measure=train,loss", r"measure must be among train, sample; got \['loss'\]"),
        ("cifar10.batch=0", "must be >= 1"),
        ("batch", "expected key=value"),
    ],
)
def test_sizes_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        BI.parse_sizes(spec, "cpu")


def test_measure_picks_the_rows():
    """``measure=sample`` measures sampling alone (a GPU step that re-measures only what is
    missing), with its compile time and the right number of network calls."""
    sz = BI.parse_sizes("torch=0 measure=sample repeats=1", "quick")
    rows, note = BI._network_rows(sz, "cpu")
    assert [(r["what"], r["config"], r["precision"]) for r in rows] == [
        ("sample", "small", "float32")
    ]
    assert rows[0]["jaxdiff_img_s"] > 0 and rows[0]["jaxdiff_compile_s"] > 0
    assert rows[0]["steps"] == sz["small"]["sample_steps"] and "torch=0" in note


def test_vp_coefficients_match_jaxdiff(x64):
    torch = pytest.importorskip("torch")
    IT = _bench("images_torch")

    t = np.linspace(0.0, 1.0, 101)
    a, s = IT.vp_coefficients(torch.as_tensor(t, dtype=torch.float64))
    path = jd.vp_path()
    np.testing.assert_allclose(a.numpy(), np.asarray(path.alpha(jnp.asarray(t))), rtol=1e-13)
    np.testing.assert_allclose(s.numpy(), np.asarray(path.sigma(jnp.asarray(t))), rtol=1e-13)


def test_torch_ddim_is_jaxdiff_ddim():
    # Data N(0, c^2 I): the exact eps-prediction is sigma_t x / (alpha_t^2 c^2 + sigma_t^2). The
    # hand-written PyTorch loop and jd.sample(ddim()) on the same grid and start agree to float32
    # rounding (float32 state, 10 steps: ~1e-6 relative).
    torch = pytest.importorskip("torch")
    IT = _bench("images_torch")

    c, path = 0.5, jd.vp_path()
    ts = np.linspace(1.0, IT.T_MIN, 11)
    x1 = np.array(jax.random.normal(jax.random.key(0), (8, 4, 4, 3)))

    def eps_jax(x, t):
        a, s = (v[:, None, None, None] for v in (path.alpha(t), path.sigma(t)))
        return s * x / (a**2 * c**2 + s**2)

    def eps_torch(x, t):
        a, s = (float(v) for v in IT.vp_coefficients(torch.tensor(t, dtype=torch.float64)))
        return s * x / (a**2 * c**2 + s**2)

    sol = jd.sample(
        None, path, jd.Field(eps_jax, "eps"), x1.shape, sampler=jd.samplers.ddim(),
        ts=jnp.asarray(ts), x_init=jnp.asarray(x1),
    )  # fmt: skip
    out = IT.ddim(eps_torch, torch.as_tensor(x1), ts).numpy()
    assert int(sol.nfe) == 10
    np.testing.assert_allclose(out, np.asarray(sol.x), rtol=1e-5, atol=1e-6)
    # not the identity: DDIM contracted the start towards the data's scale c alpha_s / ...
    assert np.abs(out).max() < 0.8 * np.abs(x1).max()


def test_torch_device_follows_jax():
    torch = pytest.importorskip("torch")
    IT = _bench("images_torch")

    assert IT.device("cpu") == torch.device("cpu")
    assert IT.device("gpu", "cpu") == torch.device("cpu")
    gpu = IT.device("gpu")  # a GPU against a CPU is no comparison: None without CUDA
    assert gpu == (torch.device("cuda") if torch.cuda.is_available() else None)
    with pytest.raises(ValueError, match="torch_device must be auto, cpu or cuda; got 'tpu'"):
        IT.device("cpu", "tpu")


def _torch_layout(path, shape) -> tuple:
    """jaxdiff's parameter shape in PyTorch's layout (conv OIHW, Linear (out, in))."""
    names = [getattr(k, "key", "") for k in path]
    if "MultiHeadDotProductAttention_0" in names:
        leaf, layer = names[-1], names[-2]
        if layer == "out":
            return (shape[-1], shape[0] * shape[1]) if leaf == "kernel" else shape
        return (shape[1] * shape[2], shape[0]) if leaf == "kernel" else (shape[0] * shape[1],)
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(reversed(shape)) if len(shape) == 2 else tuple(shape)


@pytest.mark.parametrize("name", ["small", "cifar10"])
def test_diffusers_unet_equals_jaxdiff_tensor_for_tensor(name):
    # The benchmark's diffusers config is jaxdiff's network: the same multiset of tensor shapes
    # (in PyTorch's layout), hence the same parameter count (1,192,387 and 35,746,307).
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    IT = _bench("images_torch")
    from jaxdiff.nets import ddpm_cifar10, small_unet

    model = (small_unet if name == "small" else ddpm_cifar10)()
    x = jnp.zeros((1, 32, 32, 3))
    params = jax.eval_shape(model.init, jax.random.key(0), x, jnp.zeros(1))
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    ours = Counter(_torch_layout(p, v.shape) for p, v in leaves)
    with torch.device("meta"):
        net = IT.unet(name, "meta", sum(v.size for _, v in leaves))
    theirs = Counter(tuple(p.shape) for p in net.parameters())
    assert ours == theirs
    assert sum(v.size for _, v in leaves) == {"small": 1_192_387, "cifar10": 35_746_307}[name]
    with pytest.raises(AssertionError, match="parameters"):
        IT.unet(name, "meta", 1)


@pytest.mark.parametrize("name", ["small", "cifar10"])
def test_diffusers_unet_computes_jaxdiff_unet(name):
    # With port_params the benchmark's diffusers net is jaxdiff's network as a function: outputs
    # agree to float32 rounding (~1e-6 relative). Random weights everywhere (no zero-initialised
    # layer hides a mismatch; jaxdiff's init would zero every block's last conv).
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    IT = _bench("images_torch")
    from jaxdiff.nets import ddpm_cifar10, small_unet

    model = (small_unet if name == "small" else ddpm_cifar10)()
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros(1))
    rng = np.random.default_rng(5)

    def draw(path, v):  # random weights at 1/sqrt(fan-in); norms' scales 1 + noise, biases noise
        z = rng.standard_normal(v.shape, np.float32)
        kind = path[-1].key
        if kind == "kernel":
            return z / np.sqrt(v.size / v.shape[-1], dtype=np.float32)
        return np.float32(1.0) + np.float32(0.1) * z if kind == "scale" else np.float32(0.1) * z

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    net = IT.unet(name, "cpu", sum(v.size for v in jax.tree.leaves(params))).eval()
    IT.port_params(net, params, model)
    x = np.array(jax.random.normal(jax.random.key(1), (2, 32, 32, 3)))
    t = np.array([0.3, 0.8], np.float32)
    ours = np.asarray(jax.jit(model.apply)(params, jnp.asarray(x), jnp.asarray(t)))
    with torch.no_grad():
        out = net(torch.as_tensor(x.transpose(0, 3, 1, 2).copy()), torch.as_tensor(1000 * t))
    theirs = out.sample.numpy().transpose(0, 2, 3, 1)
    assert np.abs(ours).max() > 0.5
    np.testing.assert_allclose(theirs, ours, atol=2e-5 * np.abs(ours).max(), rtol=0)


def test_timed_counts_waiting():
    def slow():
        for i in range(3):
            time.sleep(0.02)
            yield i

    it = IL.Timed(slow())
    assert list(it) == [0, 1, 2]
    assert it.count == 4  # three items and the StopIteration
    assert it.wait_s >= 0.06  # time.sleep sleeps at least as long as asked


@pytest.mark.parametrize("per_image", [False, True])
def test_grain_pipeline_is_the_loaders(per_image):
    # Each batch holds source images, each as it is or flipped left-right, with its label; the
    # first epoch (4 batches of 8 of 32 images) visits every image once.
    pytest.importorskip("grain")
    from jaxdiff.loader import ArraySource

    n, b = 32, 8
    images = np.zeros((n, 2, 3, 1), np.uint8)
    images[:, 0, :, 0] = np.arange(n)[:, None] * 7 + np.arange(3)  # rows tell index and side
    src = ArraySource(images, np.arange(n) % 5)
    it = IL.grain_batches(src, b, threads=2, per_image=per_image, labels=True)
    seen, flipped = [], 0
    for _ in range(n // b):
        x, y = next(it)
        assert x.shape == (b, 2, 3, 1) and x.dtype == np.uint8 and y.shape == (b,)
        for img, label in zip(x, y, strict=True):
            i = int(img[0, :, 0].min()) // 7
            flip = bool(img[0, 0, 0] > img[0, 2, 0])
            want = images[i, :, ::-1] if flip else images[i]
            np.testing.assert_array_equal(img, want)
            assert label == i % 5
            seen.append(i)
            flipped += flip
    assert sorted(seen) == list(range(n))
    # flips ~ Binomial(32, 1/2): 1..31 fails with probability 2^-31 for a fixed seed
    assert 0 < flipped < n


def test_rows_from_a_cut_log_become_the_result_files(tmp_path):
    """A run stopped at its time limit leaves only its log: ``benchmarks.from_log`` turns the
    logged rows (``images._log_row``) back into result rows, in order, with the benchmark's keys
    and no column that no row fills."""
    BI, FL = _bench("images"), _bench("from_log")
    first = dict.fromkeys(BI.KEYS) | dict(what="train", config="small", jaxdiff_img_s=2.0, params=7)
    second = dict.fromkeys(BI.KEYS) | dict(what="loader npz", config="-", prefetch=2)
    log, out = tmp_path / "bench.log", io.StringIO()
    with contextlib.redirect_stdout(out):
        BI._log_row(first)
        print("  [images] small float32: sampling, batch 128, 100 DDIM steps")
        BI._log_row(second)
    log.write_text("== header\n" + out.getvalue() + "== images small: exit 124\n")
    rows = FL.rows_from_logs([log.read_text()])
    assert rows == [
        {"what": "train", "config": "small", "jaxdiff_img_s": 2.0, "params": 7, "prefetch": None},
        {"what": "loader npz", "config": "-", "jaxdiff_img_s": None, "params": None, "prefetch": 2},
    ]
    assert FL.main([str(log), "--out", str(tmp_path), "--tag", "t", "--env", "device=gpu:X"]) == 0
    text = (tmp_path / "t.md").read_text()
    assert "# jaxdiff benchmarks on gpu:X" in text and "total time not recorded" in text
    assert "| train | small | 2 | 7 |  |" in text
    with pytest.raises(SystemExit, match="no '\\[images\\] row' lines"):
        FL.main([str(tmp_path / "t.md"), "--out", str(tmp_path), "--tag", "u"])
