"""Few-step recipes on the digits, switch by switch: shortcut models (Frans et al. 2024) and
MeanFlow with guidance in training (Geng et al. 2025).

The fewstep benchmark's digits setting (``benchmarks/fewstep_training.py``: class-conditional
``TwoTimeMLP`` width 256, depth 3, Fourier time features of scale 1; AdamW 2e-3 with warmup and
cosine, batch 128; evaluated from the EMA parameters, decay 0.999) trained with
``jd.shortcut_loss`` and each of its recipe switches: EMA targets (``make_train_step(...,
ema_targets=True)``), clipping (``target_clip``; the digits lie in ``[-1, 1]`` as the paper's
images), and guided targets (``target_guidance = w`` with ``label_dropout = 0.1``, sampled
without guidance); and with ``jd.meanflow_loss`` (uniform times, adaptive weighting power 0.5,
as in the benchmark) without and with guidance in training (``target_guidance = w``,
``guidance_mix = k``, ``guidance_interval``), and trained with label dropout alone and guided
at sampling (classifier-free guidance of each jump, ``fd_k_cfgW``). Scores: the Fréchet distance on the shipped classifier's features against
the test split (floor: train against test, 6.6) and the classifier's accuracy on the requested
labels, 1,000 samples (labels 0..9 in turn) at 1, 2 and 4 jumps; one row per variant and seed.

    python scripts/fewstep_recipes.py [--steps 1500] [--seeds 0 1] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

import jaxdiff as jd
from benchmarks.fewstep_training import _train, digits_task
from jaxdiff.nets import init_params
from jaxdiff.nets.two_time import TwoTimeMLP

VARIANTS = {  # name: (loss, its keywords, ema_targets)
    "online": ("shortcut", {}, False),
    "ema": ("shortcut", {}, True),
    "ema+clip4": ("shortcut", {"target_clip": 4.0}, True),
    "guided1.5": ("shortcut", {"target_guidance": 1.5}, False),
    "ema+guided1.5": ("shortcut", {"target_guidance": 1.5}, True),
    "ema+guided2": ("shortcut", {"target_guidance": 2.0}, True),
    "meanflow": ("meanflow", {}, False),
    "meanflow-guided1.5": ("meanflow", {"target_guidance": 1.5}, False),
    "meanflow-guided2": ("meanflow", {"target_guidance": 2.0}, False),
    "meanflow-guided1-mix0.5": ("meanflow", {"target_guidance": 1.0, "guidance_mix": 0.5}, False),
    "meanflow-guided1.2": ("meanflow", {"target_guidance": 1.2}, False),
    # trained unguided with the null label; guided at sampling (CFG on the jumps, 2 calls a jump)
    "meanflow-dropout": ("meanflow", {"label_dropout": 0.1, "null_label": 10}, False),
    "meanflow-guided1.5-interval": (
        "meanflow",
        {"target_guidance": 1.5, "guidance_interval": (0.0, 0.84)},
        False,
    ),
}
SAMPLING_GUIDANCE = (1.2, 1.5, 2.0)
LOSSES = {
    "shortcut": lambda net, **kw: jd.shortcut_loss(net, jd.linear_path(), **kw),
    "meanflow": lambda net, **kw: jd.meanflow_loss(
        net, jd.linear_path(), time_sampler=jd.uniform_time(0.0, 1.0), weighting_power=0.5, **kw
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--only", nargs="+", choices=tuple(VARIANTS))
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    task = digits_task(1000)
    model = TwoTimeMLP(task.width, 3, num_classes=10, time_scale=1.0)
    net = jd.Field(model.apply, "velocity")
    labels = task.labels
    rows = []
    for name in args.only or VARIANTS:
        which, kw, ema = VARIANTS[name]
        if "target_guidance" in kw:
            kw = {**kw, "label_dropout": 0.1, "null_label": 10}
        loss = LOSSES[which](net, **kw)
        for seed in args.seeds:
            params0 = init_params(
                model, jax.random.key(seed), jnp.zeros((1, *task.shape)), 0.5, 0.5, labels[:1]
            )
            t0 = time.perf_counter()
            params, train_s, _ = _train(
                loss, params0, task.data, args.steps, args.batch, 2e-3, seed=seed + 1,
                ema_targets=ema,
            )  # fmt: skip
            field = jd.Field(lambda p, x, t, r=None: model.apply(p, x, t, r, labels), "velocity")
            x1 = jax.random.normal(jax.random.key(100 + seed), (labels.shape[0], *task.shape))
            row = {"variant": name, "seed": seed, "train_s": round(train_s, 1)}
            for k in (1, 2, 4):
                x = jd.sample(None, jd.linear_path(), field.bind(params), x_init=x1,
                              sampler=jd.samplers.meanflow(), steps=k).x  # fmt: skip
                fd, acc = task.score(x)
                row[f"fd_{k}"], row[f"acc_{k}"] = round(fd, 2), round(acc, 3)
            if kw.get("label_dropout") and "target_guidance" not in kw:
                for w in SAMPLING_GUIDANCE:  # classifier-free guidance of each jump
                    both = jd.Field(lambda p, x, t, *a: model.apply(p, x, t, *(a[:-1] or (None,)),
                                                                    a[-1]), "velocity")  # fmt: skip
                    guided = jd.classifier_free_guidance(both.bind(params), labels, 10, w)
                    for k in (1, 2, 4):
                        x = jd.sample(None, jd.linear_path(), guided, x_init=x1,
                                      sampler=jd.samplers.meanflow(), steps=k).x  # fmt: skip
                        fd, acc = task.score(x)
                        row[f"fd_{k}_cfg{w}"], row[f"acc_{k}_cfg{w}"] = round(fd, 2), round(acc, 3)
            row["total_s"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
