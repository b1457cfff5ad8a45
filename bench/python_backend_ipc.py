#!/usr/bin/env python3
"""Cost of the python backend's execution modes, per ``execute`` call (numbers in docs/python-backend.md).

Runs an identity ``model.py`` in-process and in a worker process (our Channel: pickle 5 over a
Unix socketpair, big buffers out of band), on FP32[1,16] and FP32[1,1M], and, for comparison,
the same round trip over ``multiprocessing.Pipe`` (``Connection.send``/``recv``, pickle) with
an echo process: the stdlib way we did not take.

  python bench/python_backend_ipc.py [--seconds 2]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from elastiserve.engine.backends.python import BACKEND  # noqa: E402
from tests.engine.python_backend_support import make_context, request, write_model  # noqa: E402

IDENTITY = """
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.get_input_tensor_by_name(r, "INPUT0")]) for r in requests]
"""

CONFIG = """
name: "identity" backend: "python" max_batch_size: 0
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ -1, -1 ] }} ]
output [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ -1, -1 ] }} ]
parameters {{ key: "execution_mode" value {{ string_value: "{mode}" }} }}
"""


def timed(fn: Any, seconds: float) -> tuple[float, float, int]:
    """(median µs, p99 µs, calls) of ``fn`` called repeatedly for about ``seconds``."""
    for _ in range(20):
        fn()
    samples = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99)], len(samples)


def _echo(conn: Any) -> None:
    while True:
        try:
            conn.send(conn.recv())
        except EOFError:
            return


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=2.0)
    opts = parser.parse_args()
    shapes = {"FP32[1,16]": (1, 16), "FP32[1,1M]": (1, 1_000_000)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("in_process", "process"):
            model_dir, config = write_model(Path(tmp), f"identity_{mode}", IDENTITY, CONFIG.format(mode=mode))
            instance = BACKEND.create_instance(make_context(model_dir, config))
            for label, shape in shapes.items():
                req = request("identity", INPUT0=np.ones(shape, np.float32))
                rows.append(
                    (f"{mode} execute", label, *timed(lambda r=req, i=instance: i.execute([r]), opts.seconds))
                )
            instance.close()
    parent, child = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(target=_echo, args=(child,), daemon=True)
    proc.start()
    for label, shape in shapes.items():
        array = np.ones(shape, np.float32)

        def pipe_round_trip(a: np.ndarray = array) -> None:
            parent.send(a)
            parent.recv()

        rows.append(("multiprocessing.Pipe echo", label, *timed(pipe_round_trip, opts.seconds)))
    parent.close()
    proc.join(5)
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}")
    print("| path | tensor | median µs | p99 µs | calls |")
    print("|---|---|---:|---:|---:|")
    for path, label, median, p99, calls in rows:
        print(f"| {path} | {label} | {median:.1f} | {p99:.1f} | {calls} |")


if __name__ == "__main__":
    main()
