"""Run the benchmarks and write ``benchmarks/results/<device>.json`` and ``<device>.md``.

    python -m benchmarks            # full mode
    python -m benchmarks --quick    # about 30 minutes on 2 CPU cores (most of it training)
    python -m benchmarks --only solver_overhead

Each section is a module of this package with ``TITLE`` and ``run(quick: bool) -> dict`` returning
``{"rows": [dict, ...], "notes": str, "plots": [paths]}``. Rows of one section share their keys; ratios
are stored next to the absolute numbers they come from.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

from benchmarks.common import device_tag, environment

SECTIONS = [
    "solver_overhead",
    "eager",
    "peers",
    "schedulers",
    "accuracy",
    "training",
    "likelihood",
    "scaling",
    "couplings",
    "fewstep_training",
    "inverse",
    "images",
]
RESULTS = Path(__file__).parent / "results"


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):  # as written before a JSON round trip made the keys strings
        return "{" + ", ".join(f"{k}: {v!r}" for k, v in value.items()) + "}"
    return str(value)


def markdown(results: dict) -> str:
    lines = [f"# jaxdiff benchmarks on {results['environment']['device']}", ""]
    env = results["environment"]
    lines.append("Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    total = results.get("total_s")
    lines.append(
        f"Mode: {'quick' if results['quick'] else 'full'}; "
        + (f"total {total:.0f} s" if total is not None else "total time not recorded")
    )
    for name, sec in results["sections"].items():
        lines += ["", f"## {sec['title']} (`{name}`)", ""]
        if sec.get("notes"):
            lines += [sec["notes"], ""]
        rows = sec.get("rows", [])
        if rows:
            keys = list(rows[0])
            lines.append("| " + " | ".join(keys) + " |")
            lines.append("|" + "---|" * len(keys))
            for row in rows:
                lines.append("| " + " | ".join(_fmt(row.get(k, "")) for k in keys) + " |")
        for plot in sec.get("plots", []):
            lines += ["", f"![{name}]({Path(plot).name})"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes: about 30 minutes on 2 CPU cores"
    )
    parser.add_argument(
        "--only",
        nargs="*",
        choices=SECTIONS,
        help="run only these sections; the other sections of an earlier result file are kept",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the result files")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["JAXDIFF_BENCH_OUT"] = str(args.out)
    tag = device_tag() + ("-quick" if args.quick else "")
    results = {"environment": environment(), "quick": args.quick, "sections": {}}
    previous = args.out / f"{tag}.json"
    if args.only and previous.exists():  # --only updates those sections and keeps the others
        results["sections"] = json.loads(previous.read_text()).get("sections", {})
    failed = []
    for name in args.only or SECTIONS:
        module = importlib.import_module(f"benchmarks.{name}")
        print(f"== {module.TITLE}", flush=True)
        t0 = time.perf_counter()
        try:
            section = module.run(quick=args.quick)
        except Exception as err:  # noqa: BLE001 - one broken section must not lose the others
            traceback.print_exc()
            failed.append(name)
            section = {"rows": [], "notes": f"FAILED: {type(err).__name__}: {str(err)[:300]}"}
        section["title"] = module.TITLE
        section["seconds"] = time.perf_counter() - t0
        results["sections"][name] = section
        for row in section.get("rows", []):
            print("  " + ", ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)
        results["total_s"] = sum(s.get("seconds", 0.0) for s in results["sections"].values())
        (args.out / f"{tag}.json").write_text(json.dumps(results, indent=2, default=str))
        (args.out / f"{tag}.md").write_text(markdown(results))
    print(f"wrote {args.out / (tag + '.json')} and .md", flush=True)
    if failed:
        print(f"failed sections: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
