#!/usr/bin/env python3
"""Side-by-side: elastiserve's engine vs real Triton (nvidia-pytriton wheel) on the same models.

Both servers serve the same unmodified Triton Python-backend models (identity_fp32, add_sub,
identity_fp32_dynbatch), one after the other in one run, pinned to core 0 while the load
generator (wrk for HTTP, h2load for gRPC — C generators that are not the bottleneck) runs on
core 1. Prints a markdown table with the elastiserve/Triton ratios and writes JSON.

  python bench/engine_vs_triton.py [--duration 8] [--connections 16] [--out bench/results/x.json]

Needs: wrk and h2load (Debian: wrk, nghttp2-client), the anchors folder (env ELASTISERVE_ANCHORS,
default ../shared/anchors) with a Triton venv installed per its anchors.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from elastiserve.testing import free_ports

ROOT = Path(__file__).resolve().parent.parent
ANCHORS = Path(os.environ.get("ELASTISERVE_ANCHORS", ROOT.parent / "shared" / "anchors"))
CACHE = Path(os.environ.get("ELASTISERVE_ANCHOR_CACHE", Path.home() / ".cache" / "elastiserve-anchors"))
CASES_ALL = [
    ("identity_fp32", "http", "INPUT0", "OUTPUT0"),
    ("identity_fp32", "grpc", "INPUT0", "OUTPUT0"),
    ("add_sub", "http", "INPUT0,INPUT1", "OUTPUT0,OUTPUT1"),
    ("add_sub", "grpc", "INPUT0,INPUT1", "OUTPUT0,OUTPUT1"),
    ("identity_fp32_dynbatch", "http", "INPUT0", "OUTPUT0"),
    ("identity_fp32_dynbatch", "grpc", "INPUT0", "OUTPUT0"),
]
CASES = [c for c in CASES_ALL if not os.environ.get("BENCH_MODELS") or c[0] in os.environ["BENCH_MODELS"].split(",")]


def wait_ready(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"server on {port} not ready")


def start_elastiserve(repo: Path, http: int, grpc: int, metrics: int) -> subprocess.Popen[bytes]:
    cmd = [
        "taskset",
        "-c",
        "0",
        sys.executable,
        "-m",
        "elastiserve",
        "serve",
        f"--model-repository={repo}",
        "--http-address=127.0.0.1",
        f"--http-port={http}",
        "--grpc-address=127.0.0.1",
        f"--grpc-port={grpc}",
        "--metrics-address=127.0.0.1",
        f"--metrics-port={metrics}",
        "--log-info=false",
    ]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_triton(repo: Path, http: int, grpc: int, metrics: int) -> subprocess.Popen[bytes]:
    venv = CACHE / "triton-venv"
    if not (venv / "bin" / "python").exists():
        raise SystemExit(f"no Triton venv at {venv}: see {ANCHORS.parent / 'docs' / 'anchors.md'}")
    env = {
        **os.environ,
        "TRITON_EXTRA_ARGS": f"--http-port={http} --grpc-port={grpc} --metrics-port={metrics}",
    }
    cmd = [
        "taskset",
        "-c",
        "0",
        str(ANCHORS / "triton" / "start.sh"),
        str(venv),
        str(repo),
        str(CACHE / "triton-backends"),
    ]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def load(
    protocol: str, port: int, model: str, inputs: str, outputs: str, connections: int, duration: int
) -> dict:
    if protocol == "http":
        cmd = [
            sys.executable,
            str(ANCHORS / "wrkload.py"),
            "--url",
            f"127.0.0.1:{port}",
            "--model",
            model,
            "--inputs",
            inputs,
            "--outputs",
            outputs,
            "--connections",
            str(connections),
            "--duration",
            str(duration),
        ]
    else:
        cmd = [
            sys.executable,
            str(ANCHORS / "h2grpcload.py"),
            "--url",
            f"127.0.0.1:{port}",
            "--model",
            model,
            "--inputs",
            inputs,
            "--clients",
            str(connections),
            "--duration",
            str(duration),
        ]
    out = subprocess.run(["taskset", "-c", "1", *cmd], capture_output=True, text=True, timeout=duration + 120)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"error": (out.stderr or out.stdout)[-500:]}
    return json.loads(lines[-1])


def run_server(kind: str, repo: Path, args: argparse.Namespace) -> dict[str, dict]:
    http, grpc, metrics = free_ports(3)
    process = (start_elastiserve if kind == "elastiserve" else start_triton)(repo, http, grpc, metrics)
    results: dict[str, dict] = {}
    try:
        wait_ready(http)
        for model, protocol, inputs, outputs in CASES:
            port = http if protocol == "http" else grpc
            load(protocol, port, model, inputs, outputs, args.connections, 2)  # warm-up
            results[f"{model}/{protocol}"] = load(
                protocol, port, model, inputs, outputs, args.connections, args.duration
            )
            print(f"{kind:12s} {model:24s} {protocol:4s} {results[f'{model}/{protocol}']}", file=sys.stderr)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--servers", default="elastiserve,triton")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    repo = ANCHORS / "triton" / "models"
    all_results = {kind: run_server(kind, repo, args) for kind in args.servers.split(",")}
    print(f"\n{args.connections} connections, {args.duration}s, server on core 0, generator on core 1\n")
    print("| model | protocol | elastiserve req/s | p99 ms | Triton req/s | p99 ms | ratio |")
    print("|---|---|---|---|---|---|---|")
    for model, protocol, _, _ in CASES:
        key = f"{model}/{protocol}"
        ours = all_results.get("elastiserve", {}).get(key, {})
        theirs = all_results.get("triton", {}).get(key, {})
        ratio = (
            (ours.get("throughput_rps", 0) / theirs["throughput_rps"]) if theirs.get("throughput_rps") else 0
        )
        print(
            f"| {model} | {protocol} | {ours.get('throughput_rps', '-')} | {ours.get('p99_ms', '-')} | "
            f"{theirs.get('throughput_rps', '-')} | {theirs.get('p99_ms', '-')} | {ratio:.2f} |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(all_results, indent=2))


if __name__ == "__main__":
    main()
