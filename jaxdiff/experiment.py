"""Runs behind the command line: build a model, path and loss from a JSON-able config, train with
checkpoints, evaluation and plots, then sample a checkpoint and measure the samples.

A config is a plain dict (``DEFAULTS`` overridden by the user) saved with every checkpoint, so
``sample_run`` rebuilds exactly the trained model. Paths: ``fm`` (linear, flow matching), ``vp``,
``subvp``, ``ve``, ``cosine``. Losses: ``fm`` (regress the conditional velocity), ``eps``, ``x0``,
``v``, ``dsm`` (the conditional score; weighting ``sigma2``, its default, or ``likelihood``).
Sources: ``gaussian`` or a 2-D toy set (data-to-data translation on the ``fm`` or ``cosine``
path); couplings: ``independent``, ``ot`` (mini-batch exact OT), ``sinkhorn`` (entropic,
``ot_reg`` times the mean cost), and their class-conditional ``ot-class`` / ``sinkhorn-class``
(need ``conditional``).
Few-step losses (``FEWSTEP_LOSSES``): ``meanflow`` (Geng et al. 2025: the average velocity of a
two-time network, ``TwoTimeMLP`` or with ``model`` ``unet`` ``TwoTimeUNet``, sampled by
``jd.samplers.meanflow()``), ``shortcut`` (Frans et al. 2024: the same network and sampler,
trained by self-consistency, :func:`jaxdiff.shortcut_loss`) and ``consistency`` (consistency training,
Song et al. 2023: the network inside ``consistency_function``, target ``x0``, sampled by
``jd.samplers.consistency()``), both on the ``fm`` or ``cosine`` path from Gaussian noise.
The image recipe: ``precond`` ``edm`` wraps the network in EDM's preconditioning (target ``x0``,
``sigma_data``), weightings ``edm``, ``min-snr``, ``sigmoid``, ``v``, ``elbo`` (each converted to the
loss's error, :mod:`jaxdiff.weightings`), time ``edm`` (log-normal noise levels), ``dropout`` for
the U-Net (a fresh key per step) and ``dtype`` ``bfloat16`` (mixed precision).
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import couplings as CP
from jaxdiff import losses as L
from jaxdiff import weightings as W
from jaxdiff._checks import check_count
from jaxdiff.data import TOY_DATASETS, load_digits
from jaxdiff.field import Field
from jaxdiff.guidance import check_interval
from jaxdiff.metrics import energy_distance, mmd
from jaxdiff.paths import GaussianPath, cosine_path, linear_path, subvp_path, ve_path, vp_path
from jaxdiff.sources import dataset_source

Array = jax.Array

PATHS = {
    "fm": linear_path,
    "vp": vp_path,
    "subvp": subvp_path,
    "ve": ve_path,
    "cosine": cosine_path,
}
FEWSTEP_LOSSES = ("meanflow", "shortcut", "consistency")
TWO_TIME_LOSSES = ("meanflow", "shortcut")  # u(x, t, r): the two-time networks
LOSSES = ("fm", "eps", "x0", "v", "dsm", *FEWSTEP_LOSSES)
WEIGHTINGS = {
    "unit": L.unit_weight,
    "sigma2": L.sigma_sq_weight,
    "likelihood": L.likelihood_weight,
    "edm": W.edm_weight,  # factories of the image recipe: built with the config's parameters
    "min-snr": W.min_snr_weight,
    "sigmoid": W.sigmoid_weight,
    "v": W.v_weight,
    "elbo": W.elbo_weight,
}
TIMES = ("uniform", "logit-normal", "importance", "edm")
PRECONDS = ("none", "edm")
CURRICULA = ("none", "ct", "ict")
TARGET_EMA_CT = "ct"  # target_ema: CT's mu(N), following the grid's points N (Song et al. 2023)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DATASETS = (*TOY_DATASETS, "digits")
SOURCES = ("gaussian", *TOY_DATASETS)
COUPLINGS = ("independent", "ot", "sinkhorn", "ot-class", "sinkhorn-class")
MMD_BANDWIDTHS = (0.05, 0.1, 0.2, 0.5, 1.0)
MMD_KERNEL = "sum over h in (0.05, 0.1, 0.2, 0.5, 1.0) of exp(-|x - y|^2 / (2 h^2))"

DEFAULTS: dict[str, Any] = {
    "data": "checkerboard",
    "path": "fm",
    "loss": None,  # fm for the fm path, eps otherwise
    "target": None,  # what the network predicts: velocity for fm, eps otherwise
    "weighting": None,  # unit; sigma2 for loss dsm (Song et al. 2021's lambda = sigma^2)
    "time": "uniform",
    "model": None,  # mlp for 2-D data, unet for digits
    "width": 128,
    "depth": 3,
    "channels": [32, 64],
    "conditional": False,
    "label_dropout": 0.1,
    "steps": 4000,
    "batch": 256,
    "lr": 5e-3,
    "weight_decay": 1e-4,
    "clip": 1.0,  # the gradient's global norm; 0: no clipping
    "ema": 0.999,
    "seed": 0,
    "chunk": 100,
    "eval_every": 0,  # 0: at the end only
    "ckpt_every": 1000,
    "eval_n": 2000,  # 0: no evaluation
    "eval_steps": 20,  # 1 for the few-step losses unless given
    "source": "gaussian",  # what t = 1 holds: N(0, I) or a 2-D toy set
    "coupling": "independent",
    "ot_reg": 0.05,  # sinkhorn couplings: entropic reg as a fraction of the batch's mean cost
    "precond": "none",  # edm: EDM's c_skip, c_out, c_in, c_noise around the network
    "sigma_data": 0.5,  # the data's standard deviation for precond and weighting edm
    "dropout": 0.0,  # U-Net dropout while training
    "dtype": "float32",  # bfloat16: mixed precision (float32 params, optimizer and loss)
    "ema_targets": False,  # shortcut, consistency: targets from the EMA network
    "target_ema": None,  # with ema_targets: the targets' own EMA decay (else the evaluation EMA)
    "num_scales": 16,  # consistency: the grid's points (the last stage's with a curriculum)
    "curriculum": "none",  # consistency: ct or ict grows the grid over the run (one program)
    "lognormal": None,  # consistency: iCT's log-normal intervals (P_mean, P_std), else uniform
    "t_max": 1.0,  # consistency: the grid's last time (and where sampling starts)
    "ct_weighting": "inverse_gap",  # consistency: the interval's weight (iCT: inverse_sigma_gap)
    "rho": 1.0,  # consistency: the grid's spacing in t (1 uniform; > 1 denser near the data)
    "target_guidance": None,  # conditional meanflow, shortcut: guided targets (the cfg scale)
    "target_guidance_mix": 0.0,  # meanflow's guided targets: the conditional share k
    "target_guidance_interval": None,  # meanflow's guided targets: (t_lo, t_hi), else all t
}


def resolve(config: dict) -> dict:
    """Fill defaults and check every value; raises ``ValueError`` naming the bad one."""
    unknown = set(config) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    c = {**DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    _choice(c, "data", DATASETS)
    _choice(c, "path", tuple(PATHS))
    _choice(c, "precond", PRECONDS)
    edm = c["precond"] == "edm"
    c["loss"] = c["loss"] or ("x0" if edm else "fm" if c["path"] == "fm" else "eps")
    _choice(c, "loss", LOSSES)
    default_target = {"fm": "velocity", "dsm": "score", **FEWSTEP_TARGETS}.get(c["loss"], c["loss"])
    c["target"] = c["target"] or ("x0" if edm else default_target)
    _choice(c, "target", ("eps", "x0", "v", "velocity", "score"))
    if edm and c["target"] != "x0":
        raise ValueError(
            f"precond edm predicts x0 (c_skip x + c_out F); got target {c['target']!r}"
        )
    _choice(c, "dtype", tuple(DTYPES))
    _check_recipe(c)
    # unit weighting of the score weighs t = 1e-3 ~9,000 times t = 1 on VP
    c["weighting"] = c["weighting"] or ("sigma2" if c["loss"] == "dsm" else "unit")
    _choice(c, "weighting", tuple(WEIGHTINGS))
    _choice(c, "time", TIMES)
    _choice(c, "curriculum", CURRICULA)
    if c["loss"] == "consistency":  # else refused below as unused
        check_count(c["num_scales"], "num_scales", minimum=2 if c["curriculum"] == "none" else 3)
    _check_consistency_grid(c)
    if c["lognormal"] is not None:
        from jaxdiff.consistency import _check_lognormal

        c["lognormal"] = list(_check_lognormal(c["lognormal"], False))  # JSON keeps lists
    few = c["loss"] in FEWSTEP_LOSSES
    c["model"] = c["model"] or ("unet" if c["data"] == "digits" and not few else "mlp")
    if few and config.get("eval_steps") is None:
        c["eval_steps"] = 1
    _choice(c, "model", ("mlp", "unet"))
    if c["dropout"] and c["model"] != "unet":
        raise ValueError(f"dropout {c['dropout']} needs model unet (the MLP has no dropout)")
    if c["model"] == "unet" and c["data"] != "digits":
        raise ValueError("model 'unet' needs image data (data 'digits')")
    if c["conditional"] and c["data"] != "digits":
        raise ValueError("conditional training needs labelled data (data 'digits')")
    for name in ("width", "depth", "steps", "batch", "chunk", "eval_steps"):
        c[name] = check_count(c[name], name)  # 10.0 was kept (and saved) as a float
    for name in ("eval_every", "ckpt_every", "eval_n"):
        c[name] = check_count(c[name], name, minimum=0)
    if not (_number(c["lr"]) and math.isfinite(c["lr"]) and c["lr"] > 0):
        raise ValueError(f"lr must be a positive number; got {c['lr']}")
    # both reached the optimizer unchecked: -1 and "x" failed after the run folder was made,
    # inf trained to NaN parameters, clip true clipped at 1 (the stop-53 review)
    wd = c["weight_decay"]
    if not (_number(wd) and math.isfinite(wd) and wd >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0; got {wd!r}")
    clip = c["clip"]
    if clip is not None and not (_number(clip) and math.isfinite(clip) and clip >= 0):
        raise ValueError(
            f"clip (the gradient's global norm) must be a finite number > 0, or 0 for no "
            f"clipping; got {clip!r}"
        )
    for name in ("ema", "label_dropout"):  # a string once raised a bare TypeError
        if not _number(c[name]):
            raise ValueError(f"{name} must be a number in [0, 1); got {c[name]!r}")
    if not 0.0 <= c["ema"] < 1.0:
        raise ValueError(f"ema must lie in [0, 1); got {c['ema']}")
    if not isinstance(c["ema_targets"], bool):
        raise ValueError(f"ema_targets must be true or false; got {c['ema_targets']!r}")
    mu = c["target_ema"]
    if mu is not None:
        if mu == TARGET_EMA_CT:
            if c["loss"] != "consistency":
                raise ValueError(
                    f"target_ema {mu!r} (CT's mu(N)) follows the grid of --loss consistency; "
                    f"got --loss {c['loss']}"
                )
        elif not _number(mu) or not 0.0 <= mu < 1.0:
            raise ValueError(
                f"target_ema must be a number in [0, 1) or {TARGET_EMA_CT!r}; got {mu!r}"
            )
        if not c["ema_targets"]:
            raise ValueError(
                f"target_ema {mu} is the decay of the target network of --ema-targets; got no "
                "--ema-targets"
            )
    if not 0.0 <= c["label_dropout"] < 1.0:
        raise ValueError(f"label_dropout must lie in [0, 1); got {c['label_dropout']}")
    if c["loss"] == "fm" and c["path"] == "fm" and c["target"] in ("eps", "score"):
        raise ValueError(
            f"target {c['target']!r} is singular at t = 1 on the fm (linear) path, where alpha = 0;"
            " use velocity, x0 or v"
        )
    if any(int(ch) < 1 for ch in c["channels"]):
        raise ValueError(f"channels must be positive; got {c['channels']}")
    if c["eval_n"] == 1:  # found only after the whole run had trained
        raise ValueError("eval_n must be 0 (no evaluation) or at least 2 (the statistics compare "
                         "sets of samples); got 1")  # fmt: skip
    check_seed(c["seed"])
    _check_source_coupling(c)
    _check_fewstep(c)
    _check_target_guidance(c)
    _check_unused(c)
    return c


def _number(value: Any) -> bool:
    """A JSON number: an int or a float, not a bool (``True`` is an ``int`` in Python)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_consistency_grid(c: dict) -> None:
    """``t_max`` in ``(0, 1]``, ``rho > 0`` and a consistency weighting; iCT's
    ``inverse_sigma_gap`` needs ``alpha_t > 0`` on the grid, so ``t_max < 1`` on the fm and
    cosine paths."""
    from jaxdiff.consistency import WEIGHTINGS as CT_WEIGHTINGS

    t_max = c["t_max"]
    if not _number(t_max) or not 0.0 < t_max <= 1.0:
        raise ValueError(f"t_max must be a number in (0, 1]; got {t_max!r}")
    c["t_max"] = float(t_max)
    rho = c["rho"]
    if not (_number(rho) and 0 < rho < float("inf")):  # NaN fails too
        raise ValueError(f"rho must be a finite number > 0; got {rho!r}")
    c["rho"] = float(rho)
    _choice(c, "ct_weighting", CT_WEIGHTINGS)
    alpha_vanishes = c["path"] in ("fm", "cosine")  # the other paths are refused for consistency
    if c["ct_weighting"] == "inverse_sigma_gap" and c["t_max"] == 1.0 and alpha_vanishes:
        raise ValueError(
            "ct_weighting inverse_sigma_gap weighs by the gap in sigma_t / alpha_t, infinite at "
            "t = 1 where alpha = 0: give --t-max below 1 (iCT's 80 on VE is t_max = 0.9877 on fm)"
        )


def _check_unused(c: dict) -> None:
    """Refuse a value the run would ignore (it was stored in the checkpoint as if used), as
    ``ot_reg`` without a Sinkhorn coupling is; a value equal to the default cannot be told apart."""
    few = c["loss"] in FEWSTEP_LOSSES
    unused = {
        "label_dropout": (
            not c["conditional"] or (few and c["target_guidance"] is None),
            "the classifier-free dropout of --conditional diffusion losses and of "
            "--target-guidance",
        ),
        "ema_targets": (
            c["loss"] not in ("shortcut", "consistency"),
            "the EMA targets of --loss shortcut or consistency",
        ),
        "num_scales": (c["loss"] != "consistency", "the grid of --loss consistency"),
        "curriculum": (c["loss"] != "consistency", "the grid's growth in --loss consistency"),
        "lognormal": (c["loss"] != "consistency", "the intervals' law in --loss consistency"),
        "t_max": (c["loss"] != "consistency", "the grid's end in --loss consistency"),
        "ct_weighting": (c["loss"] != "consistency", "the intervals' weight in --loss consistency"),
        "rho": (c["loss"] != "consistency", "the grid's spacing in --loss consistency"),
        "sigma_data": (
            c["precond"] != "edm" and c["weighting"] != "edm",
            "the data's scale for --precond edm or --weighting edm",
        ),
        "channels": (c["model"] != "unet", "the U-Net's widths (--model unet)"),
        "width": (c["model"] != "mlp", "the MLP's width (--model mlp)"),
        "depth": (c["model"] != "mlp", "the MLP's depth (--model mlp)"),
    }
    for name, (ignored, what) in unused.items():
        value, default = c[name], DEFAULTS[name]
        if isinstance(default, list):  # channels: a tuple from the CLI, a list from JSON
            value, default = [int(v) for v in value], [int(v) for v in default]
        if ignored and value != default:
            raise ValueError(f"{name} {c[name]} is {what}; this run does not use it")


FEWSTEP_TARGETS = {"meanflow": "velocity", "shortcut": "velocity", "consistency": "x0"}


def _check_target_guidance(c: dict) -> None:
    w, loss = c["target_guidance"], c["loss"]
    _check_meanflow_guidance(c)
    if w is None:
        return
    if not _number(w) or not math.isfinite(w):
        raise ValueError(f"target_guidance must be a finite number; got {w!r}")
    if loss not in TWO_TIME_LOSSES or not c["conditional"]:
        raise ValueError(
            f"target_guidance {w} guides a conditional meanflow or shortcut model's targets: it "
            f"needs --loss meanflow or shortcut with --conditional; got loss {loss}"
            + ("" if c["conditional"] else " without --conditional")
        )
    if not c["label_dropout"] > 0:
        raise ValueError(
            f"target_guidance {w} needs label_dropout > 0 (the unconditional velocity)"
        )


def _check_meanflow_guidance(c: dict) -> None:
    """MeanFlow's two options of guided targets, before any training (``meanflow_loss`` checks
    them again): numbers in range, and only with a guided meanflow run."""
    k, interval = c["target_guidance_mix"], c["target_guidance_interval"]
    if not _number(k) or not math.isfinite(k):
        raise ValueError(f"target_guidance_mix must be a number in [0, 1); got {k!r}")
    if (k != 0 or interval is not None) and (
        c["target_guidance"] is None or c["loss"] != "meanflow"
    ):
        given = "target_guidance_mix" if k != 0 else "target_guidance_interval"
        raise ValueError(
            f"{given} {k if k != 0 else interval} shapes MeanFlow's guided targets: it needs "
            f"--loss meanflow with --target-guidance; got loss {c['loss']}"
            + ("" if c["target_guidance"] is not None else " without --target-guidance")
        )
    if not 0.0 <= k < 1.0:
        raise ValueError(f"target_guidance_mix must lie in [0, 1); got {k}")
    if interval is None:
        return
    real = isinstance(interval, list | tuple) and len(interval) == 2
    if not real or not all(_number(v) for v in interval):
        raise ValueError(
            f"target_guidance_interval must be two numbers [t_lo, t_hi]; got {interval!r}"
        )
    try:
        c["target_guidance_interval"] = list(check_interval(interval))
    except ValueError as err:
        raise ValueError(f"target_guidance_interval: {err}") from None


def _check_fewstep(c: dict) -> None:
    """One-line errors for the few-step losses' bad combinations."""
    loss = c["loss"]
    if loss not in FEWSTEP_LOSSES:
        return
    if c["path"] not in ("fm", "cosine"):
        raise ValueError(
            f"loss {loss} needs a path that reaches N(0, I) exactly at t = 1 (alpha_1 = 0): fm or "
            f"cosine, not {c['path']!r} (VP's and sub-VP's alpha_1 > 0, VE's prior is not N(0, I))"
        )
    if c["target"] != FEWSTEP_TARGETS[loss]:
        two = loss in TWO_TIME_LOSSES
        what = "the average velocity" if two else "the trajectory's end (x0)"
        raise ValueError(
            f"loss {loss} trains {what}: target {FEWSTEP_TARGETS[loss]}, not {c['target']!r}"
        )
    if c["source"] != "gaussian" or c["coupling"] != "independent":
        raise ValueError(
            f"loss {loss} trains from Gaussian noise paired independently; --source and "
            "--coupling are for --loss fm"
        )
    allowed = ("uniform", "logit-normal") if loss in TWO_TIME_LOSSES else ("uniform",)
    if c["time"] not in allowed:
        raise ValueError(f"loss {loss} draws its times {' or '.join(allowed)}; got {c['time']!r}")
    if c["weighting"] != "unit":
        raise ValueError(f"loss {loss} has its own weighting; --weighting is for diffusion losses")
    if c["precond"] != "none" or c["dtype"] != "float32" or c["dropout"]:
        raise ValueError(
            f"loss {loss} trains a float32 network without preconditioning or dropout; --precond, "
            "--dtype and --dropout are for diffusion losses"
        )


def network_fn(c: dict, model: Any):
    """The function a run's field calls: ``model.apply``, or for ``consistency`` the consistency
    function ``c_skip(t) x + c_out(t) model.apply(...)`` around it."""
    if c["loss"] == "consistency":
        from jaxdiff.consistency import consistency_function

        return consistency_function(model.apply)
    return model.apply


SEED_LIMIT = 2**32  # jax.random.key keeps 32 bits of a seed without x64: 2**32 would repeat 0


def check_seed(seed: int) -> int:
    """``seed`` if it is an integer in ``[0, 2**32)``, else ``ValueError``."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be an integer in [0, 2**32); got {seed!r}")
    return seed


def _check_recipe(c: dict) -> None:
    for name in ("sigma_data", "dropout"):
        if not _number(c[name]):
            raise ValueError(f"{name} must be a number; got {c[name]!r}")
    if not (math.isfinite(c["sigma_data"]) and c["sigma_data"] > 0):
        raise ValueError(f"sigma_data must be a positive number; got {c['sigma_data']}")
    if not 0.0 <= c["dropout"] < 1.0:
        raise ValueError(f"dropout must lie in [0, 1); got {c['dropout']}")


def make_weighting(c: dict):
    """The loss weighting of a resolved config."""
    name = c["weighting"]
    if name == "edm":
        return W.edm_weight(float(c["sigma_data"]))
    if name in ("min-snr", "sigmoid", "v", "elbo"):
        return WEIGHTINGS[name]()
    return WEIGHTINGS[name]


def make_field(c: dict, model, path: GaussianPath) -> Field:
    """The network of a config bound to its target (``precond edm``: EDM's wrapper, target x0)."""
    if c["precond"] == "edm":
        from jaxdiff.precond import edm_precond

        return edm_precond(model.apply, path, sigma_data=float(c["sigma_data"]))
    return Field(model.apply, c["target"])


# Sinkhorn in the CLI: at ot_reg = 0.005 of the mean cost the marginals reached 1e-3 within 1,200
# iterations on every toy set (batch 256) and the digits (batch 128), 8 batches each; 0.001 did
# not within 2,000 and stopped a run mid-training.
MIN_OT_REG, OT_ITERS = 0.005, 5000


def _check_source_coupling(c: dict) -> None:
    _choice(c, "source", SOURCES)
    _choice(c, "coupling", COUPLINGS)
    if not (_number(c["ot_reg"]) and math.isfinite(c["ot_reg"]) and c["ot_reg"] > 0):
        raise ValueError(f"ot_reg must be a positive number; got {c['ot_reg']}")
    if c["ot_reg"] < MIN_OT_REG:  # Sinkhorn's iterations grow as 1 / reg
        raise ValueError(
            f"ot_reg {c['ot_reg']} is below {MIN_OT_REG} of the mean cost, where Sinkhorn needs "
            f"more than its {OT_ITERS} iterations a step (the plan is then nearly exact OT: use "
            "--coupling ot)"
        )
    if c["ot_reg"] != DEFAULTS["ot_reg"] and not c["coupling"].startswith("sinkhorn"):
        raise ValueError(
            f"ot_reg {c['ot_reg']} is the entropic reg of --coupling sinkhorn or sinkhorn-class; "
            f"coupling {c['coupling']!r} does not use it"
        )
    plain_noise = c["source"] == "gaussian" and c["coupling"] == "independent"
    if c["source"] != "gaussian":
        if c["data"] == "digits":
            raise ValueError(
                f"source {c['source']!r} draws 2-D points; data 'digits' needs source 'gaussian'"
            )
        if c["path"] not in ("fm", "cosine"):
            raise ValueError(
                f"source {c['source']!r} needs a path that ends at it (alpha_1 = 0): fm or cosine, "
                f"not {c['path']!r}"
            )
    if not plain_noise and (c["target"] == "score" or c["loss"] == "dsm"):
        what = (
            f"source {c['source']!r}"
            if c["source"] != "gaussian"
            else f"coupling {c['coupling']!r}"
        )
        raise ValueError(
            f"the score (loss dsm, target score) needs Gaussian noise independent of the data, not "
            f"{what}; use --loss fm with --target velocity, x0 or v"
        )
    if c["coupling"].endswith("-class") and not c["conditional"]:
        raise ValueError(
            f"coupling {c['coupling']!r} pairs within classes and needs labels: add --conditional "
            "(data digits)"
        )


def make_coupling(c: dict):
    """The coupling of a resolved config (``None`` for the independent one)."""
    name = c["coupling"]
    if name == "independent":
        return None
    within = name.endswith("-class")
    if name.startswith("ot"):
        return CP.exact_ot(class_conditional=within)
    return CP.sinkhorn_ot(
        float(c["ot_reg"]), num_iters=OT_ITERS, class_conditional=within, relative=True
    )


def _choice(c: dict, name: str, options: tuple) -> None:
    if c[name] not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(str, options))}; got {c[name]!r}")


class Setup(NamedTuple):
    model: Any
    path: GaussianPath
    loss: Any
    sample_batch: Any
    example: Array
    num_classes: int | None
    source: Any = None  # draws x1 at t = 1 (None: N(0, I)); samplers start from it
    field: Any = None  # the unbound Field of the model (precond applied); bind(params) to sample
    images: Any = None  # an image run's opened source (run_images): its evaluations read it


def build(c: dict) -> Setup:
    """The model, path, loss and batch sampler of a resolved config."""
    from jaxdiff.nets import MLP, TwoTimeMLP, TwoTimeUNet, UNet

    path = PATHS[c["path"]]()
    source = None if c["source"] == "gaussian" else dataset_source(TOY_DATASETS[c["source"]])
    num_classes = 10 if c["conditional"] else None
    dtype = DTYPES[c["dtype"]]
    two_times = c["loss"] in TWO_TIME_LOSSES
    if c["model"] == "mlp" and two_times:
        model = TwoTimeMLP(width=c["width"], depth=c["depth"], num_classes=num_classes, dtype=dtype)
    elif c["model"] == "mlp":
        model = MLP(width=c["width"], depth=c["depth"], num_classes=num_classes, dtype=dtype)
    else:
        model = (TwoTimeUNet if two_times else UNet)(
            channels=tuple(c["channels"]),
            num_classes=num_classes,
            dropout=float(c["dropout"]),
            dtype=dtype,
        )
    batch = int(c["batch"])
    if c["data"] == "digits":
        images, labels = (jnp.asarray(a) for a in load_digits("train"))

        def sample_batch(key):
            idx = jax.random.randint(key, (batch,), 0, images.shape[0])
            return (images[idx], labels[idx]) if num_classes else images[idx]

        example = images[:1]
    else:
        toy = TOY_DATASETS[c["data"]]

        def sample_batch(key):
            return toy(key, batch)

        example = jnp.zeros((1, 2))
    t_max = 1.0 - 1e-3 if c["path"] in ("fm", "cosine") and c["target"] in ("eps", "score") else 1.0
    regress = {"fm": "velocity", "dsm": "score"}.get(c["loss"], c["loss"])
    weighting = make_weighting(c)
    t_min = 0.0 if c["path"] == "fm" and c["target"] in ("velocity", "x0", "v") else 1e-3
    if (
        t_min == 0.0
        and c["loss"] not in FEWSTEP_LOSSES
        and L.uniform_low_end_error(  # an x0 network's eps loss divides by sigma_0
            L.uniform_time(0.0, t_max), path, c["target"], regress, weighting
        )
    ):  # (these configs were refused by the loss after the run folder was made)
        t_min = 1e-3
    if c["time"] == "uniform":
        sampler = L.uniform_time(t_min, t_max)
    elif c["time"] == "logit-normal":
        sampler = L.logit_normal_time(t_min=t_min, t_max=t_max)
    elif c["time"] == "edm":
        sampler = W.edm_time(path, t_min=max(t_min, 1e-3), t_max=t_max)
    else:
        sampler = L.importance_time(path, weighting, max(t_min, 1e-3), t_max, regress=regress)
    if c["loss"] in FEWSTEP_LOSSES:
        loss = _fewstep_loss(c, model, path)
        return Setup(model, path, loss, sample_batch, example, num_classes, source)
    field = make_field(c, model, path)
    loss = L.diffusion_loss(
        field,
        path,
        regress=regress,
        weighting=weighting,
        rngs=("dropout",) if c["dropout"] else (),
        time_sampler=sampler,
        label_dropout=c["label_dropout"] if num_classes else 0.0,
        null_label=num_classes,
        source=source,
        coupling=make_coupling(c),
    )
    return Setup(model, path, loss, sample_batch, example, num_classes, source, field)


def consistency_scales(c: dict):
    """A consistency run's ``num_scales``: the number, or with ``curriculum`` ``ct`` (Song et
    al. 2023) or ``ict`` (Song & Dhariwal 2024) a :func:`jaxdiff.curriculum` over the run's
    steps, from 2 (ct) or 3 (ict) points up to ``num_scales``."""
    n, K = int(c["num_scales"]), int(c["steps"])
    return n if c["curriculum"] == "none" else _curriculum(c["curriculum"], n, K)


@functools.cache  # tabulated once per run: the loss, the target's decay and a resume's log
def _curriculum(kind: str, n: int, steps: int):
    """CT's or iCT's curriculum of ``steps`` steps up to ``n`` points (a Python loop over the
    steps: ~3 s for CT's 800,000)."""
    import jaxdiff.consistency as C

    grow = C.ct_num_scales if kind == "ct" else C.ict_num_scales
    return C.curriculum(lambda k: grow(k, steps, 2, n - 1), steps)


def target_decay(c: dict):
    """The target network's decay of a run: ``target_ema`` (a number, or None for the
    evaluation EMA), or with ``target_ema`` ``"ct"`` consistency training's ``mu(N) = exp(2
    log(0.9) / (N - 1))`` (:func:`jaxdiff.ct_target_decay`) of the run's grid: one number for a
    fixed grid, a :func:`jaxdiff.curriculum` that follows ``curriculum``'s grid otherwise."""
    import jaxdiff.consistency as C

    if c["target_ema"] != TARGET_EMA_CT:
        return c["target_ema"]
    n = consistency_scales(c)
    if isinstance(n, int):
        return C.ct_target_decay(n)
    return C.Curriculum(tuple(C.ct_target_decay(v) for v in n.values), n.ends)


def _fewstep_loss(c: dict, model: Any, path: GaussianPath):
    from jaxdiff.consistency import consistency_training_loss
    from jaxdiff.meanflow import meanflow_loss
    from jaxdiff.shortcut import shortcut_loss

    net = Field(network_fn(c, model), FEWSTEP_TARGETS[c["loss"]])
    if c["loss"] == "consistency":
        ln = c["lognormal"]
        ln = None if ln is None else tuple(ln)
        return consistency_training_loss(
            net, path, num_scales=consistency_scales(c), lognormal=ln, t_max=float(c["t_max"]),
            rho=float(c["rho"]), weighting=c["ct_weighting"],
        )  # fmt: skip
    if c["time"] == "uniform":  # the shortcut loss's own default draws (0, 1]: t = 0 is inf
        times = None if c["loss"] == "shortcut" else L.uniform_time(0.0, 1.0)  # on cosine
    else:
        times = L.logit_normal_time(t_min=0.0, t_max=1.0)
    guided = c["target_guidance"] is not None
    make = shortcut_loss if c["loss"] == "shortcut" else meanflow_loss
    interval = c["target_guidance_interval"]
    extra = {} if c["loss"] == "shortcut" else {
        "guidance_mix": float(c["target_guidance_mix"]),
        "guidance_interval": None if interval is None else tuple(interval),
    }  # fmt: skip
    return make(
        net,
        path,
        time_sampler=times,
        label_dropout=c["label_dropout"] if guided else 0.0,
        null_label=10 if guided else None,  # the label embedding's extra row
        target_guidance=c["target_guidance"],
        **extra,
    )


def init_state(c: dict, setup: Setup):
    """Fresh train state and optimizer of a config (params from ``seed``)."""
    from jaxdiff.train import adamw_cosine, init_train_state

    init_key, train_key = jax.random.split(jax.random.key(int(c["seed"])))
    labels = jnp.zeros((1,), jnp.int32) if setup.num_classes else None
    from jaxdiff.nets import init_params

    two = c["loss"] in TWO_TIME_LOSSES
    times = (jnp.zeros((1,)), None) if two else (jnp.zeros((1,)),)  # (t, r)
    params = init_params(setup.model, init_key, setup.example, *times, labels)
    opt = adamw_cosine(
        c["lr"], int(c["steps"]), weight_decay=c["weight_decay"], clip_norm=c["clip"] or None
    )
    return init_train_state(params, opt, train_key, target_ema=c["target_ema"] is not None), opt


def reference_data(c: dict, n: int, which: int = 0):
    """Held-out data to compare samples with: fresh toy samples (keys disjoint from training) or
    the digits test split (``which = 1``: a second independent toy set, or the digits train split)."""
    if c["data"] == "digits":
        return load_digits("test" if which == 0 else "train")
    key = jax.random.fold_in(jax.random.key(10_000 + int(c["seed"])), which)
    return np.asarray(TOY_DATASETS[c["data"]](key, n)), None


def toy_metrics(samples, reference, reference2) -> dict:
    """Energy distance and MMD of ``samples`` to ``reference``; the same between two true sets."""
    return {
        "energy_distance": float(energy_distance(samples, reference)),
        "energy_distance_true_vs_true": float(energy_distance(reference2, reference)),
        "mmd": float(mmd(samples, reference, MMD_BANDWIDTHS)),
        "mmd_true_vs_true": float(mmd(reference2, reference, MMD_BANDWIDTHS)),
        "mmd_kernel": MMD_KERNEL,
        "n": int(samples.shape[0]),
    }


def digits_metrics(samples, labels) -> dict:
    """Fréchet distance on the digits classifier's features (to the test split; train vs test as
    reference), the classifier's accuracy on class-conditional samples, and memorisation. Samples
    of one class (``sample --class``) are compared with that class's digits."""
    from jaxdiff.digits import classifier_accuracy, digits_frechet_distance, load_classifier
    from jaxdiff.metrics import memorization_ratio

    clf = load_classifier()
    test, test_labels = load_digits("test")
    train, train_labels = load_digits("train")
    one = None if labels is None else np.unique(np.asarray(labels))
    out = {}
    if one is not None and one.size == 1:  # samples of one class: compared with that class's
        out["frechet_class"] = int(one[0])  # digits (against all ten, 685 for a good model)
        test = test[np.asarray(test_labels) == one[0]]
        train = train[np.asarray(train_labels) == one[0]]
    out.update(
        frechet_distance=float(digits_frechet_distance(clf, samples, test)),
        frechet_distance_train_vs_test=float(digits_frechet_distance(clf, train, test)),
        memorization_ratio=float(memorization_ratio(samples[: len(test)], train, test)),
        n=int(samples.shape[0]),
    )
    if labels is not None:
        out["class_accuracy"] = float(classifier_accuracy(clf, samples, labels))
    return out


def save_plot(samples, reference, file: Path, title: str) -> None:
    """Scatter plot (2-D) or an image grid (digits) of the samples, next to the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples, reference = np.asarray(samples), np.asarray(reference)
    if samples.ndim == 2:
        fig, axes = plt.subplots(1, 2, figsize=(8, 4), sharex=True, sharey=True)
        for ax, pts, name in ((axes[0], reference, "data"), (axes[1], samples, "samples")):
            ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4)
            ax.set_title(name)
            ax.set_aspect("equal")
    else:
        rows = min(10, samples.shape[0] // 10) or 1
        fig, axes = plt.subplots(rows, 10, figsize=(10, rows), squeeze=False)
        for i, ax in enumerate(axes.ravel()):
            ax.imshow(samples[i, ..., 0], cmap="gray_r", vmin=-1, vmax=1)
            ax.axis("off")
    fig.suptitle(title)
    file.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(file, dpi=100, bbox_inches="tight")
    plt.close(fig)


def write_json(file: Path, data: dict) -> None:
    """Write ``data`` to ``file`` atomically (a reader never sees half a file)."""
    from jaxdiff.rundir import write_json as atomic

    atomic(file, data)


def now() -> float:
    return time.perf_counter()
