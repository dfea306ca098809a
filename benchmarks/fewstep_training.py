"""Few-step generation trained from scratch: flow matching, MeanFlow, consistency and reflow.

One evaluation for all: energy distance and MMD between ``N`` samples and ``N`` held-out true
points of a 2-D toy, at 1, 2, 4 and 8 network evaluations, next to the floor (the same statistic
between two independent true sets). Every method trains the same network (``TwoTimeMLP``: width
128, depth 3, Fourier time features of scale 1; the one-time methods call it with ``r = t``) with
the same optimiser (AdamW, warmup + cosine to each stage's end, clipping, lr 2e-3) at the same
batch, and is evaluated from its EMA parameters.

**Equal training compute** is ``budget = S`` optimiser steps x batch per method, teachers
included: the two-stage methods spend ``S / 2`` on their flow-matching teacher and ``S / 2`` on
their own stage. Per step the methods differ in network passes per example (``fwd``: forward
passes, a JVP counted as 2 -- MeanFlow's runs on the 25% of the batch with ``r < t`` --, CT/CD's
stop-gradient target 1, CD's Heun teacher 2; ``bwd``: backward passes); measured on 2 CPU cores
(interleaved, batch 256) a step costs 1.03x FM's for MeanFlow (1.36x with the JVP on the whole
batch), 1.28x for CT and 1.93x for CD. The measured seconds are given too (``train_s``: the
method's own stage; ``total_s``: with its teacher and, for reflow, the pair solves; compile
excluded). Two more rows spend ``2 S``: FM with twice the steps, and reflow from the ``S``-step
FM teacher.

* **FM**: conditional flow matching on the linear path; Euler at k steps (``t = 1 -> 1e-3``) and at
  100 steps (``ed_100``, its multi-step number).
* **MeanFlow** (Geng et al. 2025): uniform times, 75% of the batch with ``r = t``, adaptive weight
  power 0.5 (the paper's 1.0 measured worse here); k uniform MeanFlow jumps.
* **CT** (consistency training, iCT-style: EDM scalings, stop-gradient target, pseudo-Huber,
  ``1 / dt`` weights on a grid uniform in ``t``, ``N`` doubling from 9 to 33 in three stages);
  multistep consistency sampling on the uniform grid at k steps.
* **CD**: consistency distillation from the FM teacher (Heun teacher steps, ``N = 16``;
  initialised from scratch: starting from the teacher's weights measured worse).
* **Reflow** (Liu et al. 2023): ``pairs`` (noise, sample) from the FM teacher (Euler, 100 steps),
  then flow matching on the fixed pairs, initialised from the teacher's weights; Euler at k steps.

``straightness`` is Liu et al.'s ``S`` (100 Euler steps) of the field's own ODE: for MeanFlow,
of its instantaneous velocity ``u(z, t, t)``.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

import jaxdiff as jd

TITLE = "Few-step generation: FM vs MeanFlow vs consistency vs reflow (ED/MMD at 1-8 steps)"
KS = (1, 2, 4, 8)
BANDWIDTHS = (0.05, 0.1, 0.2, 0.5, 1.0)


def _train(loss, params, data, steps, batch, lr, seed=1):
    """``steps`` of AdamW on ``loss``; returns (EMA params, train seconds, compile seconds)."""
    from jaxdiff.train import adamw_cosine, init_train_state, make_train_chunk, make_train_step

    opt = adamw_cosine(lr, steps)
    stages = loss if isinstance(loss, list) else [(loss, steps)]  # [(loss, steps)] curriculum
    state = init_train_state(params, opt, jax.random.key(seed))
    train_s = compile_s = 0.0
    for stage_loss, n in stages:
        step = make_train_step(stage_loss, opt, ema_decay=0.999)
        chunk = make_train_chunk(step, lambda k: data(k, batch), n)
        t0 = time.perf_counter()
        compiled = chunk.lower(state).compile()
        compile_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        state, losses = compiled(state)
        jax.block_until_ready(losses)
        train_s += time.perf_counter() - t0
    return state.ema, train_s, compile_s


def _scores(x, true):
    return (float(jd.energy_distance(x, true)), float(jd.mmd(x, true, BANDWIDTHS)))


def run(quick: bool = False) -> dict:
    if quick:
        return compare(3000, 256, 5000, 20000, ["checkerboard"], "quick")
    return compare(20000, 512, 20000, 100000, ["checkerboard", "8gaussians"], "full")


def compare(steps, batch, n_eval, n_pairs, datasets, mode, lr=2e-3) -> dict:
    """The table for ``steps`` x ``batch`` per method on each of ``datasets``."""
    from jaxdiff.nets import init_params
    from jaxdiff.nets.two_time import TwoTimeMLP

    model = TwoTimeMLP(width=128, depth=3, time_scale=1.0)
    params0 = init_params(model, jax.random.key(0), jnp.zeros((1, 2)), 0.5, 0.5)
    rows, floors = [], {}
    for name in datasets:
        data = jd.data.TOY_DATASETS[name]
        true = data(jax.random.key(123), n_eval)
        floors[name] = _scores(data(jax.random.key(7), n_eval), true)
        rows += _on(name, data, true, model, params0, steps, batch, n_eval, n_pairs, lr)

    notes = (
        f"{mode} mode: {steps} steps x batch {batch} per method, "
        f"N = {n_eval} samples per evaluation, {n_pairs} reflow pairs. Floors (ED, MMD) between two "
        "true sets: "
        + ", ".join(f"{k} {v[0]:.2e} / {v[1]:.2e}" for k, v in floors.items())
        + ". budget: optimiser steps including the teacher's (S or 2 S); fwd/bwd: network passes "
        "per example per step (a JVP = 2 forward, MeanFlow's on 25% of the batch; CT/CD: the "
        "stop-gradient target is a 2nd forward; CD's Heun teacher adds 2). train_s: the method's own stage; total_s: with "
        "its teacher and the reflow pair solves; compile excluded. ed_100: Euler at 100 steps. "
        "Straightness: Liu et al.'s S over 100 Euler steps."
    )
    return {"rows": rows, "notes": notes, "floors": floors}


def _on(name, data, true, model, params0, steps, batch, n_eval, n_pairs, lr) -> list[dict]:
    """The rows of every method on one data set."""
    path = jd.linear_path()
    one_time = lambda p, x, t: model.apply(p, x, t)  # noqa: E731 - r = t
    x1 = jax.random.normal(jax.random.key(5), (n_eval, 2))
    rows = []

    def row(
        method,
        budget,
        own,
        fwd,
        bwd,
        train_s,
        total_s,
        compile_s,
        samples,
        field=None,
        ed_100=False,
    ):
        r = {"data": name, "method": method, "budget": budget, "own_steps": own, "batch": batch,
             "fwd": fwd, "bwd": bwd, "train_s": train_s, "total_s": total_s,
             "compile_s": compile_s}  # fmt: skip
        for k in KS:
            r[f"ed_{k}"], r[f"mmd_{k}"] = _scores(samples(k), true)
        r["ed_100"] = _scores(samples(100), true)[0] if ed_100 else None
        r["straightness"] = (
            None
            if field is None
            else float(jd.straightness(field, x1[:2000], path=jd.linear_path()).value)
        )
        rows.append(r)
        print("   ", {k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()})

    def euler(field):
        return jax.jit(lambda k: jd.sample(None, path, field, x_init=x1, steps=k).x,
                       static_argnums=0)  # fmt: skip

    def consistency(p):
        f, cm = cm_net.bind(p), jd.samplers.consistency()
        return jax.jit(lambda k: jd.sample(jax.random.key(9), path, f, x_init=x1, sampler=cm,
                                           steps=k).x, static_argnums=0)  # fmt: skip

    def reflow(teacher, teacher_s, own):
        t0 = time.perf_counter()
        pair_fn = jax.jit(lambda k: jd.reflow_pairs(k, path, teacher, (n_pairs, 2), steps=100))
        pairs = jax.block_until_ready(pair_fn(jax.random.key(11)))
        pairs_s = time.perf_counter() - t0  # one solve of n_pairs: compile included (~1 s)

        def pair_data(key, b):  # a minibatch of the fixed pairs: flow matching on given x1
            idx = jax.random.randint(key, (b,), 0, n_pairs)
            return jax.tree.map(lambda a: a[idx], pairs)

        p, s, c = _train(fm_loss, teacher.params, pair_data, own, batch, lr)
        return fm_net.bind(p), s, teacher_s + pairs_s + s, c

    half = steps // 2
    # flow matching: the S-step model, and the S/2-step teacher of the two-stage methods
    fm_net = jd.Field(one_time, "velocity")
    fm_loss = jd.flow_matching_loss(fm_net, path)
    fm_p, fm_s, fm_c = _train(fm_loss, params0, data, steps, batch, lr)
    fm = fm_net.bind(fm_p)
    row("FM", steps, steps, 1, 1, fm_s, fm_s, fm_c, euler(fm), fm, ed_100=True)
    half_p, half_s, _ = _train(fm_loss, params0, data, half, batch, lr)
    teacher = fm_net.bind(half_p)

    # MeanFlow
    mf_net = jd.Field(model.apply, "velocity")
    mf_loss = jd.meanflow_loss(mf_net, path, time_sampler=jd.uniform_time(0.0, 1.0),
                               weighting_power=0.5)  # fmt: skip
    mf_p, mf_s, mf_c = _train(mf_loss, params0, data, steps, batch, lr)
    mf = mf_net.bind(mf_p)
    mf_run = jax.jit(lambda k: jd.sample(None, path, mf, x_init=x1, steps=k,
                                         sampler=jd.samplers.meanflow()).x,
                     static_argnums=0)  # fmt: skip
    row("MeanFlow", steps, steps, 1.25, 1, mf_s, mf_s, mf_c, mf_run, mf)

    # consistency training (iCT curriculum in stages) and distillation from the S/2 teacher
    cm_net = jd.Field(jd.consistency_function(one_time), "x0")
    sizes = [jd.ict_num_scales(k, steps, 8, 32) for k in range(steps)]
    stages = [(jd.consistency_training_loss(cm_net, path, num_scales=n), sizes.count(n))
              for n in dict.fromkeys(sizes)]  # fmt: skip
    ct_p, ct_s, ct_c = _train(stages, params0, data, steps, batch, lr)
    row("CT", steps, steps, 2, 1, ct_s, ct_s, ct_c, consistency(ct_p))
    cd_loss = jd.consistency_distillation_loss(cm_net, teacher, path, num_scales=16)
    cd_p, cd_s, cd_c = _train(cd_loss, params0, data, steps - half, batch, lr)
    row("CD (FM S/2 + CD S/2)", steps, steps - half, 4, 1, cd_s, half_s + cd_s, cd_c,
        consistency(cd_p))  # fmt: skip

    # reflow from the S/2 teacher; then the 2 S rows
    rf, rf_s, rf_total, rf_c = reflow(teacher, half_s, steps - half)
    row("Reflow (FM S/2 + RF S/2)", steps, steps - half, 1, 1, rf_s, rf_total, rf_c, euler(rf),
        rf, ed_100=True)  # fmt: skip
    fm2_p, fm2_s, fm2_c = _train(fm_loss, params0, data, 2 * steps, batch, lr)
    fm2 = fm_net.bind(fm2_p)
    row("FM 2x", 2 * steps, 2 * steps, 1, 1, fm2_s, fm2_s, fm2_c, euler(fm2), fm2, ed_100=True)
    rf2, rf2_s, rf2_total, rf2_c = reflow(fm, fm_s, steps)
    row("Reflow (FM S + RF S)", 2 * steps, steps, 1, 1, rf2_s, rf2_total, rf2_c, euler(rf2), rf2,
        ed_100=True)  # fmt: skip
    return rows
