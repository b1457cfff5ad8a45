#!/usr/bin/env python3
"""An ensemble of two tiny models vs the same two models called by the client one after the other.

Starts a real ``elastiserve serve`` on 127.0.0.1 with two Python-backend models (``first``:
Y = X + 1, ``second``: Y = X * 2, FP32 [16]) and the ensemble ``both`` = second(first(X)). One
client (NVIDIA's tritonclient, HTTP and gRPC) sends sequential requests; blocks of the two ways
alternate so drift hits both equally. Prints per-request latency (median, p99) and the ratio
ensemble / two round-trips (below 1: the ensemble is cheaper).

  python bench/ensemble_vs_roundtrips.py [--requests 2000] [--blocks 5] [--protocol http,grpc]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from elastiserve.testing import running_engine  # noqa: E402

MODEL = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor("Y", {expr})])
            for x in (pb_utils.get_input_tensor_by_name(r, "X").as_numpy() for r in requests)
        ]
"""

CONFIG = """
name: "{name}" backend: "python" max_batch_size: 8
input [ {{ name: "X" data_type: TYPE_FP32 dims: [ 16 ] }} ]
output [ {{ name: "Y" data_type: TYPE_FP32 dims: [ 16 ] }} ]
"""

ENSEMBLE = """
name: "both" platform: "ensemble" max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 16 ] } ]
ensemble_scheduling { step [
  { model_name: "first" model_version: -1 input_map { key: "X" value: "X" } output_map { key: "Y" value: "MID" } },
  { model_name: "second" model_version: -1 input_map { key: "X" value: "MID" } output_map { key: "Y" value: "Y" } }
] }
"""


def write_repo(root: Path) -> Path:
    for name, expr in (("first", "x + 1"), ("second", "x * 2")):
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(CONFIG.format(name=name))
        (root / name / "1" / "model.py").write_text(textwrap.dedent(MODEL.format(expr=expr)))
    (root / "both" / "1").mkdir(parents=True)
    (root / "both" / "config.pbtxt").write_text(textwrap.dedent(ENSEMBLE))
    return root


def clients(
    protocol: str, url: str
) -> tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]:
    """(ensemble call, two round-trips call) for one protocol, sharing one client."""
    if protocol == "http":
        import tritonclient.http as tc
    else:
        import tritonclient.grpc as tc  # type: ignore[no-redef]
    client = tc.InferenceServerClient(url)

    def call(model: str, x: np.ndarray) -> np.ndarray:
        tensor = tc.InferInput("X", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        return client.infer(model, [tensor]).as_numpy("Y")

    return (lambda x: call("both", x)), (lambda x: call("second", call("first", x)))


def measure(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000, help="requests per way, all blocks together")
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--protocol", default="http,grpc")
    args = parser.parse_args()
    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    with tempfile.TemporaryDirectory() as tmp, running_engine(write_repo(Path(tmp))) as engine:
        import httpx

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://{engine.http_url}/v2/health/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        print(
            "| protocol | ensemble median µs | ensemble p99 µs | 2 round-trips median µs | "
            "2 round-trips p99 µs | ratio (median) |"
        )
        print("|---|---|---|---|---|---|")
        for protocol in args.protocol.split(","):
            ensemble, roundtrips = clients(
                protocol, engine.http_url if protocol == "http" else engine.grpc_url
            )
            expected = (x + 1) * 2
            assert np.array_equal(ensemble(x), expected) and np.array_equal(roundtrips(x), expected)
            measure(ensemble, x, 200)  # warm-up: placement settles (docs/scheduling.md)
            measure(roundtrips, x, 200)
            per_block = max(1, args.requests // args.blocks)
            e_times: list[float] = []
            r_times: list[float] = []
            for _ in range(args.blocks):
                e_times += measure(ensemble, x, per_block)
                r_times += measure(roundtrips, x, per_block)
            e_med, r_med = statistics.median(e_times), statistics.median(r_times)
            e_p99 = statistics.quantiles(e_times, n=100)[98]
            r_p99 = statistics.quantiles(r_times, n=100)[98]
            print(
                f"| {protocol} | {e_med * 1e6:.0f} | {e_p99 * 1e6:.0f} | {r_med * 1e6:.0f} | {r_p99 * 1e6:.0f} "
                f"| {e_med / r_med:.2f} |"
            )


if __name__ == "__main__":
    main()
