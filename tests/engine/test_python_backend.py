"""The python backend in its default (in-process) mode, its config handling, and pb_utils."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc.model_config_pb2 import ModelConfig

from elastiserve.engine.backends import get_backend
from elastiserve.engine.backends.python import (
    BACKEND,
    InProcessInstance,
    custom_metrics_text,
    execution_mode,
    model_config_dict,
)
from elastiserve.errors import ConfigError, Internal, InvalidArgument, NotFound
from elastiserve.types import InferResponse, RequestedOutput

from .python_backend_support import (
    ADD_SUB_MODEL,
    add_sub_config,
    add_sub_request,
    make_context,
    request,
    write_model,
)

import triton_python_backend_utils as pb_utils  # isort: skip  (registered by the backend import)


def test_backend_is_registered_under_its_triton_name() -> None:
    backend = get_backend("python")
    assert backend is BACKEND
    assert backend.name == "python"
    assert backend.parallelism == "thread"


def test_add_sub_runs_unmodified(tmp_path: Path) -> None:
    model_dir, config = write_model(tmp_path, "add_sub", ADD_SUB_MODEL)
    instance = BACKEND.create_instance(make_context(model_dir, config))
    try:
        assert isinstance(instance, InProcessInstance)
        assert not instance.out_of_process and not instance.requires_thread  # may run inline
        results = instance.execute(
            [add_sub_request("add_sub", 3, 1, "a"), add_sub_request("add_sub", 5, 2, "b")]
        )
        assert [type(r) for r in results] == [InferResponse, InferResponse]
        first, second = results
        assert isinstance(first, InferResponse) and isinstance(second, InferResponse)
        assert (first.id, first.model_name, first.model_version) == ("a", "add_sub", "1")
        out0 = first.output("OUTPUT0")
        assert out0 is not None and out0.datatype == "FP32" and out0.shape == [1, 16]
        np.testing.assert_array_equal(out0.data, np.full((1, 16), 4, np.float32))
        np.testing.assert_array_equal(second.output("OUTPUT1").data, np.full((1, 16), 3, np.float32))  # type: ignore[union-attr]
    finally:
        instance.close()


BYTES_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy()
            assert text.dtype == np.object_ and all(isinstance(v, bytes) for v in text.flat)
            upper = np.array([v.upper() for v in text.flat], dtype=np.object_).reshape(text.shape)
            as_str = np.array([v.decode() + "!" for v in text.flat]).reshape(text.shape)  # dtype <U
            mixed = np.array(["é", 1, b"raw"], dtype=np.object_)  # Triton encodes str(x) as UTF-8
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("UPPER", upper), pb_utils.Tensor("BANG", as_str), pb_utils.Tensor("MIXED", mixed)
            ]))
        return responses
"""

BYTES_CONFIG = """
name: "strings" backend: "python" max_batch_size: 0
input [ { name: "TEXT" data_type: TYPE_STRING dims: [ -1 ] } ]
output [ { name: "UPPER" data_type: TYPE_STRING dims: [ -1 ] }, { name: "BANG" data_type: TYPE_STRING dims: [ -1 ] } ]
"""


def test_bytes_tensors_are_object_arrays_of_bytes(tmp_path: Path) -> None:
    model_dir, config = write_model(tmp_path, "strings", BYTES_MODEL, BYTES_CONFIG)
    instance = BACKEND.create_instance(make_context(model_dir, config))
    try:
        text = np.array([b"hello", b"w\x00rld"], dtype=np.object_)
        (result,) = instance.execute([request("strings", TEXT=text)])
        assert isinstance(result, InferResponse)
        upper, bang = result.output("UPPER"), result.output("BANG")
        assert upper is not None and bang is not None
        assert upper.datatype == bang.datatype == "BYTES"
        assert list(upper.data) == [b"HELLO", b"W\x00RLD"]  # type: ignore[arg-type]
        assert list(bang.data) == [b"hello!", b"w\x00rld!"]  # type: ignore[arg-type]
        assert bang.data.dtype == np.object_  # type: ignore[union-attr]
        assert list(result.output("MIXED").data) == ["é".encode(), b"1", b"raw"]  # type: ignore[union-attr]
    finally:
        instance.close()


ERRORS_MODEL = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        first = pb_utils.get_input_tensor_by_name(requests[0], "INPUT0").as_numpy()
        mode = int(first.flat[0])
        if mode == 100:
            raise ValueError("boom from execute")
        if mode == 200:
            return [pb_utils.InferenceResponse([])]  # wrong count when 2 requests
        if mode == 300:
            requests[0].get_response_sender()
        if mode == 400:
            raise SystemExit(2)  # must fail the call, not end the engine
        responses = []
        for request in requests:
            value = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            if value.flat[0] < 0:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError("negative input", pb_utils.TritonError.INVALID_ARG)))
            elif value.flat[0] == 7:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError("no seven")))
            elif value.flat[0] == 8:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError("gone", pb_utils.TritonError.NOT_FOUND)))
            else:
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", value)]))
        return responses
"""


@pytest.fixture
def errors_instance(tmp_path: Path):  # type: ignore[no-untyped-def]
    model_dir, config = write_model(tmp_path, "errors", ERRORS_MODEL, add_sub_config("errors"))
    instance = BACKEND.create_instance(make_context(model_dir, config))
    yield instance
    instance.close()


def test_error_response_fails_only_that_request(errors_instance) -> None:  # type: ignore[no-untyped-def]
    results = errors_instance.execute(
        [
            add_sub_request("errors", 1, 0, "ok"),
            add_sub_request("errors", -1, 0, "neg"),
            add_sub_request("errors", 7, 0, "seven"),
            add_sub_request("errors", 8, 0, "eight"),
        ]
    )
    ok, neg, seven, eight = results
    assert isinstance(ok, InferResponse) and ok.id == "ok"
    assert isinstance(neg, InvalidArgument) and neg.message == "negative input"
    assert isinstance(seven, Internal) and seven.message == "no seven"  # Triton's default code
    assert isinstance(eight, NotFound) and eight.http_status == 404


def test_exception_in_execute_fails_every_request_of_the_call(errors_instance) -> None:  # type: ignore[no-untyped-def]
    results = errors_instance.execute([add_sub_request("errors", 100, 0), add_sub_request("errors", 1, 0)])
    assert all(isinstance(r, Internal) for r in results)
    message = str(results[0])
    assert "errors_0_0" in message and "ValueError: boom from execute" in message
    assert "model.py:" in message and "in execute" in message


def test_sys_exit_in_execute_only_fails_the_call(errors_instance) -> None:  # type: ignore[no-untyped-def]
    (result,) = errors_instance.execute([add_sub_request("errors", 400, 0)])
    assert isinstance(result, Internal) and "SystemExit: 2" in str(result)
    assert isinstance(errors_instance.execute([add_sub_request("errors", 1, 0)])[0], InferResponse)


def test_wrong_number_of_responses_is_a_clear_error(errors_instance) -> None:  # type: ignore[no-untyped-def]
    results = errors_instance.execute([add_sub_request("errors", 200, 0), add_sub_request("errors", 1, 0)])
    assert all(isinstance(r, Internal) for r in results)
    assert "InferenceRequest(s) size is:2, and InferenceResponse(s) size is:1" in str(results[0])


def test_response_sender_needs_a_decoupled_model(errors_instance) -> None:  # type: ignore[no-untyped-def]
    (result,) = errors_instance.execute([add_sub_request("errors", 300, 0)])
    assert isinstance(result, Internal) and "only available to decoupled models" in str(result)


def test_decoupled_model_loads(tmp_path: Path) -> None:
    extra = "model_transaction_policy { decoupled: true }"
    model_dir, config = write_model(tmp_path, "dec", ADD_SUB_MODEL, add_sub_config("dec", extra=extra))
    instance = BACKEND.create_instance(make_context(model_dir, config))
    try:
        assert hasattr(instance, "execute_decoupled")  # tests/engine/test_decoupled.py runs them
    finally:
        instance.close()


ARGS_MODEL = """
import json
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.args = args
        config = json.loads(args["model_config"])
        self.out_dtype = pb_utils.triton_string_to_numpy(
            pb_utils.get_output_config_by_name(config, "OUTPUT0")["data_type"])

    def execute(self, requests):
        responses = []
        for request in requests:
            seen = {
                "args": self.args,
                "parameters": request.parameters(),
                "request_id": request.request_id(),
                "correlation_id": request.correlation_id(),
                "flags": request.flags(),
                "outputs": request.requested_output_names(),
                "cancelled": request.is_cancelled(),
                "out_dtype": np.dtype(self.out_dtype).name,
            }
            blob = np.array([json.dumps(seen).encode()], dtype=np.object_)
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor("OUTPUT0", blob)], parameters={"answered_by": "args"}))
        return responses
"""


def _seen(result: object) -> dict:  # type: ignore[type-arg]
    assert isinstance(result, InferResponse), result
    out = result.output("OUTPUT0")
    assert out is not None and out.data is not None
    return json.loads(out.data[0])


def test_initialize_args_and_request_accessors(tmp_path: Path) -> None:
    model_dir, config = write_model(tmp_path, "args", ARGS_MODEL, add_sub_config("args"))
    instance = BACKEND.create_instance(make_context(model_dir, config, index=0))
    try:
        req = add_sub_request("args", 1, 2, "req-42")
        req.parameters = {"custom": "x", "n": 3, "sequence_id": 77, "sequence_start": True, "priority": 1}
        (result,) = instance.execute([req])
        seen = _seen(result)
        args = seen["args"]
        assert set(args) == {
            "model_config",
            "model_instance_kind",
            "model_instance_name",
            "model_instance_device_id",
            "model_repository",
            "model_version",
            "model_name",
        }
        assert all(isinstance(v, str) for v in args.values())
        assert args["model_instance_kind"] == "CPU"
        assert args["model_instance_name"] == "args_0_0"
        assert args["model_instance_device_id"] == "0"
        assert args["model_repository"] == str(model_dir)
        assert args["model_version"] == "1"
        assert args["model_name"] == "args"
        model_config = json.loads(args["model_config"])
        assert model_config["max_batch_size"] == 64
        assert model_config["input"][0]["dims"] == [16]  # numbers, as Triton serialises them
        assert model_config["input"][0]["data_type"] == "TYPE_FP32"
        assert seen["out_dtype"] == "float32"
        assert json.loads(seen["parameters"]) == {"custom": "x", "n": 3}  # reserved keys consumed
        assert seen["request_id"] == "req-42"
        assert seen["correlation_id"] == 77
        assert seen["flags"] == pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START
        assert seen["outputs"] == ["OUTPUT0", "OUTPUT1"]  # none requested: all of them
        assert seen["cancelled"] is False
        assert result.parameters == {"answered_by": "args"}  # type: ignore[union-attr]

        req = add_sub_request("args", 1, 2)
        req.outputs = [RequestedOutput("OUTPUT1")]
        (result,) = instance.execute([req])
        assert _seen(result)["outputs"] == ["OUTPUT1"]
        assert json.loads(_seen(result)["parameters"]) == {}
    finally:
        instance.close()


FINALIZE_MODEL = """
import os
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.marker = os.path.join(args["model_repository"], "finalized-" + args["model_instance_name"])

    def execute(self, requests):
        return [pb_utils.InferenceResponse([]) for _ in requests]

    def finalize(self):
        with open(self.marker, "w") as f:
            f.write(str(os.getpid()))
"""


def test_finalize_is_called_on_close(tmp_path: Path) -> None:
    model_dir, config = write_model(tmp_path, "fin", FINALIZE_MODEL, add_sub_config("fin"))
    instance = BACKEND.create_instance(make_context(model_dir, config))
    marker = model_dir / "finalized-fin_0_0"
    assert not marker.exists()
    instance.close()
    assert marker.read_text() == str(__import__("os").getpid())
    instance.close()  # idempotent
    (result,) = instance.execute([add_sub_request("fin", 0, 0)])
    assert "unloaded" in str(result)


def test_initialize_failure_is_a_load_error(tmp_path: Path) -> None:
    source = """
    class TritonPythonModel:
        def initialize(self, args):
            raise RuntimeError("no weights here")
    """
    model_dir, config = write_model(tmp_path, "badinit", source, add_sub_config("badinit"))
    with pytest.raises(Internal, match=r"badinit_0_0.*RuntimeError: no weights here"):
        BACKEND.create_instance(make_context(model_dir, config))


def test_import_errors_and_missing_files_are_clear(tmp_path: Path) -> None:
    model_dir, config = write_model(
        tmp_path, "broken", "import not_a_real_module_xyz\n", add_sub_config("broken")
    )
    with pytest.raises(Internal, match=r"ModuleNotFoundError.*not_a_real_module_xyz"):
        BACKEND.create_instance(make_context(model_dir, config))
    model_dir, config = write_model(tmp_path, "noclass", "X = 1\n", add_sub_config("noclass"))
    with pytest.raises(Internal, match="defines no TritonPythonModel"):
        BACKEND.create_instance(make_context(model_dir, config))
    (model_dir / "1" / "model.py").unlink()
    with pytest.raises(ConfigError, match=r"model\.py does not exist"):
        BACKEND.create_instance(make_context(model_dir, config))


def test_model_can_import_sibling_modules_and_default_model_filename(tmp_path: Path) -> None:
    source = """
    import helper_mod_for_test
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests):
            return [pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", helper_mod_for_test.VALUE)])
                    for _ in requests]
    """
    model_dir, _ = write_model(tmp_path, "sib", "")
    (model_dir / "1" / "custom.py").write_text(source.replace("\n    ", "\n"))
    (model_dir / "1" / "helper_mod_for_test.py").write_text("import numpy as np\nVALUE = np.arange(3)\n")
    config = text_format.Parse(
        add_sub_config("sib", extra='default_model_filename: "custom.py"'), ModelConfig()
    )
    instance = BACKEND.create_instance(make_context(model_dir, config))
    try:
        (result,) = instance.execute([add_sub_request("sib", 0, 0)])
        assert list(result.output("OUTPUT0").data) == [0, 1, 2]  # type: ignore[union-attr]
    finally:
        instance.close()


ASYNC_MODEL = """
import asyncio
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    async def execute(self, requests):
        await asyncio.sleep(0)
        return [pb_utils.InferenceResponse([pb_utils.get_input_tensor_by_name(r, "INPUT0")]) for r in requests]
"""


def test_async_execute(tmp_path: Path) -> None:
    model_dir, config = write_model(tmp_path, "aio", ASYNC_MODEL, add_sub_config("aio"))
    instance = BACKEND.create_instance(make_context(model_dir, config))
    try:
        assert instance.requires_thread  # type: ignore[attr-defined]  # runs its own event loop
        (result,) = instance.execute([add_sub_request("aio", 2, 0)])
        assert result.output("INPUT0").data[0, 0] == 2  # type: ignore[union-attr]
    finally:
        instance.close()


# -- config -------------------------------------------------------------------------------------

AUTO_COMPLETE_MODEL = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        config = auto_complete_model_config.as_dict()
        assert config["name"] == "auto"
        auto_complete_model_config.add_input({"name": "IN", "data_type": "TYPE_FP32", "dims": [4]})
        auto_complete_model_config.add_output({"name": "OUT", "data_type": "TYPE_INT64", "dims": [-1, 2]})
        auto_complete_model_config.set_max_batch_size(8)
        auto_complete_model_config.set_dynamic_batching()
        auto_complete_model_config.set_model_transaction_policy({"decoupled": False})
        return auto_complete_model_config

    def execute(self, requests):
        return []
"""


def test_auto_complete_config_edits_the_proto_in_place(tmp_path: Path) -> None:
    model_dir, _ = write_model(tmp_path, "auto", AUTO_COMPLETE_MODEL, 'name: "auto"\nbackend: "python"\n')
    config = text_format.Parse('name: "auto"\nbackend: "python"\n', ModelConfig())
    BACKEND.auto_complete_config(config, model_dir, None)
    assert config.max_batch_size == 8
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("IN", 11, [4])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("OUT", [-1, 2])]
    assert config.HasField("dynamic_batching")
    assert config.backend == "python" and config.name == "auto"

    # An existing, matching input is accepted; a conflicting one is a config error.
    config = text_format.Parse(
        'name: "auto" backend: "python" input [{ name: "IN" data_type: TYPE_FP32 dims: [4] }]', ModelConfig()
    )
    BACKEND.auto_complete_config(config, model_dir, 1)
    assert len(config.input) == 1
    config = text_format.Parse(
        'name: "auto" backend: "python" input [{ name: "IN" data_type: TYPE_INT8 dims: [4] }]', ModelConfig()
    )
    with pytest.raises(ConfigError, match="configuration expects datatype TYPE_INT8 for input 'IN'"):
        BACKEND.auto_complete_config(config, model_dir, 1)
    config = text_format.Parse('name: "auto" backend: "python" max_batch_size: 32', ModelConfig())
    with pytest.raises(ConfigError, match="max_batch_size 32"):
        BACKEND.auto_complete_config(config, model_dir, 1)


def test_auto_complete_does_not_import_models_without_the_hook(tmp_path: Path) -> None:
    model_dir, config = write_model(tmp_path, "plain", "raise SystemExit('must not be imported')\n")
    before = config.SerializeToString()
    BACKEND.auto_complete_config(config, model_dir, 1)
    BACKEND.auto_complete_config(config, tmp_path / "nonexistent", None)
    assert config.SerializeToString() == before


def test_model_config_json_matches_triton_shape() -> None:
    config = text_format.Parse(
        add_sub_config("m", extra="dynamic_batching { max_queue_delay_microseconds: 100 }"), ModelConfig()
    )
    data = model_config_dict(config)
    assert data["dynamic_batching"]["max_queue_delay_microseconds"] == 100  # uint64 as a number
    assert data["output"][1]["dims"] == [16]
    assert data["instance_group"][0]["count"] == 1
    assert data["platform"] == "" and data["input"][0]["is_shape_tensor"] is False  # all fields printed


@pytest.mark.parametrize(
    ("count", "extra", "mode"),
    [
        (1, "", "in_process"),
        (2, "", "process"),
        (4, 'parameters { key: "execution_mode" value { string_value: "in_process" } }', "in_process"),
        (1, 'parameters { key: "execution_mode" value { string_value: "process" } }', "process"),
        (3, 'parameters { key: "execution_mode" value { string_value: "auto" } }', "process"),
    ],
)
def test_execution_mode(count: int, extra: str, mode: str) -> None:
    assert execution_mode(text_format.Parse(add_sub_config("m", count, extra), ModelConfig())) == mode


def test_execution_mode_rejects_unknown_values() -> None:
    extra = 'parameters { key: "execution_mode" value { string_value: "threads" } }'
    with pytest.raises(ConfigError, match="execution_mode='threads'"):
        execution_mode(text_format.Parse(add_sub_config("m", 1, extra), ModelConfig()))
    assert execution_mode(text_format.Parse('name: "m" backend: "python"', ModelConfig())) == "in_process"


# -- pb_utils -----------------------------------------------------------------------------------


def test_pb_utils_is_our_module_under_triton_name() -> None:
    from elastiserve.engine.backends.python_compat import triton_python_backend_utils as ours

    assert pb_utils is ours


def test_type_helpers() -> None:
    assert pb_utils.triton_string_to_numpy("TYPE_FP32") is np.float32
    assert pb_utils.triton_string_to_numpy("TYPE_STRING") is np.object_
    assert pb_utils.numpy_to_triton_type(np.float32) == 11
    assert pb_utils.numpy_to_triton_type(np.dtype("S5")) == 13
    assert pb_utils.numpy_to_triton_type(np.bool_) == 1
    assert pb_utils.triton_to_numpy_type(11) is np.float32
    assert pb_utils.triton_to_numpy_type(99) is None
    data = np.array([b"ab", b"", b"xyz"], dtype=np.object_)
    assert list(pb_utils.deserialize_bytes_tensor(pb_utils.serialize_byte_tensor(data))) == list(data)
    config = {"input": [{"name": "A", "data_type": "TYPE_FP32"}], "output": [{"name": "B", "dims": [2]}]}
    assert pb_utils.get_input_config_by_name(config, "A") == {"name": "A", "data_type": "TYPE_FP32"}
    assert pb_utils.get_output_config_by_name(config, "B") == {"name": "B", "dims": [2]}
    assert pb_utils.get_output_config_by_name(config, "C") is None
    assert pb_utils.using_decoupled_model_transaction_policy(
        {"model_transaction_policy": {"decoupled": True}}
    )


def test_tensor_api_and_dlpack() -> None:
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    t = pb_utils.Tensor("X", array)
    assert t.name() == "X" and t.shape() == [2, 3] and t.is_cpu() and t.triton_dtype() == 11
    assert t.as_numpy() is array
    back = pb_utils.Tensor.from_dlpack("Y", t.to_dlpack())
    np.testing.assert_array_equal(back.as_numpy(), array)
    assert np.shares_memory(back.as_numpy(), array)
    assert np.from_dlpack(t).shape == (2, 3)  # a Tensor is itself a DLPack producer
    assert pb_utils.Tensor.from_dlpack("Z", array).name() == "Z"  # objects with __dlpack__
    with pytest.raises(pb_utils.TritonModelException, match="BYTES"):
        pb_utils.Tensor("S", np.array([b"a"], dtype=np.object_)).to_dlpack()
    response = pb_utils.InferenceResponse([t])
    assert pb_utils.get_output_tensor_by_name(response, "X") is t
    assert not response.has_error() and response.parameters() == "{}"
    with pytest.raises(pb_utils.TritonModelException, match="must be a list"):
        pb_utils.InferenceResponse(t)  # type: ignore[arg-type]


def test_errors_and_codes() -> None:
    error = pb_utils.TritonError("nope")
    assert error.message() == "nope" and error.code() == pb_utils.TritonError.INTERNAL
    assert pb_utils.TritonError("x", pb_utils.TritonError.UNAVAILABLE).code() == 4
    assert pb_utils.TritonModelException("m").message() == "m"
    with pytest.raises(pb_utils.TritonModelException, match="only works inside a model served"):
        pb_utils.InferenceRequest(model_name="m", inputs=[], requested_output_names=[]).exec()


def test_logger(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="elastiserve.python_model"):
        pb_utils.Logger.log_info("info msg")
        pb_utils.Logger.log_warn("warn msg")
        pb_utils.Logger.log_error("error msg")
        pb_utils.Logger.log_verbose("verbose msg")
        pb_utils.Logger.log("specific msg", pb_utils.Logger.WARNING)
    levels = {r.getMessage(): r.levelno for r in caplog.records}
    assert levels == {
        "info msg": logging.INFO,
        "warn msg": logging.WARNING,
        "error msg": logging.ERROR,
        "verbose msg": logging.DEBUG,
        "specific msg": logging.WARNING,
    }


def test_custom_metrics() -> None:
    counter = pb_utils.MetricFamily("test_pb_counter", "a counter", pb_utils.MetricFamily.COUNTER)
    metric = counter.Metric(labels={"model": "m", "version": "1"})
    metric.increment(2)
    metric.increment(0.5)
    assert metric.value() == 2.5
    assert counter.Metric(labels={"version": "1", "model": "m"}).value() == 2.5  # same series
    with pytest.raises(pb_utils.TritonModelException):
        metric.increment(-1)
    with pytest.raises(pb_utils.TritonModelException):
        metric.set(3)
    with pytest.raises(pb_utils.TritonModelException):
        metric.observe(1)
    gauge = pb_utils.MetricFamily("test_pb_gauge", "a gauge", pb_utils.MetricFamily.GAUGE).Metric()
    gauge.set(5)
    gauge.increment(-1.5)
    assert gauge.value() == 3.5
    hist_family = pb_utils.MetricFamily("test_pb_hist", "a histogram", pb_utils.MetricFamily.HISTOGRAM)
    with pytest.raises(pb_utils.TritonModelException):
        hist_family.Metric(labels={})
    with pytest.raises(pb_utils.TritonModelException):
        hist_family.Metric(labels={}, buckets=[1, 1, 2])
    hist = hist_family.Metric(labels={"k": "v"}, buckets=[0.1, 1.0, 2.5])
    for value in (0.05, 1.5, 6.0):
        hist.observe(value)
    with pytest.raises(pb_utils.TritonModelException):
        hist.value()
    with pytest.raises(pb_utils.TritonModelException, match="different kind"):
        pb_utils.MetricFamily("test_pb_counter", "x", pb_utils.MetricFamily.GAUGE)
    text = custom_metrics_text()
    assert "# TYPE test_pb_counter counter\n" in text
    assert 'test_pb_counter{model="m",version="1"} 2.5\n' in text
    assert "test_pb_gauge 3.5\n" in text
    assert 'test_pb_hist_bucket{k="v",le="0.1"} 1\n' in text
    assert 'test_pb_hist_bucket{k="v",le="2.5"} 2\n' in text
    assert 'test_pb_hist_bucket{k="v",le="+Inf"} 3\n' in text
    assert 'test_pb_hist_count{k="v"} 3\n' in text and 'test_pb_hist_sum{k="v"} 7.55\n' in text


def test_custom_metrics_as_a_prometheus_collector() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from elastiserve.engine.backends.python import CUSTOM_METRICS

    family = pb_utils.MetricFamily("test_pb_collected", "collected", pb_utils.MetricFamily.HISTOGRAM)
    family.Metric(labels={"m": "x"}, buckets=[1.0]).observe(0.5)
    pb_utils.MetricFamily("test_pb_collected_gauge", "g", pb_utils.MetricFamily.GAUGE).Metric().set(2)
    registry = CollectorRegistry()
    registry.register(CUSTOM_METRICS)  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    assert 'test_pb_collected_bucket{le="1",m="x"} 1.0' in text  # Triton writes le="1"
    assert 'test_pb_collected_count{m="x"} 1.0' in text
    assert "test_pb_collected_gauge 2.0" in text


INPLACE_MODEL = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            data *= 2  # Triton gives models writable arrays; unmodified models rely on it
            out = pb_utils.get_input_tensor_by_name(request, "INPUT1").as_numpy()
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("OUTPUT0", data), pb_utils.Tensor("OUTPUT1", out)]))
        return responses
"""


def test_inputs_over_read_only_buffers_are_writable_for_models(tmp_path: Path) -> None:
    model_dir, config = write_model(tmp_path, "inplace", INPLACE_MODEL)
    instance = BACKEND.create_instance(make_context(model_dir, config))
    try:
        body = np.arange(16, dtype=np.float32).tobytes()  # immutable, like an HTTP request body
        request = add_sub_request("inplace", 0, 0, "r")
        request.inputs[0].data = np.frombuffer(body, np.float32).reshape(1, 16)
        (result,) = instance.execute([request])
        assert isinstance(result, InferResponse)
        out = result.output("OUTPUT0")
        assert out is not None and out.data is not None
        np.testing.assert_array_equal(out.data, np.arange(16, dtype=np.float32).reshape(1, 16) * 2)
        assert np.frombuffer(body, np.float32)[1] == 1.0  # the request body itself is untouched
    finally:
        instance.close()
