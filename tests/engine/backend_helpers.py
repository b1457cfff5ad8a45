"""Shared helpers for the backend tests: configs from pbtxt text, contexts and requests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc.model_config_pb2 import ModelConfig

from elastiserve.engine.backends.base import ModelContext, ModelInstance
from elastiserve.errors import ElastiserveError
from elastiserve.types import InferRequest, InferResponse, InferTensor, numpy_to_datatype


def parse_config(text: str) -> ModelConfig:
    """config.pbtxt text -> ModelConfig, exactly as the engine parses it."""
    return text_format.Parse(text, ModelConfig())


def context(model_dir: Path, config: ModelConfig, version: int = 1) -> ModelContext:
    return ModelContext(
        name=config.name or model_dir.name,
        version=version,
        config=config,
        model_dir=model_dir,
        repository=model_dir.parent,
        instance_name=f"{model_dir.name}_0_0",
    )


def request(model: str, request_id: str = "", **arrays: np.ndarray) -> InferRequest:
    tensors = [InferTensor(name, numpy_to_datatype(a.dtype), list(a.shape), a) for name, a in arrays.items()]
    return InferRequest(model_name=model, inputs=tensors, id=request_id)


def execute_ok(instance: ModelInstance, *requests: InferRequest) -> list[InferResponse]:
    """Execute and fail the test on any per-request error."""
    results = instance.execute(list(requests))
    assert len(results) == len(requests)
    for result in results:
        if isinstance(result, ElastiserveError):
            raise AssertionError(f"request failed: {result}")
    return results  # type: ignore[return-value]


def output(response: InferResponse, name: str) -> np.ndarray:
    tensor = response.output(name)
    assert tensor is not None, f"no output {name!r} in {[o.name for o in response.outputs]}"
    assert tensor.data is not None
    assert list(tensor.data.shape) == tensor.shape
    return tensor.data
