#!/usr/bin/env python3
"""Regenerate README.md's Performance table from a ``bench/run.py`` results file.

    python bench/readme.py bench/results/<date>-<host>.json

Replaces what lies between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` in README.md, so
the numbers there always come from a results file (never typed by hand).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def _n(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def section(data: dict[str, Any], results_path: str) -> str:
    clients = data["config"].get("clients", 16)
    ratios = {r["key"]: r["ratio"] for r in data["ratios"]}
    best: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in data["runs"]:
        if "model" not in row or (row.get("input_format") == "json" and row["server"] != "mlserver"):
            continue
        for r in row.get("results", []):
            if r["concurrency"] == clients and r["requests"]:
                best[(row["server"], row["model"], row["protocol"])] = r
    host = data["host"]
    lines = [
        f"Latest run: `{data['command']}` on {data['date']}, host `{host['hostname']}` "
        f"({host['cpus']} CPUs, {host['cpu_model']}, Python {host['python']}); each server pinned to "
        f"CPU {data['config']['server_cpus']}, the same generator (`elastiserve bench`) pinned to CPU "
        f"{data['config']['generator_cpus']}, {data['config']['duration']} s per level after "
        f"{data['config']['warmup']} s warm-up, batch 1, {clients} clients. Full report: `{results_path}` "
        "(and its .md/.png).",
        "",
        "| model | protocol | elastiserve req/s (p99 ms) | Triton 2.51 | MLServer 1.7 (JSON) | xTriton | xMLServer |",
        "|---|---|---|---|---|---|---|",
    ]
    models = list(dict.fromkeys(row["model"] for row in data["runs"] if "model" in row))
    for model in models:
        for protocol in ("http", "grpc"):
            cells = []
            for server in ("elastiserve", "triton", "mlserver"):
                r = best.get((server, model, protocol))
                cells.append(f"{_n(r['throughput_rps'])} ({_n(r['latency_ms']['p99'], 1)})" if r else "-")
            if cells[0] == "-":
                continue
            rt = ratios.get(f"{model}/{protocol}/c{clients}/vs-triton")
            rm = ratios.get(f"{model}/{protocol}/c{clients}/vs-mlserver")
            lines.append(f"| {model} | {protocol} | {' | '.join(cells)} | {_n(rt, 2)} | {_n(rm, 2)} |")
    met = [t for t in data.get("targets", []) if t["met"] is not None]
    if met:
        lines += [
            "",
            "Targets: "
            + "; ".join(
                f"{t['what']}: {_n(t['ratio'], 3)} ({'met' if t['met'] else 'not met'})" for t in met
            ),
        ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    path = Path(argv[1]).resolve()
    data = json.loads(path.read_text())
    readme = ROOT / "README.md"
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        print(f"error: README.md has no {BEGIN} ... {END} markers", file=sys.stderr)
        return 1
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    try:
        shown = str(path.relative_to(ROOT))
    except ValueError:
        shown = str(path)
    readme.write_text(f"{head}{BEGIN}\n{section(data, shown)}\n{END}{tail}")
    print(f"README.md Performance section regenerated from {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
