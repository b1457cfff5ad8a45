#!/usr/bin/env python3
"""Regression guard: compare the ratios of two ``bench/run.py`` results files.

    python bench/compare.py OLD.json NEW.json [--tolerance 0.10]

Ratios (elastiserve/Triton, elastiserve/MLServer, fraction of the in-process limit) are
compared, not raw req/s: both sides of a ratio were measured in the same run on the same
machine, so a ratio survives a slower or busier machine where absolute numbers do not. A ratio
present in both files that fell by more than the tolerance (default 10%) is flagged; the exit
code is 1 when any is, 0 otherwise, 2 on unreadable input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def load_ratios(path: Path) -> dict[str, float]:
    data: dict[str, Any] = json.loads(path.read_text())
    return {r["key"]: float(r["ratio"]) for r in data.get("ratios", []) if r.get("ratio")}


def compare(
    old: dict[str, float], new: dict[str, float], tolerance: float
) -> list[tuple[str, float, float, float, bool]]:
    """(key, old, new, change, regressed) for every ratio in both files, worst first."""
    rows = []
    for key in sorted(old.keys() & new.keys()):
        change = new[key] / old[key] - 1.0
        rows.append((key, old[key], new[key], change, change < -tolerance))
    return sorted(rows, key=lambda row: row[3])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--tolerance", type=float, default=0.10, help="allowed relative drop [0.10]")
    args = parser.parse_args(argv)
    try:
        old, new = load_ratios(args.old), load_ratios(args.new)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"error: cannot read results: {exc}", file=sys.stderr)
        return 2
    rows = compare(old, new, args.tolerance)
    if not rows:
        print("error: the two files share no ratio", file=sys.stderr)
        return 2
    print("| ratio | old | new | change |")
    print("|---|---|---|---|")
    for key, before, after, change, regressed in rows:
        flag = " **REGRESSION**" if regressed else ""
        print(f"| {key} | {before:.3f} | {after:.3f} | {change:+.1%}{flag} |")
    only = sorted(old.keys() ^ new.keys())
    if only:
        print(f"\n{len(only)} ratios in one file only (not compared)")
    regressions = [row for row in rows if row[4]]
    if regressions:
        print(f"\n{len(regressions)} ratio(s) worse by more than {args.tolerance:.0%}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
