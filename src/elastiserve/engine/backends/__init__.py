"""Backend lookup: Triton's ``backend:``/``platform:`` names -> a lazily imported module.

Each module exposes ``BACKEND`` (see :mod:`elastiserve.engine.backends.base`). Importing a
backend imports its framework, so nothing here is imported before a model needs it.
"""

from __future__ import annotations

import importlib

from elastiserve.engine.backends.base import Backend
from elastiserve.errors import ConfigError

_MODULES: dict[str, str] = {
    "python": "elastiserve.engine.backends.python",
    "onnxruntime": "elastiserve.engine.backends.onnxruntime",
    "sklearn": "elastiserve.engine.backends.sklearn",
    "fil": "elastiserve.engine.backends.fil",
    "pytorch": "elastiserve.engine.backends.pytorch",
}

# Triton platform names -> backend names.
PLATFORMS: dict[str, str] = {
    "onnxruntime_onnx": "onnxruntime",
    "pytorch_libtorch": "pytorch",
}

# File name Triton expects when the config names none (default_model_filename).
DEFAULT_MODEL_FILENAMES: dict[str, str] = {
    "python": "model.py",
    "onnxruntime": "model.onnx",
    "pytorch": "model.pt",
    "sklearn": "model.joblib",
    "fil": "xgboost.model",
}


def backend_name(backend: str, platform: str) -> str:
    """Resolve the config's ``backend``/``platform`` pair to one of our backend names."""
    if backend:
        return backend
    if platform in PLATFORMS:
        return PLATFORMS[platform]
    if platform == "ensemble":
        return "ensemble"
    raise ConfigError(f"unsupported platform '{platform}'" if platform else "no backend or platform given")


def get_backend(name: str) -> Backend:
    module_name = _MODULES.get(name)
    if module_name is None:
        raise ConfigError(f"unknown backend '{name}'; available: {', '.join(sorted(_MODULES))}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"backend '{name}' needs a package that is not installed ({exc.name}); "
            f"install it with: pip install 'elastiserve[{_EXTRA.get(name, name)}]'"
        ) from exc
    return module.BACKEND


_EXTRA = {"onnxruntime": "onnx", "pytorch": "torch", "fil": "xgboost,lightgbm"}
