"""``train_run``, ``sample_run`` and ``demo_run``: what ``python -m jaxdiff`` does, as functions.

``train_run(config, out)`` writes ``out/ckpt/<step>/`` (Orbax: params, optimizer state, EMA, step,
key, and the config; checksummed), ``out/metrics.json`` (loss history, evaluations, steps/s) and
``out/samples.png`` (``train_run`` and ``demo_run`` live in ``jaxdiff.run_train``).
``sample_run(ckpt_dir, ...)`` rebuilds the model from the newest intact checkpoint and writes
``samples.npz``, ``metrics.json`` and ``samples.png``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import experiment as E
from jaxdiff import rundir as R
from jaxdiff import samplers
from jaxdiff._checks import check_count
from jaxdiff.field import Field
from jaxdiff.guidance import check_interval, classifier_free_guidance
from jaxdiff.sample import sample

METRICS_N = 10_000  # samples the O(m^2) metrics of `sample` see by default (23 s at 20k on 2 cores)

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
    solver: str | None = None,
    steps: int = 20,
    eta: float = 0.0,
    guidance: float = 1.0,
    guidance_interval: tuple[float, float] | None = None,
    batch: int = 2000,
) -> Callable:
    """``(params, key, n, labels) -> samples`` drawn in jitted batches of ``batch``.

    ``solver`` (default ``heun``) integrates the ODE or SDE of a diffusion or flow run; a run of a
    few-step loss (``meanflow``, ``shortcut``, ``consistency``) samples with its own sampler in
    ``steps`` steps from ``t = 1`` to 0 and takes no solver, ``eta`` or guidance. ``guidance_interval = (t_lo,
    t_hi)`` guides only there (``jd.classifier_free_guidance``'s ``interval``)."""
    if c["loss"] in E.FEWSTEP_LOSSES:
        return _fewstep_sampler(c, setup, solver, steps, eta, guidance, guidance_interval, batch)
    if guidance_interval is not None:
        try:
            guidance_interval = check_interval(guidance_interval)
        except ValueError as err:  # the library's message names its argument, not the flag
            raise ValueError(f"--guidance-interval: {err}") from None
    if not math.isfinite(guidance):  # NaN once sampled 24 s, then blamed eta and the steps
        raise ValueError(f"guidance must be a finite number; got {guidance}")
    if not setup.num_classes and (guidance != 1 or guidance_interval is not None):
        raise ValueError(
            "--guidance and --guidance-interval need a class-conditional model (trained with "
            "--conditional)"
        )
    solver = "heun" if solver is None else solver
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}; got {solver!r}")
    steps = check_count(steps, "steps")
    if eta < 0 or not math.isfinite(eta):
        raise ValueError(f"eta must be >= 0; got {eta}")
    if eta > 0 and (setup.source is not None or c.get("coupling", "independent") != "independent"):
        raise ValueError(
            "eta > 0 (the reverse SDE) needs the score of Gaussian noise independent of the data; "
            "a run with a source or a coupling samples with the ODE (eta 0)"
        )
    shape = tuple(setup.example.shape[1:])
    apply = setup.model.apply

    if eta > 0:
        sampler = samplers.sde(SOLVERS[solver](), eta=eta)
    else:
        sampler = samplers.ode(SOLVERS[solver]())

    net = Field(apply, c["target"]) if setup.field is None else setup.field

    @jax.jit
    def draw(params, key, labels):
        if setup.num_classes:
            conditional = net.bind(params)
            field = classifier_free_guidance(
                conditional, labels, setup.num_classes, guidance, interval=guidance_interval
            )
        else:
            field = net.bind(params)
        shape_n = (labels.shape[0], *shape)
        sol = sample(
            key, setup.path, field, shape_n, source=setup.source, sampler=sampler, steps=steps
        )
        return sol.x

    return _batched(draw, batch, f"solver {solver}, {steps} steps, eta {eta:g}")


def _fewstep_sampler(c, setup, solver, steps, eta, guidance, interval, batch) -> Callable:
    loss = c["loss"]
    flags = (
        ("--solver", solver is not None),
        ("--eta", eta != 0),
        ("--guidance", guidance != 1),
        ("--guidance-interval", interval is not None),
    )
    if any(on for _, on in flags):
        given = [f for f, on in flags if on]
        raise ValueError(
            f"a {loss} run samples with its own sampler (--steps 1, 2, 4, ...): drop "
            f"{', '.join(given)} (for flow-matching and diffusion runs)"
        )
    steps = check_count(steps, "steps")
    two_times = loss in E.TWO_TIME_LOSSES
    sampler = samplers.meanflow() if two_times else samplers.consistency()
    fn, shape = E.network_fn(c, setup.model), tuple(setup.example.shape[1:])

    def conditional(params_labels, x, t, *args):
        params, labels = params_labels
        if two_times:  # the two-time networks: (x, t, r, labels)
            return fn(params, x, t, *(args or (None,)), labels)
        return fn(params, x, t, labels)

    @jax.jit
    def draw(params, key, labels):
        if setup.num_classes:
            field = Field(conditional, c["target"], (params, labels))
        else:
            field = Field(fn, c["target"], params)
        shape_n = (labels.shape[0], *shape)
        t_max = c["t_max"]  # a consistency grid ending below 1 is sampled from its end
        t_start = None if two_times or t_max == 1.0 else t_max
        return sample(
            key, setup.path, field, shape_n, sampler=sampler, steps=steps, t_start=t_start
        ).x

    return _batched(draw, batch, f"the {loss} sampler, {steps} steps")


def _batched(draw, batch: int, how: str) -> Callable:
    """``(params, key, n, labels) -> (samples, labels)`` from ``draw`` in batches of ``batch``."""

    def run(params, key, n, labels=None):
        labels = np.arange(n) % 10 if labels is None else np.asarray(labels)
        out = []
        for i, start in enumerate(range(0, n, batch)):
            lab = labels[start : start + batch]
            m = lab.shape[0]
            lab = np.pad(lab, (0, batch - m), mode="edge") if m < batch else lab
            try:
                with _quiet_callback_errors():
                    x = draw(params, jax.random.fold_in(key, i), jnp.asarray(lab, jnp.int32))
                    x = np.asarray(x)
                finite = bool(np.isfinite(x).all())
            except jax.errors.JaxRuntimeError as err:  # the sampler's own finite check
                if "non-finite" not in str(err):
                    raise
                finite = False
            if not finite:
                raise FloatingPointError(
                    f"the samples came out non-finite (NaN or inf) with {how}: lower eta or take "
                    "more steps"
                )
            out.append(x[:m])
        return np.concatenate(out), labels

    return run


@contextlib.contextmanager
def _quiet_callback_errors():
    """Silence JAX's log of a failing host callback: the sampler's finite check raises through
    one, and its error is re-raised in one line (any other error propagates whole)."""
    logger = logging.getLogger("jax._src.callback")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _measure(c, setup, x, labels, n) -> tuple[dict, np.ndarray]:
    """Metrics of samples ``x`` against held-out data (and, for 2-D data, the two-true-sets floor)."""
    from jaxdiff import run_images as IR

    if IR.is_images(c):
        return IR.measure(c, x, setup.images)
    if c["data"] == "digits":
        metrics = E.digits_metrics(x, labels if setup.num_classes else None)
        return metrics, E.reference_data(c, n)[0]
    reference = E.reference_data(c, n, 0)[0]
    return E.toy_metrics(x, reference, E.reference_data(c, n, 1)[0]), reference


def evaluate(c, setup, draw, params, key, n, *, log=print, plot: Path | None = None) -> dict:
    """Sample ``n`` points with ``draw`` (``make_sampler``) and measure them against held-out data."""
    from jaxdiff import run_images as IR

    start = E.now()
    x, labels = draw(params, key, n, IR.eval_labels(c, n, setup.images))
    seconds = E.now() - start
    metrics, reference = _measure(c, setup, x, labels, n)
    metrics["sample_seconds"] = seconds
    log("  " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
    if plot is not None:
        save = IR.save_plot if IR.is_images(c) else E.save_plot
        save(x, reference, plot, f"{c['data']}, {c['path']} path, {c['target']} target")
    return {"metrics": metrics, "samples": x, "labels": labels}


def load_checkpoint(ckpt_dir: str | Path, images: str | None = None):
    """``(config, setup, state, writer)`` of the newest intact checkpoint in ``ckpt_dir`` (or
    ``ckpt_dir/ckpt``); ``writer`` names the process still training the run (``None``: none).

    An image run reads its training images (its network is sized to them); ``images`` (an
    ``--images`` spec) names them where they moved, checked against the checkpoint's count and
    shape."""
    if not str(ckpt_dir).strip():  # Path("") is the working directory
        raise ValueError("--ckpt must name a run folder; got an empty string")
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / "ckpt").is_dir():
        ckpt_dir = ckpt_dir / "ckpt"
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} does not exist")
    if not any(p.name.isdigit() for p in ckpt_dir.iterdir()):
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
    writer = R.holder(ckpt_dir.parent)  # a live run: its newest step may be a save in progress
    for _ in range(_LIVE_RETRIES):
        try:
            return (*_load_step(ckpt_dir, images, writer), writer)
        except _Vanished as gone:  # the live run's retention deleted the step picked: again
            step = gone.step
    raise FileNotFoundError(
        f"the run is still training ({writer}) and deleted each step picked here before it was "
        f"read (last: step {step}; it keeps its newest checkpoints only): sample again, or after "
        "the run"
    )


_LIVE_RETRIES = 5


class _Vanished(Exception):
    """The step picked was deleted (by the live run's retention) before it was read."""

    def __init__(self, step: int):
        super().__init__(step)
        self.step = step


def _load_step(ckpt_dir: Path, images: str | None, writer: str | None):
    """``(config, setup, state)`` of the newest intact step; :class:`_Vanished` where a live run
    deleted that step before its state was read."""
    from jaxdiff.checkpoint import Checkpointer

    with Checkpointer(ckpt_dir, writer=writer) as ckpt:
        step = ckpt._pick(None)  # one step for the config and the state (the run saves on)
        try:
            return _read_step(ckpt, ckpt_dir, step, images)
        except Exception:
            if writer is not None and not (ckpt_dir / str(step)).exists():
                raise _Vanished(step) from None
            raise


def _read_step(ckpt, ckpt_dir: Path, step: int, images: str | None):
    """``(config, setup, state)`` of ``step``: its config, the model built from it, its state."""
    from jaxdiff import run_images as IR

    meta = ckpt.meta(step)
    saved = R.saved_config(meta, ckpt_dir)
    if images is not None:
        if not IR.is_images(saved):
            raise ValueError(
                f"--images applies to image runs; this run trained on {saved['data']!r}"
            )
        saved = {**saved, "images": images}
    c = IR.resolve(saved)
    try:
        setup = IR.build(c)
    except FileNotFoundError as err:
        if not IR.is_images(c) or images is not None:
            raise
        raise FileNotFoundError(
            f"{err}: sampling reads the run's training images (its network is sized to them, "
            "the metrics compare with them); if they moved, pass --images SPEC"
        ) from None
    if images is not None:
        IR.check_loader_state(meta.get("loader"), IR.loader(c, setup.images))
    like, _ = E.init_state(c, setup)
    state, _ = ckpt.restore(like, step)
    return c, setup, state


SAMPLE_STREAM = 0x5A3D1E  # folded into the seed: sampling's keys apart from training's


def sample_key(seed: int) -> jax.Array:
    """The root key of ``sample_run(seed=...)``: ``fold_in(key(seed), SAMPLE_STREAM)``.

    Training splits ``key(seed)`` into its init and state keys (``split(k)[i]`` is
    ``fold_in(k, i)``), so sampling from ``key(seed)`` with batch ``i``'s key ``fold_in(k, i)``
    gave batch 0 the init key and batch 1 the training key, whose draws made the training's batch
    1 (a key-hygiene review: the sampler's first noise a monotone function of those uniforms, at
    both defaults, seed 0)."""
    return jax.random.fold_in(jax.random.key(seed), SAMPLE_STREAM)


def sample_run(
    ckpt_dir: str | Path,
    *,
    n: int = 10_000,
    solver: str | None = None,
    steps: int | None = None,
    eta: float = 0.0,
    seed: int = 0,
    label: int | None = None,
    guidance: float = 1.0,
    guidance_interval: tuple[float, float] | None = None,
    ema: bool = True,
    out: str | Path | None = None,
    metrics_n: int = METRICS_N,
    images: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Sample ``n`` points from a checkpoint; write ``samples.npz``, ``metrics.json``, ``samples.png``.

    The metrics (energy distance and MMD, or the digits' Fréchet distance) cost O(m^2) in the
    number of points m they see: they use the first ``metrics_n`` samples (i.i.d., so an unbiased
    subsample; 0: no metrics), and ``metrics.json`` says how many. ``steps`` defaults to 20, and
    to 1 for a meanflow, shortcut or consistency run (one-step generators).
    """
    if n < 2:
        raise ValueError(f"n must be at least 2; got {n}")
    metrics_n = check_count(metrics_n, "metrics_n", minimum=0, what="0: no metrics")
    if metrics_n == 1:
        raise ValueError("metrics_n must be 0 (no metrics) or at least 2; got 1")
    E.check_seed(seed)
    c, setup, state, writer = load_checkpoint(ckpt_dir, images)
    if label is not None and not setup.num_classes:
        raise ValueError("--class needs a class-conditional model (trained with --conditional)")
    if label is not None and not 0 <= label < (setup.num_classes or 0):
        raise ValueError(f"class must lie in [0, {setup.num_classes}); got {label}")
    labels = None if label is None else np.full((n,), label)
    if steps is None:
        steps = 1 if c["loss"] in E.FEWSTEP_LOSSES else 20
    params = state.ema if ema else state.params
    draw = make_sampler(  # checks the options before the output folder is made
        c,
        setup,
        solver=solver,
        steps=steps,
        eta=eta,
        guidance=guidance,
        guidance_interval=guidance_interval,
        batch=min(n, 2000),
    )
    run = Path(ckpt_dir).parent if R.has_steps(Path(ckpt_dir)) else Path(ckpt_dir)
    if out is not None and _holds_training_run(Path(out)):  # its metrics.json and samples.png
        raise ValueError(
            f"--out {out} holds a training run (its checkpoints and metrics.json), which the "
            f"samples would overwrite; choose another folder (default: {run / 'samples'})"
        )
    out = R.prepare(out if out is not None else run / "samples")
    if c["loss"] in E.FEWSTEP_LOSSES:
        solver = c["loss"]  # the run's own sampler
    solver = "heun" if solver is None else solver
    live = "" if writer is None else f" (the run is still training: {writer})"
    log(f"sampling {n} from step {int(state.step)}{live}: {solver}, {steps} steps, eta {eta}")
    start = E.now()
    x, used = draw(params, sample_key(seed), n, labels)
    seconds = E.now() - start
    m = min(n, metrics_n)
    if m:
        metrics, reference = _measure(c, setup, x[:m], None if used is None else used[:m], m)
    else:  # no metrics: data to plot the samples against, without the O(m^2) comparison
        from jaxdiff import run_images as IR

        k = min(n, 2000)
        reference = (
            IR.reference(c, k, setup.images) if IR.is_images(c) else E.reference_data(c, k)[0]
        )
        metrics = {}
    metrics.update(sample_seconds=seconds, solver=solver, steps=steps, eta=eta, guidance=guidance)
    if guidance_interval is not None:
        metrics.update(guidance_interval=[float(v) for v in guidance_interval])
    metrics.update(n_samples=n, metrics_n=m)
    np.savez(out / "samples.npz", samples=x, labels=used)
    E.write_json(out / "metrics.json", metrics)
    from jaxdiff import run_images as IR

    save = IR.save_plot if IR.is_images(c) else E.save_plot
    save(x, reference, out / "samples.png", f"{c['data']}: {solver}, {steps} steps")
    log("  " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
    log(f"wrote {out / 'samples.npz'}, metrics.json and samples.png")
    return {"metrics": metrics, "samples": x, "labels": used}


def _holds_training_run(out: Path) -> bool:
    """Whether ``out`` holds a training run: checkpoints, or a metrics.json with a loss history."""
    if R.has_steps(out / "ckpt"):
        return True
    metrics = out / R.METRICS
    if not metrics.is_file():
        return False
    try:
        data = json.loads(metrics.read_text())
    except (OSError, ValueError):
        return True  # unreadable: not ours to overwrite
    return isinstance(data, dict) and ("loss_history" in data or "config" in data)


def __getattr__(name: str):
    if name in ("train_run", "demo_run", "DEMO_CONFIG"):  # jaxdiff.run_train imports this module
        from jaxdiff import run_train

        return getattr(run_train, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
