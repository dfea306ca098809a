"""Training runs: ``train_run`` (``python -m jaxdiff train``) and ``demo_run`` (``demo``).

A run folder is locked while a run uses it, never overwritten by a new run, and continued by
``resume`` (see ``jaxdiff.rundir`` for the folder's rules and what a resume may change).
``metrics.json`` is written before each checkpoint, so it always covers the newest checkpoint; a
resume trims anything after the step it restarts from and appends to the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxdiff import experiment as E
from jaxdiff import run_images as IR
from jaxdiff import rundir as R
from jaxdiff._checks import check_count
from jaxdiff.runs import evaluate, make_sampler


def train_run(
    config: dict,
    out: str | Path,
    *,
    resume: bool = False,
    until: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Train per ``config`` into the run folder ``out``; returns the summary (``metrics.json``).

    A new run refuses a folder that already holds a run's files (nothing is overwritten).
    ``resume`` continues from the newest intact checkpoint with the saved config: ``config`` may
    change only ``rundir.RESUME_MAY_CHANGE`` (more ``steps``, evaluation and checkpoint periods;
    see ``rundir.resume_config``), and the history in ``metrics.json`` is continued. A finished
    run is reported, not retrained. ``until`` stops at that step (resume later). The folder is
    locked for the whole run (``rundir.RunLock``)."""
    if until is not None:
        until = check_count(until, "until", what="a step")
    if resume and not R.has_steps(Path(out) / "ckpt"):
        raise FileNotFoundError(f"no checkpoint to resume from in {Path(out) / 'ckpt'}")
    source = None  # bad values, and image data that cannot train, fail before the folder
    if not resume:  # is made (a missing folder left one behind); opened once for the run
        source = IR.check_images(_check_devices(IR.resolve(config)))
    out = R.prepare(out)
    with R.RunLock(out):
        return _train(
            config, out, resume=resume, until=until, progress=progress, log=log, source=source
        )


def _check_devices(c: dict, resume: bool = False) -> dict:
    """``c``, refused where its batch does not split over the devices (the data mesh's)."""
    batch, n = int(c["batch"]), jax.device_count()
    if batch % n and resume:  # --batch cannot change on a resume: name what can
        fits = [k for k in range(1, batch + 1) if batch % k == 0 and k <= max(n, 8)]
        raise ValueError(
            f"the run's batch {batch} (from its checkpoint) does not split over the {n} devices; "
            f"resume it on a device count that divides it: {', '.join(map(str, fits))}"
        )
    if batch % n:
        raise ValueError(
            f"--batch {batch} must be a multiple of the {n} devices (each trains on an equal share)"
        )
    return c


def _train(config, out: Path, *, resume, until, progress, log, source=None) -> dict:
    from jaxdiff.checkpoint import Checkpointer
    from jaxdiff.train import data_mesh, make_train_chunk, make_train_step, replicate, train

    ckpt_dir = out / "ckpt"
    if not resume:
        c = IR.resolve(config)
        if R.has_steps(ckpt_dir):
            raise ValueError(
                f"{ckpt_dir} already holds checkpoints; pass --resume to continue or use another --out"
            )
        if R.run_files(out):
            raise ValueError(
                f"{out} already holds {', '.join(R.run_files(out))} of an earlier run; "
                "use another --out (a run never overwrites one)"
            )
    elif not R.has_steps(ckpt_dir):
        raise FileNotFoundError(f"no checkpoint to resume from in {ckpt_dir}")
    ckpt = Checkpointer(ckpt_dir, max_to_keep=2)
    feed, data, saved_meta = None, None, {}
    try:
        if resume:
            c, changes = R.resume_config(R.saved_config(ckpt.meta(), ckpt_dir), config)
            _check_devices(c, resume=True)  # a run resumed on other devices
        setup = IR.build(c, source)
        state, opt = E.init_state(c, setup)
        history = R.History()
        total = int(c["steps"])
        if resume:
            state, saved_meta = ckpt.restore(state)
            first = int(state.step)
            # refused before anything is logged or moved (the log announced the shorter
            # schedule and damaged steps were set aside, then the run was refused)
            if first > total:
                raise ValueError(f"the run is at step {first}; --steps {total} is behind it")
            if until is not None and until <= first and first < total:
                raise ValueError(f"--until {until} is not after the checkpoint's step {first}")
            ckpt.set_aside_damaged()  # moved to ckpt/damaged/, so new saves can take their steps
            _log_resume(c, changes, first, ckpt_dir, log)
            history = R.History(R.read_metrics(out), first)
            if first == total:
                return _finished(c, setup, state, history, out, log)
            if history.final is not None:  # trained further: the old final is an evaluation
                history.evaluations.append({"step": first, **history.final})
                history.final = None
        first = int(state.step)
        mesh = data_mesh()
        state = replicate(state, mesh)
        step_fn = make_train_step(
            setup.loss, opt, ema_decay=c["ema"], ema_targets=c["ema_targets"],
            target_decay=E.target_decay(c),
        )  # fmt: skip

        def make_chunk(k):
            return make_train_chunk(step_fn, setup.sample_batch, k, mesh=mesh)

        if IR.is_images(c):  # host data: a loader at the run's step, fed by a thread
            loaded = saved_meta.get("loader") if resume else None
            make_chunk, feed, data = IR.make_chunks(c, step_fn, mesh, first, loaded, setup.images)

        end = total if until is None else min(int(until), total)
        periods = [int(c[k]) for k in ("ckpt_every", "eval_every") if int(c[k]) > 0]
        every = periods or None  # chunks end at multiples of each (their gcd made 1-step chunks)
        meta = {"config": c}
        n_eval = int(c["eval_n"])
        draw = make_sampler(c, setup, steps=int(c["eval_steps"]), batch=min(n_eval or 1, 2000))
        start = E.now()
        session = {"start": first, "end": first, "total_steps": total, "seconds": 0.0}

        def record(step):  # metrics.json first, then the checkpoint: a resume trims the excess
            seconds = E.now() - start
            rate = (step - first) / seconds if seconds > 0 else None
            session.update(end=step, seconds=seconds, steps_per_second=rate)
            summary = history.record(c, step, session)
            E.write_json(out / R.METRICS, summary)
            return summary

        def on_every(s):
            step = int(s.step)
            if c["eval_every"] and n_eval and step % c["eval_every"] == 0 and step < total:
                key = jax.random.key(int(c["seed"]) + 1)
                res = evaluate(c, setup, draw, s.ema, key, n_eval, log=log)
                history.evaluations.append({"step": step, **res["metrics"]})
            if c["ckpt_every"] and (step % c["ckpt_every"] == 0 or step == end):
                record(step)
                ckpt.save(s, _with_loader(meta, data, step))

        log(
            f"training {c['model']} on {c['data']}: {c['path']} path, {c['loss']} loss, "
            f"{c['target']} target, {total} steps of batch {c['batch']} on {mesh.size} device(s)"
        )
        state, _ = train(
            state,
            make_chunk,
            end,
            chunk_size=int(c["chunk"]),
            on_chunk=lambda s, losses: history.add_loss(int(s.step), float(jnp.mean(losses))),
            every=every,
            on_every=on_every,
            progress=progress,
        )
        summary = record(int(state.step))
        if int(state.step) not in ckpt.steps():
            ckpt.save(state, _with_loader(meta, data, int(state.step)))
    finally:
        if feed is not None:
            feed.close()
        ckpt.close()
    log(
        f"step {int(state.step)}: loss {history.losses[-1]:.4f}, "
        f"{summary['steps_per_second'] or 0:.0f} steps/s, checkpoint in {ckpt_dir}"
    )
    if int(state.step) == total:
        summary = _final_evaluation(c, setup, state, history, out, summary, log)
    summary["state"] = state
    return summary


def _with_loader(meta: dict, data, step: int) -> dict:
    """The checkpoint's metadata, with the image loader's state at ``step`` for image runs."""
    return meta if data is None else {**meta, "loader": data.state(step)}


def _log_resume(c, changes, step, ckpt_dir, log) -> None:
    fixed = ", ".join(f"{k} {c[k]}" for k in c if k not in R.RESUME_MAY_CHANGE)
    log(f"resumed from step {step} in {ckpt_dir}; from the checkpoint: {fixed}")
    for k, (old, new) in changes.items():
        log(f"  {k}: {old} -> {new} (from the command line)")
    if "steps" in changes:
        log(
            f"  the learning-rate schedule (warmup + cosine) now ends at step {c['steps']}, as in "
            f"a run started with --steps {c['steps']}; from step {step} the rate follows it"
        )
        if c["loss"] == "consistency" and c["curriculum"] != "none":
            before = {**c, "steps": changes["steps"][0]}
            now, was = (E.consistency_scales(d)(step).item() for d in (c, before))
            log(
                f"  so does the {c['curriculum']} curriculum: the grid has {now} points at step "
                f"{step} (it had {was}), as in a run started with --steps {c['steps']}"
            )
            if c["target_ema"] == E.TARGET_EMA_CT:
                now, was = (float(E.target_decay(d)(step)) for d in (c, before))
                log(f"  and the target network's decay mu(N) is {now:.6g} (it had {was:.6g})")


def _final_evaluation(c, setup, state, history, out, summary, log) -> dict:
    n_eval = int(c["eval_n"])
    if not n_eval:
        return summary
    draw = make_sampler(c, setup, steps=int(c["eval_steps"]), batch=min(n_eval, 2000))
    key = jax.random.key(int(c["seed"]) + 1)
    res = evaluate(c, setup, draw, state.ema, key, n_eval, plot=out / "samples.png", log=log)
    history.final = summary["final"] = res["metrics"]
    E.write_json(out / R.METRICS, summary)
    return summary


def _finished(c, setup, state, history, out, log) -> dict:
    """A resumed run that is already at its last step: report it; write only a missing final
    evaluation (the run was stopped during it)."""
    step = int(state.step)
    previous = R.read_metrics(out)
    if previous is None or previous.get("step") != step:  # none, or a later session's whose
        previous = history.record(c, step)  # checkpoints were lost: the record at this step
        E.write_json(out / R.METRICS, previous)
    log(
        f"the run in {out} is finished (step {step} of {c['steps']}); nothing to train "
        f"(a larger --steps trains it further)"
    )
    if history.final is None and c["eval_n"]:
        previous = _final_evaluation(c, setup, state, history, out, previous, log)
    return {**previous, "state": state}


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

    Trains ``DEMO_CONFIG`` in ``out``, samples 5,000 points with Heun's method (20 steps) from the
    EMA parameters, and compares them with held-out data; the same statistics between two
    independent true sets show the noise floor. The demo never deletes or overwrites a run: if
    ``out`` holds the same demo (same ``steps``), a finished one is reported as it stands and an
    interrupted one continues from its last checkpoint; a folder holding anything else that a
    run writes (another run, or its ``metrics.json`` or ``samples.png``) is refused.
    """
    config = E.resolve(dict(DEMO_CONFIG, **({"steps": steps} if steps is not None else {})))
    start = E.now()
    out = R.prepare(out)
    with R.RunLock(out):
        found = R.run_files(out)
        if found:
            _check_same_demo(out, config, found)
            metrics = R.read_metrics(out)
            if metrics and metrics.get("step") == config["steps"] and "final" in metrics:
                print(
                    f"{out} holds this demo, finished: its results below (to train it again, "
                    "choose another --out)"
                )
                summary = metrics
            else:
                summary = _train({}, out, resume=True, until=None, progress=progress, log=print)
        else:
            summary = _train(config, out, resume=False, until=None, progress=progress, log=print)
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


def _check_same_demo(out: Path, config: dict, found: list[str]) -> None:
    """``ValueError`` unless ``out`` holds a run of exactly ``config`` (the demo's)."""
    from jaxdiff.checkpoint import CheckpointError, read_meta

    what = f"files of another run ({', '.join(found)})"
    if R.has_steps(out / "ckpt"):
        try:
            saved = E.resolve(R.saved_config(read_meta(out / "ckpt"), out / "ckpt"))
        except CheckpointError:
            what = "a run whose every checkpoint is damaged"
        else:
            diff = [k for k in config if saved.get(k) != config[k]]
            if not diff:
                return
            what = "another run (" + ", ".join(f"{k} {saved.get(k)}" for k in diff[:4])
            what += f"; the demo has {', '.join(f'{k} {config[k]}' for k in diff[:4])})"
    raise ValueError(f"{out} holds {what}; the demo never replaces a run: choose another --out")
