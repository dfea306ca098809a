"""The PyTorch side of the ``images`` benchmark: diffusers' ``UNet2DModel`` configured as jaxdiff's
``small_unet`` and ``ddpm_cifar10`` (parameter counts asserted equal), and the same training step
and DDIM loop as the jaxdiff side, written out by hand.

``freq_shift`` is each config's (``small_unet`` 0, ``10000^(-k / half)``; ``ddpm_cifar10`` DDPM's
own 1, ``half - 1``), and :func:`port_params` copies jaxdiff's weights in: the two networks then
compute the same function (tested).

Both sides use ``jd.vp_path()`` (``log alpha_t = -(b0 t + (b1 - b0) t^2 / 2) / 2`` with
``b0, b1 = 0.1, 20``, ``sigma_t^2 = 1 - alpha_t^2``) and feed the network ``1000 t`` (jaxdiff's
sinusoidal embedding scales ``t`` by 1000 inside; diffusers takes the step index).
"""

from __future__ import annotations

import os

import numpy as np

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
        freq_shift=0,
    ),
    "cifar10": dict(
        layers_per_block=2,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None,
        norm_num_groups=32,
        dropout=0.1,
        freq_shift=1,
    ),
}
COMMON = dict(
    sample_size=32, in_channels=3, out_channels=3, norm_eps=1e-6, downsample_padding=0,
    flip_sin_to_cos=False,
)  # fmt: skip
B0, B1 = 0.1, 20.0  # jd.vp_path()'s beta_min, beta_max
T_MIN, LR, EMA = 1e-3, 1e-4, 0.999


def device(jax_platform: str, requested: str = "auto"):
    """The torch device that matches JAX's: ``cuda`` when JAX runs on a GPU, else ``cpu``;
    ``requested`` (``cpu``/``cuda``) overrides. ``None`` when JAX is on a GPU and this PyTorch
    has no CUDA (a GPU against a CPU is no comparison)."""
    import torch

    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"torch_device must be auto, cpu or cuda; got {requested!r}")
    if requested == "auto":
        requested = "cuda" if jax_platform == "gpu" else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        return None
    return torch.device(requested)


def setup(dev) -> str:
    """Threads = the cores this process may use (as XLA:CPU does); TF32 allowed for float32 on a
    GPU as XLA allows it; cuDNN autotuning (XLA autotunes its convolutions too)."""
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    return f"PyTorch {torch.__version__} on {dev}, {torch.get_num_threads()} threads"


def compile_works(dev) -> bool:
    """Whether Inductor builds a kernel on ``dev`` (a C++ compiler on CPU, Triton on CUDA)."""
    import torch

    try:
        f = torch.compile(lambda x: torch.sin(x) + 1.0)
        return bool(torch.allclose(f(torch.zeros(2, device=dev)).cpu(), torch.ones(2)))
    except Exception:  # noqa: BLE001 - any failure means: compare eager only
        return False


def unet(name: str, dev, count: int):
    """diffusers' ``UNet2DModel`` equal to jaxdiff's config ``name``; asserts ``count`` params."""
    import diffusers

    net = diffusers.UNet2DModel(**COMMON, **DIFFUSERS[name]).to(dev)
    n = sum(p.numel() for p in net.parameters())
    if n != count:
        raise AssertionError(f"{name}: diffusers has {n} parameters, jaxdiff {count}")
    return net


def port_params(net, params, model) -> None:
    """Copy jaxdiff U-Net ``params`` of ``model`` into diffusers' ``net`` of the matching config
    (:func:`jaxdiff.nets.to_diffusers`: the same layers in the same order, renamed)."""
    import torch

    from jaxdiff.nets import to_diffusers

    net.load_state_dict({k: torch.from_numpy(v) for k, v in to_diffusers(params, model).items()})


def vp_coefficients(t):
    """``(alpha_t, sigma_t)`` of ``jd.vp_path()`` for a torch tensor ``t``."""
    import torch

    log_a = -0.25 * t**2 * (B1 - B0) - 0.5 * t * B0
    return torch.exp(log_a), torch.sqrt(-torch.expm1(2.0 * log_a))


def sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _step_marker(compiled: bool, mode: str):
    """``torch.compiler.cudagraph_mark_step_begin`` under CUDA graphs (``mode``
    ``reduce-overhead`` / ``max-autotune``), so that each training step or network call starts a
    new generation of cudagraph trees and no replay overwrites an output still in use; else a
    no-op."""
    import torch

    if compiled and mode in ("reduce-overhead", "max-autotune"):
        return torch.compiler.cudagraph_mark_step_begin
    return lambda: None


def _prepare(net, compiled: bool, mode: str, channels_last: bool):
    """``(net, to, fn, mark)`` for a thunk: with ``channels_last`` the net's weights and every
    input image (``to``) in ``torch.channels_last`` (NHWC strides; cuDNN's fast path for
    convolutions); ``fn`` the network, through ``torch.compile`` when ``compiled``; ``mark`` the
    per-step CUDA-graph marker (:func:`_step_marker`)."""
    import torch

    to = lambda x: x  # noqa: E731
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        to = lambda x: x.contiguous(memory_format=torch.channels_last)  # noqa: E731
    fn = torch.compile(net, mode=mode) if compiled else net
    return net, to, fn, _step_marker(compiled, mode)


def train_thunk(
    net,
    data,
    batch: int,
    steps: int,
    dev,
    bf16: bool,
    compiled: bool,
    mode: str = "default",
    channels_last: bool = False,
):
    """``steps`` training steps per call: DDPM's eps loss on the VP path, ``t ~ U(T_MIN, 1)``,
    AdamW after clipping the gradient norm to 1, EMA of the weights; batches drawn on the device
    from ``data`` (N, C, H, W). ``mode``: ``torch.compile``'s."""
    import torch

    net, to, fn, mark = _prepare(net, compiled, mode, channels_last)
    params = list(net.parameters())
    fused = dict(fused=True) if dev.type == "cuda" else {}
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, **fused)
    ema = [p.detach().clone() for p in params]

    def run():
        net.train()  # the net is shared with the sampling thunk, which sets eval()
        for _ in range(steps):
            mark()
            x = to(data[torch.randint(0, data.shape[0], (batch,), device=dev)])
            t = T_MIN + (1.0 - T_MIN) * torch.rand(batch, device=dev)
            a, s = (c[:, None, None, None] for c in vp_coefficients(t))
            eps = torch.randn_like(x)
            with torch.autocast(dev.type, torch.bfloat16, enabled=bf16):
                pred = fn(a * x + s * eps, t * 1000.0).sample
            loss = torch.mean(torch.square(pred.float() - eps))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - EMA)
        sync(dev)

    return run


def ddim(eps_fn, x, ts: np.ndarray):
    """DDIM (eta 0) from ``x`` at ``ts[0]`` over the decreasing grid ``ts``, one ``eps_fn(x, t)``
    call per step: ``x0 = (x - sigma_t eps) / alpha_t``, ``x <- alpha_s x0 + sigma_s eps``, the
    update of ``jd.samplers.ddim()``."""
    import torch

    alpha, sigma = (c.tolist() for c in vp_coefficients(torch.as_tensor(ts, dtype=torch.float64)))
    for i in range(len(ts) - 1):
        eps = eps_fn(x, float(ts[i])).float()
        x0 = (x - sigma[i] * eps) / alpha[i]
        x = alpha[i + 1] * x0 + sigma[i + 1] * eps
    return x


def sample_thunk(
    net,
    batch: int,
    steps: int,
    dev,
    bf16: bool,
    compiled: bool,
    mode: str = "default",
    channels_last: bool = False,
):
    """One DDIM sample of ``batch`` images in ``steps`` network calls per call, under no_grad."""
    import torch

    net, to, fn, mark = _prepare(net, compiled, mode, channels_last)
    ts = np.linspace(1.0, T_MIN, steps + 1)

    def eps_fn(x, t):
        mark()
        return fn(x, torch.full((x.shape[0],), t * 1000.0, device=dev)).sample

    def run():
        net.eval()
        with torch.no_grad(), torch.autocast(dev.type, torch.bfloat16, enabled=bf16):
            ddim(eps_fn, to(torch.randn(batch, 3, 32, 32, device=dev)), ts)
        sync(dev)

    return run
