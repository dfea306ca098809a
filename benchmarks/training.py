"""Training throughput: jaxdiff's train step against the same MLP trained with plain PyTorch.

Both train the benchmark MLP (``benchmarks.common``: 3 -> width -> width -> 2, SiLU) with conditional
flow matching on the 2-D checkerboard, drawing a fresh batch every step on the device, with AdamW
(weight decay 1e-4) after clipping the gradient norm to 1. jaxdiff runs ``make_train_step`` inside
``make_train_chunk`` (one jitted ``lax.scan`` of K steps, as its training loop does); PyTorch runs an
eager loop, the same loop with the network through ``torch.compile``, and the loop with the whole step
compiled (data, loss and backward in one graph, clipping and AdamW in a second: PyTorch's compiled
optimizer); each variant runs at its own best thread count (the faster of 1 and all cores). Rows give
steps/s of each and the ratio; compile time of the JAX chunk is reported apart. A second jaxdiff row trains
``jaxdiff.nets.MLP`` (the CLI's default toy network) for scale.

U-Net rows: ``jaxdiff.nets.small_unet`` trained with the eps loss on the 8x8 digits and on 32x32x3
synthetic images, in float32 and bfloat16, through ``make_train_chunk`` (one ``lax.scan`` of K
steps) against a Python loop over the same step jitted alone (donated state). The ratio
``chunk_over_plain`` guards XLA:CPU's slow path for convolution gradients inside a loop (see
``jaxdiff.nets.conv``): with ``lax.conv``'s own gradients it was ~0.01 (16 s/step against
0.15 s/step); with ``jaxdiff.nets.conv2d`` it should stay near 1 (or above: no dispatch per step).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import jaxdiff as jd
from benchmarks.common import interleaved, mlp_apply, mlp_init
from benchmarks.peers import best_threads, jax_cores, pinned, torch_train_mlp

TITLE = (
    "Training throughput: jaxdiff train step vs plain PyTorch (same MLP, data, batch); "
    "the U-Net chunked vs a plain jitted step, float32 and bfloat16"
)


def _jax_chunk(apply, params, batch: int, steps: int):
    from jaxdiff.train import adamw_cosine, init_train_state, make_train_chunk, make_train_step

    loss = jd.flow_matching_loss(jd.Field(apply, "velocity"))
    opt = adamw_cosine(1e-3, 10**6, warmup_steps=1)
    step = make_train_step(loss, opt)
    chunk = make_train_chunk(step, lambda key: jd.data.checkerboard(key, batch), steps)
    state = [init_train_state(params, opt, jax.random.key(0))]

    def run():
        state[0], losses = chunk(state[0])
        return losses

    return run


def _torch_loop(width: int, batch: int, steps: int, compiled: str = "none"):
    """PyTorch's training loop: ``compiled="none"`` eager, ``"net"`` the network through
    ``torch.compile`` (static shapes, ``dynamic=False``, as in the peers benchmark), ``"step"`` the whole step compiled (data, forward and loss in one
    ``fullgraph`` graph whose backward AOTAutograd compiles; clipping and AdamW in a second graph,
    PyTorch's compiled optimizer with a tensor learning rate)."""
    import torch

    net = torch_train_mlp(width)
    lr = torch.tensor(1e-3) if compiled == "step" else 1e-3  # a float lr recompiles the step
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    forward = torch.compile(net, dynamic=False) if compiled == "net" else net

    def checkerboard(n):
        x1 = torch.rand(n) * 4 - 2
        x2 = torch.rand(n) - 2 * torch.randint(0, 2, (n,)).float()
        return torch.stack([x1, x2 + torch.floor(x1) % 2], dim=1)

    def loss_fn():
        x0 = checkerboard(batch)
        eps = torch.randn_like(x0)
        t = torch.rand(batch, 1)
        xt = (1 - t) * x0 + t * eps
        pred = forward(torch.cat([xt, t], dim=1))
        return ((pred - (eps - x0)) ** 2).mean()

    def update():
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()

    if compiled == "step":
        loss_fn = torch.compile(loss_fn, fullgraph=True, dynamic=False)
        update = torch.compile(update, dynamic=False)

    def run():
        for _ in range(steps):
            loss = loss_fn()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            update()
        return loss.detach()

    return run


def _unet_thunks(data: str, dtype, batch: int, steps: int):
    """Zero-argument thunks running ``steps`` U-Net steps: chunked (scan) and a plain jitted loop."""
    from jaxdiff.data import load_digits
    from jaxdiff.nets import init_params, small_unet
    from jaxdiff.train import adamw_cosine, init_train_state, make_train_chunk, make_train_step

    if data == "digits":
        images = jnp.asarray(load_digits("train")[0])

        def sample(key):
            return images[jax.random.randint(key, (batch,), 0, images.shape[0])]

    else:

        def sample(key):
            return jax.random.normal(key, (batch, 32, 32, 3))

    model = small_unet(dtype=dtype)
    example = jax.eval_shape(sample, jax.random.key(0))
    params = init_params(model, jax.random.key(0), jnp.zeros((1, *example.shape[1:])), 0.5)
    opt = adamw_cosine(1e-3, 10**6, warmup_steps=1)
    step = make_train_step(jd.eps_loss(jd.Field(model.apply, "eps"), jd.vp_path()), opt)
    chunk = make_train_chunk(step, sample, steps)

    @functools.partial(jax.jit, donate_argnums=0)
    def plain_step(state):
        key, batch_key = jax.random.split(state.key)
        return step(state._replace(key=key), sample(batch_key))

    states = {k: init_train_state(params, opt, jax.random.key(1)) for k in ("chunk", "plain")}

    def chunked():
        states["chunk"], losses = chunk(states["chunk"])
        return losses

    def plain():
        for _ in range(steps):
            states["plain"], loss = plain_step(states["plain"])
        return loss

    return {"chunk": chunked, "plain": plain}


def _unet_rows(quick: bool) -> list[dict]:
    steps, repeats = (3, 1) if quick else (20, 5)
    cases = [("digits", 64 if quick else 128)] + ([] if quick else [("32x32x3", 32)])
    rows = []
    for data, batch in cases:
        for dtype in (None, jnp.bfloat16):
            res = interleaved(_unet_thunks(data, dtype, batch, steps), repeats=repeats)
            chunk_s, plain_s = res["chunk"]["median_s"], res["plain"]["median_s"]
            rows.append(
                {
                    "model": f"small_unet {data}",
                    "dtype": "bfloat16" if dtype is not None else "float32",
                    "batch": batch,
                    "steps_per_call": steps,
                    "jaxdiff_steps_s": steps / chunk_s,
                    "plain_jit_steps_s": steps / plain_s,
                    "chunk_over_plain": plain_s / chunk_s,
                    "jaxdiff_compile_s": res["chunk"]["compile_s"],
                    "torch_steps_s": None,
                    "speedup": None,
                }
            )
    return rows


def run(quick: bool) -> dict:
    from jaxdiff.nets import MLP, init_params

    steps = 100 if quick else 500
    repeats = 3 if quick else 7
    batches = [256, 1024] if quick else [64, 256, 1024, 4096]
    width = 256
    rows = []
    try:
        import torch  # noqa: F401

        have_torch = True
    except ImportError:
        have_torch = False
    threads: dict[int, dict[str, int]] = {}
    compile_ok = False
    if have_torch:
        from benchmarks.peers import _torch_compile_works

        compile_ok = _torch_compile_works()
    for batch in batches:
        params = mlp_init(jax.random.key(0), dim=2, width=width, depth=2)
        model = MLP()
        mparams = init_params(model, jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros(1))
        thunks = {
            "jaxdiff": _jax_chunk(mlp_apply, params, batch, steps),
            "jaxdiff_nets_mlp": _jax_chunk(model.apply, mparams, batch, steps),
        }
        variants = {"torch": "none"}
        if have_torch and compile_ok:
            variants.update(torch_compile="net", torch_compile_step="step")
        if have_torch:  # graphs for this batch alone (static shapes, as XLA's), fresh budget
            import torch

            torch._dynamo.reset()
        for name, how in variants.items() if have_torch else ():
            loop = _torch_loop(width, batch, steps, compiled=how)  # compiled in its first call
            n, _ = best_threads(loop, jax_cores(), runs=3, no_grad=False, recompile=how != "none")
            threads.setdefault(batch, {})[name] = n
            thunks[name] = pinned(loop, n)
        res = interleaved(thunks, repeats=repeats)
        for name, label in (("torch_compile", "network"), ("torch_compile_step", "whole step")):
            if name in res:
                rows.append(
                    {
                        "model": f"benchmark MLP {width}, torch.compile {label}",
                        "dtype": "float32",
                        "batch": batch,
                        "steps_per_call": steps,
                        "jaxdiff_steps_s": steps / res["jaxdiff"]["median_s"],
                        "plain_jit_steps_s": None,
                        "chunk_over_plain": None,
                        "jaxdiff_compile_s": res["jaxdiff"]["compile_s"],
                        "torch_steps_s": steps / res[name]["median_s"],
                        "speedup": res[name]["median_s"] / res["jaxdiff"]["median_s"],
                    }
                )
        common = {"dtype": "float32", "batch": batch, "steps_per_call": steps}
        rows.append(
            {
                "model": f"benchmark MLP {width}",
                **common,
                "jaxdiff_steps_s": steps / res["jaxdiff"]["median_s"],
                "plain_jit_steps_s": None,
                "chunk_over_plain": None,
                "jaxdiff_compile_s": res["jaxdiff"]["compile_s"],
                "torch_steps_s": steps / res["torch"]["median_s"] if have_torch else None,
                "speedup": (res["torch"]["median_s"] / res["jaxdiff"]["median_s"])
                if have_torch
                else None,
            }
        )
        rows.append(
            {
                "model": "nets.MLP",
                **common,
                "jaxdiff_steps_s": steps / res["jaxdiff_nets_mlp"]["median_s"],
                "plain_jit_steps_s": None,
                "chunk_over_plain": None,
                "jaxdiff_compile_s": res["jaxdiff_nets_mlp"]["compile_s"],
                "torch_steps_s": None,
                "speedup": None,
            }
        )
    rows += _unet_rows(quick)
    dev = jax.devices()[0]
    notes = (
        f"Benchmark MLP 3 -> {width} -> {width} -> 2 (SiLU), flow matching on the checkerboard, "
        f"AdamW + clipping, {steps} steps per timed call, median of {repeats} interleaved calls. "
        f"JAX device {dev.platform}; PyTorch on CPU, eager, with the network through "
        f"torch.compile, and with the whole step compiled (data, loss and its backward in one "
        f"graph, clipping and AdamW in another), each compiled before timing; torch threads per "
        f"batch and variant the faster of 1 and {jax_cores()} (median of 3 calls): {threads}"
        + (
            ""
            if have_torch
            else " -- torch not installed (pip install '.[bench]'): no PyTorch rows"
        )
        + ". speedup = torch time / jaxdiff time. nets.MLP: jaxdiff.nets.MLP (width 128, depth 3, "
        "Fourier time embedding), the CLI's default toy network. small_unet rows: eps loss on the "
        "VP path, chunk = make_train_chunk (one lax.scan), plain = a Python loop over the step "
        "jitted alone; chunk_over_plain = plain time / chunk time (~0.01 when convolution "
        "gradients fall to XLA:CPU's naive loops inside the scan; ~1 or above when fixed). "
        "bfloat16 = activations only (float32 params, optimizer state and loss); on CPU bfloat16 "
        "convolutions do not reach the Eigen fast path (F16/F32 only), so it can be slower."
    )
    return {"rows": rows, "notes": notes}
