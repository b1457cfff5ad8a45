"""The pytorch backend: with real torch when installed, else its mapping logic on a stand-in torch.

torch is an optional extra; the test extra (and so CI) installs it, and where it is missing the
real TorchScript test is skipped with its reason shown (``pytest -rs``). The stand-in tests check
input/output ordering, dtype handling and the missing-torch error without it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from elastiserve.engine.backends import get_backend, pytorch
from elastiserve.errors import ConfigError

from .backend_helpers import context, execute_ok, output, parse_config, request

BACKEND = get_backend("pytorch")
HAVE_TORCH = importlib.util.find_spec("torch") is not None
RNG = np.random.default_rng(3)

CONFIG = """
name: "tm"
platform: "pytorch_libtorch"
max_batch_size: 8
input [
  { name: "INPUT__1", data_type: TYPE_FP32, dims: [4] },
  { name: "INPUT__0", data_type: TYPE_FP32, dims: [4] }
]
output [
  { name: "OUTPUT__1", data_type: TYPE_FP32, dims: [4] },
  { name: "OUTPUT__0", data_type: TYPE_FP32, dims: [1] }
]
"""


def model_dir(tmp_path: Path) -> Path:
    (tmp_path / "tm" / "1").mkdir(parents=True)
    (tmp_path / "tm" / "1" / "model.pt").write_bytes(b"stand-in")
    return tmp_path / "tm"


def reference(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """forward(a, b) -> ((a * b).sum(1, keepdim=True), a - b)."""
    return (a * b).sum(axis=1, keepdims=True), a - b


# -- a stand-in for torch: enough API for the backend, backed by numpy ---------------------------
class FakeTensor:
    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def detach(self) -> FakeTensor:
        return self

    def cpu(self) -> FakeTensor:
        return self

    def numpy(self) -> np.ndarray:
        return self.array


class FakeModule:
    def __init__(self, forward: Callable[..., Any]) -> None:
        self.forward = forward
        self.calls: list[list[np.ndarray]] = []

    def eval(self) -> FakeModule:
        return self

    def __call__(self, *args: FakeTensor) -> Any:
        self.calls.append([a.array for a in args])
        return self.forward(*args)


def fake_torch(module: FakeModule) -> types.ModuleType:
    torch = types.ModuleType("torch")
    torch.jit = types.SimpleNamespace(load=lambda path, map_location=None: module)  # type: ignore[attr-defined]
    torch.from_numpy = FakeTensor  # type: ignore[attr-defined]
    torch.inference_mode = contextlib.nullcontext  # type: ignore[attr-defined]
    torch.no_grad = contextlib.nullcontext  # type: ignore[attr-defined]
    torch.set_num_threads = lambda n: None  # type: ignore[attr-defined]
    torch.set_num_interop_threads = lambda n: None  # type: ignore[attr-defined]
    return torch


@pytest.fixture
def with_fake_torch(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[FakeModule], None]]:
    def install(module: FakeModule) -> None:
        monkeypatch.setitem(sys.modules, "torch", fake_torch(module))

    yield install


def tuple_forward(a: FakeTensor, b: FakeTensor) -> tuple[FakeTensor, FakeTensor]:
    dot, diff = reference(a.array, b.array)
    return FakeTensor(dot.astype(np.float64)), FakeTensor(diff)


def test_inputs_by_index_suffix_and_outputs_by_position(tmp_path: Path, with_fake_torch: Any) -> None:
    module = FakeModule(tuple_forward)
    with_fake_torch(module)
    instance = BACKEND.create_instance(context(model_dir(tmp_path), parse_config(CONFIG)))
    a = RNG.normal(size=(3, 4)).astype(np.float32)
    b = RNG.normal(size=(3, 4)).astype(np.float32)
    b.setflags(write=False)  # request buffers can be read-only; torch.from_numpy needs writable
    responses = execute_ok(
        instance, request("tm", INPUT__0=a[:1], INPUT__1=b[:1]), request("tm", INPUT__0=a[1:], INPUT__1=b[1:])
    )
    np.testing.assert_array_equal(module.calls[0][0], a)  # INPUT__0 is the first argument
    np.testing.assert_array_equal(module.calls[0][1], b)
    assert module.calls[0][1].flags.writeable
    dot, diff = reference(a, b)
    assert [t.name for t in responses[0].outputs] == ["OUTPUT__1", "OUTPUT__0"]  # config order
    got_dot = np.concatenate([output(r, "OUTPUT__0") for r in responses])
    assert got_dot.dtype == np.float32  # cast to the configured type
    np.testing.assert_allclose(got_dot, dot, rtol=1e-6)
    np.testing.assert_allclose(np.concatenate([output(r, "OUTPUT__1") for r in responses]), diff)


def test_plain_names_use_config_order_and_dict_outputs(tmp_path: Path, with_fake_torch: Any) -> None:
    module = FakeModule(lambda x, y: {"sum": FakeTensor(x.array + y.array), "x": FakeTensor(x.array)})
    with_fake_torch(module)
    config = parse_config(
        """
        name: "tm" backend: "pytorch" max_batch_size: 4
        input [{ name: "x", data_type: TYPE_FP32, dims: [2] }, { name: "y", data_type: TYPE_FP32, dims: [2] }]
        output [{ name: "sum", data_type: TYPE_FP32, dims: [2] }]
        """
    )
    instance = BACKEND.create_instance(context(model_dir(tmp_path), config))
    x = RNG.normal(size=(2, 2)).astype(np.float32)
    y = RNG.normal(size=(2, 2)).astype(np.float32)
    (response,) = execute_ok(instance, request("tm", x=x, y=y))
    np.testing.assert_allclose(output(response, "sum"), x + y)


def test_missing_torch_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail, installed or not
    with pytest.raises(ConfigError, match=r"pip install 'elastiserve\[torch\]'"):
        BACKEND.create_instance(context(model_dir(tmp_path), parse_config(CONFIG)))


def test_autocomplete_sets_platform_and_requires_io(tmp_path: Path) -> None:
    config = parse_config(CONFIG.replace('platform: "pytorch_libtorch"', 'backend: "pytorch"'))
    BACKEND.auto_complete_config(config, model_dir(tmp_path), 1)
    assert config.platform == "pytorch_libtorch"
    with pytest.raises(ConfigError, match="must list the inputs and outputs"):
        BACKEND.auto_complete_config(mc.ModelConfig(), tmp_path / "tm", 1)


def test_positional_order() -> None:
    assert pytorch.positional_order(["INPUT__1", "INPUT__0", "INPUT__2"]) == [1, 0, 2]
    assert pytorch.positional_order(["b", "a"]) == [0, 1]
    assert pytorch.positional_order(["x__0", "y"]) == [0, 1]


@pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed (pip install 'elastiserve[torch]')")
def test_real_torchscript_model(tmp_path: Path) -> None:
    import torch

    class Net(torch.nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return (a * b).sum(dim=1, keepdim=True), a - b

    directory = tmp_path / "tm"
    (directory / "1").mkdir(parents=True)
    scripted = torch.jit.script(Net())
    scripted.save(str(directory / "1" / "model.pt"))
    instance = BACKEND.create_instance(context(directory, parse_config(CONFIG)))
    a = RNG.normal(size=(3, 4)).astype(np.float32)
    b = RNG.normal(size=(3, 4)).astype(np.float32)
    (response,) = execute_ok(instance, request("tm", INPUT__0=a, INPUT__1=b))
    want_dot, want_diff = (t.numpy() for t in scripted(torch.from_numpy(a), torch.from_numpy(b)))
    np.testing.assert_allclose(output(response, "OUTPUT__0"), want_dot, rtol=1e-6)
    np.testing.assert_allclose(output(response, "OUTPUT__1"), want_diff)
