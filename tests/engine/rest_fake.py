"""An in-process fake model registry behind the real :class:`DataPlane`, and a REST server
running on its own uvloop thread, for the REST frontend tests (and the HTTP benchmark).

The fake does what the real registry/dataplane promise frontends: metadata/config/stats in
Triton's JSON shape, outputs filtered to those requested, classification applied.
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
from elastiserve.engine.frontends.http_server import HttpServerHandle
from elastiserve.engine.frontends.rest import start_http_server
from elastiserve.errors import InvalidArgument, NotFound
from elastiserve.types import InferRequest, InferResponse, InferTensor, config_type_to_datatype

IDENTITY_CONFIG = """
name: "identity_fp32"
backend: "python"
max_batch_size: 64
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
dynamic_batching { max_queue_delay_microseconds: 100 }
instance_group [ { count: 1 kind: KIND_CPU } ]
"""

ADD_SUB_CONFIG = """
name: "add_sub"
backend: "python"
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] },
        { name: "INPUT1" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] },
         { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 16 ] } ]
"""

# Echoes every INPUTn as OUTPUTn whatever its datatype (the config's types are not enforced).
ECHO_CONFIG = """
name: "echo"
backend: "python"
input [ { name: "INPUT0" data_type: TYPE_STRING dims: [ -1 ] },
        { name: "INPUT1" data_type: TYPE_STRING dims: [ -1 ] optional: true } ]
output [ { name: "OUTPUT0" data_type: TYPE_STRING dims: [ -1 ] },
         { name: "OUTPUT1" data_type: TYPE_STRING dims: [ -1 ] } ]
"""

BYTES_CONFIG = """
name: "bytes_in"
backend: "python"
input [ { name: "INPUT0" data_type: TYPE_STRING dims: [ -1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_STRING dims: [ -1 ] } ]
"""


class FakeModel:
    def __init__(
        self, config_text: str, fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
    ) -> None:
        self.config = text_format.Parse(config_text, ModelConfig())
        self.name = self.config.name
        self.fn = fn
        self.ready = True
        self.last_request: InferRequest | None = None
        self.count = 0
        self.check_types = self.name != "echo"
        self.response_parameters: dict[str, Any] = {}
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

    async def infer(self, request: InferRequest) -> InferResponse:
        self.last_request = request
        if self.gate is not None:
            await self.gate.wait()
        arrays: dict[str, np.ndarray] = {}
        declared = {i.name: i for i in self.config.input}
        for tensor in request.inputs:
            spec = declared.get(tensor.name)
            if spec is None:
                raise InvalidArgument(f"unexpected inference input '{tensor.name}' for model '{self.name}'")
            if self.check_types and tensor.datatype != config_type_to_datatype(spec.data_type):
                raise InvalidArgument(
                    f"inference input '{tensor.name}' data-type is '{tensor.datatype}', but model "
                    f"'{self.name}' expects '{config_type_to_datatype(spec.data_type)}'"
                )
            assert tensor.data is not None and list(tensor.data.shape) == list(tensor.shape)
            arrays[tensor.name] = tensor.data
        for spec in self.config.input:
            if spec.name not in arrays and not spec.optional:
                raise InvalidArgument(
                    f"expected 1 inputs but got {len(arrays)} inputs for model '{self.name}'"
                )
        outputs = self.fn(arrays)
        self.count += 1
        requested = request.outputs or []
        if requested:
            tensors = []
            for out in requested:
                if out.name not in outputs:
                    raise InvalidArgument(f"unexpected inference output '{out.name}' for model '{self.name}'")
                tensors.append(_classify(out.name, outputs[out.name], out.parameters.get("class_count", 0)))
        else:
            tensors = [_tensor(n, a) for n, a in outputs.items()]
        return InferResponse(
            self.name, "1", tensors, id=request.id, parameters=dict(self.response_parameters)
        )


def _tensor(name: str, array: np.ndarray) -> InferTensor:
    from elastiserve.types import numpy_to_datatype

    return InferTensor(name, numpy_to_datatype(array.dtype), list(array.shape), array)


def _classify(name: str, array: np.ndarray, k: int) -> InferTensor:
    """Triton's classification: top-k as BYTES "value:index" per batch row."""
    if not k:
        return _tensor(name, array)
    rows = array.reshape(1, -1) if array.ndim == 1 else array.reshape(array.shape[0], -1)
    k = min(k, rows.shape[1])
    out = np.empty((rows.shape[0], k), dtype=np.object_)
    for r, row in enumerate(rows):
        for j, idx in enumerate(np.argsort(-row, kind="stable")[:k]):
            out[r, j] = f"{float(row[idx]):f}:{idx}".encode()
    if array.ndim == 1:
        out = out.reshape(k)
    return _tensor(name, out)


class FakeRegistry:
    """Just enough of the model registry for :class:`DataPlane`."""

    control_mode = "explicit"

    def __init__(self) -> None:
        self.models: dict[str, FakeModel] = {}
        self.loads: list[tuple[str, str | None, dict[str, bytes] | None]] = []
        self.unloads: list[tuple[str, bool]] = []
        for text, fn in (
            (IDENTITY_CONFIG, lambda a: {"OUTPUT0": a["INPUT0"]}),
            (
                ADD_SUB_CONFIG,
                lambda a: {"OUTPUT0": a["INPUT0"] + a["INPUT1"], "OUTPUT1": a["INPUT0"] - a["INPUT1"]},
            ),
            (ECHO_CONFIG, lambda a: {n.replace("INPUT", "OUTPUT"): v for n, v in a.items()}),
            (BYTES_CONFIG, lambda a: {"OUTPUT0": a["INPUT0"]}),
        ):
            model = FakeModel(text, fn)
            self.models[model.name] = model

    def all_ready(self) -> bool:
        return all(m.ready for m in self.models.values())

    def is_ready(self, name: str, version: str = "") -> bool:
        model = self.models.get(name)
        return model is not None and model.ready and version in ("", "1")

    def get(self, name: str, version: str = "") -> FakeModel:
        model = self.models.get(name)
        if model is None or not model.ready or version not in ("", "1"):
            raise NotFound(f"Request for unknown model: '{name}' is not found")
        return model

    def metadata(self, name: str, version: str = "") -> dict[str, Any]:
        return self.get(name, version).metadata()

    def statistics(self, name: str = "", version: str = "") -> list[dict[str, Any]]:
        models = [self.get(name, version)] if name else list(self.models.values())
        return [
            {
                "name": m.name,
                "version": "1",
                "last_inference": 0,
                "inference_count": m.count,
                "execution_count": m.count,
                "inference_stats": {"success": {"count": m.count, "ns": 0}},
                "batch_stats": [],
            }
            for m in models
        ]

    def index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        return [
            {"name": m.name, "version": "1", "state": "READY" if m.ready else "UNAVAILABLE", "reason": ""}
            for m in sorted(self.models.values(), key=lambda m: m.name)
            if m.ready or not ready_only
        ]

    async def load(
        self, name: str, config_json: str | None = None, files: dict[str, bytes] | None = None
    ) -> None:
        self.loads.append((name, config_json, files))
        model = self.models.get(name)
        if model is None:
            raise InvalidArgument(f"failed to load '{name}', failed to poll from model repository")
        model.ready = True

    async def unload(self, name: str, unload_dependents: bool = False) -> None:
        self.unloads.append((name, unload_dependents))
        model = self.models.get(name)
        if model is None:
            raise InvalidArgument(f"failed to unload '{name}', no version is available")
        model.ready = False


def make_dataplane() -> tuple[DataPlane, FakeRegistry]:
    registry = FakeRegistry()
    return DataPlane(registry), registry  # type: ignore[arg-type]


class ServerThread:
    """The REST server on its own uvloop loop in a thread, so sync clients can call it."""

    def __init__(self, dataplane: DataPlane, **kwargs: Any) -> None:
        import uvloop

        self.loop = uvloop.new_event_loop()
        self.dataplane = dataplane
        self.kwargs = kwargs
        self.handle: HttpServerHandle | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> ServerThread:
        self.thread.start()
        self.handle = self.run(start_http_server(self.dataplane, "127.0.0.1", 0, **self.kwargs))
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
            self.run(self.handle.close(timeout=5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
