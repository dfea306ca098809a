"""Command line: ``python -m jaxdiff demo | train | sample``.

    python -m jaxdiff demo                       # train on the checkerboard, sample, measure, plot
    python -m jaxdiff train --data checkerboard --path fm --steps 4000 --out runs/cb
    python -m jaxdiff train --out runs/cb --resume           # continue from the latest checkpoint
    python -m jaxdiff train --source moons --data 8gaussians --coupling ot --out runs/m2g
    python -m jaxdiff train --images folder:cifar10/train --conditional --out runs/cifar
    python -m jaxdiff sample --ckpt runs/cb --solver heun --steps 20 --n 10000
    python -m jaxdiff train --loss meanflow --data checkerboard --out runs/mf   # one-step model
    python -m jaxdiff sample --ckpt runs/mf --steps 1                  # its own sampler, 1 step

Errors (unknown options, bad values, missing or damaged checkpoints, a run folder in use or
holding another run, unwritable folders, non-finite samples) print one line and exit with status 2;
warnings (a damaged checkpoint skipped) print one line each.

``train --resume`` continues the run saved in ``--out``: its data, path, loss, model, batch,
optimizer, EMA and seed come from the checkpoint (repeating them is fine; changing them is an
error), while ``--steps`` (a new total: the learning-rate schedule is stretched to it),
``--chunk``, ``--eval-every``, ``--ckpt-every``, ``--eval-n``, ``--until``, ``--no-progress`` and
``--images`` (the same data in a new place) apply. ``demo`` continues an interrupted demo in ``--out``, reports a finished one, and refuses
a folder holding any other run.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line instead of usage + message."""

    def error(self, message: str):
        raise _UsageError(f"{self.prog}: {message} (see --help)")


class _UsageError(Exception):
    pass


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _seed(text: str) -> int:
    from jaxdiff.experiment import check_seed

    try:
        return check_seed(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer in [0, 2**32), got {text!r}"
        ) from None


def _parser() -> _Parser:
    from jaxdiff import experiment as E
    from jaxdiff.runs import SOLVERS

    parser = _Parser(prog="python -m jaxdiff", description="Train and sample diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="train flow matching on the 2-D checkerboard and sample")
    demo.add_argument("--out", default="out/demo", help="folder for checkpoints, metrics, plot")
    demo.add_argument("--steps", type=_positive_int, default=None, help="training steps")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")

    train = sub.add_parser("train", help="train a model; writes checkpoints, metrics and a plot")
    train.add_argument("--data", choices=E.DATASETS, help="data set (default checkerboard)")
    train.add_argument("--path", choices=tuple(E.PATHS), help="probability path (default fm)")
    train.add_argument(
        "--loss",
        choices=E.LOSSES,
        help="loss (default x0 with --precond edm, fm for --path fm, else eps); meanflow, "
        "shortcut and consistency train few-step generators",
    )
    train.add_argument(
        "--target",
        choices=("eps", "x0", "v", "velocity", "score"),
        help="what the network predicts (default velocity for --path fm, else eps)",
    )
    train.add_argument(
        "--weighting",
        choices=tuple(E.WEIGHTINGS),
        help="loss weighting (default unit; sigma2 for --loss dsm)",
    )
    train.add_argument("--time", choices=E.TIMES, help="time sampler (default uniform)")
    train.add_argument(
        "--model",
        choices=("mlp", "unet"),
        help="default mlp for 2-D data, unet for the digits and images",
    )
    train.add_argument("--width", type=_positive_int, help="MLP width (default 128)")
    train.add_argument("--depth", type=_positive_int, help="MLP hidden layers (default 3)")
    train.add_argument("--channels", type=_positive_int, nargs="+", help="U-Net widths")
    train.add_argument("--conditional", action="store_true", default=None, help="class labels")
    train.add_argument(
        "--label-dropout",
        type=float,
        dest="label_dropout",
        help="share of labels dropped for classifier-free guidance (default 0.1)",
    )
    train.add_argument(
        "--ema-targets",
        action="store_true",
        default=None,
        dest="ema_targets",
        help="shortcut, consistency: targets from the EMA network (Frans et al. 2024)",
    )
    train.add_argument(
        "--target-ema",
        type=_target_ema,
        dest="target_ema",
        metavar="MU",
        help="with --ema-targets: the target network's own EMA decay MU (consistency models' "
        "mu; default: the targets are the evaluation EMA), or ct: consistency training's "
        "mu(N) = 0.9^(2/(N-1)) of the grid's N points, following --curriculum",
    )
    train.add_argument(
        "--num-scales",
        type=int,
        dest="num_scales",
        metavar="N",
        help="consistency: the grid's points (default 16; with --curriculum, the last stage's)",
    )
    train.add_argument(
        "--curriculum",
        choices=E.CURRICULA,
        help="consistency: grow the grid from 2 (ct, Song et al. 2023) or 3 (ict, Song & "
        "Dhariwal 2024) points to --num-scales over the run, in one compiled step",
    )
    train.add_argument(
        "--lognormal",
        type=float,
        nargs=2,
        metavar=("P_MEAN", "P_STD"),
        help="consistency: draw the grid's intervals from iCT's discretised log-normal over "
        "log(sigma/alpha) (Song & Dhariwal 2024: -1.1 2.0), not uniformly",
    )
    train.add_argument(
        "--t-max",
        type=float,
        dest="t_max",
        metavar="T",
        help="consistency: the grid's last time, where sampling starts (default 1)",
    )
    train.add_argument(
        "--rho",
        type=float,
        metavar="RHO",
        help="consistency: the grid's spacing, t_i = (t_max^(1/rho) i/(N-1))^rho (default 1, "
        "uniform in t; 7 is Karras et al.'s exponent, denser near the data)",
    )
    train.add_argument(
        "--ct-weighting",
        choices=("inverse_gap", "unit", "inverse_sigma_gap"),
        dest="ct_weighting",
        help="consistency: the weight of an interval, 1/(t_{n+1} - t_n) (default), 1, or iCT's "
        "1/(s_{n+1} - s_n) in s = sigma/alpha (Song & Dhariwal 2024; needs --t-max < 1)",
    )
    train.add_argument(
        "--target-guidance",
        type=float,
        dest="target_guidance",
        metavar="W",
        help="conditional meanflow or shortcut: guided targets at scale W, sampled in one "
        "step unguided",
    )
    train.add_argument(
        "--target-guidance-mix",
        type=float,
        dest="target_guidance_mix",
        metavar="K",
        help="meanflow with --target-guidance: the conditional velocity's share k in "
        "w v + k u_c + (1 - w - k) u_null (default 0; Geng et al. 2025, B.1)",
    )
    train.add_argument(
        "--target-guidance-interval",
        type=float,
        nargs=2,
        metavar=("T_LO", "T_HI"),
        dest="target_guidance_interval",
        help="meanflow with --target-guidance: guided targets only for T_LO <= t <= T_HI "
        "(0 <= T_LO < T_HI)",
    )
    train.add_argument(
        "--precond", choices=E.PRECONDS, help="edm: EDM's preconditioning (target x0)"
    )
    train.add_argument("--sigma-data", type=float, dest="sigma_data", help="for edm (default 0.5)")
    train.add_argument("--dropout", type=float, help="U-Net dropout while training (default 0)")
    train.add_argument(
        "--dtype", choices=(*E.DTYPES, "bf16"), help="bfloat16 (bf16): mixed precision"
    )
    train.add_argument("--steps", type=_positive_int, help="training steps (default 4000)")
    train.add_argument("--batch", type=_positive_int, help="batch size (default 256)")
    train.add_argument("--lr", type=float, help="AdamW's peak learning rate (default 5e-3)")
    train.add_argument("--ema", type=float, help="EMA decay (default 0.999)")
    train.add_argument("--seed", type=_seed, help="the run's seed (default 0)")
    train.add_argument("--chunk", type=_positive_int, help="steps per jitted chunk")
    train.add_argument(
        "--eval-every",
        type=int,
        dest="eval_every",
        help="steps between evaluations (0: at the end)",
    )
    train.add_argument(
        "--ckpt-every", type=int, dest="ckpt_every", help="steps between checkpoints (default 1000)"
    )
    train.add_argument("--eval-n", type=int, dest="eval_n", help="samples per evaluation (0: none)")
    train.add_argument(
        "--source", choices=E.SOURCES, help="what t = 1 holds: gaussian (default) or a toy set"
    )
    train.add_argument(
        "--coupling", choices=E.COUPLINGS, help="pairing of source and data (default independent)"
    )
    train.add_argument(
        "--ot-reg",
        type=float,
        dest="ot_reg",
        help="sinkhorn: reg as a fraction of the mean cost (>= 0.005)",
    )
    train.add_argument(
        "--images",
        metavar="SPEC",
        help="your images instead of --data: folder:PATH (class subfolders = labels), "
        "folder-memory:PATH (decoded once into memory) or npz:PATH (arrays images, labels)",
    )
    train.add_argument(
        "--no-flip", dest="flip", action="store_false", default=None, help="no random flips"
    )
    train.add_argument("--out", required=True, help="run folder")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    train.add_argument("--until", type=_positive_int, help="stop at this step (resume later)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    smp = sub.add_parser("sample", help="sample a trained checkpoint")
    smp.add_argument("--ckpt", required=True, help="run folder or its ckpt/ folder")
    smp.add_argument(
        "--solver",
        choices=tuple(SOLVERS),
        help="ODE/SDE solver (default heun; none for meanflow, shortcut "
        "and consistency runs, which sample with their own sampler)",
    )
    smp.add_argument(
        "--steps",
        type=_positive_int,
        help="default 20; 1 for meanflow, shortcut and consistency runs",
    )
    smp.add_argument("--n", type=_positive_int, default=10_000)
    smp.add_argument("--eta", type=float, default=0.0, help="0: ODE, 1: reverse SDE")
    smp.add_argument("--seed", type=_seed, default=0)
    smp.add_argument("--class", type=int, dest="label", help="class of conditional samples")
    smp.add_argument("--guidance", type=float, default=1.0, help="classifier-free scale")
    smp.add_argument(
        "--guidance-interval",
        type=float,
        nargs=2,
        metavar=("T_LO", "T_HI"),
        dest="guidance_interval",
        help="guide only for T_LO <= t <= T_HI (e.g. 0 0.84; Kynkaanniemi et al. 2024)",
    )
    smp.add_argument("--no-ema", action="store_true", help="use the raw params, not the EMA")
    smp.add_argument("--out", help="output folder (default: samples/ in the run folder)")
    smp.add_argument(
        "--images",
        help="an image run's training images where they moved (folder:PATH, folder-memory:PATH "
        "or npz:PATH): the network is sized to them and the metrics compare with them",
    )
    smp.add_argument(
        "--metrics-n",
        type=int,
        default=10_000,
        dest="metrics_n",
        help="samples the O(n^2) metrics see (the first ones; 0: no metrics)",
    )
    return parser


def _target_ema(text: str) -> float | str:
    """``--target-ema``: a decay, or ``ct`` (consistency training's ``mu(N)``)."""
    from jaxdiff.experiment import TARGET_EMA_CT

    if text == TARGET_EMA_CT:
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number or {TARGET_EMA_CT!r}; got {text!r}"
        ) from None


TRAIN_KEYS = (
    "data path loss target weighting time model width depth channels conditional label_dropout "
    "steps batch lr ema seed chunk eval_every ckpt_every eval_n source coupling ot_reg precond "
    "sigma_data dropout dtype ema_targets target_ema target_guidance target_guidance_mix "
    "target_guidance_interval num_scales curriculum lognormal t_max ct_weighting rho"
).split()
TRAIN_KEYS += ["images", "flip"]  # image data of your own (jaxdiff.run_images)


def _run(args: argparse.Namespace) -> int:
    import jax

    from jaxdiff import runs

    if jax.process_count() > 1:  # jax.distributed initialised (a TPU pod starts so by itself)
        # the second process met the first's folder lock ("in use by another jaxdiff process")
        # and the first waited in the checkpointer's collectives until gloo's deadline (~30 s)
        raise ValueError(
            f"the command line runs on one host; this is process {jax.process_index()} of "
            f"{jax.process_count()} (jax.distributed is initialised): train over several hosts "
            "from Python (README: Training from Python)"
        )
    if args.command == "demo":
        return runs.demo_run(args.out, steps=args.steps, progress=not args.no_progress)
    if args.command == "train":
        config = {k: getattr(args, k) for k in TRAIN_KEYS if getattr(args, k) is not None}
        if config.get("dtype") == "bf16":
            config["dtype"] = "bfloat16"
        runs.train_run(
            config, args.out, resume=args.resume, until=args.until, progress=not args.no_progress
        )
        return 0
    runs.sample_run(
        args.ckpt,
        n=args.n,
        solver=args.solver,
        steps=args.steps,
        eta=args.eta,
        seed=args.seed,
        label=args.label,
        guidance=args.guidance,
        guidance_interval=args.guidance_interval,
        ema=not args.no_ema,
        out=args.out,
        metrics_n=args.metrics_n,
        images=args.images,
    )
    return 0


def _one_line_warnings(show):
    """``warnings.showwarning`` printing jaxdiff's own warnings in one line, others as ``show``."""

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if category.__module__.startswith("jaxdiff"):
            print(f"jaxdiff: warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    return showwarning


def _out_of_memory(message: str) -> bool:
    return "RESOURCE_EXHAUSTED" in message or "out of memory" in message.lower()


def _as_flag(message: str, parser: argparse.ArgumentParser, command: str | None) -> str:
    """A message of the Python API that starts with a config key ("eval_n must be ...") names
    the command's flag instead ("--eval-n must be ...")."""
    key, sep, rest = message.partition(" ")
    for action in parser._actions:  # the subcommands' parsers
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            for option in action.choices[command]._actions:
                if option.dest == key and option.option_strings and rest.startswith("must "):
                    return f"{option.option_strings[-1]}{sep}{rest}"
    return message


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0, or 2 after a one-line error on stderr)."""
    from jaxdiff.rundir import RunBusyError

    args = None
    parser = _parser()
    absl = logging.getLogger("absl")  # Orbax's notes on damaged steps: our warning says it once
    level = absl.level
    absl.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warnings(warnings.showwarning)
        try:
            args = parser.parse_args(argv)
            return _run(args)
        except _UsageError as err:
            print(err, file=sys.stderr)
        except (ValueError, FileNotFoundError, ImportError, RunBusyError) as err:
            message = _as_flag(str(err), parser, getattr(args, "command", None))
            print(f"jaxdiff: error: {message}", file=sys.stderr)
        except FloatingPointError as err:
            if args is not None and args.command == "sample":
                print(f"jaxdiff: error: {err}", file=sys.stderr)
            else:
                print(f"jaxdiff: training diverged: {err} (lower --lr?)", file=sys.stderr)
        except MemoryError as err:  # numpy: e.g. --n 10000000000000
            print(f"jaxdiff: error: out of memory: {err} (lower --n or --batch)", file=sys.stderr)
        except RuntimeError as err:  # XLA's out of memory (jax.errors.JaxRuntimeError)
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if type(err).__name__ != "JaxRuntimeError" or not _out_of_memory(first):
                raise
            print(f"jaxdiff: error: out of memory: {first} (lower --n or --batch)", file=sys.stderr)
        except OSError as err:  # a full disk, a folder made read-only during the run, ...
            where = f": {err.filename}" if err.filename else ""
            print(f"jaxdiff: error: {err.strerror or err}{where}", file=sys.stderr)
        except KeyboardInterrupt:
            print(
                "jaxdiff: interrupted; resume with --resume from the last checkpoint",
                file=sys.stderr,
            )
            return 130
        finally:
            absl.setLevel(level)
    return 2


if __name__ == "__main__":
    sys.exit(main())
