"""Decoupled Triton Python models for the streaming tests (engine and e2e), written unmodified the
way Triton's documentation shows them: ``get_response_sender()``, responses from threads,
``TRITONSERVER_RESPONSE_COMPLETE_FINAL``, ``is_cancelled()``."""

from __future__ import annotations

import textwrap
from pathlib import Path

# repeat: COUNT responses OUT=0..COUNT-1 from a thread the model starts (after execute returned),
# DELAY_MS between them, an error response at ERROR_AT. When the client goes away the thread sees
# is_cancelled(), writes cancelled-<request id> into the model directory and stops. Negative
# counts test the rules: -1 returns a list (decoupled execute must return None), -2 raises, -3
# sends FINAL twice (the second raises; the message is written to second-final-<id>), -4 makes
# the (worker) process exit.
REPEAT_MODEL = """
import os
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.dir = args["model_repository"]
        assert pb_utils.using_decoupled_model_transaction_policy(__import__("json").loads(args["model_config"]))

    def execute(self, requests):
        for request in requests:
            count = int(pb_utils.get_input_tensor_by_name(request, "COUNT").as_numpy().reshape(-1)[0])
            delay = pb_utils.get_input_tensor_by_name(request, "DELAY_MS")
            delay = int(delay.as_numpy().reshape(-1)[0]) / 1000 if delay is not None else 0.0
            error_at = pb_utils.get_input_tensor_by_name(request, "ERROR_AT")
            error_at = int(error_at.as_numpy().reshape(-1)[0]) if error_at is not None else -1
            sender = request.get_response_sender()
            if count == -1:
                return [pb_utils.InferenceResponse([])]
            if count == -2:
                raise ValueError("repeat was asked to fail")
            if count == -4:
                os._exit(3)  # only ever sent to worker-process instances
            if count == -3:
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                try:
                    sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                except pb_utils.TritonModelException as exc:
                    self._mark("second-final-" + request.request_id(), str(exc))
                continue
            threading.Thread(
                target=self.produce, args=(request, sender, count, delay, error_at), daemon=True
            ).start()
        return None

    def produce(self, request, sender, count, delay, error_at):
        for i in range(count):
            if delay:
                time.sleep(delay)
            if request.is_cancelled() or sender.is_cancelled():
                self._mark("cancelled-" + request.request_id(), str(i))
                break
            if i == error_at:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"failed at {i}")))
                continue
            out = pb_utils.Tensor("OUT", np.array([i], dtype=np.int32))
            pid = pb_utils.Tensor("PID", np.array([os.getpid()], dtype=np.int32))
            sender.send(pb_utils.InferenceResponse(output_tensors=[out, pid]))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _mark(self, name, text):
        # Written whole then renamed: a test that sees the file never reads it half-written.
        path = os.path.join(self.dir, name)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
"""

REPEAT_CONFIG = """
name: "{name}"
backend: "python"
max_batch_size: 0
model_transaction_policy {{ decoupled: true }}
input [
  {{ name: "COUNT" data_type: TYPE_INT32 dims: [ 1 ] }},
  {{ name: "DELAY_MS" data_type: TYPE_INT32 dims: [ 1 ] optional: true }},
  {{ name: "ERROR_AT" data_type: TYPE_INT32 dims: [ 1 ] optional: true }}
]
output [
  {{ name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] }},
  {{ name: "PID" data_type: TYPE_INT32 dims: [ 1 ] }}
]
instance_group [ {{ count: {count} kind: KIND_CPU }} ]
"""

# words: one response per word of text_input, sent from inside execute (an async def execute),
# with the request's parameters echoed back as JSON in PARAMS.
WORDS_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    async def execute(self, requests):
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0]
            sender = request.get_response_sender()
            for i, word in enumerate(text.decode().split()):
                sender.send(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("text_output", np.array([word.encode()], dtype=np.object_)),
                    pb_utils.Tensor("index", np.array([i], dtype=np.int32)),
                    pb_utils.Tensor("params", np.array([request.parameters().encode()], dtype=np.object_)),
                ]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
"""

WORDS_CONFIG = """
name: "words"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] } ]
output [
  { name: "text_output" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "index" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "params" data_type: TYPE_STRING dims: [ 1 ] }
]
"""

# upper: a plain (not decoupled) model, used over the stream and the generate endpoints.
UPPER_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy()
            scale = pb_utils.get_input_tensor_by_name(request, "scale")
            scale = scale.as_numpy() if scale is not None else np.ones(2, np.float32)
            upper = np.array([t.upper() for t in text.reshape(-1)], dtype=np.object_).reshape(text.shape)
            out.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("text_output", upper),
                pb_utils.Tensor("vec", (scale * 2).astype(np.float32)),
            ]))
        return out
"""

UPPER_CONFIG = """
name: "upper"
backend: "python"
max_batch_size: 0
input [
  { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "scale" data_type: TYPE_FP32 dims: [ 2 ] optional: true }
]
output [
  { name: "text_output" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "vec" data_type: TYPE_FP32 dims: [ 2 ] }
]
"""


def _write(repo: Path, name: str, model: str, config: str) -> None:
    (repo / name / "1").mkdir(parents=True, exist_ok=True)
    (repo / name / "1" / "model.py").write_text(textwrap.dedent(model))
    (repo / name / "config.pbtxt").write_text(config)


def write_decoupled_repo(repo: Path, repeat_instances: int = 1) -> Path:
    """``repeat`` (``repeat_instances`` instances: 2+ means worker processes), ``repeat_procs``
    (always 2 worker processes), ``words`` and ``upper``."""
    repo.mkdir(parents=True, exist_ok=True)
    _write(repo, "repeat", REPEAT_MODEL, REPEAT_CONFIG.format(name="repeat", count=repeat_instances))
    _write(repo, "repeat_procs", REPEAT_MODEL, REPEAT_CONFIG.format(name="repeat_procs", count=2))
    _write(repo, "words", WORDS_MODEL, WORDS_CONFIG)
    _write(repo, "upper", UPPER_MODEL, UPPER_CONFIG)
    return repo
