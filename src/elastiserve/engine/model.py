"""A loaded model version: request validation, scheduling and response shaping.

Validation mirrors Triton's InferenceRequest::Normalize (same checks, same messages where
Triton's are clear); output selection and the classification extension are applied here so
that every backend only produces plain output tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from elastiserve.engine.config import control_input_names
from elastiserve.engine.scheduler import Scheduler
from elastiserve.engine.stats import ModelStats
from elastiserve.engine.streaming import DecoupledUnary, ResponseStream, single_response, start_decoupled
from elastiserve.errors import InvalidArgument, Unavailable, Unsupported
from elastiserve.types import InferRequest, InferResponse, InferTensor, config_type_to_datatype

if TYPE_CHECKING:
    from tritonclient.grpc.model_config_pb2 import ModelConfig


class TensorSpec:
    """What the config says about one input or output, precomputed for the hot path."""

    __slots__ = ("datatype", "dims", "labels", "name", "optional", "reshape")

    def __init__(self, tensor: Any, model_dir: Path, is_input: bool) -> None:
        self.name: str = tensor.name
        self.datatype: str = config_type_to_datatype(tensor.data_type)
        self.dims: tuple[int, ...] = tuple(tensor.dims)
        self.optional: bool = bool(getattr(tensor, "optional", False)) if is_input else False
        self.reshape: tuple[int, ...] | None = (
            tuple(tensor.reshape.shape) if tensor.HasField("reshape") else None
        )
        self.labels: list[str] = []
        label_file = getattr(tensor, "label_filename", "")
        if label_file and (model_dir / label_file).is_file():
            self.labels = (model_dir / label_file).read_text().splitlines()


_BATCH_NOTE = (
    " NOTE: Setting a non-zero max_batch_size in the model config requires a batch dimension to be "
    "prepended to each input shape. If you want to specify the full shape including the batch dim in "
    "your input dims config, try setting max_batch_size to zero. See the model configuration docs for "
    "more info on max_batch_size."
)


def _names(items: list) -> str:
    """A list printed as Triton prints it: ``['a','b']`` / ``[-1,16]``."""
    return "[" + ",".join(f"'{i}'" if isinstance(i, str) else str(i) for i in items) + "]"


def _shape_matches(expected: tuple[int, ...], actual: list[int]) -> bool:
    if len(expected) != len(actual):
        return False
    return all(e == -1 or e == a for e, a in zip(expected, actual, strict=True))


class ModelVersion:
    """One servable version of a model."""

    def __init__(
        self, name: str, version: int, config: ModelConfig, model_dir: Path, scheduler: Scheduler | None
    ) -> None:
        self.name = name
        self.version = version
        self.version_str = str(version)
        self.config = config
        self.model_dir = model_dir
        self.max_batch_size = config.max_batch_size
        self.inputs = {t.name: TensorSpec(t, model_dir, True) for t in config.input}
        self.outputs = {t.name: TensorSpec(t, model_dir, False) for t in config.output}
        # Sequence control inputs are injected by the sequence batcher, never required from clients.
        injected = control_input_names(config)
        self.required_inputs = [n for n, s in self.inputs.items() if not s.optional and n not in injected]
        self.stats = ModelStats(name, self.version_str)
        self.scheduler = scheduler
        # Decoupled models answer through response streams only (engine/streaming.py).
        self.decoupled = bool(config.model_transaction_policy.decoupled)

    # -- metadata ---------------------------------------------------------------------------------
    def metadata(self, versions: list[str]) -> dict[str, Any]:
        batch = [-1] if self.max_batch_size > 0 else []
        return {
            "name": self.name,
            "versions": versions,
            "platform": self.config.platform or self.config.backend,
            "inputs": [
                {"name": s.name, "datatype": s.datatype, "shape": batch + list(s.dims)}
                for s in self.inputs.values()
            ],
            "outputs": [
                {"name": s.name, "datatype": s.datatype, "shape": batch + list(s.dims)}
                for s in self.outputs.values()
            ],
        }

    # -- inference --------------------------------------------------------------------------------
    async def infer(self, request: InferRequest) -> InferResponse:
        if self.decoupled:
            raise DecoupledUnary(DecoupledUnary.GRPC_MESSAGE)
        batch_size = self.validate(request)
        assert self.scheduler is not None
        response = await self.scheduler.infer(request, batch_size)
        response.model_name = self.name
        response.model_version = self.version_str
        response.id = request.id
        return self.shape_outputs(request, response)

    def infer_stream(self, request: InferRequest) -> ResponseStream:
        """Start ``request`` and return the stream of its responses: as many as a decoupled model
        sends, else the one response. Invalid requests raise here, before anything streams."""
        if not self.decoupled:
            return single_response(self.infer(request))
        batch_size = self.validate(request)
        scheduler = self.scheduler
        if not isinstance(scheduler, Scheduler):
            raise Unsupported(f"model '{self.name}': decoupled models need the default or dynamic batcher")
        if scheduler.closed:
            raise Unavailable(f"model '{request.model_name}' is unloading")

        def shape(response: InferResponse) -> InferResponse:
            response.model_name = self.name
            response.model_version = self.version_str
            response.id = request.id
            return self.shape_outputs(request, response)

        stream = ResponseStream(transform=shape)
        start_decoupled(scheduler, request, batch_size, stream)
        return stream

    def validate(self, request: InferRequest) -> int:
        """Check inputs against the config; returns the batch size (1 for non-batching models).

        Messages are Triton's, including the ``[request id: …]`` prefix."""
        try:
            return self._validate(request)
        except InvalidArgument as exc:
            raise InvalidArgument(f"[request id: {request.id or '<id_unknown>'}] {exc.message}") from None

    def _validate(self, request: InferRequest) -> int:
        name = self.name
        inputs = self.inputs
        given = request.inputs
        required = self.required_inputs
        if (
            len(given) < len(required)
            or any(t.name not in inputs for t in given)
            # optional inputs given instead of a required one
            or (len(required) != len(inputs) and len({t.name for t in given}.intersection(required)) < len(required))
        ):
            present = [t.name for t in given]
            missing = [n for n in required if n not in present]
            # Unknown input names are reported first when the count alone is not short.
            if missing and (len(given) < len(required) or all(t.name in inputs for t in given)):
                expected = (  # Triton's wording, with and without optional inputs
                    f"number of inputs between {len(required)} and {len(inputs)}"
                    if len(required) != len(inputs)
                    else f"{len(required)} inputs"
                )
                raise InvalidArgument(
                    f"expected {expected} but got {len(given)} inputs for model "
                    f"'{name}'. Got input(s) {_names(present)}, but missing required input(s) "
                    f"{_names(missing)}. Please provide all required input(s)."
                )
            for tensor in given:
                if tensor.name not in inputs:
                    raise InvalidArgument(f"unexpected inference input '{tensor.name}' for model '{name}'")
        batch_size = 1
        batching = self.max_batch_size > 0
        for index, tensor in enumerate(given):
            spec = inputs[tensor.name]
            if tensor.datatype != spec.datatype:
                raise InvalidArgument(
                    f"inference input '{tensor.name}' data-type is '{tensor.datatype}', but model "
                    f"'{name}' expects '{spec.datatype}'"
                )
            shape = tensor.shape
            if batching:
                if not shape:
                    raise InvalidArgument(
                        f"inference input '{tensor.name}' for model '{name}' has no batch dimension; "
                        f"expected shape [-1,{','.join(map(str, spec.dims))}]"
                    )
                this_batch = shape[0]
                if index == 0:
                    batch_size = this_batch
                elif this_batch != batch_size:
                    raise InvalidArgument(
                        f"inputs of model '{name}' have different batch sizes "
                        f"({batch_size} and {this_batch} for '{tensor.name}')"
                    )
                dims = shape[1:]
            else:
                dims = shape
            if not _shape_matches(spec.dims, dims):
                want = ([-1] if batching else []) + list(spec.dims)
                raise InvalidArgument(
                    f"unexpected shape for input '{tensor.name}' for model '{name}'. "
                    f"Expected {_names(want)}, got {_names(shape)}.{_BATCH_NOTE if batching else ''}"
                )
            if spec.reshape is not None and tensor.data is not None:
                new_shape = ([shape[0]] if batching else []) + list(spec.reshape)
                tensor.data = tensor.data.reshape(new_shape)
                tensor.shape = new_shape
        if batching and (batch_size < 1 or batch_size > self.max_batch_size):
            raise InvalidArgument(
                f"inference request batch-size must be <= {self.max_batch_size} for '{name}'"
                if batch_size > self.max_batch_size
                else f"inference request batch-size must be >= 1 for '{name}'"
            )
        for requested in request.outputs:
            if requested.name not in self.outputs and self.outputs:
                raise InvalidArgument(f"unexpected inference output '{requested.name}' for model '{name}'")
        return batch_size

    def shape_outputs(self, request: InferRequest, response: InferResponse) -> InferResponse:
        """Keep requested outputs (all when none requested) and apply classification."""
        if not request.outputs:
            if self.outputs:
                response.outputs = [t for t in response.outputs if t.name in self.outputs]
            return response
        by_name = {t.name: t for t in response.outputs}
        shaped: list[InferTensor] = []
        for requested in request.outputs:
            tensor = by_name.get(requested.name)
            if tensor is None:
                raise InvalidArgument(f"model '{self.name}' did not produce output '{requested.name}'")
            class_count = requested.parameters.get("classification") or requested.parameters.get(
                "class_count"
            )
            if class_count:
                tensor = self._classify(tensor, int(class_count))
            shaped.append(tensor)
        response.outputs = shaped
        return response

    def _classify(self, tensor: InferTensor, count: int) -> InferTensor:
        """Triton's classification extension: top-k "value:index[:label]" strings per batch item."""
        if tensor.datatype == "BYTES":
            raise InvalidArgument("class result not available for output due to unsupported type 'BYTES'")
        data = tensor.data
        assert data is not None
        batched = self.max_batch_size > 0
        rows = data.reshape(data.shape[0], -1) if batched else data.reshape(1, -1)
        labels = self.outputs[tensor.name].labels if tensor.name in self.outputs else []
        k = min(count, rows.shape[1])
        result = np.empty((rows.shape[0], k), dtype=np.object_)
        for r, row in enumerate(rows):
            order = np.argsort(-row.astype(np.float64), kind="stable")[:k]
            for c, idx in enumerate(order):
                text = f"{row[idx]:f}:{idx}" if np.issubdtype(row.dtype, np.floating) else f"{row[idx]}:{idx}"
                if idx < len(labels):
                    text += f":{labels[idx]}"
                result[r, c] = text.encode()
        if not batched:
            result = result.reshape(k)
        return InferTensor(tensor.name, "BYTES", list(result.shape), result)
