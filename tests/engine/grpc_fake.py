"""An in-process fake model registry behind the real :class:`DataPlane`, and the gRPC frontend
on its own uvloop thread (so blocking clients can call it), for the gRPC frontend tests and
bench/grpc_stack.py.

It keeps the promises the real registry makes frontends (Triton-JSON metadata and statistics,
the ModelConfig proto, Triton's error messages for model-level mistakes, outputs filtered to
those requested) with models that run inline on the event loop, like the scheduler runs tiny
models, so the benchmark measures the frontend and not a fake scheduler.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc.model_config_pb2 import ModelConfig

from elastiserve.engine.dataplane import DataPlane
from elastiserve.engine.frontends.grpc import GrpcServerHandle, start_grpc_server
from elastiserve.errors import InvalidArgument
from elastiserve.types import (
    InferRequest,
    InferResponse,
    InferTensor,
    RequestedOutput,
    config_type_to_datatype,
    numpy_to_datatype,
)
from tests.engine.rest_fake import FakeRegistry as RestFakeRegistry

Fn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]

CONFIGS: dict[str, str] = {
    "identity_fp32": """
        name: "identity_fp32" backend: "python" max_batch_size: 64
        input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
        output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]""",
    "add_sub": """
        name: "add_sub" backend: "python" max_batch_size: 64
        input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] },
                { name: "INPUT1" data_type: TYPE_FP32 dims: [ 16 ] } ]
        output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] },
                 { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 16 ] } ]""",
    "identity_bytes": """
        name: "identity_bytes" backend: "python"
        input [ { name: "INPUT0" data_type: TYPE_STRING dims: [ -1 ] } ]
        output [ { name: "OUTPUT0" data_type: TYPE_STRING dims: [ -1 ] } ]""",
    # Echoes INPUTn as OUTPUTn whatever the datatype (types are not checked: every datatype test).
    "echo": """
        name: "echo" backend: "python"
        input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] },
                { name: "INPUT1" data_type: TYPE_FP32 dims: [ -1 ] optional: true } ]
        output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] },
                 { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ -1 ] } ]""",
    # Fails with a plain Python exception: the frontend must answer INTERNAL, not a traceback.
    "broken": """
        name: "broken" backend: "python"
        input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
        output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]""",
}


def _broken(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    raise ZeroDivisionError("division by zero")


FUNCTIONS: dict[str, Fn] = {
    "identity_fp32": lambda a: {"OUTPUT0": a["INPUT0"]},
    "add_sub": lambda a: {"OUTPUT0": a["INPUT0"] + a["INPUT1"], "OUTPUT1": a["INPUT0"] - a["INPUT1"]},
    "identity_bytes": lambda a: {"OUTPUT0": a["INPUT0"]},
    "echo": lambda a: {n.replace("INPUT", "OUTPUT"): v for n, v in a.items()},
    "broken": _broken,
}


class FakeModel:
    def __init__(self, name: str) -> None:
        self.config = text_format.Parse(CONFIGS[name], ModelConfig())
        self.name = name
        self.fn = FUNCTIONS[name]
        self.ready = True
        self.check_types = name != "echo"
        self.count = 0
        self.last_request: InferRequest | None = None
        self.gate: asyncio.Event | None = None  # when set, infer waits for it (in-flight tests)

    def metadata(self) -> dict[str, Any]:
        batch = [-1] if self.config.max_batch_size > 0 else []

        def io(items: Any) -> list[dict[str, Any]]:
            return [
                {
                    "name": t.name,
                    "datatype": config_type_to_datatype(t.data_type),
                    "shape": batch + [int(d) for d in t.dims],
                }
                for t in items
            ]

        return {
            "name": self.name,
            "versions": ["1"],
            "platform": "python",
            "inputs": io(self.config.input),
            "outputs": io(self.config.output),
        }

    def _check_input(self, tensor: InferTensor) -> None:
        spec = next((i for i in self.config.input if i.name == tensor.name), None)
        if spec is None:
            raise InvalidArgument(f"unexpected inference input '{tensor.name}' for model '{self.name}'")
        if not self.check_types:
            return
        expected = config_type_to_datatype(spec.data_type)
        if tensor.datatype != expected:
            raise InvalidArgument(
                f"inference input '{tensor.name}' data-type is '{tensor.datatype}', but model "
                f"'{self.name}' expects '{expected}'"
            )
        dims = ([-1] if self.config.max_batch_size > 0 else []) + list(spec.dims)
        shape = list(tensor.shape)
        if len(shape) != len(dims) or any(d != -1 and d != s for d, s in zip(dims, shape, strict=True)):
            raise InvalidArgument(
                f"unexpected shape for input '{tensor.name}' for model '{self.name}'. "
                f"Expected {dims}, got {shape}"
            )

    async def infer(self, request: InferRequest) -> InferResponse:
        self.last_request = request
        if self.gate is not None:
            await self.gate.wait()
        for tensor in request.inputs:
            self._check_input(tensor)
            assert tensor.data is not None and list(tensor.data.shape) == list(tensor.shape)
        arrays = {t.name: t.data for t in request.inputs if t.data is not None}
        for spec in self.config.input:
            if spec.name not in arrays and not spec.optional:
                raise InvalidArgument(
                    f"expected {len(self.config.input)} inputs but got {len(arrays)} inputs for model "
                    f"'{self.name}'"
                )
        outputs = self.fn(arrays)
        self.count += 1
        tensors = []
        for out in request.outputs or [RequestedOutput(n) for n in outputs]:
            if out.name not in outputs:
                raise InvalidArgument(f"unexpected inference output '{out.name}' for model '{self.name}'")
            tensors.append(_classify(out.name, outputs[out.name], out.parameters.get("class_count", 0)))
        # Request parameters come back as response parameters, so tests can see them round-trip.
        return InferResponse(self.name, "1", tensors, id=request.id, parameters=dict(request.parameters))


def _tensor(name: str, array: np.ndarray) -> InferTensor:
    return InferTensor(name, numpy_to_datatype(array.dtype), list(array.shape), array)


def _classify(name: str, array: np.ndarray, k: int) -> InferTensor:
    """Triton's classification: top-k "value:index" strings per batch row."""
    if not k:
        return _tensor(name, array)
    rows = array.reshape(1, -1) if array.ndim == 1 else array.reshape(array.shape[0], -1)
    k = min(k, rows.shape[1])
    out = np.empty((rows.shape[0], k), dtype=np.object_)
    for r, row in enumerate(rows):
        for j, idx in enumerate(np.argsort(-row, kind="stable")[:k]):
            out[r, j] = f"{float(row[idx]):f}:{idx}".encode()
    return _tensor(name, out.reshape(k) if array.ndim == 1 else out)


class FakeRegistry(RestFakeRegistry):
    """The REST tests' fake registry with this module's models and fuller statistics."""

    def __init__(self) -> None:
        self.models: dict[str, FakeModel] = {name: FakeModel(name) for name in CONFIGS}  # type: ignore[assignment]
        self.loads: list[tuple[str, str | None, dict[str, bytes] | None]] = []
        self.unloads: list[tuple[str, bool]] = []

    def statistics(self, name: str = "", version: str = "") -> list[dict[str, Any]]:
        models = [self.get(name, version)] if name else list(self.models.values())
        return [
            {
                "name": m.name,
                "version": "1",
                "last_inference": 0,
                "inference_count": m.count,
                "execution_count": m.count,
                "inference_stats": {
                    "success": {"count": m.count, "ns": 1000 * m.count},
                    "fail": {"count": 0, "ns": 0},
                    "queue": {"count": m.count, "ns": 10 * m.count},
                },
                "batch_stats": [{"batch_size": 1, "compute_infer": {"count": m.count, "ns": 5}}]
                if m.count
                else [],
                "memory_usage": [],
            }
            for m in models
        ]


def make_dataplane() -> tuple[DataPlane, FakeRegistry]:
    registry = FakeRegistry()
    return DataPlane(registry), registry  # type: ignore[arg-type]


class GrpcServerThread:
    """The gRPC frontend over a fake dataplane, on its own uvloop loop in a daemon thread."""

    def __init__(self, transport: str = "core", **kwargs: Any) -> None:
        import uvloop

        self.loop = uvloop.new_event_loop()
        self.dataplane, self.registry = make_dataplane()
        self.transport = transport
        self.kwargs = kwargs
        self.handle: GrpcServerHandle | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self, host: str = "127.0.0.1", port: int = 0) -> GrpcServerThread:
        self.thread.start()
        self.handle = self.run(
            start_grpc_server(self.dataplane, host, port, transport=self.transport, **self.kwargs)
        )
        return self

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def port(self) -> int:
        assert self.handle is not None
        return self.handle.port

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.handle is not None:
            self.run(self.handle.close(1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
