"""Helpers for the python backend tests: write Triton model dirs, build contexts and requests."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc.model_config_pb2 import ModelConfig

from elastiserve.engine.backends.base import ModelContext
from elastiserve.types import InferRequest, InferTensor, RequestedOutput, numpy_to_datatype

ADD_SUB_CONFIG = """
name: "{name}"
backend: "python"
max_batch_size: 64
input [
  {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] }},
  {{ name: "INPUT1" data_type: TYPE_FP32 dims: [ 16 ] }}
]
output [
  {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] }},
  {{ name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 16 ] }}
]
instance_group [ {{ count: {count} kind: KIND_CPU }} ]
{extra}
"""

# The shape of Triton's add_sub example: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1.
ADD_SUB_MODEL = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        pass

    def execute(self, requests):
        responses = []
        for request in requests:
            in0 = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            in1 = pb_utils.get_input_tensor_by_name(request, "INPUT1").as_numpy()
            out0 = pb_utils.Tensor("OUTPUT0", (in0 + in1).astype(in0.dtype))
            out1 = pb_utils.Tensor("OUTPUT1", (in0 - in1).astype(in0.dtype))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out0, out1]))
        return responses

    def finalize(self):
        pass
"""


def write_model(
    repo: Path, name: str, source: str, config_text: str | None = None, version: int = 1
) -> tuple[Path, ModelConfig]:
    """Write ``<repo>/<name>/config.pbtxt`` and ``<version>/model.py``; return (model_dir, config)."""
    model_dir = repo / name
    (model_dir / str(version)).mkdir(parents=True, exist_ok=True)
    (model_dir / str(version) / "model.py").write_text(textwrap.dedent(source))
    if config_text is None:
        config_text = ADD_SUB_CONFIG.format(name=name, count=1, extra="")
    (model_dir / "config.pbtxt").write_text(config_text)
    return model_dir, text_format.Parse(config_text, ModelConfig())


def add_sub_config(name: str, count: int = 1, extra: str = "") -> str:
    return ADD_SUB_CONFIG.format(name=name, count=count, extra=extra)


def make_context(
    model_dir: Path, config: ModelConfig, index: int = 0, version: int = 1, **kwargs: Any
) -> ModelContext:
    return ModelContext(
        name=config.name or model_dir.name,
        version=version,
        config=config,
        model_dir=model_dir,
        repository=model_dir.parent,
        instance_name=f"{config.name}_0_{index}",
        instance_index=index,
        **kwargs,
    )


def tensor(name: str, array: np.ndarray) -> InferTensor:
    return InferTensor(name, numpy_to_datatype(array.dtype), list(array.shape), array)


def request(
    model: str, req_id: str = "", outputs: list[str] | None = None, **arrays: np.ndarray
) -> InferRequest:
    return InferRequest(
        model_name=model,
        inputs=[tensor(k, v) for k, v in arrays.items()],
        id=req_id,
        outputs=[RequestedOutput(o) for o in outputs or []],
    )


def add_sub_request(model: str, a: float, b: float, req_id: str = "") -> InferRequest:
    return request(
        model,
        req_id,
        INPUT0=np.full((1, 16), a, dtype=np.float32),
        INPUT1=np.full((1, 16), b, dtype=np.float32),
    )


# A sequence model: sums INPUT per correlation ID (START resets) and says which instance
# (name:pid) ran it. Used by the sequence-batching tests, in-process and end to end.
ACCUMULATOR_MODEL = """
import os
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.who = f"{args['model_instance_name']}:{os.getpid()}"
        self.sums = {}

    def execute(self, requests):
        out = []
        for r in requests:
            x = int(pb_utils.get_input_tensor_by_name(r, "INPUT").as_numpy().flat[0])
            corrid = int(pb_utils.get_input_tensor_by_name(r, "CORRID").as_numpy().flat[0])
            if pb_utils.get_input_tensor_by_name(r, "START").as_numpy().flat[0]:
                self.sums[corrid] = 0
            self.sums[corrid] = self.sums.get(corrid, 0) + x
            out.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUTPUT", np.array([[self.sums[corrid]]], np.int32)),
                pb_utils.Tensor("WHO", np.array([[self.who.encode()]], dtype=np.object_)),
            ]))
        return out
"""
