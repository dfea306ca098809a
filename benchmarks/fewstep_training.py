"""Few-step generation trained from scratch: flow matching, MeanFlow, consistency and reflow.

One evaluation for all: energy distance and MMD between ``N`` samples and ``N`` held-out true
points of a 2-D toy, at 1, 2, 4 and 8 network evaluations, next to the floor (the same statistic
between two independent true sets). Every method trains the same network (``TwoTimeMLP``: width
128, depth 3, Fourier time features of scale 1; the one-time methods call it with ``r = t``) for
the same ``steps`` at the same batch with the same optimiser (AdamW, warmup + cosine, clipping)
and is evaluated from its EMA parameters, so equal steps x batch is the compute unit; the columns
give each method's network evaluations per example (``fwd``: forward passes, a JVP counted as 2;
``bwd``: backward passes) and the measured training time, compile excluded.

* **FM**: conditional flow matching on the linear path; Euler at k steps (``t = 1 -> 1e-3``), and
  Euler at 100 steps as its multi-step number. **FM 2x**: twice the steps (the budget of the
  two-stage methods below).
* **MeanFlow** (Geng et al. 2025): uniform times, 75% of the batch with ``r = t``, adaptive weight
  power 0.5 (the paper's 1.0 measured worse here); k uniform MeanFlow jumps.
* **CT** (consistency training, iCT-style: stop-gradient target, pseudo-Huber, ``1 / dt``
  weights, ``N`` doubling from 10 to 160 in stages); multistep consistency sampling at k steps.
* **CD** from the trained FM network (Heun teacher steps, ``N = 32``); its cost includes FM's.
* **Reflow** (Liu et al. 2023): ``pairs`` (noise, sample) from the FM network (Euler, 100 steps),
  then ``steps`` more of flow matching on the fixed pairs, initialised from FM's weights; its
  cost is FM's training + the pair solves + the retraining (``extra_s``).

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
        + ". fwd/bwd: network passes per example per step (MeanFlow's JVP = 2 forward; CT/CD: the "
        "stop-gradient target is a 2nd forward; CD's Heun teacher adds 2). train_s excludes "
        "compile; extra_s is the teacher's training (+ the pair solves for reflow). ed_100: Euler "
        "at 100 steps. Straightness: Liu et al.'s S over 100 Euler steps."
    )
    return {"rows": rows, "notes": notes, "floors": floors}


def _on(name, data, true, model, params0, steps, batch, n_eval, n_pairs, lr) -> list[dict]:
    """The rows of every method on one data set."""
    path = jd.linear_path()
    one_time = lambda p, x, t: model.apply(p, x, t)  # noqa: E731 - r = t
    x1 = jax.random.normal(jax.random.key(5), (n_eval, 2))
    x1_s = x1[:2000]
    rows = []

    def row(method, fwd, bwd, train_s, compile_s, samples, extra_s=0.0, field=None, **kw):
        r = {"data": name, "method": method, "steps": kw.pop("steps", steps), "batch": batch,
             "fwd": fwd, "bwd": bwd, "train_s": train_s, "extra_s": extra_s,
             "compile_s": compile_s}  # fmt: skip
        for k in KS:
            r[f"ed_{k}"], r[f"mmd_{k}"] = _scores(samples(k), true)
        r["ed_100"] = kw.get("ed_100")
        r["straightness"] = None if field is None else float(jd.straightness(field, x1_s))
        rows.append(r)
        print("   ", {k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()})

    def euler(field):
        run = jax.jit(lambda k: jd.sample(None, path, field, x_init=x1, target="velocity",
                                          steps=k).x, static_argnums=0)  # fmt: skip
        return run

    # flow matching, and with twice the steps
    fm_net = jd.Field(one_time, "velocity")
    fm_loss = jd.flow_matching_loss(fm_net, path)
    fm_params, fm_s, fm_c = _train(fm_loss, params0, data, steps, batch, lr)
    fm = fm_net.bind(fm_params)
    sample_fm = euler(fm)
    row("FM", 1, 1, fm_s, fm_c, sample_fm, field=fm, ed_100=_scores(sample_fm(100), true)[0])
    p2, s2, c2 = _train(fm_loss, params0, data, 2 * steps, batch, lr)
    fm2 = fm_net.bind(p2)
    sample_fm2 = euler(fm2)
    row("FM 2x", 1, 1, s2, c2, sample_fm2, field=fm2, steps=2 * steps,
        ed_100=_scores(sample_fm2(100), true)[0])  # fmt: skip

    # MeanFlow
    mf_net = jd.Field(model.apply, "velocity")
    mf_loss = jd.meanflow_loss(mf_net, path, time_sampler=jd.uniform_time(0.0, 1.0),
                               weighting_power=0.5)  # fmt: skip
    mf_params, mf_s, mf_c = _train(mf_loss, params0, data, steps, batch, lr)
    mf = mf_net.bind(mf_params)
    mf_run = jax.jit(lambda k: jd.meanflow_sample(None, mf, x_init=x1, steps=k).x,
                     static_argnums=0)  # fmt: skip
    row("MeanFlow", 2, 1, mf_s, mf_c, mf_run, field=mf)

    # consistency training (iCT curriculum in stages) and distillation from FM
    cm_net = jd.Field(jd.consistency_function(one_time), "x0")

    def cm_sampler(p):
        f = cm_net.bind(p)
        return jax.jit(lambda k: jd.consistency_sample(jax.random.key(9), f, x_init=x1,
                                                       steps=k).x, static_argnums=0)  # fmt: skip

    sizes = [jd.ict_num_scales(k, steps, 10, 160) for k in range(steps)]
    stages = [(jd.consistency_training_loss(cm_net, path, num_scales=n), sizes.count(n))
              for n in dict.fromkeys(sizes)]  # fmt: skip
    ct_params, ct_s, ct_c = _train(stages, params0, data, steps, batch, lr)
    row("CT", 2, 1, ct_s, ct_c, cm_sampler(ct_params))
    cd_loss = jd.consistency_distillation_loss(cm_net, fm, path, num_scales=32)
    cd_params, cd_s, cd_c = _train(cd_loss, fm_params, data, steps, batch, lr)
    row("CD (from FM)", 4, 1, cd_s, cd_c, cm_sampler(cd_params), extra_s=fm_s)

    # reflow: pairs from FM, then flow matching on them, initialised from FM
    t0 = time.perf_counter()
    pair_fn = jax.jit(lambda k: jd.reflow_pairs(k, path, fm, (n_pairs, 2), steps=100))
    x0p, x1p = jax.block_until_ready(pair_fn(jax.random.key(11)))
    pairs_s = time.perf_counter() - t0

    def pair_data(key, b):
        idx = jax.random.randint(key, (b,), 0, n_pairs)
        return x0p[idx], x1p[idx]

    rf_loss = jd.reflow_loss(fm_net, path)
    rf_params, rf_s, rf_c = _train(rf_loss, fm_params, pair_data, steps, batch, lr)
    rf = fm_net.bind(rf_params)
    row("Reflow (2-RF)", 1, 1, rf_s, rf_c, euler(rf), extra_s=fm_s + pairs_s, field=rf,
        ed_100=_scores(euler(rf)(100), true)[0])  # fmt: skip
    return rows
