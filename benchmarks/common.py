"""Shared helpers for the benchmarks: timing, environment, the benchmark MLP, result rows.

Timing rules (from the design note): exclude compile time from run time but report it, call
``block_until_ready``, take the median of repeated runs, and measure every figure in the same run
as what it is compared with. ``EQX_ON_ERROR=nan`` is set before equinox is imported, so runtime
checks cost nothing here (users get the raising default).
"""

from __future__ import annotations

import os

os.environ.setdefault("EQX_ON_ERROR", "nan")

import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


def block(x: Any) -> Any:
    return jax.block_until_ready(x)


def time_jitted(fn: Callable, *args, repeats: int = 10, min_time: float = 0.0) -> dict:
    """Compile ``fn`` (already jitted) on ``args``, then time ``repeats`` calls.

    Returns ``{"compile_s", "median_s", "min_s", "runs"}``; the first call (trace + compile + one
    run) is reported as ``compile_s``. With ``min_time``, keeps repeating until that much time passed.
    """
    start = time.perf_counter()
    block(fn(*args))
    compile_s = time.perf_counter() - start
    times: list[float] = []
    total = 0.0
    while len(times) < repeats or total < min_time:
        start = time.perf_counter()
        block(fn(*args))
        dt = time.perf_counter() - start
        times.append(dt)
        total += dt
    return {
        "compile_s": compile_s,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "runs": len(times),
    }


def interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int = 10, burst: int = 1
) -> dict[str, dict]:
    """Time several zero-argument thunks round-robin (so drifts in machine load hit all alike).

    Each thunk is called once first (compile, reported as ``compile_s``), then ``repeats`` rounds;
    in each round every thunk runs ``burst`` times in a row, each call timed (strict A-B
    alternation at batch 1 slowed a sub-millisecond JAX call by 25-45% next to a PyTorch loop:
    caches and thread wake-ups). Returns each thunk's ``median_s``, ``min_s``, quartiles
    ``q1_s`` and ``q3_s``, and ``runs``.
    """
    out: dict[str, dict] = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        block(fn())
        out[name] = {"compile_s": time.perf_counter() - start, "times": []}
    for _ in range(repeats):
        for name, fn in fns.items():
            for _ in range(burst):
                start = time.perf_counter()
                block(fn())
                out[name]["times"].append(time.perf_counter() - start)
    for rec in out.values():
        times = rec.pop("times")
        q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
        rec.update(
            median_s=statistics.median(times), min_s=min(times), q1_s=q1, q3_s=q3, runs=len(times)
        )
    return out


def environment() -> dict:
    """Device, versions and machine facts recorded with every result file."""
    import diffrax
    import equinox
    import flax
    import optax

    dev = jax.devices()[0]
    return {
        "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}",
        "num_devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "diffrax": diffrax.__version__,
        "equinox": equinox.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "eqx_on_error": os.environ.get("EQX_ON_ERROR"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def device_tag() -> str:
    """File-name tag for the result file: ``cpu`` or the GPU's kind, e.g. ``gpu-nvidia-h100``."""
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return "cpu"
    kind = getattr(dev, "device_kind", dev.platform).lower().replace(" ", "-")
    return f"{dev.platform}-{kind}"


# --- the benchmark network: an MLP field on (x, t), width 256 --------------------------------


def mlp_init(key: jax.Array, dim: int = 2, width: int = 256, depth: int = 2) -> dict:
    """Weights of ``dim + 1 -> width (-> width)* -> dim`` with SiLU; plain arrays, no Flax."""
    sizes = [dim + 1] + [width] * depth + [dim]
    keys = jax.random.split(key, len(sizes) - 1)
    return {
        f"l{i}": {
            "w": jax.random.normal(k, (a, b)) / jnp.sqrt(a),
            "b": jnp.zeros((b,)),
        }
        for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True))
    }


def mlp_apply(params: dict, x: jax.Array, t: jax.Array) -> jax.Array:
    """The field ``(x, t) -> output`` with ``t`` a scalar or per-sample, appended as a feature."""
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])[:, None]
    h = jnp.concatenate([x, t], axis=-1)
    n = len(params)
    for i in range(n):
        layer = params[f"l{i}"]
        h = h @ layer["w"] + layer["b"]
        if i < n - 1:
            h = jax.nn.silu(h)
    return h
