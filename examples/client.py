#!/usr/bin/env python3
"""Send one request to each example model with NVIDIA's tritonclient (HTTP and gRPC) and print it.

  python examples/client.py [--http 127.0.0.1:8000] [--grpc 127.0.0.1:8001]
"""

from __future__ import annotations

import argparse

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--http", default="127.0.0.1:8000")
    parser.add_argument("--grpc", default="127.0.0.1:8001")
    parser.add_argument("--http-only", action="store_true", help="skip the gRPC request")
    args = parser.parse_args()

    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    b = np.ones((1, 16), dtype=np.float32)

    http = httpclient.InferenceServerClient(args.http)
    inputs = [httpclient.InferInput("INPUT0", [1, 16], "FP32"), httpclient.InferInput("INPUT1", [1, 16], "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = http.infer("add_sub", inputs)
    print("HTTP add_sub OUTPUT0 (a+b):", result.as_numpy("OUTPUT0")[0, :6], "...")

    if not args.http_only:
        grpc = grpcclient.InferenceServerClient(args.grpc)
        inputs = [grpcclient.InferInput("INPUT0", [1, 16], "FP32"), grpcclient.InferInput("INPUT1", [1, 16], "FP32")]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(b)
        result = grpc.infer("add_sub", inputs)
        print("gRPC add_sub OUTPUT1 (a-b):", result.as_numpy("OUTPUT1")[0, :6], "...")

    for name in ("simple_onnx", "sklearn_iris", "xgboost_model", "lightgbm_model"):
        meta = http.get_model_metadata(name)
        spec = meta["inputs"][0]
        shape = [1 if d == -1 else d for d in spec["shape"]]
        tensor = httpclient.InferInput(spec["name"], shape, spec["datatype"])
        tensor.set_data_from_numpy(np.full(shape, 0.5, dtype=np.float32))
        output = meta["outputs"][0]["name"]
        print(f"HTTP {name}: {output} =", http.infer(name, [tensor]).as_numpy(output).reshape(-1)[:4])


if __name__ == "__main__":
    main()
