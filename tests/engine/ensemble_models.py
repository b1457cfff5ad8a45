"""A model repository with ensembles over small Python models, shared by the ensemble tests."""

from __future__ import annotations

import textwrap
from pathlib import Path

from .python_backend_support import ADD_SUB_MODEL, add_sub_config

# Y = X * factor, after sleeping `sleep` seconds (both from the config's parameters).
SCALE_MODEL = """
import json
import time
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"]).get("parameters", {})
        self.factor = float(params.get("factor", {}).get("string_value", "2"))
        self.sleep = float(params.get("sleep", {}).get("string_value", "0"))

    def execute(self, requests):
        if self.sleep:
            time.sleep(self.sleep)
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            if float(x.reshape(-1)[0]) == -999:
                raise pb_utils.TritonModelException("scale refuses -999")
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", (x * self.factor).astype(x.dtype))]))
        return out
"""


def scale_config(
    name: str, factor: float = 2, sleep: float = 0, max_batch_size: int = 8, extra: str = ""
) -> str:
    return f"""
name: "{name}" backend: "python" max_batch_size: {max_batch_size}
input [ {{ name: "X" data_type: TYPE_FP32 dims: [ 16 ] }} ]
output [ {{ name: "Y" data_type: TYPE_FP32 dims: [ 16 ] }} ]
parameters [
  {{ key: "factor" value {{ string_value: "{factor}" }} }},
  {{ key: "sleep" value {{ string_value: "{sleep}" }} }}
]
{extra}
"""


# A: add_sub(A, B) -> SUM, DIFF; scale(SUM) -> OUT.   Outputs OUT (=(A+B)*2) and DIFF (=A-B).
PIPE_CONFIG = """
name: "{name}" platform: "ensemble" max_batch_size: 8
input [
  {{ name: "A" data_type: TYPE_FP32 dims: [ 16 ] }},
  {{ name: "B" data_type: TYPE_FP32 dims: [ 16 ] }}
]
output [
  {{ name: "OUT" data_type: TYPE_FP32 dims: [ 16 ] }},
  {{ name: "DIFF" data_type: TYPE_FP32 dims: [ 16 ] }}
]
ensemble_scheduling {{ step [
  {{ model_name: "add_sub" model_version: -1
     input_map {{ key: "INPUT0" value: "A" }} input_map {{ key: "INPUT1" value: "B" }}
     output_map {{ key: "OUTPUT0" value: "SUM" }} output_map {{ key: "OUTPUT1" value: "DIFF" }} }},
  {{ model_name: "{scale}" model_version: {scale_version}
     input_map {{ key: "X" value: "SUM" }} output_map {{ key: "Y" value: "OUT" }} }}
] }}
"""

# Two slow branches from A, joined by add_sub: LEFT = A*2, RIGHT = A*3, SUM = 5A, DIFF = -A.
DIAMOND_CONFIG = """
name: "diamond" platform: "ensemble" max_batch_size: 8
input [ { name: "A" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [
  { name: "SUM" data_type: TYPE_FP32 dims: [ 16 ] },
  { name: "DIFF" data_type: TYPE_FP32 dims: [ 16 ] }
]
ensemble_scheduling { step [
  { model_name: "add_sub" input_map { key: "INPUT0" value: "LEFT" } input_map { key: "INPUT1" value: "RIGHT" }
    output_map { key: "OUTPUT0" value: "SUM" } output_map { key: "OUTPUT1" value: "DIFF" } },
  { model_name: "slow_left" input_map { key: "X" value: "A" } output_map { key: "Y" value: "LEFT" } },
  { model_name: "slow_right" input_map { key: "X" value: "A" } output_map { key: "Y" value: "RIGHT" } }
] }
"""

# Variable-size dims at the ensemble: the composing model's own validation catches bad shapes.
LOOSE_CONFIG = """
name: "loose" platform: "ensemble" max_batch_size: 8
input [ { name: "A" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ -1 ] } ]
ensemble_scheduling { step [
  { model_name: "scale" model_version: 1 input_map { key: "X" value: "A" } output_map { key: "Y" value: "OUT" } }
] }
"""

SLEEP = 0.2


def write(repo: Path, name: str, config: str, model: str | None = None, version_dir: bool = True) -> Path:
    model_dir = repo / name
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(textwrap.dedent(config))
    if version_dir:
        (model_dir / "1").mkdir(exist_ok=True)
        if model is not None:
            (model_dir / "1" / "model.py").write_text(textwrap.dedent(model))
    return model_dir


def write_repo(repo: Path) -> Path:
    """add_sub, scale (version 1: x2, version 2: x10), slow_left/right, and the ensembles pipe
    (pins scale version 1), pipe_latest (scale -1 = latest = 2), diamond (no version folder)."""
    write(
        repo,
        "add_sub",
        add_sub_config("add_sub").replace("max_batch_size: 64", "max_batch_size: 8"),
        ADD_SUB_MODEL,
    )
    scale_dir = write(repo, "scale", scale_config("scale") + "version_policy { all { } }", SCALE_MODEL)
    (scale_dir / "2").mkdir(exist_ok=True)
    v2 = textwrap.dedent(SCALE_MODEL).replace("self.factor = float(", "self.factor = 10.0  # (")
    (scale_dir / "2" / "model.py").write_text(v2)
    write(repo, "slow_left", scale_config("slow_left", factor=2, sleep=SLEEP), SCALE_MODEL)
    write(repo, "slow_right", scale_config("slow_right", factor=3, sleep=SLEEP), SCALE_MODEL)
    write(repo, "pipe", PIPE_CONFIG.format(name="pipe", scale="scale", scale_version=1))
    write(repo, "pipe_latest", PIPE_CONFIG.format(name="pipe_latest", scale="scale", scale_version=-1))
    write(repo, "diamond", DIAMOND_CONFIG, version_dir=False)
    write(repo, "loose", LOOSE_CONFIG)
    return repo
