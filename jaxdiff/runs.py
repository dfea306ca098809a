"""``train_run``, ``sample_run`` and ``demo_run``: what ``python -m jaxdiff`` does, as functions.

``train_run(config, out)`` writes ``out/ckpt/<step>/`` (Orbax: params, optimizer state, EMA, step,
key, and the config), ``out/metrics.json`` (loss history, evaluations, steps/s) and
``out/samples.png``. ``sample_run(ckpt_dir, ...)`` rebuilds the model from the saved config and
writes ``samples.npz``, ``metrics.json`` and ``samples.png``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import experiment as E
from jaxdiff.guidance import classifier_free_guidance
from jaxdiff.sample import sample

SOLVERS = {
    "euler": diffrax.Euler,
    "heun": diffrax.Heun,
    "midpoint": diffrax.Midpoint,
    "tsit5": diffrax.Tsit5,
    "dopri5": diffrax.Dopri5,
}


def make_sampler(
    c: dict,
    setup: E.Setup,
    *,
    solver: str = "heun",
    steps: int = 20,
    eta: float = 0.0,
    guidance: float = 1.0,
    batch: int = 2000,
) -> Callable:
    """``(params, key, n, labels) -> samples`` drawn in jitted batches of ``batch``."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}; got {solver!r}")
    if steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps}")
    if eta < 0 or not math.isfinite(eta):
        raise ValueError(f"eta must be >= 0; got {eta}")
    if eta > 0 and (setup.source is not None or c.get("coupling", "independent") != "independent"):
        raise ValueError(
            "eta > 0 (the reverse SDE) needs the score of Gaussian noise independent of the data; "
            "a run with a source or a coupling samples with the ODE (eta 0)"
        )
    singular_at_1 = c["path"] in ("fm", "cosine") and (eta > 0 or c["target"] in ("eps", "score"))
    t_start = 1.0 - 1e-3 if singular_at_1 else 1.0
    shape = tuple(setup.example.shape[1:])
    apply = setup.model.apply

    @jax.jit
    def draw(params, key, labels):
        if setup.num_classes:
            field = classifier_free_guidance(
                lambda x, t, y: apply(params, x, t, y), labels, setup.num_classes, guidance
            )
        else:
            field = lambda x, t: apply(params, x, t)  # noqa: E731
        shape_n = (labels.shape[0], *shape)
        x_init = None if setup.source is None else setup.source(jax.random.fold_in(key, 1), shape_n)
        sol = sample(
            key,
            setup.path,
            field,
            shape_n,
            x_init=x_init,
            target=c["target"],
            eta=eta,
            steps=steps,
            t_start=t_start,
            solver=SOLVERS[solver](),
        )
        return sol.x

    def run(params, key, n, labels=None):
        labels = np.arange(n) % 10 if labels is None else np.asarray(labels)
        out = []
        for i, start in enumerate(range(0, n, batch)):
            lab = labels[start : start + batch]
            m = lab.shape[0]
            lab = np.pad(lab, (0, batch - m), mode="edge") if m < batch else lab
            x = draw(params, jax.random.fold_in(key, i), jnp.asarray(lab, jnp.int32))
            out.append(np.asarray(x[:m]))
        return np.concatenate(out), labels

    return run


def _measure(c, setup, x, labels, n) -> tuple[dict, np.ndarray]:
    """Metrics of samples ``x`` against held-out data (and, for 2-D data, the two-true-sets floor)."""
    if c["data"] == "digits":
        metrics = E.digits_metrics(x, labels if setup.num_classes else None)
        return metrics, E.reference_data(c, n)[0]
    reference = E.reference_data(c, n, 0)[0]
    return E.toy_metrics(x, reference, E.reference_data(c, n, 1)[0]), reference


def evaluate(c, setup, draw, params, key, n, *, log=print, plot: Path | None = None) -> dict:
    """Sample ``n`` points with ``draw`` (``make_sampler``) and measure them against held-out data."""
    start = E.now()
    x, labels = draw(params, key, n)
    seconds = E.now() - start
    metrics, reference = _measure(c, setup, x, labels, n)
    metrics["sample_seconds"] = seconds
    log("  " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
    if plot is not None:
        E.save_plot(x, reference, plot, f"{c['data']}, {c['path']} path, {c['target']} target")
    return {"metrics": metrics, "samples": x, "labels": labels}


def train_run(
    config: dict,
    out: str | Path,
    *,
    resume: bool = False,
    until: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Train per ``config`` into ``out``; ``resume`` continues from the latest checkpoint (with the
    saved config); ``until`` stops at that step (resume later). Returns the summary dict."""
    from jaxdiff.checkpoint import Checkpointer
    from jaxdiff.train import data_mesh, make_train_chunk, make_train_step, replicate, train

    out = Path(out)
    c = E.resolve(config)
    ckpt_dir = out / "ckpt"
    if ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
        if not resume:
            raise ValueError(
                f"{ckpt_dir} already holds checkpoints; pass --resume to continue or use another --out"
            )
    elif resume:
        raise FileNotFoundError(f"no checkpoint to resume from in {ckpt_dir}")
    ckpt = Checkpointer(ckpt_dir, max_to_keep=2)
    try:
        if resume:
            c = E.resolve(ckpt.meta()["config"])
        setup = E.build(c)
        state, opt = E.init_state(c, setup)
        if resume:
            state, _ = ckpt.restore(state)
            log(f"resumed from step {int(state.step)} in {ckpt_dir}")
        mesh = data_mesh()
        state = replicate(state, mesh)
        step_fn = make_train_step(setup.loss, opt, ema_decay=c["ema"])

        def make_chunk(k):
            return make_train_chunk(step_fn, setup.sample_batch, k, mesh=mesh)

        total = int(c["steps"])
        until = total if until is None else min(int(until), total)
        periods = [int(c[k]) for k in ("ckpt_every", "eval_every") if int(c[k]) > 0]
        every = math.gcd(*periods) if periods else None
        meta = {"config": c}
        evals: list[dict] = []
        n_eval = int(c["eval_n"])
        draw = make_sampler(c, setup, steps=int(c["eval_steps"]), batch=min(n_eval or 1, 2000))

        def on_every(s):
            step = int(s.step)
            if c["ckpt_every"] and (step % c["ckpt_every"] == 0 or step == until):
                ckpt.save(s, meta)
            if c["eval_every"] and n_eval and step % c["eval_every"] == 0 and step < total:
                key = jax.random.key(int(c["seed"]) + 1)
                res = evaluate(c, setup, draw, s.ema, key, n_eval, log=log)
                evals.append({"step": step, **res["metrics"]})

        log(
            f"training {c['model']} on {c['data']}: {c['path']} path, {c['loss']} loss, "
            f"{c['target']} target, {total} steps of batch {c['batch']} on {mesh.size} device(s)"
        )
        start, first = E.now(), int(state.step)
        state, history = train(
            state,
            make_chunk,
            until,
            chunk_size=int(c["chunk"]),
            every=every,
            on_every=on_every,
            progress=progress,
        )
        seconds = E.now() - start
        ckpt.wait()
        if int(state.step) not in ckpt.steps():
            ckpt.save(state, meta)
        ckpt.wait()
    finally:
        ckpt.close()
    steps_done = int(state.step) - first
    summary = {
        "config": c,
        "step": int(state.step),
        "train_seconds": seconds,
        "steps_per_second": steps_done / seconds if seconds > 0 else None,
        "loss_history": history,
        "evaluations": evals,
    }
    log(
        f"step {int(state.step)}: loss {history[-1] if history else float('nan'):.4f}, "
        f"{summary['steps_per_second'] or 0:.0f} steps/s, checkpoint in {ckpt_dir}"
    )
    if int(state.step) == total and n_eval:
        key = jax.random.key(int(c["seed"]) + 1)
        res = evaluate(c, setup, draw, state.ema, key, n_eval, plot=out / "samples.png", log=log)
        summary["final"] = res["metrics"]
    E.write_json(out / "metrics.json", summary)
    summary["state"] = state
    return summary


def load_checkpoint(ckpt_dir: str | Path):
    """``(config, setup, state)`` of the latest checkpoint in ``ckpt_dir`` (or ``ckpt_dir/ckpt``)."""
    from jaxdiff.checkpoint import Checkpointer

    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / "ckpt").is_dir():
        ckpt_dir = ckpt_dir / "ckpt"
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} does not exist")
    if not any(p.name.isdigit() for p in ckpt_dir.iterdir()):
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
    with Checkpointer(ckpt_dir) as ckpt:
        c = E.resolve(ckpt.meta()["config"])
        setup = E.build(c)
        like, _ = E.init_state(c, setup)
        state, _ = ckpt.restore(like)
    return c, setup, state


def sample_run(
    ckpt_dir: str | Path,
    *,
    n: int = 10_000,
    solver: str = "heun",
    steps: int = 20,
    eta: float = 0.0,
    seed: int = 0,
    label: int | None = None,
    guidance: float = 1.0,
    ema: bool = True,
    out: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Sample ``n`` points from a checkpoint; write ``samples.npz``, ``metrics.json``, ``samples.png``."""
    if n < 2:
        raise ValueError(f"n must be at least 2; got {n}")
    c, setup, state = load_checkpoint(ckpt_dir)
    if label is not None and not setup.num_classes:
        raise ValueError("--class needs a class-conditional model (trained with --conditional)")
    if label is not None and not 0 <= label < (setup.num_classes or 0):
        raise ValueError(f"class must lie in [0, {setup.num_classes}); got {label}")
    labels = None if label is None else np.full((n,), label)
    out = Path(out) if out is not None else Path(ckpt_dir) / "samples"
    params = state.ema if ema else state.params
    log(f"sampling {n} from step {int(state.step)}: {solver}, {steps} steps, eta {eta}")
    draw = make_sampler(
        c, setup, solver=solver, steps=steps, eta=eta, guidance=guidance, batch=min(n, 2000)
    )
    start = E.now()
    x, used = draw(params, jax.random.key(seed), n, labels)
    seconds = E.now() - start
    metrics, reference = _measure(c, setup, x, used, n)
    metrics.update(sample_seconds=seconds, solver=solver, steps=steps, eta=eta, guidance=guidance)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "samples.npz", samples=x, labels=used)
    E.write_json(out / "metrics.json", metrics)
    E.save_plot(x, reference, out / "samples.png", f"{c['data']}: {solver}, {steps} steps")
    log("  " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
    log(f"wrote {out / 'samples.npz'}, metrics.json and samples.png")
    return {"metrics": metrics, "samples": x, "labels": used}


DEMO_CONFIG = {
    "data": "checkerboard",
    "path": "fm",
    "depth": 4,  # depth sharpens the squares' edges more than width, at less cost
    "lr": 3e-3,
    "steps": 8000,
    "ckpt_every": 2000,
    "eval_n": 5000,
}


def demo_run(
    out: str | Path = "out/demo", *, steps: int | None = None, progress: bool = True
) -> int:
    """The README's main job: flow matching on the checkerboard, then samples, metrics and a plot.

    Trains ``DEMO_CONFIG`` from scratch in ``out`` (replacing an earlier demo there), samples 5,000
    points with Heun's method (20 steps) from the EMA parameters, and compares them with held-out
    data; the same statistics between two independent true sets show the noise floor.
    """
    import shutil

    out = Path(out)
    if (out / "ckpt").exists():
        shutil.rmtree(out / "ckpt")
    config = dict(DEMO_CONFIG, **({"steps": steps} if steps else {}))
    start = E.now()
    summary = train_run(config, out, progress=progress)
    m = summary["final"]
    print(
        f"energy distance to held-out data {m['energy_distance']:.5f} "
        f"(two true sets: {m['energy_distance_true_vs_true']:.5f}); "
        f"MMD {m['mmd']:.5f} (two true sets: {m['mmd_true_vs_true']:.5f})"
    )
    print(
        f"plot: {out / 'samples.png'}, metrics: {out / 'metrics.json'}; "
        f"total {E.now() - start:.0f} s"
    )
    return 0
