"""The onnxruntime backend against ONNX Runtime called directly, plus Triton-style auto-complete."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from tritonclient.grpc import model_config_pb2 as mc

from elastiserve.engine.backends import _common, get_backend
from elastiserve.engine.backends.onnxruntime import OnnxRuntimeInstance
from elastiserve.errors import ConfigError
from elastiserve.types import InferResponse

from .backend_helpers import context, execute_ok, output, parse_config, request

BACKEND = get_backend("onnxruntime")
RNG = np.random.default_rng(7)


def save(model_dir: Path, graph: onnx.GraphProto, version: int = 1) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = model_dir / str(version) / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def mlp_graph(batch: str | int = "batch", extra_output: bool = False) -> onnx.GraphProto:
    """x[batch,16] -> y[batch,4] (and z = x * 2 when ``extra_output``)."""
    w = numpy_helper.from_array(RNG.normal(size=(16, 4)).astype(np.float32), "W")
    b = numpy_helper.from_array(RNG.normal(size=(4,)).astype(np.float32), "B")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])]
    inits = [w, b]
    if extra_output:
        inits.append(numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two"))
        nodes.append(helper.make_node("Mul", ["x", "two"], ["z"]))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [batch, 16]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 16])]
    return helper.make_graph(nodes, "mlp", inputs, outputs, inits)


@pytest.fixture
def mlp_dir(tmp_path: Path) -> Path:
    model_dir = tmp_path / "mlp"
    save(model_dir, mlp_graph(extra_output=True))
    return model_dir


def direct(path: Path, outputs: list[str], **feed: np.ndarray) -> list[np.ndarray]:
    """ONNX Runtime called directly: the reference for every comparison."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(outputs, feed)


FULL = """
name: "mlp"
backend: "onnxruntime"
max_batch_size: 8
input [{ name: "x", data_type: TYPE_FP32, dims: [16] }]
output [{ name: "y", data_type: TYPE_FP32, dims: [4] }]
"""


def test_batched_requests_match_onnxruntime(mlp_dir: Path) -> None:
    config = parse_config(FULL)
    instance = BACKEND.create_instance(context(mlp_dir, config))
    xs = [RNG.normal(size=(n, 16)).astype(np.float32) for n in (1, 3, 2)]
    responses = execute_ok(instance, *(request("mlp", f"r{i}", x=x) for i, x in enumerate(xs)))
    (want,) = direct(mlp_dir / "1" / "model.onnx", ["y"], x=np.concatenate(xs))
    got = np.concatenate([output(r, "y") for r in responses])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert [r.id for r in responses] == ["r0", "r1", "r2"]
    assert [list(output(r, "y").shape) for r in responses] == [[1, 4], [3, 4], [2, 4]]
    # Only the configured output comes back, although the graph has two.
    assert [t.name for t in responses[0].outputs] == ["y"]


def test_unbatched_config(mlp_dir: Path) -> None:
    config = parse_config(
        FULL.replace("max_batch_size: 8", "max_batch_size: 0")
        .replace("dims: [16]", "dims: [-1, 16]")
        .replace("dims: [4]", "dims: [-1, 4]")
    )
    instance = BACKEND.create_instance(context(mlp_dir, config))
    x = RNG.normal(size=(5, 16)).astype(np.float32)
    (response,) = execute_ok(instance, request("mlp", x=x))
    (want,) = direct(mlp_dir / "1" / "model.onnx", ["y"], x=x)
    np.testing.assert_allclose(output(response, "y"), want, rtol=1e-5, atol=1e-6)


def test_all_graph_outputs_when_config_lists_none(mlp_dir: Path) -> None:
    config = parse_config(
        'name: "mlp" max_batch_size: 4 input [{ name: "x", data_type: TYPE_FP32, dims: [16] }]'
    )
    instance = BACKEND.create_instance(context(mlp_dir, config))
    x = RNG.normal(size=(2, 16)).astype(np.float32)
    (response,) = execute_ok(instance, request("mlp", x=x))
    want_y, want_z = direct(mlp_dir / "1" / "model.onnx", ["y", "z"], x=x)
    np.testing.assert_allclose(output(response, "y"), want_y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(output(response, "z"), want_z)


def test_inputs_cast_only_when_needed(mlp_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    instance = BACKEND.create_instance(context(mlp_dir, parse_config(FULL)))
    assert isinstance(instance, OnnxRuntimeInstance)
    fed: list[np.ndarray] = []
    real_run = instance.session.run

    def spy(names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        fed.append(feed["x"])
        return real_run(names, feed)

    monkeypatch.setattr(instance.session, "run", spy)
    x32 = RNG.normal(size=(2, 16)).astype(np.float32)
    execute_ok(instance, request("mlp", x=x32))
    assert fed[-1] is x32  # already the model's type: passed through untouched
    (response,) = execute_ok(instance, request("mlp", x=x32.astype(np.float64)))
    assert fed[-1].dtype == np.float32
    (want,) = direct(mlp_dir / "1" / "model.onnx", ["y"], x=x32)
    np.testing.assert_allclose(output(response, "y"), want, rtol=1e-5, atol=1e-6)


# -- auto-complete ------------------------------------------------------------------------------
def test_autocomplete_missing_config(mlp_dir: Path) -> None:
    config = mc.ModelConfig()
    BACKEND.auto_complete_config(config, mlp_dir, 1)
    assert config.name == "mlp"
    assert config.backend == "onnxruntime" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 4  # Triton's default-max-batch-size
    assert config.HasField("dynamic_batching")
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [("x", mc.TYPE_FP32, [16])]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
        ("y", mc.TYPE_FP32, [4]),
        ("z", mc.TYPE_FP32, [16]),
    ]
    instance = BACKEND.create_instance(context(mlp_dir, config))
    x = RNG.normal(size=(4, 16)).astype(np.float32)
    (response,) = execute_ok(instance, request("mlp", x=x))
    want_y, _ = direct(mlp_dir / "1" / "model.onnx", ["y", "z"], x=x)
    np.testing.assert_allclose(output(response, "y"), want_y, rtol=1e-5, atol=1e-6)


def test_autocomplete_latest_version_when_none_given(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    save(model_dir, mlp_graph(), version=1)
    save(model_dir, mlp_graph(extra_output=True), version=3)
    config = mc.ModelConfig()
    BACKEND.auto_complete_config(config, model_dir, None)
    assert [t.name for t in config.output] == ["y", "z"]


def test_autocomplete_partial_config_keeps_user_values(mlp_dir: Path) -> None:
    config = parse_config(
        """
        name: "mlp"
        max_batch_size: 16
        dynamic_batching { max_queue_delay_microseconds: 100 }
        input [{ name: "x" }]
        output [{ name: "z", data_type: TYPE_FP32, dims: [16] }]
        """
    )
    BACKEND.auto_complete_config(config, mlp_dir, 1)
    assert config.max_batch_size == 16
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [("x", mc.TYPE_FP32, [16])]
    assert [t.name for t in config.output] == ["z"]  # a subset of outputs is kept as written
    instance = BACKEND.create_instance(context(mlp_dir, config))
    x = RNG.normal(size=(3, 16)).astype(np.float32)
    (response,) = execute_ok(instance, request("mlp", x=x))
    assert [t.name for t in response.outputs] == ["z"]
    np.testing.assert_allclose(output(response, "z"), direct(mlp_dir / "1" / "model.onnx", ["z"], x=x)[0])


def test_autocomplete_fills_outputs_only(mlp_dir: Path) -> None:
    config = parse_config('input [{ name: "x", data_type: TYPE_FP32, dims: [16] }] max_batch_size: 2')
    BACKEND.auto_complete_config(config, mlp_dir, 1)
    assert config.max_batch_size == 2
    assert [t.name for t in config.output] == ["y", "z"]


@pytest.mark.parametrize(
    ("config_text", "needle"),
    [
        ('input [{ name: "x", data_type: TYPE_INT32 }]', "TYPE_INT32"),
        ('input [{ name: "x", data_type: TYPE_FP32, dims: [15] }]', "tensor 'x'"),
        ('input [{ name: "wrong", data_type: TYPE_FP32, dims: [16] }]', "'wrong'"),
        ('output [{ name: "y", data_type: TYPE_FP64, dims: [4] }]', "output 'y'"),
        ('output [{ name: "nope", data_type: TYPE_FP32, dims: [4] }]', "'nope'"),
    ],
)
def test_autocomplete_mismatch_names_model_and_tensor(mlp_dir: Path, config_text: str, needle: str) -> None:
    config = parse_config('name: "mlp" ' + config_text)
    with pytest.raises(ConfigError) as err:
        BACKEND.auto_complete_config(config, mlp_dir, 1)
    assert "'mlp'" in str(err.value) and needle in str(err.value)


def test_full_config_mismatch_fails_at_load(mlp_dir: Path) -> None:
    config = parse_config(FULL.replace("dims: [4]", "dims: [5]"))
    BACKEND.auto_complete_config(config, mlp_dir, 1)  # full config: left alone, as Triton does
    with pytest.raises(ConfigError, match=r"model 'mlp', tensor 'y'"):
        BACKEND.create_instance(context(mlp_dir, config))


def test_fixed_batch_dim_cannot_batch(tmp_path: Path) -> None:
    model_dir = tmp_path / "fixed"
    save(model_dir, mlp_graph(batch=2))
    config = mc.ModelConfig()
    BACKEND.auto_complete_config(config, model_dir, 1)
    assert config.max_batch_size == 0
    assert [list(t.dims) for t in config.input] == [[2, 16]]
    with pytest.raises(ConfigError, match="does not support batching"):
        BACKEND.auto_complete_config(parse_config("max_batch_size: 8"), model_dir, 1)


def test_scalar_per_item_output_gets_reshape(tmp_path: Path) -> None:
    model_dir = tmp_path / "sum"
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, axes=[1])],
        "sum",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, ["n"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    model.ir_version = 8
    (model_dir / "1").mkdir(parents=True)
    onnx.save(model, str(model_dir / "1" / "model.onnx"))
    config = mc.ModelConfig()
    BACKEND.auto_complete_config(config, model_dir, 1)
    (out,) = config.output
    assert list(out.dims) == [1] and out.HasField("reshape") and list(out.reshape.shape) == []
    instance = BACKEND.create_instance(context(model_dir, config))
    x = RNG.normal(size=(3, 3)).astype(np.float32)
    (response,) = execute_ok(instance, request("sum", x=x))
    np.testing.assert_allclose(output(response, "s"), x.sum(axis=1, keepdims=True), rtol=1e-5)


def test_string_tensors_round_trip(tmp_path: Path) -> None:
    model_dir = tmp_path / "strings"
    save(
        model_dir,
        helper.make_graph(
            [helper.make_node("Identity", ["s"], ["o"])],
            "strings",
            [helper.make_tensor_value_info("s", TensorProto.STRING, ["n", 1])],
            [helper.make_tensor_value_info("o", TensorProto.STRING, ["n", 1])],
        ),
    )
    config = mc.ModelConfig()
    BACKEND.auto_complete_config(config, model_dir, 1)
    assert config.input[0].data_type == mc.TYPE_STRING
    instance = BACKEND.create_instance(context(model_dir, config))
    data = np.array([[b"hello"], ["w\u00f6rld".encode()]], dtype=object)
    (response,) = execute_ok(instance, request("strings", s=data))
    result = output(response, "o")
    assert response.outputs[0].datatype == "BYTES"
    assert result.tolist() == data.tolist()


def test_session_threads_from_config_and_default(mlp_dir: Path) -> None:
    text = FULL + 'parameters { key: "intra_op_thread_count" value { string_value: "3" } }'
    instance = BACKEND.create_instance(context(mlp_dir, parse_config(text)))
    assert isinstance(instance, OnnxRuntimeInstance)
    assert instance.session.get_session_options().intra_op_num_threads == 3
    default = BACKEND.create_instance(context(mlp_dir, parse_config(FULL)))
    assert isinstance(default, OnnxRuntimeInstance)
    expected = _common.default_threads(parse_config(FULL))
    assert default.session.get_session_options().intra_op_num_threads == expected
    assert 1 <= expected <= 4


def test_bad_execution_mode_is_config_error(mlp_dir: Path) -> None:
    text = FULL + 'parameters { key: "execution_mode" value { string_value: "7" } }'
    with pytest.raises(ConfigError, match="execution_mode"):
        BACKEND.create_instance(context(mlp_dir, parse_config(text)))


def test_bad_and_missing_model_files(tmp_path: Path) -> None:
    model_dir = tmp_path / "broken"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "model.onnx").write_bytes(b"this is not an onnx file")
    with pytest.raises(ConfigError, match=r"model 'broken': cannot load ONNX model"):
        BACKEND.auto_complete_config(mc.ModelConfig(), model_dir, 1)
    with pytest.raises(ConfigError, match="cannot load ONNX model"):
        BACKEND.create_instance(context(model_dir, parse_config(FULL.replace('"mlp"', '"broken"'))))
    empty = tmp_path / "empty"
    (empty / "1").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"model 'empty'.*not found"):
        BACKEND.auto_complete_config(mc.ModelConfig(), empty, 1)


def test_wrong_request_shape_is_a_per_request_error(mlp_dir: Path) -> None:
    instance = BACKEND.create_instance(context(mlp_dir, parse_config(FULL)))
    good = request("mlp", x=RNG.normal(size=(1, 16)).astype(np.float32))
    bad = request("mlp", x=RNG.normal(size=(1, 7)).astype(np.float32))
    results = instance.execute([good, bad])
    # One batch: a framework failure is reported for every request of that batch, not raised.
    assert all(not isinstance(r, InferResponse) for r in results)
    assert "mlp" in str(results[0])
    (alone,) = instance.execute([good])
    assert isinstance(alone, InferResponse)


def test_skl2onnx_zipmap_output_is_left_out(tmp_path: Path) -> None:
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    x = RNG.normal(size=(60, 3)).astype(np.float32)
    clf = LogisticRegression().fit(x, (x[:, 0] > 0).astype(np.int64))
    model_dir = tmp_path / "clf"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "model.onnx").write_bytes(to_onnx(clf, x[:1]).SerializeToString())
    config = mc.ModelConfig()
    BACKEND.auto_complete_config(config, model_dir, 1)
    assert [t.name for t in config.output] == ["output_label"]  # the ZipMap'd probabilities are not
    instance = BACKEND.create_instance(context(model_dir, config))
    (response,) = execute_ok(instance, request("clf", X=x[:5]))
    np.testing.assert_array_equal(output(response, "output_label")[:, 0], clf.predict(x[:5]))
    config.output.add(name="output_probability", data_type=mc.TYPE_FP32, dims=[2])
    with pytest.raises(ConfigError, match=r"output 'output_probability'.*zipmap=False"):
        BACKEND.create_instance(context(model_dir, config))
