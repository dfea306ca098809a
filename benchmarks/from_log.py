"""Result files from the logs of image-benchmark runs cut short by a time limit.

A lent GPU runs ``benchmarks/gpu.sh`` under the device tool's 10-minute limit, and a run stopped at
its limit writes no result file. ``benchmarks/images.py`` logs each row as it is measured
(``[images] row {...}``); this gathers those rows from one or more logs and writes ``TAG.json`` and
``TAG.md`` in the format of ``python -m benchmarks``::

    python -m benchmarks.from_log bench.log c.log --out benchmarks/results --tag gpu-nvidia-h200 \\
        --env device="gpu:NVIDIA H200" jax=0.11.2 --notes "what was cut, and why"
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from benchmarks import images
from benchmarks.run import markdown

_ROW = re.compile(r"\[images\](?: +[\d.]+ s)? row (\{.*\})\s*$")  # with or without the time


def rows_from_logs(texts: list[str]) -> list[dict]:
    """The logged rows of ``texts`` in order, each with ``images.KEYS`` as its keys (``None`` where
    the row has no value), columns that no row fills dropped."""
    rows = []
    for text in texts:
        for line in text.splitlines():
            match = _ROW.search(line)
            if match:
                row = dict.fromkeys(images.KEYS)
                row.update(json.loads(match.group(1)))
                rows.append(row)
    used = [k for k in images.KEYS if any(r[k] is not None for r in rows)]
    return [{k: r[k] for k in used} for r in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.from_log", description=__doc__)
    parser.add_argument("logs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tag", required=True, help="file name without extension")
    parser.add_argument("--env", nargs="*", default=[], help="KEY=VALUE facts of the machine")
    parser.add_argument("--notes", default="", help="the section's notes")
    args = parser.parse_args(argv)
    rows = rows_from_logs([p.read_text() for p in args.logs])
    if not rows:
        raise SystemExit(f"no '[images] row' lines in {', '.join(map(str, args.logs))}")
    env = {"device": "(not recorded)", **dict(item.split("=", 1) for item in args.env)}
    section = {"title": images.TITLE, "rows": rows, "notes": args.notes}
    results = {"environment": env, "quick": False, "sections": {"images": section}, "total_s": None}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.tag}.json").write_text(json.dumps(results, indent=2))
    (args.out / f"{args.tag}.md").write_text(markdown(results))
    print(f"{len(rows)} rows -> {args.out / args.tag}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
