"""The contract between the engine and a backend.

A *backend* (one module per framework, looked up lazily by name in ``backends/__init__.py``)
turns a model directory into *model instances*. The scheduler owns the instances, queues
requests and calls :meth:`ModelInstance.execute` with a list of requests (one request, or
the requests a dynamic batch collected). Backends that work on whole arrays subclass
:class:`ArrayModelInstance`, which concatenates the batch along dimension 0 and splits the
outputs back, so each framework module only writes ``run(inputs) -> outputs``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from elastiserve.errors import ElastiserveError, Internal, InvalidArgument
from elastiserve.types import InferRequest, InferResponse, InferTensor, numpy_to_datatype

if TYPE_CHECKING:
    from tritonclient.grpc.model_config_pb2 import ModelConfig


@dataclass(slots=True)
class ModelContext:
    """Everything a backend needs to create one instance of one model version."""

    name: str
    version: int
    config: ModelConfig
    model_dir: Path  # <repository>/<model>
    repository: Path
    instance_name: str = ""  # Triton style: "<model>_<group>_<index>"
    instance_index: int = 0
    instance_kind: str = "KIND_CPU"
    device_id: int = 0
    # The engine's dataplane, for backends that call other models (Python BLS); None in unit tests.
    server: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def version_dir(self) -> Path:
        return self.model_dir / str(self.version)

    def model_file(self, default_name: str) -> Path:
        """The model file: ``default_model_filename`` from the config, else the backend's default."""
        return self.version_dir / (self.config.default_model_filename or default_name)


ExecuteResult = list[InferResponse | ElastiserveError]


class ModelInstance(Protocol):
    """One loaded copy of a model. ``execute`` returns one response or error per request, in order."""

    def execute(self, requests: list[InferRequest]) -> ExecuteResult: ...

    def close(self) -> None: ...


Parallelism = Literal["thread", "process", "inline"]


class Backend(Protocol):
    """What each backend module exposes as ``BACKEND``."""

    name: str
    # How the scheduler may run several instances of this backend at once:
    # "thread" (native code releases the GIL), "process" (pure Python, GIL-bound),
    # "inline" (cheap enough to run on the event loop).
    parallelism: Parallelism

    def auto_complete_config(self, config: ModelConfig, model_dir: Path, version: int | None) -> None:
        """Fill in what a missing or partial config lacks (inputs, outputs, max_batch_size), in place."""
        ...

    def create_instance(self, context: ModelContext) -> ModelInstance: ...


def concat_batch(requests: list[InferRequest], names: list[str]) -> tuple[dict[str, np.ndarray], list[int]]:
    """Stack the named inputs of several batched requests along dim 0; returns arrays and batch sizes."""
    sizes = [int(req.inputs[0].shape[0]) if req.inputs and req.inputs[0].shape else 1 for req in requests]
    arrays: dict[str, np.ndarray] = {}
    for name in names:
        parts = []
        for req in requests:
            tensor = req.input(name)
            if tensor is None or tensor.data is None:
                raise InvalidArgument(f"expected input '{name}' in request for model '{req.model_name}'")
            parts.append(tensor.data)
        arrays[name] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    return arrays, sizes


def to_output_tensor(name: str, array: np.ndarray) -> InferTensor:
    array = np.asarray(array)
    datatype = numpy_to_datatype(array.dtype)
    if datatype == "BYTES" and array.dtype != np.object_:
        from elastiserve.types import as_bytes_array

        array = as_bytes_array(array)
    return InferTensor(name=name, datatype=datatype, shape=list(array.shape), data=array)


class ArrayModelInstance:
    """Base for array-in/array-out backends (ONNX, scikit-learn, tree models, TorchScript).

    Subclasses set ``input_names`` and implement :meth:`run` on whole (batched) arrays.
    """

    input_names: list[str]

    def __init__(self, context: ModelContext) -> None:
        self.context = context
        self.batched = context.config.max_batch_size > 0
        self.input_names = [i.name for i in context.config.input]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def execute(self, requests: list[InferRequest]) -> ExecuteResult:
        version = str(self.context.version)
        if not self.batched or len(requests) == 1:
            return [self._execute_one(req, version) for req in requests]
        try:
            inputs, sizes = concat_batch(requests, self.input_names)
            outputs = self.run(inputs)
        except ElastiserveError as exc:
            return [exc] * len(requests)
        except Exception as exc:  # a framework error is the model's failure, not the server's
            return [Internal(f"{self.context.name}: {type(exc).__name__}: {exc}")] * len(requests)
        results: ExecuteResult = []
        offset = 0
        for req, size in zip(requests, sizes, strict=True):
            tensors = [to_output_tensor(n, a[offset : offset + size]) for n, a in outputs.items()]
            results.append(InferResponse(req.model_name, version, tensors, id=req.id))
            offset += size
        return results

    def _execute_one(self, req: InferRequest, version: str) -> InferResponse | ElastiserveError:
        try:
            inputs = {}
            for name in self.input_names:
                tensor = req.input(name)
                if tensor is None or tensor.data is None:
                    raise InvalidArgument(f"expected input '{name}' in request for model '{req.model_name}'")
                inputs[name] = tensor.data
            outputs = self.run(inputs)
        except ElastiserveError as exc:
            return exc
        except Exception as exc:
            return Internal(f"{self.context.name}: {type(exc).__name__}: {exc}")
        tensors = [to_output_tensor(n, a) for n, a in outputs.items()]
        return InferResponse(req.model_name, version, tensors, id=req.id)

    def close(self) -> None:
        pass
