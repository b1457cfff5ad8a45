"""add_sub for the Triton Python backend: the sum and the difference of two FP32 [16] inputs."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Reads its output types from the model config, as Triton's own add_sub example does."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.dtypes = {
            name: pb_utils.triton_string_to_numpy(pb_utils.get_output_config_by_name(config, name)["data_type"])
            for name in ("OUTPUT0", "OUTPUT1")
        }

    def execute(self, requests):
        responses = []
        for request in requests:
            a = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            b = pb_utils.get_input_tensor_by_name(request, "INPUT1").as_numpy()
            total = pb_utils.Tensor("OUTPUT0", np.add(a, b).astype(self.dtypes["OUTPUT0"]))
            diff = pb_utils.Tensor("OUTPUT1", np.subtract(a, b).astype(self.dtypes["OUTPUT1"]))
            responses.append(pb_utils.InferenceResponse(output_tensors=[total, diff]))
        return responses

    def finalize(self):
        pass
