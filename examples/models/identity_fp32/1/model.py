"""Identity for the Triton Python backend: returns INPUT0 unchanged as OUTPUT0 (FP32 [16])."""

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Written against Triton's Python-backend API, so it runs unchanged on Triton too."""

    def initialize(self, args):
        pass

    def execute(self, requests):
        return [
            pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor("OUTPUT0", pb_utils.get_input_tensor_by_name(req, "INPUT0").as_numpy())
                ]
            )
            for req in requests
        ]

    def finalize(self):
        pass
