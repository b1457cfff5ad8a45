"""TorchScript models: ``backend: "pytorch"`` / ``platform: "pytorch_libtorch"``, file ``model.pt``.

torch is an optional extra (``pip install 'elastiserve[torch]'``) and is imported only when a
model of this backend is loaded, so this module imports without it; a missing torch is a
ConfigError that says how to install it.

As in Triton's PyTorch backend, inputs are passed to ``forward`` positionally: names of the
form ``<name>__<index>`` (``INPUT__0``, ``INPUT__1``) give the position, otherwise the config's
order does. Outputs ``<name>__<index>`` (``OUTPUT__0``…) take that element of the returned
tuple/list; other names are taken in config order, or by key when ``forward`` returns a dict.
TorchScript carries no tensor shapes, so there is nothing to auto-complete: the config must
list inputs and outputs.

Config keys (Triton's names): ``INTRA_OP_THREAD_COUNT`` and ``INTER_OP_THREAD_COUNT`` (torch's
thread pools are per process, so the first model that sets them wins, as in Triton; unset, the
intra-op pool is sized like the other backends': the CPUs we may use shared among instances, at
most 4), ``INFERENCE_MODE`` (default ``true``: ``torch.inference_mode()``, else ``no_grad``).
Execution releases the GIL inside torch's kernels: ``parallelism = "thread"``.
"""

from __future__ import annotations

import contextlib
import re
import threading
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from elastiserve.engine.backends import _common as common
from elastiserve.engine.backends.base import ArrayModelInstance, ModelContext, Parallelism
from elastiserve.errors import ConfigError, InvalidArgument

if TYPE_CHECKING:
    from tritonclient.grpc.model_config_pb2 import ModelConfig

DEFAULT_FILENAME = "model.pt"
_INDEXED = re.compile(r"^(.*)__(\d+)$")
_threads_lock = threading.Lock()
_threads_set = {"intra": False, "inter": False}


def import_torch() -> ModuleType:
    """``import torch``, or a ConfigError telling how to install it."""
    try:
        import torch
    except ImportError:
        raise ConfigError(
            "backend 'pytorch' needs PyTorch, which is not installed; "
            "install it with: pip install 'elastiserve[torch]'"
        ) from None
    return torch


def positional_order(names: list[str]) -> list[int]:
    """Indices into ``names`` in call order: by ``__<index>`` suffix when all names have one."""
    matches = [_INDEXED.match(n) for n in names]
    if names and all(matches):
        indices = [int(m.group(2)) for m in matches if m]
        if len(set(indices)) == len(indices):
            return sorted(range(len(names)), key=lambda i: indices[i])
    return list(range(len(names)))


def _configure_threads(torch: ModuleType, config: ModelConfig) -> None:
    """Process-wide pools: set once, by the first model that loads (Triton does the same)."""
    with _threads_lock:
        if not _threads_set["intra"]:
            intra = common.param_int(config, "INTRA_OP_THREAD_COUNT", 0)
            torch.set_num_threads(intra if intra > 0 else common.default_threads(config))
            _threads_set["intra"] = True
        inter = common.param_int(config, "INTER_OP_THREAD_COUNT", 0)
        if inter > 0 and not _threads_set["inter"]:
            with contextlib.suppress(RuntimeError):  # only settable before inter-op work starts
                torch.set_num_interop_threads(inter)
            _threads_set["inter"] = True


class PyTorchBackend:
    """``BACKEND`` for TorchScript models."""

    name = "pytorch"
    parallelism: Parallelism = "thread"

    def auto_complete_config(self, config: ModelConfig, model_dir: Path, version: int | None) -> None:
        if not config.backend and not config.platform:
            config.backend = self.name
        if not config.platform:
            config.platform = "pytorch_libtorch"
        if not config.name:
            config.name = model_dir.name
        if not config.input or not config.output:
            raise ConfigError(
                f"model '{common.model_label(config, model_dir)}': TorchScript models carry no tensor "
                "names or shapes, so config.pbtxt must list the inputs and outputs"
            )

    def create_instance(self, context: ModelContext) -> PyTorchInstance:
        return PyTorchInstance(context)


class PyTorchInstance(ArrayModelInstance):
    """One ``torch.jit`` module on the CPU."""

    def __init__(self, context: ModelContext) -> None:
        super().__init__(context)
        torch = import_torch()
        self.torch = torch
        config = context.config
        path = context.model_file(DEFAULT_FILENAME)
        if not path.exists():
            raise ConfigError(f"model '{context.name}': model file '{path}' not found")
        _configure_threads(torch, config)
        try:
            self.module = torch.jit.load(str(path), map_location="cpu")
            self.module.eval()
        except Exception as exc:
            raise ConfigError(
                f"model '{context.name}': cannot load TorchScript model '{path}': {type(exc).__name__}: {exc}"
            ) from None
        names = [t.name for t in config.input]
        self.call_order = [names[i] for i in positional_order(names)]
        # output name (config order) -> position in the returned tuple: its __<index>, else config order
        out_names = [t.name for t in config.output]
        matches = [_INDEXED.match(n) for n in out_names]
        indexed = all(matches) and len({m.group(2) for m in matches if m}) == len(out_names)
        self.output_index = {
            name: (int(m.group(2)) if indexed and m else i)
            for i, (name, m) in enumerate(zip(out_names, matches, strict=True))
        }
        self.output_dtypes = {t.name: common.config_dtype(t.data_type) for t in config.output}
        self.output_dims = {t.name: list(t.dims) for t in config.output}
        self.inference_mode = common.param_bool(config, "INFERENCE_MODE", True)

    def _tensor(self, name: str, array: np.ndarray) -> Any:
        if array.dtype == np.object_:
            raise InvalidArgument(f"model '{self.context.name}': BYTES input '{name}' is not supported")
        if not array.flags.writeable or not array.flags.c_contiguous:
            array = np.array(array, copy=True, order="C")  # torch.from_numpy shares memory
        return self.torch.from_numpy(array)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        args = [self._tensor(name, inputs[name]) for name in self.call_order]
        mode = torch.inference_mode() if self.inference_mode else torch.no_grad()
        with mode:
            result = self.module(*args)
        out: dict[str, np.ndarray] = {}
        for name, index in self.output_index.items():
            if isinstance(result, dict):
                value = result.get(name)
                if value is None:
                    raise InvalidArgument(f"model '{self.context.name}' returned no output '{name}'")
            elif isinstance(result, list | tuple):
                if index >= len(result):
                    raise InvalidArgument(
                        f"model '{self.context.name}' returned {len(result)} outputs, no output '{name}'"
                    )
                value = result[index]
            else:
                if index != 0:
                    raise InvalidArgument(f"model '{self.context.name}' returned one output, no '{name}'")
                value = result
            array = value.detach().cpu().numpy()
            dtype = self.output_dtypes[name]
            if array.dtype != dtype:
                array = array.astype(dtype)
            out[name] = common.fit_to_dims(array, self.output_dims[name], self.batched)
        return out


BACKEND = PyTorchBackend()
