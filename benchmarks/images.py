"""Images at 32x32x3: U-Net training and sampling images/s, jaxdiff against the same network in
PyTorch (diffusers' ``UNet2DModel``, eager and ``torch.compile``), and the image loader.

Networks: ``jaxdiff.nets.small_unet`` (1,192,387 parameters) and ``ddpm_cifar10`` (35,746,307,
dropout 0.1), each against ``diffusers.UNet2DModel`` configured as their docstrings say; the
parameter counts are asserted equal. Same work on both sides:

* training: DDPM's eps loss on the VP path written out by hand on both sides (``t ~ U(1e-3, 1)``,
  ``x_t = alpha_t x + sigma_t eps``, mean squared error; dropout active in training), AdamW
  (lr 1e-4, no weight decay) after clipping the gradient norm to 1, and an EMA of the weights
  (decay 0.999) updated every step; batches drawn on the device from an in-memory set of images.
  jaxdiff runs ``make_train_step`` in ``make_train_chunk`` (one jitted scan of K steps);
  PyTorch a loop of K steps. images/s = K * batch / time.
* sampling: DDIM (eta 0) on the VP path, the same uniform grid of S steps from t = 1 to 1e-3 on
  both sides (``jd.sample`` with ``ddim()`` and ``ts=``; PyTorch: a no_grad loop of S network calls
  and the same update), S network evaluations; images/s = batch / time.
* loader rows: images/s that ``jaxdiff.loader`` delivers on the device (``prefetch`` with the
  data mesh's sharding) from an ``.npz``, a folder of PNGs decoded on the fly (``folder``) and
  decoded once (``folder-memory``), batches of 128 at 32x32x3 from ``jaxdiff.data.shapes``
  (noisy, ~2.3 KB per PNG like CIFAR-10's); with Google's ``grain`` (if installed) running the
  same pipelines for comparison. The ``train+loader`` row trains small_unet from the PNG folder
  through ``make_feed_chunk`` and reports the fraction of the time spent waiting for data and
  the images/s without the loader (device-resident data) measured alongside.

Fairness (design note): ``torch.set_num_threads`` = JAX's cores, ``torch.no_grad()`` for sampling,
every timed call synchronised (``block_until_ready``, ``torch.cuda.synchronize``), compile time
(jaxdiff: trace + XLA; PyTorch: first call, ``torch.compile``'s inductor) excluded from the
rates and reported, the three sides timed round-robin. On a GPU: float32 rows allow TF32 on both
sides (XLA's default for float32 convolutions and dots; PyTorch's flags set to match), and
bfloat16 rows compare jaxdiff's ``dtype=bfloat16`` (float32 params) with ``torch.autocast``.
"""

from __future__ import annotations

import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxdiff as jd
from benchmarks.common import interleaved

TITLE = (
    "Images 32x32x3: U-Net training and sampling images/s, jaxdiff vs diffusers UNet2DModel "
    "(eager, torch.compile); the image loader"
)

DIFFUSERS = {
    "small": dict(
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=16,
        norm_num_groups=8,
        resnet_time_scale_shift="scale_shift",
        attn_norm_num_groups=8,
    ),
    "cifar10": dict(
        layers_per_block=2,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None,
        norm_num_groups=32,
        dropout=0.1,
    ),
}
COMMON = dict(
    sample_size=32, in_channels=3, out_channels=3, norm_eps=1e-6, downsample_padding=0,
    flip_sin_to_cos=False, freq_shift=1,
)  # fmt: skip
T_MIN, LR, EMA = 1e-3, 1e-4, 0.999
KEYS = (
    "what", "config", "precision", "batch", "steps", "jaxdiff_img_s", "torch_eager_img_s",
    "torch_compile_img_s", "speedup_vs_eager", "speedup_vs_compile", "jaxdiff_compile_s",
    "torch_eager_first_s", "torch_compile_s", "grain_img_s", "data_wait_fraction", "params",
)  # fmt: skip


def _sizes(quick: bool, gpu: bool) -> dict:
    """(batch, train steps per call, sampling steps) per config, and repeats."""
    if quick:
        return {"small": (4, 1, 2), "cifar10": (2, 1, 2), "repeats": 1, "compile_cifar": False}
    if gpu:
        return {"small": (128, 20, 50), "cifar10": (128, 10, 50), "repeats": 5, "compile_cifar": 1}
    return {"small": (128, 2, 10), "cifar10": (128, 1, 2), "repeats": 3, "compile_cifar": True}


def _jax_unet(name: str, dtype):
    from jaxdiff.nets import ddpm_cifar10, init_params, small_unet

    model = (small_unet if name == "small" else ddpm_cifar10)(dtype=dtype)
    params = init_params(model, jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros(1))
    return model, params


def _torch_unet(name: str, device, count: int):
    import diffusers

    net = diffusers.UNet2DModel(**COMMON, **DIFFUSERS[name]).to(device)
    n = sum(p.numel() for p in net.parameters())
    assert n == count, f"{name}: diffusers has {n} parameters, jaxdiff {count}"
    return net


def _coefficients(t):
    path = jd.vp_path()
    return path.alpha(t), path.sigma(t)


def _jax_step(name, dtype):
    """jaxdiff's train step on the hand-written eps loss, a fresh state, the parameter count."""
    from jaxdiff.train import init_train_state, make_train_step

    model, params = _jax_unet(name, dtype)

    def loss(params, key, x):
        k_t, k_eps, k_drop = jax.random.split(key, 3)
        t = jax.random.uniform(k_t, (x.shape[0],), minval=T_MIN, maxval=1.0)
        eps = jax.random.normal(k_eps, x.shape)
        a, s = _coefficients(t)
        xt = a[:, None, None, None] * x + s[:, None, None, None] * eps
        pred = model.apply(params, xt, t, rngs={"dropout": k_drop})
        return jnp.mean(jnp.square(pred - eps))

    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(LR, weight_decay=0.0))
    step = make_train_step(loss, opt, ema_decay=EMA, ema_warmup=False)
    state = init_train_state(params, opt, jax.random.key(1))
    return step, state, sum(x.size for x in jax.tree.leaves(params))


def _jax_train(name, dtype, data, batch, steps):
    """``K`` steps per call of ``make_train_chunk`` on batches drawn on the device from ``data``."""
    from jaxdiff.train import make_train_chunk

    step, state, count = _jax_step(name, dtype)

    def sample_batch(key):
        return data[jax.random.randint(key, (batch,), 0, data.shape[0])]

    chunk = make_train_chunk(step, sample_batch, steps)
    state = [state]

    def run():
        state[0], losses = chunk(state[0])
        return losses

    return run, count


def _sync(torch, device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _torch_train(net, data, batch, steps, device, bf16, compiled):
    import torch

    fn = torch.compile(net) if compiled else net
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=0.0)
    ema = [p.detach().clone() for p in net.parameters()]
    params = list(net.parameters())
    b0, b1 = 0.1, 20.0  # jd.vp_path(): log alpha_t = -(b0 t + (b1 - b0) t^2 / 2) / 2

    def run():
        for _ in range(steps):
            x = data[torch.randint(0, data.shape[0], (batch,), device=device)]
            t = T_MIN + (1.0 - T_MIN) * torch.rand(batch, device=device)
            log_a = -0.25 * t**2 * (b1 - b0) - 0.5 * t * b0
            a = torch.exp(log_a)[:, None, None, None]
            s = torch.sqrt(-torch.expm1(2.0 * log_a))[:, None, None, None]
            eps = torch.randn_like(x)
            with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                pred = fn(a * x + s * eps, t * 1000.0).sample
            loss = torch.mean(torch.square(pred.float() - eps))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - EMA)
        _sync(torch, device)
        return None

    return run


def _jax_sample(name, dtype, batch, steps):
    model, params = _jax_unet(name, dtype)
    field = jd.Field(model.apply, "eps", params)
    ts = jnp.linspace(1.0, T_MIN, steps + 1)

    @jax.jit
    def draw(key):
        shape = (batch, 32, 32, 3)
        sol = jd.sample(key, jd.vp_path(), field, shape, sampler=jd.samplers.ddim(), ts=ts)
        return sol.x, sol.nfe

    assert int(draw(jax.random.key(0))[1]) == steps, "jaxdiff's DDIM must make S evaluations"
    keys = iter(jax.random.split(jax.random.key(1), 10_000))
    return lambda: draw(next(keys))[0]


def _torch_sample(net, batch, steps, device, bf16, compiled):
    import torch

    net.eval()
    fn = torch.compile(net) if compiled else net
    ts = np.linspace(1.0, T_MIN, steps + 1)
    a, s = (np.asarray(c, np.float64) for c in _coefficients(jnp.asarray(ts)))

    def run():
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            x = torch.randn(batch, 3, 32, 32, device=device)
            for i in range(steps):
                t = torch.full((batch,), float(ts[i]) * 1000.0, device=device)
                eps = fn(x, t).sample.float()
                x0 = (x - float(s[i]) * eps) / float(a[i])
                x = float(a[i + 1]) * x0 + float(s[i + 1]) * eps
        _sync(torch, device)
        return None

    return run


def _row(what, name, precision, batch, steps, res, images, count) -> dict:
    rates = {k: images / v["median_s"] for k, v in res.items()}
    row = dict.fromkeys(KEYS)
    row.update(
        what=what, config=name, precision=precision, batch=batch, steps=steps,
        jaxdiff_img_s=rates["jaxdiff"], torch_eager_img_s=rates.get("eager"),
        torch_compile_img_s=rates.get("compile"), jaxdiff_compile_s=res["jaxdiff"]["compile_s"],
        torch_eager_first_s=res["eager"]["compile_s"] if "eager" in res else None,
        torch_compile_s=res["compile"]["compile_s"] if "compile" in res else None, params=count,
    )  # fmt: skip
    if "eager" in rates:
        row["speedup_vs_eager"] = rates["jaxdiff"] / rates["eager"]
    if "compile" in rates:
        row["speedup_vs_compile"] = rates["jaxdiff"] / rates["compile"]
    return row


def _network_rows(quick: bool) -> tuple[list[dict], str]:
    import torch

    gpu = jax.devices()[0].platform == "gpu"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    sizes = _sizes(quick, gpu)
    rows = []
    for name in ("small", "cifar10"):
        batch, train_steps, sample_steps = sizes[name]
        compile_it = name == "small" or sizes["compile_cifar"]
        for precision in ("float32", "bfloat16") if gpu else ("float32",):
            dtype, bf16 = (jnp.bfloat16, True) if precision == "bfloat16" else (None, False)
            pixels = np.asarray(jd.data.shapes(512, 32)[0], np.float32) / 127.5 - 1.0
            run_jax, count = _jax_train(name, dtype, jnp.asarray(pixels), batch, train_steps)
            data_t = torch.as_tensor(pixels.transpose(0, 3, 1, 2).copy(), device=device)
            torch.manual_seed(0)
            nets = {"eager": _torch_unet(name, device, count)}
            if compile_it:
                nets["compile"] = _torch_unet(name, device, count)
            thunks = {"jaxdiff": run_jax}
            for kind, net in nets.items():
                thunks[kind] = _torch_train(
                    net, data_t, batch, train_steps, device, bf16, kind == "compile"
                )
            res = interleaved(thunks, repeats=sizes["repeats"])
            images = batch * train_steps
            rows.append(_row("train", name, precision, batch, train_steps, res, images, count))
            thunks = {"jaxdiff": _jax_sample(name, dtype, batch, sample_steps)}
            for kind, net in nets.items():
                thunks[kind] = _torch_sample(
                    net, batch, sample_steps, device, bf16, kind == "compile"
                )
            res = interleaved(thunks, repeats=sizes["repeats"])
            rows.append(_row("sample", name, precision, batch, sample_steps, res, batch, count))
    return rows, f"PyTorch {torch.__version__} on {device}"


def _delivered(it, batches: int) -> float:
    """Images/s that the iterator ``it`` delivers (device batches), after 2 warm-up batches."""
    for _ in range(2):
        jax.block_until_ready(next(it))
    start = time.perf_counter()
    for _ in range(batches):
        x = jax.block_until_ready(next(it))
    size = jax.tree.leaves(x)[0].shape[0]
    return batches * size / (time.perf_counter() - start)


def _grain_iter(source, batch: int, threads: int, sharding, per_image: bool):
    """The same pipeline in Google's grain: shuffle per epoch, flip, batch, device_put."""
    import grain

    ds = grain.MapDataset.range(len(source)).shuffle(seed=0).repeat()
    if per_image:  # decode one image per element (grain's threads decode in parallel)

        def load(i, rng):
            x, y = source.read(np.array([i]))
            return (x[0, :, ::-1] if rng.random() < 0.5 else x[0]), y[0]

        ds = ds.random_map(load, seed=1).batch(batch, drop_remainder=True)
    else:  # arrays in memory: gather whole batches

        def load(idx, rng):
            x, y = source.read(np.asarray(idx))
            flip = rng.random(len(idx)) < 0.5
            return np.where(flip[:, None, None, None], x[:, :, ::-1], x), y

        ds = ds.batch(batch, drop_remainder=True).random_map(load, seed=1)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4))
    return iter(
        grain.experimental.device_put(it, sharding, cpu_buffer_size=4, device_buffer_size=2)
    )


def _loader_rows(quick: bool) -> tuple[list[dict], str]:
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxdiff import loader as LD
    from jaxdiff.train import data_mesh, make_feed_chunk, make_train_chunk

    n, batches, batch = (1024, 6, 128) if quick else (10_000, 60, 128)
    threads = min(8, len(os.sched_getaffinity(0)))
    mesh = data_mesh()
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    try:
        import grain  # noqa: F401

        have_grain = True
    except ImportError:
        have_grain = False
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        x, y = jd.data.shapes(n, 32)
        LD.save_image_folder(f"{tmp}/png", x, y)
        np.savez(f"{tmp}/d.npz", images=x, labels=y)
        sources = {
            "npz": LD.load_npz(f"{tmp}/d.npz"),
            "folder": LD.ImageFolder(f"{tmp}/png", threads=threads),
        }
        start = time.perf_counter()
        sources["folder-memory"] = sources["folder"].load()
        decode_s = time.perf_counter() - start
        for name, source in sources.items():
            loader = LD.ImageLoader(source, batch, seed=0)
            with LD.prefetch(loader.iterate(0), mesh) as it:
                rate = _delivered(it, batches)
            row = dict.fromkeys(KEYS)
            row.update(what=f"loader {name}", config="-", precision="uint8", batch=batch)
            row.update(steps=batches, jaxdiff_img_s=rate)
            if have_grain:
                it = _grain_iter(source, batch, threads, sharding, name == "folder")
                row["grain_img_s"] = _delivered(it, batches)
            rows.append(row)

        # Training from the PNG folder through the loader, against device-resident data.
        batch_t, steps, repeats = (4, 2, 2) if quick else (128, 10, 3)
        step, state, count = _jax_step("small", None)
        pixels = jnp.asarray(x, jnp.float32) / 127.5 - 1.0
        resident = make_train_chunk(
            step, lambda k: pixels[jax.random.randint(k, (batch_t,), 0, n)], steps
        )
        loader = LD.ImageLoader(sources["folder"], batch_t, seed=0, labels=False)
        states = {"resident": state, "loader": jax.tree.map(jnp.copy, state)}
        times = {"resident": [], "loader": []}
        with LD.prefetch(loader.iterate(0), mesh) as it:
            fed = make_feed_chunk(step, it, steps, mesh=mesh, preprocess=LD.to_float)
            for kind, chunk in (("resident", resident), ("loader", fed)):
                for i in range(repeats + 1):  # the first call compiles
                    wait = it.wait_s
                    start = time.perf_counter()
                    states[kind], losses = chunk(states[kind])
                    jax.block_until_ready(losses)
                    if i:
                        times[kind].append((time.perf_counter() - start, it.wait_s - wait))
        median = {k: float(np.median([t for t, _ in v])) for k, v in times.items()}
        row = dict.fromkeys(KEYS)
        row.update(what="train+loader folder", config="small", precision="float32")
        row.update(batch=batch_t, steps=steps, params=count)
        row["jaxdiff_img_s"] = batch_t * steps / median["loader"]
        row["torch_eager_img_s"] = None
        row["data_wait_fraction"] = sum(w for _, w in times["loader"]) / sum(
            t for t, _ in times["loader"]
        )
        row["speedup_vs_eager"] = None
        rows.append(row)
        resident_rate = batch_t * steps / median["resident"]
    note = (
        f"Loader: {n} images 32x32x3 (shapes, ~2.3 KB PNGs), batches of {batch} delivered on "
        f"the device, {threads} decode threads, {batches} batches timed; folder-memory decoded "
        f"once in {decode_s:.1f} s. grain: "
        + ("installed" if have_grain else "not installed (pip install grain for its rows)")
        + f". train+loader: small_unet from the PNG folder through make_feed_chunk, "
        f"{batch_t * steps / median['loader']:.4g} img/s, against {resident_rate:.4g} img/s "
        "with the data resident on the device (same step, same chunk length); "
        "data_wait_fraction = time the chunks waited for the prefetching thread / their time."
    )
    return rows, note


def run(quick: bool) -> dict:
    dev = jax.devices()[0]
    rows, loader_note = _loader_rows(quick)
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401

        net_rows, torch_note = _network_rows(quick)
    except ImportError as err:
        net_rows, torch_note = [], f"no PyTorch rows ({err}; pip install -e '.[bench]')"
    sizes = _sizes(quick, dev.platform == "gpu")
    notes = (
        f"JAX device {dev.platform}:{getattr(dev, 'device_kind', '')} ({jax.device_count()} "
        f"devices); {torch_note}. Sizes (batch, train steps per call, sampling steps): "
        f"small {sizes['small']}, cifar10 {sizes['cifar10']}; median of {sizes['repeats']} "
        "interleaved calls. speedup = jaxdiff images/s / PyTorch images/s (> 1: jaxdiff faster). "
        "Compile times: jaxdiff_compile_s (first call: trace + XLA), torch_eager_first_s (first "
        "eager call), torch_compile_s (first call of torch.compile: inductor). " + loader_note
    )
    return {"rows": net_rows + rows, "notes": notes}
