#!/usr/bin/env python3
"""Platform timings from issue 3 (numbers in docs/platform.md).

1. Reconcile loop time with 100 services / 300 instances on the FakeRuntime (a real SQLite store
   on disk): the passes that create and converge everything, then steady passes (no change).
2. ``create`` → first successful predict for ``examples/service.json`` on a real ``elastiserve up``:
   the REST create, then add_sub straight to the instance (discovery + tritonclient), and through
   the gateway when it is installed. Repeated ``--runs`` times (the service is deleted in between).

  python bench/platform_times.py [--services 100] [--per-service 3] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import tritonclient.http as httpclient

ROOT = Path(__file__).resolve().parent.parent

from elastiserve.controlplane.reconciler import Reconciler  # noqa: E402
from elastiserve.controlplane.spec import parse_spec, with_absolute_paths  # noqa: E402
from elastiserve.controlplane.store import Store  # noqa: E402
from elastiserve.testing import FakeRuntime, running_platform  # noqa: E402


def reconcile_loop(services: int, per_service: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(tmp)
        runtime = FakeRuntime()
        rec = Reconciler(store, runtime, drain_delay=0.0)
        for i in range(services):
            store.create_service(
                parse_spec(
                    {
                        "name": f"svc{i:03d}",
                        "processor": "onnx",
                        "model_path": "/m.onnx",
                        "metadata": {"instance": per_service},
                    }
                )
            )
        started = time.perf_counter()
        passes = 0
        while not all(r.status == "Running" for r in store.list_services()):
            rec.reconcile_once()
            passes += 1
        converge = time.perf_counter() - started
        steady = [rec.reconcile_once().duration for _ in range(50)]
        store.close()
    print(
        f"reconcile {services} services / {services * per_service} instances (FakeRuntime, SQLite on disk): "
        f"create->all Running {converge * 1000:.0f} ms in {passes} passes; steady pass "
        f"median {statistics.median(steady) * 1000:.1f} ms, p90 {sorted(steady)[45] * 1000:.1f} ms"
    )


def add_sub_ok(url: str) -> bool:
    data = np.ones((1, 16), dtype=np.float32)
    inputs = [
        httpclient.InferInput("INPUT0", [1, 16], "FP32"),
        httpclient.InferInput("INPUT1", [1, 16], "FP32"),
    ]
    for item in inputs:
        item.set_data_from_numpy(data)
    client = httpclient.InferenceServerClient(url)
    try:
        return bool(np.allclose(client.infer("add_sub", inputs).as_numpy("OUTPUT0"), 2.0))
    except Exception:
        return False
    finally:
        client.close()


def create_to_predict(runs: int) -> None:
    spec_path = ROOT / "examples" / "service.json"
    spec = with_absolute_paths(json.loads(spec_path.read_text()), spec_path.parent)
    body = {
        "inputs": [
            {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16},
            {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16},
        ]
    }
    direct, gateway = [], []
    with running_platform(gateway=True) as platform:
        cp = platform.client()
        for _ in range(runs):
            started = time.monotonic()
            view = cp.create_service(spec)
            token = view["spec"]["token"]
            while True:
                eps = cp.endpoints(spec["name"]).endpoints
                if eps and add_sub_ok(f"{eps[0]['ip']}:{eps[0]['port']}"):
                    break
                time.sleep(0.01)
            direct.append(time.monotonic() - started)
            if platform.gateway_url:
                url = f"{platform.gateway_url}/api/predict/{spec['name']}/v2/models/add_sub/infer"
                while httpx.post(url, json=body, headers={"Authorization": token}).status_code != 200:
                    time.sleep(0.01)
                gateway.append(time.monotonic() - started)
            cp.delete_service(spec["name"])
            while spec["name"] in {s["name"] for s in cp.list_services()}:
                time.sleep(0.05)
    print(
        f"create -> first successful predict, examples/service.json ({runs} runs): direct "
        + ", ".join(f"{t:.2f}s" for t in direct)
        + (
            ("; via gateway " + ", ".join(f"{t:.2f}s" for t in gateway))
            if gateway
            else "; no gateway installed"
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, default=100)
    parser.add_argument("--per-service", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    reconcile_loop(args.services, args.per_service)
    create_to_predict(args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
