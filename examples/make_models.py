#!/usr/bin/env python3
"""Build the example model repository's binary models, deterministically and offline.

    python examples/make_models.py            # writes into examples/models/
    python examples/make_models.py OUT_DIR    # writes a copy of the generated models elsewhere

Model files are git-ignored and made here instead of committed, so the repository carries no
opaque binaries; the config.pbtxt files are plain text and committed, and this script rewrites
them only when their text changed. Every model comes from fixed seeds and single-threaded
training, so running it twice leaves the same bytes (files whose bytes are unchanged are not
rewritten). Needs the ``test`` extra (onnx, scikit-learn, xgboost, lightgbm); takes ~2 s.

* ``simple_onnx``: a two-layer MLP, FP32 ``[16] -> [4]`` with a dynamic batch dimension, built
  with ``onnx.helper``. Its config gives only ``max_batch_size``/``dynamic_batching``: inputs and
  outputs are auto-completed from the graph (as Triton does without --strict-model-config).
* ``sklearn_iris``: a LogisticRegression on iris-shaped synthetic data (4 features, 3 classes),
  saved with joblib; ``method: predict_proba`` returns FP32 ``[3]`` per row.
* ``xgboost_model``: a binary XGBoost classifier (8 features) in XGBoost JSON, served by the
  ``fil`` backend with ``predict_proba`` (FP32 ``[2]`` per row).
* ``lightgbm_model``: a LightGBM regressor (8 features) in LightGBM's text format, ``fil``.

``identity_fp32`` and ``add_sub`` (Python backend) are hand-written and not touched here.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SEED = 20240601


def write_if_changed(path: Path, data: bytes) -> bool:
    """Write ``data`` unless the file already holds exactly it; True when written."""
    if path.exists() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return True


# -- configs --------------------------------------------------------------------------------------
CONFIGS: dict[str, str] = {
    "simple_onnx": """\
# Inputs and outputs are left out on purpose: the onnxruntime backend fills them in from the
# graph (input "x" FP32 [16], output "y" FP32 [4]); start with --strict-model-config to turn
# auto-complete off (then this config is rejected).
name: "simple_onnx"
backend: "onnxruntime"
max_batch_size: 64
dynamic_batching {}
instance_group [{ count: 1, kind: KIND_CPU }]
""",
    "sklearn_iris": """\
# Loading a joblib/pickle file runs code: serve only repositories you trust.
name: "sklearn_iris"
backend: "sklearn"
max_batch_size: 64
input [{ name: "input__0", data_type: TYPE_FP32, dims: [ 4 ] }]
output [{ name: "output__0", data_type: TYPE_FP32, dims: [ 3 ] }]
parameters { key: "method" value { string_value: "predict_proba" } }
dynamic_batching {}
instance_group [{ count: 1, kind: KIND_CPU }]
""",
    "xgboost_model": """\
name: "xgboost_model"
backend: "fil"
max_batch_size: 1024
default_model_filename: "model.json"
input [{ name: "input__0", data_type: TYPE_FP32, dims: [ 8 ] }]
output [{ name: "output__0", data_type: TYPE_FP32, dims: [ 2 ] }]
parameters [
  { key: "model_type" value { string_value: "xgboost_json" } },
  { key: "output_class" value { string_value: "true" } },
  { key: "predict_proba" value { string_value: "true" } }
]
dynamic_batching {}
instance_group [{ count: 1, kind: KIND_CPU }]
""",
    "lightgbm_model": """\
name: "lightgbm_model"
backend: "fil"
max_batch_size: 1024
input [{ name: "input__0", data_type: TYPE_FP32, dims: [ 8 ] }]
output [{ name: "output__0", data_type: TYPE_FP32, dims: [ 1 ] }]
parameters [
  { key: "model_type" value { string_value: "lightgbm" } },
  { key: "output_class" value { string_value: "false" } }
]
dynamic_batching {}
instance_group [{ count: 1, kind: KIND_CPU }]
""",
}


# -- models ---------------------------------------------------------------------------------------
def onnx_mlp_bytes(inputs: int = 16, hidden: int = 32, outputs: int = 4, seed: int = SEED) -> bytes:
    """x[N,16] -> Relu(x @ W1 + b1) @ W2 + b2 -> y[N,4]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = {
        "W1": rng.normal(0, 0.5, (inputs, hidden)).astype(np.float32),
        "b1": rng.normal(0, 0.1, (hidden,)).astype(np.float32),
        "W2": rng.normal(0, 0.5, (hidden, outputs)).astype(np.float32),
        "b2": rng.normal(0, 0.1, (outputs,)).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "W2"], ["y0"]),
        helper.make_node("Add", ["y0", "b2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "simple_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", inputs])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", outputs])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(
        graph, producer_name="elastiserve-examples", opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8  # readable by every onnxruntime >= 1.10
    onnx.checker.check_model(model)
    return model.SerializeToString()


def iris_like(seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """150 rows, 4 features, 3 well-separated classes (no data set download)."""
    rng = np.random.default_rng(seed)
    centers = np.array([[5.0, 3.4, 1.5, 0.2], [5.9, 2.8, 4.3, 1.3], [6.6, 3.0, 5.6, 2.0]])
    y = np.repeat(np.arange(3), 50)
    x = centers[y] + rng.normal(0, 0.3, (150, 4))
    return x.astype(np.float32), y


def sklearn_iris_bytes() -> bytes:
    import joblib
    from sklearn.linear_model import LogisticRegression

    x, y = iris_like()
    model = LogisticRegression(max_iter=500).fit(x, y)
    buffer = io.BytesIO()
    joblib.dump(model, buffer)
    return buffer.getvalue()


def tabular(
    seed: int = SEED, rows: int = 400, features: int = 8
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, a binary label and a continuous target."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features)).astype(np.float32)
    score = x[:, 0] - 0.5 * x[:, 1] + 0.25 * x[:, 2] * x[:, 3]
    return x, (score > 0).astype(np.float32), (score + rng.normal(0, 0.1, rows)).astype(np.float32)


def xgboost_json_bytes() -> bytes:
    import xgboost as xgb

    x, label, _ = tabular()
    params = {"objective": "binary:logistic", "max_depth": 3, "eta": 0.3, "nthread": 1, "seed": 0}
    booster = xgb.train(params, xgb.DMatrix(x, label=label), num_boost_round=20)
    return bytes(booster.save_raw(raw_format="json"))


def lightgbm_text_bytes() -> bytes:
    import lightgbm as lgb

    x, _, target = tabular()
    params = {
        "objective": "regression",
        "num_leaves": 15,
        "learning_rate": 0.1,
        "num_threads": 1,
        "deterministic": True,
        "seed": 0,
        "verbose": -1,
    }
    booster = lgb.train(params, lgb.Dataset(x, label=target), num_boost_round=20)
    return booster.model_to_string().encode()


MODELS = {
    "simple_onnx": ("model.onnx", onnx_mlp_bytes),
    "sklearn_iris": ("model.joblib", sklearn_iris_bytes),
    "xgboost_model": ("model.json", xgboost_json_bytes),
    "lightgbm_model": ("model.txt", lightgbm_text_bytes),
}


def main(argv: list[str]) -> int:
    out = Path(argv[1]).resolve() if len(argv) > 1 else HERE / "models"
    for name, (filename, build) in MODELS.items():
        wrote_config = write_if_changed(out / name / "config.pbtxt", CONFIGS[name].encode())
        wrote_model = write_if_changed(out / name / "1" / filename, build())
        state = "written" if (wrote_config or wrote_model) else "unchanged"
        print(f"{name}: {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
