"""Scaling: jaxdiff's Euler ODE sampling (100 steps) as the batch grows and over host devices.

* Batch sweep: samples per second of ``jaxdiff.sample`` (the benchmark MLP as a linear-path
  velocity, Euler, 100 steps) for batch 1, 4, 16, ..., 65536, each relative to the best batch of
  the sweep. Small batches are bound by the per-step overhead, large ones by the matmuls.
* Devices: the same program with the batch sharded over ``N = 1, 2, 4`` forced host devices
  (``XLA_FLAGS=--xla_force_host_platform_device_count=N``, one subprocess each, since the flag
  must be set before JAX starts): ``jax.make_mesh((N,), ("data",))`` with Auto axes,
  ``NamedSharding(mesh, P("data"))`` on the initial noise, replicated weights and a plain
  ``jax.jit`` -- jaxdiff's code is unchanged. Fake devices share the machine's cores, so more of
  them add no hardware: the rows show that sharded sampling works as it is and what partitioning
  costs (any gain means one thread per device keeps the cores busier than one device's intra-op
  threads). On a multi-GPU host the same code shards over real devices.

Worker mode (used by ``run``): ``python -m benchmarks.scaling --devices N --batch B --steps S``
prints one JSON line with the timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxdiff as jd
from benchmarks.common import block, mlp_apply, mlp_init

TITLE = "Scaling: jaxdiff Euler ODE sampling (100 steps) over batch size and forced host devices"

STEPS = 100
ROOT = Path(__file__).resolve().parent.parent


def sample_fn(params, x, steps: int = STEPS):
    """The timed program: Euler on the linear path's velocity, t = 1 -> 1e-3."""
    field = jd.Field(mlp_apply, "velocity", params)
    return jd.sample(None, jd.linear_path(), field, x_init=x, steps=steps).x


def time_compiled(
    fn, *args, min_runs: int = 5, min_time: float = 1.0, long_runs: int = 2
) -> tuple[float, float]:
    """Compile ``jax.jit(fn)`` ahead of time, then time runs; returns (median s, compile s).

    A first run is a discarded warm-up unless it took over a second (then it counts, and
    ``long_runs`` runs are taken in all); shorter ones get ``min_runs`` runs and ``min_time``.
    """
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    block(compiled(*args))
    first = time.perf_counter() - start
    times = [first] if first > 1.0 else []
    target_runs = long_runs if first > 1.0 else min_runs
    while len(times) < target_runs or (first <= 1.0 and sum(times) < min_time):
        start = time.perf_counter()
        block(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), compile_s


def worker(devices: int, batch: int, steps: int) -> dict:
    """Time sampling with the batch sharded over ``devices`` host devices (run in a subprocess)."""
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    if jax.device_count() != devices:
        raise RuntimeError(f"expected {devices} devices, JAX sees {jax.device_count()}")
    mesh = jax.make_mesh((devices,), ("data",), axis_types=(AxisType.Auto,))
    params = jax.device_put(mlp_init(jax.random.key(0)), NamedSharding(mesh, P()))
    x = jax.random.normal(jax.random.key(1), (batch, 2))
    x = jax.device_put(x, NamedSharding(mesh, P("data")))
    median_s, compile_s = time_compiled(lambda p, x: sample_fn(p, x, steps), params, x)
    out = jax.jit(lambda p, x: sample_fn(p, x, steps))(params, x)
    return {
        "devices": devices,
        "batch": batch,
        "median_s": median_s,
        "compile_s": compile_s,
        "out_devices": len(out.sharding.device_set),
        "replicated": bool(out.sharding.is_fully_replicated),
        "checksum": float(jnp.sum(out)),
    }


def run_worker(devices: int, batch: int, steps: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "benchmarks.scaling", "--devices", str(devices)]
    cmd += ["--batch", str(batch), "--steps", str(steps)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"scaling worker failed ({devices} devices):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = [r for r in rows if r["part"] == "batch"]
    devs = [r for r in rows if r["part"] == "devices"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(7.5, 2.8), dpi=80, width_ratios=(2, 1))
    a.loglog([r["batch"] for r in sweep], [r["samples_per_s"] for r in sweep], "o-")
    a.set_xlabel("batch")
    a.set_ylabel("samples / s")
    a.set_title(f"Euler ODE, {STEPS} steps", fontsize=9)
    a.grid(alpha=0.3, which="both")
    if devs:
        b.bar([str(r["devices"]) for r in devs], [r["relative"] for r in devs])
        b.axhline(1.0, color="k", lw=0.8)
        b.set_xlabel(f"host devices (batch {devs[0]['batch']})")
        b.set_ylabel("samples/s vs 1 device")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(quick: bool) -> dict:
    params = mlp_init(jax.random.key(0))
    top = 16384 if quick else 65536
    batches = [4**k for k in range(20) if 4**k <= top]
    rows = []
    for batch in batches:
        x = jax.random.normal(jax.random.key(1), (batch, 2))
        median_s, compile_s = time_compiled(
            sample_fn, params, x, min_runs=3 if quick else 5, long_runs=1 if quick else 2
        )
        rows.append(
            {
                "part": "batch",
                "batch": batch,
                "devices": 1,
                "ms": 1e3 * median_s,
                "samples_per_s": batch / median_s,
                "relative": None,
                "relative_to": "best batch",
                "compile_s": compile_s,
            }
        )
        print(f"    batch {batch}: {batch / median_s:.4g} samples/s", flush=True)
    best = max(r["samples_per_s"] for r in rows)
    for r in rows:
        r["relative"] = r["samples_per_s"] / best

    dev_batch = 1024 if quick else 16384
    rounds = 1 if quick else 2
    results: dict[int, list[dict]] = {n: [] for n in (1, 2, 4)}
    for _ in range(rounds):  # alternate the device counts so load drifts hit all alike
        for n in results:
            results[n].append(run_worker(n, dev_batch, STEPS))
    checks = {n: res[0]["checksum"] for n, res in results.items()}
    base = statistics.median(r["median_s"] for r in results[1])
    for n, res in results.items():
        median_s = statistics.median(r["median_s"] for r in res)
        rows.append(
            {
                "part": "devices",
                "batch": dev_batch,
                "devices": n,
                "ms": 1e3 * median_s,
                "samples_per_s": dev_batch / median_s,
                "relative": base / median_s,
                "relative_to": "1 device",
                "compile_s": statistics.median(r["compile_s"] for r in res),
            }
        )
        if res[0]["out_devices"] != n or (n > 1 and res[0]["replicated"]):
            raise RuntimeError(f"the samples are not split over the {n} devices: {res[0]}")
    spread = max(checks.values()) - min(checks.values())
    notes = (
        f"{os.cpu_count()} CPU cores. Batch rows: one process, relative = samples/s over the best "
        "batch's. Device rows: one subprocess per device count with "
        "--xla_force_host_platform_device_count=N (JAX_PLATFORMS=cpu), the batch sharded with "
        "NamedSharding(mesh, P('data')) on an Auto-axis mesh, weights replicated, plain jax.jit; "
        f"{rounds} round(s) alternating N, medians; relative = samples/s over 1 device's. The "
        "output stays sharded over the N devices; sum of the samples agrees across N to "
        f"{spread:.1e}. Fake host devices share the same cores: N > 1 adds no hardware, so the rows "
        "show that sharded sampling runs unchanged and what partitioning costs; a gain over 1 device "
        "only means XLA:CPU keeps the cores busier with one thread per device than with one device's "
        "intra-op threads at this size. compile_s (XLA, excluded from ms)."
    )
    out = os.environ.get("JAXDIFF_BENCH_OUT")
    plots = []
    if out:
        path = os.path.join(out, f"scaling{'-quick' if quick else ''}.png")
        _plot(rows, path)
        plots.append(path)
    return {"rows": rows, "notes": notes, "plots": plots}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="scaling worker: time sharded sampling")
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args(argv)
    print(json.dumps(worker(args.devices, args.batch, args.steps)), flush=True)
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    sys.exit(main())
