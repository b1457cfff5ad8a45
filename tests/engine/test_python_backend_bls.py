"""BLS: ``pb_utils.InferenceRequest(...).exec()`` reaches the engine's dataplane, in both modes."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from elastiserve.engine.backends.python import BACKEND
from elastiserve.errors import NotFound
from elastiserve.types import InferRequest, InferResponse, InferTensor

from .python_backend_support import add_sub_config, add_sub_request, make_context, write_model


class FakeDataPlane:
    """Stands in for DataPlane: ``double`` doubles X into Y; any other model is unknown."""

    def __init__(self) -> None:
        self.seen: list[InferRequest] = []

    async def infer(self, request: InferRequest) -> InferResponse:
        self.seen.append(request)
        await asyncio.sleep(0)
        if request.model_name != "double":
            raise NotFound(f"Request for unknown model: '{request.model_name}' is not found")
        x = request.input("X")
        assert x is not None and x.data is not None
        y = x.data * 2
        return InferResponse("double", "1", [InferTensor("Y", "FP32", list(y.shape), y)], id=request.id)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """The engine's event loop, running in its own thread (the model runs in the test thread)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


BLS_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            bls = pb_utils.InferenceRequest(
                model_name="double", inputs=[pb_utils.Tensor("X", x)], requested_output_names=["Y"],
                request_id="inner", parameters={"why": "bls"},
            )
            answer = bls.exec()
            if answer.has_error():
                raise pb_utils.TritonModelException(answer.error().message())
            y = pb_utils.get_output_tensor_by_name(answer, "Y").as_numpy()
            missing = pb_utils.InferenceRequest(
                model_name="nope", inputs=[pb_utils.Tensor("X", x)], requested_output_names=["Y"]
            ).exec()
            error = missing.error()
            note = f"{error.code() == pb_utils.TritonError.NOT_FOUND}:{error.message()}"
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUTPUT0", y),
                pb_utils.Tensor("OUTPUT1", np.array([note.encode()], dtype=np.object_)),
            ]))
        return responses
"""

ASYNC_BLS_MODEL = """
import asyncio
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    async def execute(self, requests):
        calls = [
            pb_utils.InferenceRequest(
                model_name="double",
                inputs=[pb_utils.Tensor("X", pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy())],
                requested_output_names=["Y"],
            ).async_exec()
            for r in requests
        ]
        answers = await asyncio.gather(*calls)
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", a.output_tensors()[0].as_numpy())])
            for a in answers
        ]
"""


@pytest.mark.parametrize("mode", ["in_process", "process"])
def test_bls_exec(tmp_path: Path, loop: asyncio.AbstractEventLoop, mode: str) -> None:
    extra = f'parameters {{ key: "execution_mode" value {{ string_value: "{mode}" }} }}'
    model_dir, config = write_model(tmp_path, "bls", BLS_MODEL, add_sub_config("bls", extra=extra))
    server = FakeDataPlane()
    instance = BACKEND.create_instance(make_context(model_dir, config, server=server, extra={"loop": loop}))
    try:
        assert instance.execution_mode == mode  # type: ignore[attr-defined]
        assert instance.requires_thread  # type: ignore[attr-defined]  # BLS must not run on the loop
        (result,) = instance.execute([add_sub_request("bls", 3, 0)])
        assert isinstance(result, InferResponse), result
        np.testing.assert_array_equal(result.output("OUTPUT0").data, np.full((1, 16), 6, np.float32))  # type: ignore[union-attr]
        note = result.output("OUTPUT1").data[0].decode()  # type: ignore[union-attr]
        assert note == "True:Request for unknown model: 'nope' is not found"
        inner = server.seen[0]
        assert (inner.model_name, inner.id, inner.model_version) == ("double", "inner", "")
        assert [o.name for o in inner.outputs] == ["Y"] and inner.parameters == {"why": "bls"}
    finally:
        instance.close()


def test_async_bls_in_async_execute(tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    model_dir, config = write_model(tmp_path, "abls", ASYNC_BLS_MODEL, add_sub_config("abls"))
    instance = BACKEND.create_instance(
        make_context(model_dir, config, server=FakeDataPlane(), extra={"loop": loop})
    )
    try:
        results = instance.execute([add_sub_request("abls", 1, 0), add_sub_request("abls", 2, 0)])
        assert [float(r.output("OUTPUT0").data[0, 0]) for r in results] == [2.0, 4.0]  # type: ignore[union-attr]
    finally:
        instance.close()


def test_bls_without_an_engine_is_a_clear_error(tmp_path: Path) -> None:
    model_dir, config = write_model(tmp_path, "lonely", BLS_MODEL, add_sub_config("lonely"))
    instance = BACKEND.create_instance(make_context(model_dir, config))  # no server, no loop
    try:
        (result,) = instance.execute([add_sub_request("lonely", 1, 0)])
        assert "BLS is not available" in str(result)
    finally:
        instance.close()


class SlowDataPlane(FakeDataPlane):
    """``slow`` answers after 5 s: long enough for a BLS timeout to fire first."""

    async def infer(self, request: InferRequest) -> InferResponse:
        if request.model_name == "slow":
            self.seen.append(request)
            await asyncio.sleep(5)
        return await super().infer(request)


VERSION_AND_TIMEOUT_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            pinned = pb_utils.InferenceRequest(
                model_name="double", model_version=3, inputs=[pb_utils.Tensor("X", x)],
                requested_output_names=["Y"],
            ).exec()
            late = pb_utils.InferenceRequest(
                model_name="slow", inputs=[pb_utils.Tensor("X", x)], requested_output_names=["Y"],
                timeout=200_000,  # microseconds, as in Triton
            ).exec()
            note = f"{late.has_error()}:{late.error().message() if late.has_error() else ''}"
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUTPUT0", pb_utils.get_output_tensor_by_name(pinned, "Y").as_numpy()),
                pb_utils.Tensor("OUTPUT1", np.array([note.encode()], dtype=np.object_)),
            ]))
        return responses
"""


@pytest.mark.parametrize("mode", ["in_process", "process"])
def test_bls_model_version_and_timeout(tmp_path: Path, loop: asyncio.AbstractEventLoop, mode: str) -> None:
    extra = f'parameters {{ key: "execution_mode" value {{ string_value: "{mode}" }} }}'
    model_dir, config = write_model(
        tmp_path, "vt", VERSION_AND_TIMEOUT_MODEL, add_sub_config("vt", extra=extra)
    )
    server = SlowDataPlane()
    instance = BACKEND.create_instance(make_context(model_dir, config, server=server, extra={"loop": loop}))
    try:
        started = time.monotonic()
        (result,) = instance.execute([add_sub_request("vt", 2, 0)])
        assert time.monotonic() - started < 3  # the timeout fired, the slow call did not hold execute
        assert isinstance(result, InferResponse), result
        assert result.output("OUTPUT0").data[0, 0] == 4  # type: ignore[union-attr,index]
        note = result.output("OUTPUT1").data[0].decode()  # type: ignore[union-attr]
        assert note == "True:BLS request to model 'slow' timed out after 0.2s"
        assert [(r.model_name, r.model_version) for r in server.seen] == [("double", "3"), ("slow", "")]
        time.sleep(0.05)  # let the loop finish cancelling the abandoned call
    finally:
        instance.close()
