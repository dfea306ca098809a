"""Images at 32x32x3: U-Net training and sampling images/s, jaxdiff against the same network in
PyTorch (diffusers' ``UNet2DModel``, eager and ``torch.compile``), and the image loader.

Networks: ``jaxdiff.nets.small_unet`` (1,192,387 parameters) and ``ddpm_cifar10`` (35,746,307,
dropout 0.1), each against ``diffusers.UNet2DModel`` configured as their docstrings say
(``benchmarks/images_torch.py``); the parameter counts are asserted equal. Same work both sides:

* training: DDPM's eps loss on the VP path written out by hand (``t ~ U(1e-3, 1)``, ``x_t =
  alpha_t x + sigma_t eps``, mean squared error; dropout active), AdamW (lr 1e-4, no weight decay)
  after clipping the gradient norm to 1, an EMA of the weights (0.999) every step; batches drawn
  on the device from 512 images in device memory. jaxdiff: ``make_train_step`` in
  ``make_train_chunk`` (one jitted scan of K steps); PyTorch: a loop of K steps. images/s = K *
  batch / time per call.
* sampling: DDIM (eta 0) on the VP path, the same uniform grid of S steps from t = 1 to 1e-3
  (``jd.sample`` with ``ddim()`` and ``ts=``; PyTorch: a no_grad loop of S network calls and the
  same update), S network evaluations; images/s = batch / time per call.
* loader: images/s that ``jaxdiff.loader`` (``prefetch``, sharded over the data mesh) and grain
  deliver on the device from an ``.npz``, a folder of PNGs decoded on the fly and decoded once
  (``jaxdiff.data.shapes``: noisy, ~2.3 KB PNGs like CIFAR-10's); then the same loaders feeding
  the training step (``make_feed_chunk``, chunks read back one by one as ``jaxdiff.train.train``
  does), with prefetch depth 2 and K (one chunk), against device-resident data.

Fairness: torch threads = the cores JAX uses; ``torch.no_grad()`` for sampling; every timed call
synchronised (``block_until_ready``, ``torch.cuda.synchronize``); compile time (jaxdiff: trace +
XLA; PyTorch: first call, inductor for ``torch.compile``) excluded from the rates and reported; the
three sides timed round-robin. On a GPU: float32 allows TF32 on both sides (XLA's default; torch's
flags set to match), bfloat16 rows compare jaxdiff's ``dtype=bfloat16`` (float32 params) with
``torch.autocast``; fused AdamW and cuDNN autotuning for PyTorch.

Sizes: defaults per mode (``--quick``: small_unet eager only, ~1 minute; CPU; GPU; see
``DEFAULTS``), overridden by the environment variable ``JAXDIFF_BENCH_IMAGES``, ``key=value``
pairs separated by spaces or ``;``: ``configs``, ``precision`` (``float32,bfloat16``),
``compile`` (configs under ``torch.compile``; ``none``, ``all``), ``compile_mode``,
``torch_device`` (``auto``: PyTorch on the device JAX uses), ``torch=0``, ``repeats``,
``channels_last=1`` (PyTorch's U-Net and images in ``torch.channels_last``, its fast path for
convolutions on NVIDIA GPUs),
``measure`` (``train,sample``: which rows of each config and precision); ``batch``,
``train_steps``, ``sample_steps`` (both configs, or one: ``cifar10.batch``); the loader's
``loader=0``, ``grain=0``, ``threads``, ``loader_images``, ``loader_batch``, ``loader_batches``,
``feed_batch``, ``feed_steps``, ``feed_chunks``. E.g. a smoke test of every path::

    JAXDIFF_BENCH_IMAGES="configs=small,cifar10 compile=all" python -m benchmarks --quick --only images

On a GPU, leave PyTorch room: JAX preallocates 75% of the memory unless
``XLA_PYTHON_CLIENT_MEM_FRACTION=0.45`` (say) is set before the run.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxdiff as jd
from benchmarks import images_loader as IL
from benchmarks.common import interleaved

TITLE = (
    "Images 32x32x3: U-Net training and sampling images/s, jaxdiff vs diffusers UNet2DModel "
    "(eager, torch.compile); the image loader vs grain"
)
ENV = "JAXDIFF_BENCH_IMAGES"
CONFIGS = ("small", "cifar10")
THREADS = min(8, len(os.sched_getaffinity(0)))  # decode threads of both loaders
T_MIN, LR, EMA = 1e-3, 1e-4, 0.999
KEYS = (
    "what", "config", "precision", "batch", "steps", "jaxdiff_img_s", "torch_eager_img_s",
    "torch_compile_img_s", "speedup_vs_eager", "speedup_vs_compile", "jaxdiff_compile_s",
    "torch_eager_first_s", "torch_compile_s", "params", "prefetch", "grain_img_s",
    "resident_img_s", "data_wait_fraction", "grain_wait_fraction",
)  # fmt: skip
_NET = dict(batch=int, train_steps=int, sample_steps=int)
_TOP = dict(
    configs=list, precision=list, measure=list, compile=list, compile_mode=str, torch_device=str, torch=int, repeats=int, channels_last=int,
    loader=int, grain=int, threads=int, loader_images=int, loader_batch=int, loader_batches=int,
    feed_batch=int, feed_steps=int, feed_chunks=int,
)  # fmt: skip
_BASE = dict(
    configs=["small", "cifar10"], precision=["float32"], measure=["train", "sample"],
    compile=["small", "cifar10"],
    compile_mode="default", torch_device="auto", torch=1, repeats=3, channels_last=0, loader=1, grain=1,
    threads=THREADS, loader_images=10_000, loader_batch=128, loader_batches=40, feed_batch=128,
    feed_steps=10, feed_chunks=3,
)  # fmt: skip
DEFAULTS = {
    "quick": {
        **_BASE, "small": dict(batch=4, train_steps=1, sample_steps=2),
        "cifar10": dict(batch=2, train_steps=1, sample_steps=1), "configs": ["small"],
        "compile": [], "repeats": 1, "loader_images": 256, "loader_batch": 32,
        "loader_batches": 3, "feed_batch": 8, "feed_steps": 2, "feed_chunks": 1,
    },
    "cpu": {
        **_BASE, "small": dict(batch=128, train_steps=4, sample_steps=10),
        "cifar10": dict(batch=32, train_steps=1, sample_steps=2),
    },
    "gpu": {
        **_BASE, "small": dict(batch=128, train_steps=50, sample_steps=100),
        "cifar10": dict(batch=128, train_steps=20, sample_steps=100),
        "precision": ["float32", "bfloat16"], "repeats": 5, "loader_batches": 100,
        "feed_steps": 50, "feed_chunks": 5,
    },
}  # fmt: skip


def parse_sizes(spec: str, mode: str) -> dict:
    """``DEFAULTS[mode]`` with the ``key=value`` overrides of ``spec`` (``batch``,
    ``train_steps``, ``sample_steps`` set both configs, ``small.batch`` one; lists are
    comma-separated; ``compile=none`` compiles neither). ``ValueError`` on unknown keys/values."""
    sizes = copy.deepcopy(DEFAULTS[mode])
    for item in spec.replace(";", " ").split():
        key, sep, value = item.partition("=")
        config, dot, field = key.rpartition(".")
        if not sep or (not value and _TOP.get(key) is not list):
            raise ValueError(f"{ENV}: expected key=value; got {item!r}")
        try:
            if dot and config in CONFIGS and field in _NET:
                sizes[config][field] = _NET[field](value)
            elif key in _NET:
                for c in CONFIGS:
                    sizes[c][key] = _NET[key](value)
            elif key in _TOP:
                kind = _TOP[key]
                sizes[key] = [v for v in value.split(",") if v] if kind is list else kind(value)
            else:
                known = sorted([*_NET, *_TOP, *(f"{c}.{f}" for c in CONFIGS for f in _NET)])
                raise ValueError(f"{ENV}: unknown key {key!r}; known: {', '.join(known)}")
        except ValueError as err:
            if str(err).startswith(ENV):
                raise
            raise ValueError(f"{ENV}: {key} takes a {_NET.get(field, _TOP.get(key)).__name__}; "
                             f"got {value!r}") from None  # fmt: skip
    if sizes["compile"] in (["none"], ["all"]):
        sizes["compile"] = [] if sizes["compile"] == ["none"] else list(CONFIGS)
    checks = (
        ("configs", CONFIGS),
        ("compile", CONFIGS),
        ("precision", PRECISIONS),
        ("measure", MEASURE),
    )
    for key, allowed in checks:
        bad = [v for v in sizes[key] if v not in allowed]
        if bad:
            raise ValueError(f"{ENV}: {key} must be among {', '.join(allowed)}; got {bad}")
    numbers = [*(sizes[c][f] for c in CONFIGS for f in _NET), sizes["repeats"]]
    numbers += [sizes[k] for k in ("threads", "loader_batch", "feed_batch", "feed_steps")]
    if min(numbers) < 1:
        raise ValueError(f"{ENV}: sizes, steps, repeats and threads must be >= 1; got {sizes}")
    return sizes


PRECISIONS = {"float32": None, "bfloat16": jnp.bfloat16}
MEASURE = ("train", "sample")


_T0 = time.perf_counter()


def _log(msg: str) -> None:
    print(f"  [images] {time.perf_counter() - _T0:6.1f} s {msg}", flush=True)


def _log_row(row: dict) -> None:
    """A measured row at once (a run cut short by a time limit keeps what it measured)."""
    _log("row " + json.dumps({k: v for k, v in row.items() if v is not None}))


def _jax_unet(name: str, dtype):
    """The U-Net in ``dtype`` and its initial weights (key 0; float32 whatever ``dtype``, so they
    are drawn once per config: a ddpm_cifar10 init compiles for ~18 s on the 2-core CPU)."""
    from jaxdiff.nets import ddpm_cifar10, small_unet

    return (small_unet if name == "small" else ddpm_cifar10)(dtype=dtype), _initial(name)


@functools.cache
def _initial(name: str) -> dict:
    from jaxdiff.nets import ddpm_cifar10, init_params, small_unet

    model = (small_unet if name == "small" else ddpm_cifar10)()
    return init_params(model, jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros(1))


def jax_train_step(name: str, dtype=None):
    """jaxdiff's train step on the eps loss written out (dropout active), a fresh state, the
    parameter count."""
    from jaxdiff.train import init_train_state, make_train_step

    model, params = _jax_unet(name, dtype)
    path = jd.vp_path()

    def loss(params, key, x):
        k_t, k_eps, k_drop = jax.random.split(key, 3)
        t = jax.random.uniform(k_t, (x.shape[0],), minval=T_MIN, maxval=1.0)
        eps = jax.random.normal(k_eps, x.shape)
        a, s = (c[:, None, None, None] for c in (path.alpha(t), path.sigma(t)))
        pred = model.apply(params, a * x + s * eps, t, rngs={"dropout": k_drop})
        return jnp.mean(jnp.square(pred.astype(jnp.float32) - eps))

    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(LR, weight_decay=0.0))
    step = make_train_step(loss, opt, ema_decay=EMA, ema_warmup=False)
    state = init_train_state(params, opt, jax.random.key(1))
    return step, state, sum(x.size for x in jax.tree.leaves(params))


def jax_sampler(name: str, dtype, batch: int, steps: int):
    """A jitted ``key -> images``: DDIM (eta 0) on the VP path, ``steps`` network calls."""
    model, params = _jax_unet(name, dtype)
    field = jd.Field(model.apply, "eps", params)
    ts = jnp.linspace(1.0, T_MIN, steps + 1)

    @jax.jit
    def draw(key):
        sol = jd.sample(
            key, jd.vp_path(), field, (batch, 32, 32, 3), sampler=jd.samplers.ddim(), ts=ts
        )
        return sol.x, sol.nfe

    return draw


def _jax_train(name: str, dtype, data, batch: int, steps: int):
    """A thunk running ``steps`` train steps (one ``make_train_chunk`` call) on batches drawn on
    the device from ``data``; the parameter count."""
    step, state, count = jax_train_step(name, dtype)
    from jaxdiff.train import make_train_chunk

    chunk = make_train_chunk(
        step, lambda key: data[jax.random.randint(key, (batch,), 0, data.shape[0])], steps
    )
    box = [state]

    def run():
        box[0], losses = chunk(box[0])
        return losses

    return run, count


def _pixels(n: int = 512) -> np.ndarray:
    return np.asarray(jd.data.shapes(n, 32)[0], np.float32) / 127.5 - 1.0


def _row(what, name, precision, batch, steps, res, images, count) -> dict:
    rates = {k: images / v["median_s"] for k, v in res.items()}
    row = dict.fromkeys(KEYS)
    row.update(
        what=what, config=name, precision=precision, batch=batch, steps=steps,
        jaxdiff_img_s=rates["jaxdiff"], torch_eager_img_s=rates.get("eager"),
        torch_compile_img_s=rates.get("compile"), jaxdiff_compile_s=res["jaxdiff"]["compile_s"],
        torch_eager_first_s=res.get("eager", {}).get("compile_s"),
        torch_compile_s=res.get("compile", {}).get("compile_s"), params=count,
    )  # fmt: skip
    if "eager" in rates:
        row["speedup_vs_eager"] = rates["jaxdiff"] / rates["eager"]
    if "compile" in rates:
        row["speedup_vs_compile"] = rates["jaxdiff"] / rates["compile"]
    return row


def _network_rows(sz: dict, platform: str) -> tuple[list[dict], str]:
    dev, note = None, "no PyTorch rows (torch=0)"
    if sz["torch"]:
        try:
            import diffusers  # noqa: F401

            from benchmarks import images_torch as IT

            dev = IT.device(platform, sz["torch_device"])
            if dev is None:
                note = "no PyTorch rows: JAX runs on a GPU and this PyTorch has no CUDA"
            else:
                note = IT.setup(dev)
                if sz["compile"] and not IT.compile_works(dev):
                    note += f"; torch.compile fails on {dev} (Inductor): eager rows only"
                    sz = {**sz, "compile": []}
        except ImportError as err:
            note = f"no PyTorch rows ({err}; pip install -e '.[bench]')"
    rows, pixels = [], _pixels()
    for name in sz["configs"]:
        batch, k, s = (sz[name][f] for f in ("batch", "train_steps", "sample_steps"))
        for precision in sz["precision"]:
            dtype, bf16 = PRECISIONS[precision], precision == "bfloat16"
            count = sum(x.size for x in jax.tree.leaves(_initial(name)))
            train, sample = None, None
            if "train" in sz["measure"]:
                train = {"jaxdiff": _jax_train(name, dtype, jnp.asarray(pixels), batch, k)[0]}
            if "sample" in sz["measure"]:
                draw = jax_sampler(name, dtype, batch, s)
                start = time.perf_counter()
                nfe = int(draw(jax.random.key(0))[1])  # compiles (timed: the row's compile time)
                sample_compile_s = time.perf_counter() - start
                assert nfe == s, f"jaxdiff's DDIM made {nfe} network calls, not {s}"
                keys = iter(jax.random.split(jax.random.key(1), 100_000))
                sample = {"jaxdiff": lambda draw=draw, keys=keys: draw(next(keys))[0]}
            if dev is not None:
                import torch

                data_t = torch.as_tensor(pixels.transpose(0, 3, 1, 2).copy(), device=dev)
                torch.manual_seed(0)
                kinds = ["eager"] + (["compile"] if name in sz["compile"] else [])
                jax_model, weights = _jax_unet(name, None)  # jaxdiff's initial weights (key 0)
                for kind in kinds:
                    net = IT.unet(name, dev, count)
                    IT.port_params(net, weights, jax_model)  # the same function, the same start
                    c = kind == "compile"
                    mode = sz["compile_mode"]
                    cl = bool(sz["channels_last"])
                    if train is not None:
                        train[kind] = IT.train_thunk(net, data_t, batch, k, dev, bf16, c, mode, cl)
                    if sample is not None:
                        sample[kind] = IT.sample_thunk(net, batch, s, dev, bf16, c, mode, cl)
            if train is not None:
                _log(f"{name} {precision}: training, batch {batch}, {k} steps per call")
                res = interleaved(train, repeats=sz["repeats"])
                rows.append(_row("train", name, precision, batch, k, res, batch * k, count))
                _log_row(rows[-1])
            if sample is not None:
                _log(f"{name} {precision}: sampling, batch {batch}, {s} DDIM steps")
                res = interleaved(sample, repeats=sz["repeats"])
                res["jaxdiff"]["compile_s"] = sample_compile_s
                rows.append(_row("sample", name, precision, batch, s, res, batch, count))
                _log_row(rows[-1])
            del train, sample
    return rows, note


def _loader_rows(sz: dict) -> tuple[list[dict], str]:
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxdiff import loader as LD
    from jaxdiff.train import data_mesh, make_feed_chunk, make_train_chunk, replicate

    n, lb, threads = sz["loader_images"], sz["loader_batch"], sz["threads"]
    fb, k, chunks = sz["feed_batch"], sz["feed_steps"], sz["feed_chunks"]
    mesh = data_mesh()
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    have_grain = bool(sz["grain"])
    if have_grain:
        try:
            import grain  # noqa: F401
        except ImportError:
            have_grain = False
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        x, y = jd.data.shapes(n, 32)
        _log(f"loader: writing {n} PNGs")
        LD.save_image_folder(f"{tmp}/png", x, y)
        np.savez(f"{tmp}/d.npz", images=x, labels=y)
        sources = {
            "npz": LD.load_npz(f"{tmp}/d.npz"),
            "folder": LD.ImageFolder(f"{tmp}/png", threads=threads),
        }
        sources["folder-memory"] = sources["folder"].load()
        for name, source in sources.items():
            _log(f"loader {name}: {sz['loader_batches']} batches of {lb}")
            row = dict.fromkeys(KEYS)
            row.update(what=f"loader {name}", config="-", precision="uint8", batch=lb)
            row.update(steps=sz["loader_batches"], prefetch=2)
            with LD.prefetch(LD.ImageLoader(source, lb, seed=0).iterate(0), mesh) as it:
                row["jaxdiff_img_s"] = IL.delivered(it, sz["loader_batches"])
            if have_grain:
                it = IL.Timed(IL.grain_batches(
                    source, lb, threads=threads, sharding=sharding, per_image=name == "folder",
                    labels=True,
                ))  # fmt: skip
                row["grain_img_s"] = IL.delivered(it, sz["loader_batches"])
                it.close()
            rows.append(row)
            _log_row(row)

        # Training small_unet fed by each loader, against the same chunks on resident data.
        step, state0, count = jax_train_step("small")
        pixels = jnp.asarray(x)
        resident = make_train_chunk(
            step, lambda key: LD.to_float(pixels[jax.random.randint(key, (fb,), 0, n)]), k,
            mesh=mesh,
        )  # fmt: skip

        def fresh():  # chunks donate the state; replicated on the mesh as the CLI does (a fresh
            # state would compile make_feed_chunk's scan twice: its output is committed there)
            return replicate(jax.tree.map(jnp.copy, state0), mesh)

        _log(f"train+loader: resident data, batch {fb}, {k} steps per chunk, {chunks} chunks")
        resident_s = IL.timed_chunks(resident, fresh(), chunks)[1]
        for name in ("npz", "folder"):
            for depth in sorted({2, k}):
                _log(f"train+loader {name}: prefetch {depth}")
                row = dict.fromkeys(KEYS)
                row.update(what=f"train+loader {name}", config="small", precision="float32")
                row.update(batch=fb, steps=k, params=count, prefetch=depth)
                loader = LD.ImageLoader(sources[name], fb, seed=0, labels=False)
                with LD.prefetch(loader.iterate(0), mesh, size=depth) as it:
                    feed = make_feed_chunk(step, it, k, mesh=mesh, preprocess=LD.to_float)
                    _, sec, wait = IL.timed_chunks(feed, fresh(), chunks, it)
                row.update(jaxdiff_img_s=chunks * k * fb / sec, data_wait_fraction=wait / sec)
                if have_grain:
                    it = IL.Timed(IL.grain_batches(
                        sources[name], fb, threads=threads, sharding=sharding,
                        per_image=name == "folder", buffer=depth,
                    ))  # fmt: skip
                    feed = make_feed_chunk(step, it, k, mesh=mesh, preprocess=LD.to_float)
                    _, sec, wait = IL.timed_chunks(feed, fresh(), chunks, it)
                    it.close()
                    row.update(grain_img_s=chunks * k * fb / sec, grain_wait_fraction=wait / sec)
                row["resident_img_s"] = chunks * k * fb / resident_s
                rows.append(row)
                _log_row(row)
    note = (
        f"Loader: {n} images 32x32x3 (shapes, ~2.3 KB PNGs), {threads} decode threads; 'loader' "
        f"rows: {sz['loader_batches']} batches of {lb} delivered on the device (labels included). "
        f"'train+loader' rows: small_unet trained on batches of {fb} from the loader, {chunks} "
        f"chunks of {k} steps (make_feed_chunk; each chunk's loss read back, as train() does), "
        "prefetch = batches the loader thread may run ahead (jaxdiff: prefetch(size=); grain: "
        "cpu_buffer_size, plus 2 on the device); resident_img_s: the same chunks on data in "
        "device memory; *_wait_fraction: time in next() / chunk time. grain: "
        + ("installed" if have_grain else "not run (pip install grain, or grain=0 given)")
        + "."
    )
    return rows, note


def run(quick: bool) -> dict:
    dev = jax.devices()[0]
    mode = "quick" if quick else ("gpu" if dev.platform == "gpu" else "cpu")
    sz = parse_sizes(os.environ.get(ENV, ""), mode)
    _log(f"mode {mode}, sizes {sz}")
    rows, notes = [], []
    if sz["configs"]:
        net_rows, torch_note = _network_rows(sz, dev.platform)
        rows += net_rows
        notes.append(torch_note)
    if sz["loader"]:
        loader_rows, loader_note = _loader_rows(sz)
        rows += loader_rows
        notes.append(loader_note)
    shown = {c: tuple(sz[c].values()) for c in sz["configs"]}
    notes.insert(
        0,
        f"JAX on {dev.platform}:{getattr(dev, 'device_kind', '')} ({jax.device_count()} devices, "
        f"mode {mode}); (batch, train steps per call, DDIM steps) {shown}, precisions "
        f"{sz['precision']}, torch.compile ({sz['compile_mode']}) for {sz['compile']}"
        + (", PyTorch in channels_last" if sz["channels_last"] else "")
        + f"; median of {sz['repeats']} "
        "interleaved calls. speedup = jaxdiff images/s / PyTorch images/s (> 1: jaxdiff faster); "
        "compile times: jaxdiff_compile_s (first call: trace + XLA), torch_eager_first_s (first "
        "eager call), torch_compile_s (first call under torch.compile: inductor). Sizes: "
        f"{ENV}='key=value ...' (benchmarks/images.py).",
    )
    return {"rows": rows, "notes": " ".join(notes)}
