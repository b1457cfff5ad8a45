#!/usr/bin/env python3
"""Decoupled streaming side by side: elastiserve's engine vs real Triton (nvidia-pytriton wheel).

Both servers serve the same unmodified decoupled Triton Python model (``stream_n``: sends N
responses, each an INT32 [1] counter, through ``get_response_sender()`` from inside
``execute``, then the FINAL flag), one instance, server pinned to core 0. The client is the same
for both: NVIDIA's ``tritonclient.grpc`` streaming API (``start_stream`` /
``async_stream_infer(..., enable_empty_final_response=True)``), pinned to core 1, one request
at a time on one stream. Per request it records:

* time to first response (TTFT): ``async_stream_infer`` call -> first response callback;
* per-response overhead: (last response - first response) / (N - 1) for N > 1, i.e. what each
  extra response costs end to end (server send path, wire, client), the model doing no work;
* time to the final (empty) response.

Servers alternate within each round (fresh start per round) so slow drifts of this shared
2-core machine hit both; medians over all requests of all rounds are reported.

  python bench/streaming_vs_triton.py [--rounds 3] [--requests 200] [--responses 1,100]

Needs the anchors folder (env ELASTISERVE_ANCHORS, default ../shared/anchors) with a Triton venv
installed per its anchors.md (~/.cache/elastiserve-anchors/triton-venv).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_vs_triton import free_ports, start_elastiserve, start_triton, wait_ready

MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            n = int(pb_utils.get_input_tensor_by_name(request, "N").as_numpy()[0])
            sender = request.get_response_sender()
            for i in range(n):
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([i], np.int32))]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
"""

CONFIG = """
name: "stream_n"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "N" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""


def write_repo(root: Path) -> Path:
    (root / "stream_n" / "1").mkdir(parents=True)
    (root / "stream_n" / "1" / "model.py").write_text(textwrap.dedent(MODEL))
    (root / "stream_n" / "config.pbtxt").write_text(CONFIG)
    return root


def measure(grpc_port: int, n: int, requests: int, warmup: int = 20) -> list[tuple[float, float, float]]:
    """(ttft_us, per_response_us, total_us) per request, one request at a time on one stream."""
    import tritonclient.grpc as grpcclient

    events: queue.SimpleQueue[tuple[float, Any, Any]] = queue.SimpleQueue()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    client.start_stream(callback=lambda result, error: events.put((time.perf_counter(), result, error)))
    tensor = grpcclient.InferInput("N", [1], "INT32")
    tensor.set_data_from_numpy(np.array([n], np.int32))
    samples = []
    try:
        for i in range(warmup + requests):
            start = time.perf_counter()
            client.async_stream_infer("stream_n", [tensor], request_id=str(i), enable_empty_final_response=True)
            times = []
            while True:
                at, result, error = events.get(timeout=60)
                if error is not None:
                    raise RuntimeError(f"stream error: {error}")
                if result.get_response().parameters["triton_final_response"].bool_param:
                    end = at
                    break
                times.append(at)
            if len(times) != n:
                raise RuntimeError(f"expected {n} responses, got {len(times)}")
            if i >= warmup:
                first = times[0] if times else end
                per = (times[-1] - times[0]) / (n - 1) if n > 1 else 0.0
                samples.append(((first - start) * 1e6, per * 1e6, (end - start) * 1e6))
    finally:
        client.stop_stream()
        client.close()
    return samples


def run_server(kind: str, repo: Path, counts: list[int], requests: int) -> dict[int, list[tuple[float, float, float]]]:
    http, grpc, metrics = free_ports(3)
    process = (start_elastiserve if kind == "elastiserve" else start_triton)(repo, http, grpc, metrics)
    try:
        wait_ready(http)
        out = {}
        for n in counts:
            out[n] = measure(grpc, n, requests if n <= 10 else max(20, requests // 5))
            med = statistics.median(s[0] for s in out[n])
            print(f"  {kind:12s} N={n:<5d} TTFT median {med:8.1f} us", file=sys.stderr)
        return out
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--responses", default="1,100")
    parser.add_argument("--servers", default="elastiserve,triton")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    counts = [int(c) for c in args.responses.split(",")]
    servers = args.servers.split(",")
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})  # the client on core 1; servers are pinned to core 0
    results: dict[str, dict[int, list[tuple[float, float, float]]]] = {s: {n: [] for n in counts} for s in servers}
    with tempfile.TemporaryDirectory(prefix="stream-bench-") as tmp:
        repo = write_repo(Path(tmp))
        for r in range(args.rounds):
            order = servers if r % 2 == 0 else list(reversed(servers))
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
            for kind in order:
                for n, samples in run_server(kind, repo, counts, args.requests).items():
                    results[kind][n].extend(samples)
    print("\ntritonclient.grpc stream, 1 request in flight, server on core 0, client on core 1\n")
    print("| server | responses/request | TTFT median µs | TTFT p90 µs | per-response median µs | total median µs |")
    print("|---|---|---|---|---|---|")
    summary: dict[str, Any] = {}
    for kind in servers:
        for n in counts:
            samples = results[kind][n]
            ttft = [s[0] for s in samples]
            per = [s[1] for s in samples]
            total = [s[2] for s in samples]
            row = {
                "ttft_median_us": round(pct(ttft, 50), 1),
                "ttft_p90_us": round(pct(ttft, 90), 1),
                "per_response_median_us": round(pct(per, 50), 2) if n > 1 else None,
                "total_median_us": round(pct(total, 50), 1),
                "samples": len(samples),
            }
            summary[f"{kind}/{n}"] = row
            per_text = f"{row['per_response_median_us']:.1f}" if n > 1 else "-"
            print(
                f"| {kind} | {n} | {row['ttft_median_us']:.0f} | {row['ttft_p90_us']:.0f} | {per_text} | "
                f"{row['total_median_us']:.0f} |"
            )
    if len(servers) == 2:
        ours, theirs = servers
        print()
        for n in counts:
            a, b = summary[f"{ours}/{n}"], summary[f"{theirs}/{n}"]
            line = f"N={n}: TTFT {ours}/{theirs} = {a['ttft_median_us'] / b['ttft_median_us']:.2f}"
            if n > 1:
                line += f", per-response = {a['per_response_median_us'] / b['per_response_median_us']:.2f}"
            print(line)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
