"""Softmax over band log-energies; LABEL is the winning band's name from labels.txt."""

from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        labels_file = Path(args["model_repository"]) / "labels.txt"
        self.labels = np.array([line.encode() for line in labels_file.read_text().split()], dtype=np.object_)

    def execute(self, requests):
        responses = []
        for request in requests:
            features = pb_utils.get_input_tensor_by_name(request, "FEATURES").as_numpy()
            logits = features - features.max(axis=1, keepdims=True)
            scores = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
            label = self.labels[scores.argmax(axis=1)].reshape(-1, 1)
            responses.append(
                pb_utils.InferenceResponse(
                    [pb_utils.Tensor("SCORES", scores.astype(np.float32)), pb_utils.Tensor("LABEL", label)]
                )
            )
        return responses
