"""A decoupled model: one request (a whole signal), one response per 256-sample chunk.

Each chunk goes through the ``chunk_pipeline`` ensemble with BLS, and its answer is sent the
moment it is ready, so a client sees the first label long before the signal is finished; the
last response carries only the FINAL flag. A client that goes away stops the work.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

CHUNK = 256


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            self._stream(request)
        return None  # decoupled: every answer goes through the response sender

    def _stream(self, request):
        sender = request.get_response_sender()
        audio = pb_utils.get_input_tensor_by_name(request, "AUDIO").as_numpy().reshape(-1)
        count = len(audio) // CHUNK
        for index in range(count):
            if request.is_cancelled():
                break
            chunk = audio[index * CHUNK : (index + 1) * CHUNK].astype(np.float32).reshape(1, CHUNK)
            answer = pb_utils.InferenceRequest(
                model_name="chunk_pipeline",
                requested_output_names=["SCORES", "LABEL"],
                inputs=[pb_utils.Tensor("CHUNK", chunk)],
            ).exec()
            if answer.has_error():
                sender.send(pb_utils.InferenceResponse(error=answer.error()))
                continue
            scores = pb_utils.get_output_tensor_by_name(answer, "SCORES").as_numpy()
            label = pb_utils.get_output_tensor_by_name(answer, "LABEL").as_numpy().reshape(1)
            outputs = [
                pb_utils.Tensor("INDEX", np.array([index], dtype=np.int32)),
                pb_utils.Tensor("LABEL", label.astype(np.object_)),
                pb_utils.Tensor("SCORE", np.array([scores.max()], dtype=np.float32)),
            ]
            sender.send(pb_utils.InferenceResponse(output_tensors=outputs))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
