"""Helpers shared by the array backends (onnxruntime, sklearn, fil, pytorch).

Kept apart from ``base.py`` (the contract) because these are conveniences, not contract:
reading Triton-style string ``parameters``, finding the model file of a version, comparing
config dims with a framework's shapes the way Triton's ``CompareDimsSupported`` does, sizing
thread pools for a small box, and shaping outputs to the configured dims.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from elastiserve.errors import ConfigError
from elastiserve.types import DATATYPE_TO_NUMPY, config_type_to_datatype, datatype_to_config_type

if TYPE_CHECKING:
    from tritonclient.grpc.model_config_pb2 import ModelConfig

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", ""}


def model_label(config: ModelConfig, model_dir: Path | None = None) -> str:
    """The model's name for error messages: the config's, else its directory's."""
    if config.name:
        return config.name
    return model_dir.name if model_dir is not None else "<unnamed>"


# -- parameters ---------------------------------------------------------------------------------
def param_str(config: ModelConfig, key: str, default: str | None = None) -> str | None:
    """``parameters { key: K value { string_value: V } }`` -> V (Triton's backends read them so)."""
    if key in config.parameters:
        return config.parameters[key].string_value
    return default


def param_bool(config: ModelConfig, key: str, default: bool) -> bool:
    value = param_str(config, key)
    if value is None:
        return default
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(
        f"model '{model_label(config)}': parameter '{key}' must be \"true\" or \"false\", got '{value}'"
    )


def param_int(config: ModelConfig, key: str, default: int) -> int:
    value = param_str(config, key)
    if value is None or not value.strip():
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(
            f"model '{model_label(config)}': parameter '{key}' must be an integer, got '{value}'"
        ) from None


def param_float(config: ModelConfig, key: str, default: float) -> float:
    value = param_str(config, key)
    if value is None or not value.strip():
        return default
    try:
        return float(value)
    except ValueError:
        raise ConfigError(
            f"model '{model_label(config)}': parameter '{key}' must be a number, got '{value}'"
        ) from None


# -- threads ------------------------------------------------------------------------------------
def available_cpus() -> int:
    """CPUs this process may run on (its affinity, so ``taskset -c 0`` counts as one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def instance_count(config: ModelConfig) -> int:
    return max(1, sum(max(1, group.count) for group in config.instance_group) or 1)


def default_threads(config: ModelConfig, cap: int = 4) -> int:
    """Threads per instance when the config names none: the CPUs we may use shared among the
    model's instances, at most ``cap``. Framework defaults (one thread per core per session)
    oversubscribe a 2-core box as soon as there are two instances or the server needs a core."""
    return max(1, min(cap, available_cpus() // instance_count(config)))


# -- files --------------------------------------------------------------------------------------
def version_dirs(model_dir: Path) -> list[Path]:
    """Numeric version folders, highest first."""
    if not model_dir.is_dir():
        return []
    found = [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(found, key=lambda p: int(p.name), reverse=True)


def find_model_file(config: ModelConfig, model_dir: Path, version: int | None, default_name: str) -> Path:
    """The model file of ``version`` (or of the highest version that has one when None)."""
    filename = config.default_model_filename or default_name
    label = model_label(config, model_dir)
    if version is not None:
        path = model_dir / str(version) / filename
        if not path.exists():
            raise ConfigError(f"model '{label}': model file '{path}' not found")
        return path
    for vdir in version_dirs(model_dir):
        if (vdir / filename).exists():
            return vdir / filename
    raise ConfigError(f"model '{label}': no version folder in '{model_dir}' contains '{filename}'")


# -- types and dims -----------------------------------------------------------------------------
def config_dtype(data_type: int) -> np.dtype:
    """A config enum (``TYPE_FP32`` …) -> numpy dtype; BF16 and INVALID have none."""
    datatype = config_type_to_datatype(data_type)
    dtype = DATATYPE_TO_NUMPY.get(datatype)
    if dtype is None:
        raise ConfigError(f"data type {datatype} is not supported by this backend")
    return dtype


def numpy_config_type(dtype: Any) -> int:
    """numpy dtype -> config enum value; str/bytes/object -> TYPE_STRING."""
    from tritonclient.grpc import model_config_pb2

    from elastiserve.types import numpy_to_datatype

    return model_config_pb2.DataType.Value(datatype_to_config_type(numpy_to_datatype(np.dtype(dtype))))


def type_name(data_type: int) -> str:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Name(data_type)


def dims_compatible(config_dims: Sequence[int], model_dims: Sequence[int]) -> bool:
    """Triton's rule: same rank; a model dim of -1 accepts any config dim, otherwise equal."""
    if len(config_dims) != len(model_dims):
        return False
    return all(m == -1 or c == m for c, m in zip(config_dims, model_dims, strict=True))


def shape_str(dims: Iterable[int]) -> str:
    return "[" + ",".join(str(d) for d in dims) + "]"


def fit_to_dims(array: np.ndarray, dims: Sequence[int], batched: bool) -> np.ndarray:
    """Reshape a framework output to the configured shape (``[batch] + dims`` when batched).

    Frameworks return ``[N]`` where Triton configs say dims ``[1]`` (and vice versa); the
    element count decides, so a genuinely different shape is returned as it is.
    """
    if not dims:
        return array
    target = ([array.shape[0]] if batched and array.ndim > 0 else []) + list(dims)
    if list(array.shape) == target:
        return array
    if target.count(-1) > 1:
        return array
    known = int(np.prod([d for d in target if d != -1])) if target else 1
    if -1 in target:
        if known == 0 or array.size % known:
            return array
    elif known != array.size:
        return array
    return array.reshape(target)
