"""Straight and few-step generation from scratch, at equal training compute: flow matching with the
independent, OT and Schrödinger-bridge couplings, MeanFlow, shortcut models, consistency models
and reflow.

One evaluation for all, at 1, 2, 4 and 8 network evaluations: on a 2-D toy the energy distance and
MMD between ``N`` samples and ``N`` held-out points (the rows; floors: the same statistics between
two independent true sets); on the 8x8 digits (class-conditional models, labels 0..9 in turn) the
Fréchet distance on the shipped classifier's features to the test split and the classifier's
accuracy on the requested labels (the ``digits`` table; floor: the FD between the train and test
splits). Every method trains the same network (``TwoTimeMLP``, Fourier time features of scale 1;
the one-time methods call it with ``r = t``; toys width 128, digits width 256, depth 3) with the
same optimiser (AdamW, warmup + cosine to each stage's end, clipping) at the same batch, and is
evaluated from its EMA parameters.

**Equal training compute** is ``budget = S`` optimiser steps x batch per method, teachers
included: the two-stage methods spend ``S / 2`` on their flow-matching teacher and ``S / 2`` on
their own stage. Per step the methods differ in network passes per example (``fwd``: forward
passes, a JVP counted as 2 -- MeanFlow's runs on the 25% of the batch with ``r < t`` --, CT/CD's
stop-gradient target 1, CD's Heun teacher 2; ``bwd``: backward passes); measured on 2 CPU cores
(interleaved, batch 256) a step costs 1.03x FM's for MeanFlow (1.36x with the JVP on the whole
batch), 1.28x for CT and 1.93x for CD; a shortcut step runs two more forward passes (no
gradient) on its 25% of self-consistency examples. ``train_s`` (the method's own stage) and ``total_s`` (with
its teacher and, for reflow, the pair solves) exclude compilation; they mean something only on a
quiet machine. Two more rows spend ``2 S``: FM with twice the steps, and reflow from the
``S``-step FM teacher.

* **FM**: conditional flow matching on the linear path, independent pairs; Euler at k steps
  (``t = 1 -> 1e-3``) and at 100 steps (``q_100``, its multi-step number).
* **OT-CFM** (Tong et al. 2024; Pooladian et al. 2023): FM on mini-batch exact-OT pairs
  (``jd.exact_ot``; class-conditional on the digits); Euler.
* **SB-CFM** (Tong et al. 2024): the Brownian bridge ``x_t = (1 - t) x0 + t x1 + 0.5 sqrt(t (1 -
  t)) z`` on entropic-OT pairs with ``reg = 2 sigma^2 = 0.5`` (absolute, Sinkhorn to marginals
  within ``1e-3``; class-conditional on the digits), velocity regression (``jd.interpolant_loss``); Euler on its
  ODE ``dx = b dt`` (``jd.samplers.interpolant_sde()``, to ``t = 0``).
* **MeanFlow** (Geng et al. 2025): uniform times, 75% of the batch with ``r = t``, adaptive weight
  power 0.5 (the paper's 1.0 measured worse here); k uniform jumps (``jd.samplers.meanflow()``).
* **Shortcut** (Frans et al. 2024): the same two-time network and sampler, trained by flow
  matching at ``r = t`` and self-consistency (one jump of ``2h`` = two of ``h``) on 25% of the
  batch, jumps ``1, 1/2, ..., 1/64`` (``jd.shortcut_loss`` defaults).
* **CT** (consistency training, iCT-style: EDM scalings, stop-gradient target, pseudo-Huber,
  ``1 / dt`` weights on a grid uniform in ``t``, ``N`` doubling from 9 to 33 in three stages);
  multistep consistency sampling (``jd.samplers.consistency()``) on the uniform grid.
* **CD**: consistency distillation from the FM teacher (Heun teacher steps, ``N = 16``;
  initialised from scratch: starting from the teacher's weights measured worse).
* **Reflow** (Liu et al. 2023): ``pairs`` (noise, sample) from the FM teacher (Euler, 100 steps),
  then flow matching on the fixed pairs (``jd.flow_matching_loss`` on ``{"x0", "x1"}`` batches),
  initialised from the teacher's weights; Euler.

``straightness`` is Liu et al.'s ``S`` (100 Euler steps) of the field's own ODE: for MeanFlow,
of its instantaneous velocity ``u(z, t, t)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

import jaxdiff as jd

TITLE = (
    "Straight and few-step generation: couplings, MeanFlow, shortcut, consistency, reflow (1-8 "
    "steps)"
)
KS = (1, 2, 4, 8)
BANDWIDTHS = (0.05, 0.1, 0.2, 0.5, 1.0)
SB_SIGMA = 0.5


class Task(NamedTuple):
    """A data set: training batches ``data(key, n)``, the event shape, evaluation labels (or
    ``None``), ``score(x) -> (q, q2)`` (ED/MMD or FD/accuracy) and the floor."""

    name: str
    data: Callable[[Any, int], Any]
    shape: tuple[int, ...]
    labels: Any
    score: Callable[[Any], tuple[float, float]]
    floor: tuple[float, float]
    width: int


def toy_task(name: str, n_eval: int) -> Task:
    data = jd.data.TOY_DATASETS[name]
    true = data(jax.random.key(123), n_eval)

    def score(x):
        return float(jd.energy_distance(x, true)), float(jd.mmd(x, true, BANDWIDTHS))

    return Task(name, data, (2,), None, score, score(data(jax.random.key(7), n_eval)), 128)


def digits_task(n_eval: int) -> Task:
    from jaxdiff.digits import classifier_accuracy, digits_frechet_distance, load_classifier

    images, labels = (jnp.asarray(a) for a in jd.data.load_digits("train"))
    test, test_labels = jd.data.load_digits("test")
    clf = load_classifier()
    eval_labels = jnp.arange(n_eval) % 10

    def data(key, n):
        idx = jax.random.randint(key, (n,), 0, images.shape[0])
        return images[idx], labels[idx]

    def score(x):
        fd = float(digits_frechet_distance(clf, x, test))
        return fd, float(classifier_accuracy(clf, x, eval_labels[: x.shape[0]]))

    floor = (
        float(digits_frechet_distance(clf, images, test)),
        float(classifier_accuracy(clf, test, test_labels)),
    )
    return Task("digits", data, (8, 8, 1), eval_labels, score, floor, 256)


def _train(loss, params, data, steps, batch, lr, seed=1, ema_targets=False):
    """``steps`` of AdamW on ``loss``; returns (EMA params, train seconds, compile seconds).
    ``ema_targets``: the loss's targets from the EMA network (``make_train_step``'s)."""
    from jaxdiff.train import adamw_cosine, init_train_state, make_train_chunk, make_train_step

    opt = adamw_cosine(lr, steps)
    stages = loss if isinstance(loss, list) else [(loss, steps)]  # [(loss, steps)] curriculum
    state = init_train_state(params, opt, jax.random.key(seed))
    train_s = compile_s = 0.0
    for stage_loss, n in stages:
        step = make_train_step(stage_loss, opt, ema_decay=0.999, ema_targets=ema_targets)
        chunk = make_train_chunk(step, lambda k: data(k, batch), n)
        t0 = time.perf_counter()
        compiled = chunk.lower(state).compile()
        compile_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        state, losses = compiled(state)
        jax.block_until_ready(losses)
        train_s += time.perf_counter() - t0
    return state.ema, train_s, compile_s


def run(quick: bool = False) -> dict:
    if quick:
        return compare(  # the README's tables
            3000, 256, 5000, 20000, ["checkerboard", "8gaussians"], "quick", digits=(1500, 128)
        )
    return compare(
        20000, 512, 20000, 100000, ["checkerboard", "8gaussians"], "full", digits=(6000, 128)
    )


def compare(steps, batch, n_eval, n_pairs, datasets, mode, lr=2e-3, digits=None) -> dict:
    """The table for ``steps`` x ``batch`` per method on each toy of ``datasets``, and with
    ``digits = (steps, batch)`` the digits table (1,000 samples per evaluation)."""
    rows, floors = [], {}
    for name in datasets:
        task = toy_task(name, n_eval)
        floors[name] = task.floor
        rows += _on(task, steps, batch, n_eval, n_pairs, lr)
    digit_rows = []
    if digits is not None:
        task = digits_task(1000)
        floors["digits"] = task.floor
        digit_rows = _on(task, digits[0], digits[1], 1000, n_pairs, lr)
    notes = (
        f"{mode} mode: {steps} steps x batch {batch} per method on the toys, N = {n_eval} samples "
        f"per evaluation, {n_pairs} reflow pairs. Toy rows: q = energy distance, q2 = MMD; floors "
        "between two true sets: "
        + ", ".join(f"{k} {v[0]:.2e} / {v[1]:.2e}" for k, v in floors.items() if k != "digits")
        + ". budget: optimiser steps including the teacher's (S or 2 S); fwd/bwd: network passes "
        "per example per step (a JVP = 2 forward, MeanFlow's on 25% of the batch; shortcut: 2 more "
        "forward on 25%; CT/CD: the "
        "stop-gradient target is a 2nd forward; CD's Heun teacher adds 2). train_s: the method's "
        "own stage; total_s: with its teacher and the reflow pair solves; compile excluded. "
        "q_100: 100 Euler steps. Straightness: Liu et al.'s S over 100 Euler steps."
    )
    if digit_rows:
        fd, acc = floors["digits"]
        notes += (
            f"\n\nDigits ({digits[0]} steps x batch {digits[1]} per method, class-conditional, "
            f"1,000 samples): q = Fréchet distance to the test split (train vs test: {fd:.2f}), "
            f"q2 = class accuracy (the classifier on the test split: {acc:.3f}).\n\n"
            + _table(digit_rows)
        )
    return {"rows": rows, "notes": notes, "floors": floors, "digits": digit_rows}


def _table(rows: list[dict]) -> str:
    keys = list(rows[0])
    fmt = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows])


def _on(task: Task, steps, batch, n_eval, n_pairs, lr) -> list[dict]:
    """The rows of every method on one task."""
    from jaxdiff.nets import init_params
    from jaxdiff.nets.two_time import TwoTimeMLP

    conditional = task.labels is not None
    model = TwoTimeMLP(task.width, 3, num_classes=10 if conditional else None, time_scale=1.0)
    ex_labels = jnp.zeros((1,), jnp.int32) if conditional else None
    params0 = init_params(
        model, jax.random.key(0), jnp.zeros((1, *task.shape)), 0.5, 0.5, ex_labels
    )
    path, bridge = jd.linear_path(), jd.brownian_bridge(SB_SIGMA)
    x1 = jax.random.normal(jax.random.key(5), (n_eval, *task.shape))
    lab = () if not conditional else (task.labels,)
    one_time = lambda p, x, t, *y: model.apply(p, x, t, None, *y)  # noqa: E731 - r = t
    cm_fn = jd.consistency_function(one_time)

    def bound(fn, target, params, two_time=False):  # the evaluation labels bound in
        if two_time:
            return jd.Field(lambda p, x, t, r=None: model.apply(p, x, t, r, *lab), target, params)
        return jd.Field(lambda p, x, t: fn(p, x, t, *lab), target, params)

    rows = []

    def row(method, budget, own, fwd, bwd, train_s, total_s, compile_s, samples, field=None,
            q_100=False):  # fmt: skip
        r = {"data": task.name, "method": method, "budget": budget, "own_steps": own,
             "batch": batch, "fwd": fwd, "bwd": bwd, "train_s": train_s, "total_s": total_s,
             "compile_s": compile_s}  # fmt: skip
        for k in KS:
            r[f"q_{k}"], r[f"q2_{k}"] = task.score(samples(k))
        r["q_100"] = task.score(samples(100))[0] if q_100 else None
        r["straightness"] = None if field is None else float(jd.straightness(field, x1).value)
        rows.append(r)
        print("   ", {k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()})

    def sampler_of(p_field, the_path=path, sampler=None, key=None):
        return jax.jit(lambda k: jd.sample(key, the_path, p_field, x_init=x1, sampler=sampler,
                                           steps=k).x, static_argnums=0)  # fmt: skip

    def euler(params):
        field = bound(one_time, "velocity", params)
        return sampler_of(field), field

    fm_net = jd.Field(one_time, "velocity")
    fm_loss = jd.flow_matching_loss(fm_net, path)

    def reflow(teacher_p, teacher_s, own):
        t0 = time.perf_counter()
        pair_labels = jnp.arange(n_pairs) % 10 if conditional else None
        extra = () if pair_labels is None else (pair_labels,)
        teacher = jd.Field(lambda p, x, t: one_time(p, x, t, *extra), "velocity", teacher_p)
        pair_fn = jax.jit(lambda k: jd.reflow_pairs(k, path, teacher, (n_pairs, *task.shape)))
        pairs = jax.block_until_ready(pair_fn(jax.random.key(11)))
        if conditional:
            pairs["labels"] = pair_labels
        pairs_s = time.perf_counter() - t0  # one solve of n_pairs: compile included (~1 s)

        def pair_data(key, b):  # a minibatch of the fixed pairs: flow matching on given x1
            idx = jax.random.randint(key, (b,), 0, n_pairs)
            return jax.tree.map(lambda a: a[idx], pairs)

        p, s, c = _train(fm_loss, teacher_p, pair_data, own, batch, lr)
        return p, s, teacher_s + pairs_s + s, c

    half = steps // 2
    fm_p, fm_s, fm_c = _train(fm_loss, params0, task.data, steps, batch, lr)
    row("FM", steps, steps, 1, 1, fm_s, fm_s, fm_c, *euler(fm_p), q_100=True)
    half_p, half_s, _ = _train(fm_loss, params0, task.data, half, batch, lr)

    # couplings: mini-batch OT, and the Schrödinger bridge (Brownian bridge + Sinkhorn)
    ot_loss = jd.flow_matching_loss(
        fm_net, path, coupling=jd.exact_ot(class_conditional=conditional)
    )
    ot_p, ot_s, ot_c = _train(ot_loss, params0, task.data, steps, batch, lr)
    row("OT-CFM", steps, steps, 1, 1, ot_s, ot_s, ot_c, *euler(ot_p), q_100=True)
    sinkhorn = jd.sinkhorn_ot(2 * SB_SIGMA**2, class_conditional=conditional)
    sb_loss = jd.interpolant_loss(fm_net, bridge, coupling=sinkhorn)
    sb_p, sb_s, sb_c = _train(sb_loss, params0, task.data, steps, batch, lr)
    sb = bound(one_time, "velocity", sb_p)
    sb_run = sampler_of(sb, bridge, jd.samplers.interpolant_sde())
    row(f"SB-CFM (sigma {SB_SIGMA})", steps, steps, 1, 1, sb_s, sb_s, sb_c, sb_run, sb, q_100=True)

    # MeanFlow
    mf_net = jd.Field(model.apply, "velocity")
    mf_loss = jd.meanflow_loss(mf_net, path, time_sampler=jd.uniform_time(0.0, 1.0),
                               weighting_power=0.5)  # fmt: skip
    mf_p, mf_s, mf_c = _train(mf_loss, params0, task.data, steps, batch, lr)
    mf = bound(None, "velocity", mf_p, two_time=True)
    row("MeanFlow", steps, steps, 1.25, 1, mf_s, mf_s, mf_c,
        sampler_of(mf, sampler=jd.samplers.meanflow()), mf)  # fmt: skip
    sc_p, sc_s, sc_c = _train(jd.shortcut_loss(mf_net, path), params0, task.data, steps, batch, lr)
    sc = bound(None, "velocity", sc_p, two_time=True)
    row("shortcut", steps, steps, 1.5, 1, sc_s, sc_s, sc_c,
        sampler_of(sc, sampler=jd.samplers.meanflow()), sc)  # fmt: skip

    # consistency training (iCT curriculum in stages) and distillation from the S/2 teacher
    cm_net = jd.Field(cm_fn, "x0")
    sizes = [jd.ict_num_scales(k, steps, 8, 32) for k in range(steps)]
    stages = [(jd.consistency_training_loss(cm_net, path, num_scales=n), sizes.count(n))
              for n in dict.fromkeys(sizes)]  # fmt: skip

    def consistency(p):
        return sampler_of(bound(cm_fn, "x0", p), sampler=jd.samplers.consistency(),
                          key=jax.random.key(9))  # fmt: skip

    ct_p, ct_s, ct_c = _train(stages, params0, task.data, steps, batch, lr)
    row("CT", steps, steps, 2, 1, ct_s, ct_s, ct_c, consistency(ct_p))
    teacher = fm_net.bind(half_p)
    cd_loss = jd.consistency_distillation_loss(cm_net, teacher, path, num_scales=16)
    cd_p, cd_s, cd_c = _train(cd_loss, params0, task.data, steps - half, batch, lr)
    row("CD (FM S/2 + CD S/2)", steps, steps - half, 4, 1, cd_s, half_s + cd_s, cd_c,
        consistency(cd_p))  # fmt: skip

    # reflow from the S/2 teacher; then the 2 S rows
    rf_p, rf_s, rf_total, rf_c = reflow(half_p, half_s, steps - half)
    row("Reflow (FM S/2 + RF S/2)", steps, steps - half, 1, 1, rf_s, rf_total, rf_c,
        *euler(rf_p), q_100=True)  # fmt: skip
    fm2_p, fm2_s, fm2_c = _train(fm_loss, params0, task.data, 2 * steps, batch, lr)
    row("FM 2x", 2 * steps, 2 * steps, 1, 1, fm2_s, fm2_s, fm2_c, *euler(fm2_p), q_100=True)
    rf2_p, rf2_s, rf2_total, rf2_c = reflow(fm_p, fm_s, steps)
    row("Reflow (FM S + RF S)", 2 * steps, steps, 1, 1, rf2_s, rf2_total, rf2_c, *euler(rf2_p),
        q_100=True)  # fmt: skip
    return rows
