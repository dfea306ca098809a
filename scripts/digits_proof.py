"""The U-Net on the digits, class-conditional, against the MLP: trained by the CLI's code on CPU,
sampled and measured the same way (jaxdiff.digits' classifier: accuracy on the requested classes,
Fréchet distance to the test split), with an image grid.

    python scripts/digits_proof.py                          # the three runs, then the table
    python scripts/digits_proof.py --only unet --unet-steps 3000 --seeds 3 --n 1000  # a shorter U-Net

Runs (``train_run``, the code behind ``python -m jaxdiff train``):

* ``mlp``: ``--data digits --conditional --model mlp --width 256 --steps 1500 --batch 128
  --lr 2e-3`` (the README's command: flow matching, velocity target);
* ``mlp-long``: the same for ``--mlp-long-steps`` steps (about the U-Net's CPU time);
* ``unet``: ``--model unet --channels 32 64 64`` (``small_unet``'s widths at 8x8) with EDM's
  recipe on the same path (``--precond edm --weighting edm --time edm``), ``--dropout 0.1``.

Each is sampled with Heun's method (20 steps, 40 evaluations of the guided field) from the EMA
weights at classifier-free guidance 1 and 2, and at 2 on ``t <= 0.84`` only (``--guidance-interval
0 0.84``), ``n`` samples (classes ``i % 10``) per seed; the
table gives the mean over seeds and each seed. Training CPU seconds (user + system of the process,
compilation included) are summed in ``OUT/NAME/cpu_seconds.json``. Writes
``results/digits_unet.json`` and ``.md`` and ``docs/digits_unet.png``. A run in ``OUT``
is continued or, when finished, reused (not retrained).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

MLP = dict(data="digits", conditional=True, model="mlp", width=256, steps=1500, batch=128, lr=2e-3)
UNET = dict(
    data="digits",
    conditional=True,
    model="unet",
    channels=[32, 64, 64],
    precond="edm",
    weighting="edm",
    time="edm",
    dropout=0.1,
    batch=128,
    lr=2e-3,
)


def _cpu_seconds() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _train(config: dict, out: Path, until: int | None = None) -> dict:
    """Train (or continue) the run in ``out``; the process CPU seconds of every call are summed in
    ``OUT/cpu_seconds.json`` (user + system, all threads; compilation included)."""
    from jaxdiff import rundir as R
    from jaxdiff.run_train import train_run

    config = {**config, "eval_n": 0}
    resume = R.has_steps(out / "ckpt")
    start, cpu = time.perf_counter(), _cpu_seconds()
    summary = train_run(config, out, resume=resume, until=until, progress=False)
    wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    ledger = out / "cpu_seconds.json"
    spent = json.loads(ledger.read_text()) if ledger.exists() else []
    if not spent or spent[-1]["step"] != int(summary["step"]):  # a finished run: nothing spent
        spent.append({"step": int(summary["step"]), "cpu_seconds": cpu, "wall_seconds": wall})
    ledger.write_text(json.dumps(spent, indent=1) + "\n")
    return {
        "config": {k: v for k, v in summary["config"].items()},
        "steps": summary["step"],
        "train_seconds": summary["train_seconds"],  # wall clock of the training loops
        "cpu_seconds": sum(s["cpu_seconds"] for s in spent),  # the calls' CPU time
    }


INTERVAL = (0.0, 0.84)  # guidance off at the noisiest levels (Kynkäänniemi et al. 2024)
SETTINGS = {"g1": (1.0, None), "g2": (2.0, None), "g2-interval": (2.0, INTERVAL)}


def _measure(out: Path, seeds: int, n: int) -> dict:
    from jaxdiff.runs import sample_run

    rows = {}
    for name, (g, interval) in SETTINGS.items():
        per = []
        for seed in range(seeds):
            cpu = _cpu_seconds()
            res = sample_run(
                out,
                n=n,
                steps=20,
                seed=seed,
                guidance=g,
                guidance_interval=interval,
                out=out / f"samples-{name}-s{seed}",
                log=lambda _: None,
            )
            m = res["metrics"]
            per.append((m["frechet_distance"], m["class_accuracy"], m["memorization_ratio"]))
            if seed == 0:
                if name == "g2":  # the grid's samples
                    rows["grid-g2"] = res["samples"][:100]
                rows[f"sample_cpu_seconds-{name}"] = _cpu_seconds() - cpu
        fd, acc, mem = np.array(per).T
        rows[name] = {
            "guidance": g,
            "interval": interval,
            "frechet_distance": [float(v) for v in fd],
            "frechet_distance_mean": float(fd.mean()),
            "class_accuracy": [float(v) for v in acc],
            "class_accuracy_mean": float(acc.mean()),
            "memorization_ratio_mean": float(mem.mean()),
            "frechet_distance_train_vs_test": m["frechet_distance_train_vs_test"],
            "sample_cpu_seconds": rows.pop(f"sample_cpu_seconds-{name}"),
        }
    return rows


def _grid(images: dict, file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxdiff.digits import tile

    fig, axes = plt.subplots(1, len(images), figsize=(4.2 * len(images), 4.6))
    for ax, (title, x) in zip(np.atleast_1d(axes), images.items(), strict=True):
        x = np.asarray(x)[:100, ..., 0].reshape(10, 10, 8, 8)  # sample i has class i % 10
        tiles = x.transpose(1, 0, 2, 3).reshape(100, 8, 8)  # row = class, column = draw
        canvas = np.pad(tile(tiles, 10, -0.5), 1, constant_values=-0.5)  # light grey around tiles
        ax.imshow(canvas, cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    file.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(file, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _markdown(result: dict) -> str:
    lines = [
        f"{result['n']} samples per seed, {result['seeds']} seeds; Heun, 20 steps (40 evaluations)."
        "\n",
        "| model | params | steps x batch | train CPU s | guidance | FD (mean) | FD per seed | "
        "accuracy | memorisation |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in RUNS:
        if name not in result:
            continue
        r = result[name]
        for setting in (s for s in SETTINGS if s in r):
            m = r[setting]
            g, interval = SETTINGS[setting]
            g = (
                f"{g:g}"
                if interval is None
                else f"{g:g} on t in [{interval[0]:g}, {interval[1]:g}]"
            )
            fds = ", ".join(f"{v:.2f}" for v in m["frechet_distance"])
            lines.append(
                f"| {name} | {r['params']:,} | {r['steps']} x {r['config']['batch']} | "
                f"{r['cpu_seconds']:.0f} | {g} | {m['frechet_distance_mean']:.2f} | {fds} | "
                f"{m['class_accuracy_mean']:.4f} | {m['memorization_ratio_mean']:.2f} |"
            )
    first = next(result[k] for k in RUNS if k in result)
    floor = first["g1"]["frechet_distance_train_vs_test"]
    lines.append(f"\nFD of the training split to the test split (the floor): {floor:.2f}.")
    return "\n".join(lines) + "\n"


def _num_params(out: Path) -> int:
    import jax

    from jaxdiff.runs import load_checkpoint

    _, _, state = load_checkpoint(out)
    return int(sum(x.size for x in jax.tree.leaves(state.params)))


RUNS = ("mlp", "mlp-long", "unet")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/digits-proof")
    parser.add_argument("--unet-steps", type=int, default=9000)
    parser.add_argument("--mlp-long-steps", type=int, default=100_000)
    parser.add_argument("--only", nargs="+", choices=RUNS, default=list(RUNS))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--results", default=str(ROOT / "results"))
    parser.add_argument("--grid", default=str(ROOT / "docs" / "digits_unet.png"))
    args = parser.parse_args(argv)
    out, results = Path(args.out), Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    file = results / "digits_unet.json"
    result = json.loads(file.read_text()) if file.exists() else {}
    result.update(platform=platform.platform(), seeds=args.seeds, n=args.n)
    configs = {
        "mlp": MLP,
        "mlp-long": {**MLP, "steps": args.mlp_long_steps},
        "unet": {**UNET, "steps": args.unet_steps},
    }
    for name in args.only:
        run = out / name
        print(f"{name}: training in {run}")
        result[name] = _train(configs[name], run)
        result[name]["params"] = _num_params(run)
        print(f"{name}: sampling {args.seeds} x {args.n}: {', '.join(SETTINGS)}")
        rows = _measure(run, args.seeds, args.n)
        np.save(run / "grid-g2.npy", np.asarray(rows.pop("grid-g2")))
        result[name].update(rows)
        print(json.dumps({k: v for k, v in result[name].items() if k != "config"}, indent=1))
        file.write_text(json.dumps(result, indent=1) + "\n")
    (results / "digits_unet.md").write_text(_markdown(result))
    titles = {"unet": "U-Net (EDM recipe)", "mlp": "MLP, 1,500 steps", "mlp-long": "MLP, long"}
    grids = {
        f"{titles[k]}, guidance 2": np.load(out / k / "grid-g2.npy")
        for k in ("unet", "mlp", "mlp-long")
        if (out / k / "grid-g2.npy").exists()
    }
    if grids:
        _grid(grids, Path(args.grid))
    print(_markdown(result))
    return result


if __name__ == "__main__":
    main()
