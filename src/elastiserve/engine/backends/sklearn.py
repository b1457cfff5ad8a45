"""scikit-learn estimators (and pipelines) saved with joblib or pickle: ``backend: "sklearn"``.

TRUST BOUNDARY: a joblib/pickle file is a program. Loading one runs whatever code its author put
in it, with the server's permissions, before a single request arrives (auto-complete loads it
too). Only serve model repositories you trust as much as the code of the server itself; for
models from elsewhere prefer a data-only format (ONNX via skl2onnx, XGBoost JSON, LightGBM text).

Files: ``model.joblib`` by default; ``default_model_filename: "model.pkl"`` (or ``.pickle``)
loads a pickle the same way (``joblib.load`` reads plain pickles).

Config keys: ``parameters { key: "method" value { string_value: M } }`` with M one of
``predict`` (default), ``predict_proba``, ``predict_log_proba``, ``decision_function``,
``transform``; nothing else can be called, so a config cannot reach ``fit`` or other methods.
The configured inputs (in order) are joined column-wise into the ``[N, features]`` matrix the
estimator takes; a single BYTES input is passed as a list of strings (text pipelines). The one
configured output is cast to the output's ``data_type``.

Auto-complete (for a config without inputs/outputs): ``input__0`` ``TYPE_FP32``
``[n_features_in_]`` and ``output__0`` typed from the estimator (class labels' type for
classifiers' ``predict``, ``TYPE_FP32`` otherwise, ``[n_classes]`` for probabilities). When the
config lists no inputs, a ``max_batch_size`` of 0 becomes 4 with ``dynamic_batching {}``, as
Triton's onnxruntime backend does for models that can batch (every estimator batches along rows).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import joblib
import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from elastiserve.engine.backends import _common as common
from elastiserve.engine.backends.base import ArrayModelInstance, ModelContext, Parallelism
from elastiserve.errors import ConfigError, InvalidArgument
from elastiserve.types import as_bytes_array

if TYPE_CHECKING:
    from tritonclient.grpc.model_config_pb2 import ModelConfig

log = logging.getLogger(__name__)

DEFAULT_FILENAME = "model.joblib"
METHODS = ("predict", "predict_proba", "predict_log_proba", "decision_function", "transform")
DEFAULT_MAX_BATCH_SIZE = 4


def load_estimator(path: Path, config: ModelConfig) -> Any:
    """``joblib.load`` with failures turned into a ConfigError naming the model and file.

    Executes the pickle's code: see the module docstring's trust boundary.
    """
    label = common.model_label(config)
    try:
        return joblib.load(path)
    except Exception as exc:
        raise ConfigError(
            f"model '{label}': cannot load scikit-learn model '{path}': {type(exc).__name__}: {exc}"
        ) from None


def _method(config: ModelConfig, estimator: Any) -> str:
    label = common.model_label(config)
    method = common.param_str(config, "method", "predict") or "predict"
    if method not in METHODS:
        raise ConfigError(
            f"model '{label}': parameter 'method' must be one of {', '.join(METHODS)}; got '{method}'"
        )
    if not callable(getattr(estimator, method, None)):
        raise ConfigError(f"model '{label}': {type(estimator).__name__} has no method '{method}'")
    return method


def _output_signature(estimator: Any, method: str) -> tuple[int, list[int]]:
    """(config data type, per-row dims) of what ``method`` returns, as far as the estimator tells."""
    classes = getattr(estimator, "classes_", None)
    if method in ("predict_proba", "predict_log_proba"):
        return mc.TYPE_FP32, [len(classes) if classes is not None else -1]
    if method == "decision_function":
        width = len(classes) if classes is not None and len(classes) > 2 else 1
        return mc.TYPE_FP32, [width]
    if method == "transform":
        return mc.TYPE_FP32, [-1]
    if classes is not None:
        dtype = np.asarray(classes).dtype
        if dtype.kind in ("U", "S", "O"):
            return mc.TYPE_STRING, [1]
        if dtype.kind == "b":
            return mc.TYPE_BOOL, [1]
        return (mc.TYPE_INT64 if dtype.kind in "iu" else mc.TYPE_FP32), [1]
    outputs = int(getattr(estimator, "n_outputs_", 1) or 1)
    return mc.TYPE_FP32, [outputs]


def _feature_width(tensor: Any, batched: bool) -> int | None:
    """Columns one configured input contributes (None when a dim is variable)."""
    dims = list(tensor.dims)[0 if batched else 1 :]
    if any(d < 0 for d in dims):
        return None
    return int(np.prod(dims)) if dims else 1


def validate_against_estimator(config: ModelConfig, estimator: Any, method: str) -> None:
    """Feature counts and the output width must agree with the fitted estimator."""
    label = common.model_label(config)
    batched = config.max_batch_size > 0
    if len(config.output) != 1:
        raise ConfigError(
            f"model '{label}': the sklearn backend serves exactly one output, the config lists "
            f"{len(config.output)}"
        )
    if not config.input:
        raise ConfigError(f"model '{label}': the config lists no input")
    expected = getattr(estimator, "n_features_in_", None)
    numeric = [t for t in config.input if t.data_type != mc.TYPE_STRING]
    if expected is not None and numeric and len(numeric) == len(config.input):
        widths = [_feature_width(t, batched) for t in config.input]
        known = [w for w in widths if w is not None]
        if len(known) == len(widths) and sum(known) != expected:
            names = ", ".join(f"'{t.name}'" for t in config.input)
            raise ConfigError(
                f"model '{label}': input {names} provide {sum(known)} features per row "
                f"but the estimator was fitted on {expected}"
            )
    out = config.output[0]
    _, dims = _output_signature(estimator, method)
    if dims[0] > 1 and list(out.dims) and -1 not in out.dims and int(np.prod(list(out.dims))) != dims[0]:
        raise ConfigError(
            f"model '{label}': output '{out.name}' has dims {common.shape_str(out.dims)} but "
            f"{method} returns {dims[0]} values per row"
        )


class SklearnBackend:
    """``BACKEND`` for ``backend: "sklearn"``."""

    name = "sklearn"
    # Estimators do their work in numpy/Cython code that mostly releases the GIL.
    parallelism: Parallelism = "thread"

    def auto_complete_config(self, config: ModelConfig, model_dir: Path, version: int | None) -> None:
        if not config.backend and not config.platform:
            config.backend = self.name
        if not config.name:
            config.name = model_dir.name
        incomplete = [
            t for t in [*config.input, *config.output] if t.data_type == mc.TYPE_INVALID or not t.dims
        ]
        if config.input and config.output and not incomplete:
            return
        label = common.model_label(config, model_dir)
        estimator = load_estimator(
            common.find_model_file(config, model_dir, version, DEFAULT_FILENAME), config
        )
        method = _method(config, estimator)
        if config.max_batch_size == 0 and not config.input:
            config.max_batch_size = DEFAULT_MAX_BATCH_SIZE
            if not config.HasField("dynamic_batching") and not config.HasField("sequence_batching"):
                config.dynamic_batching.SetInParent()
        lead = [] if config.max_batch_size > 0 else [-1]
        if not config.input:
            features = getattr(estimator, "n_features_in_", None)
            if features is None:
                raise ConfigError(
                    f"model '{label}': {type(estimator).__name__} does not say how many features it "
                    "takes (no n_features_in_); list the inputs in config.pbtxt"
                )
            tensor = config.input.add(name="input__0", data_type=mc.TYPE_FP32)
            tensor.dims.extend([*lead, int(features)])
        for tensor in config.input:
            if tensor.data_type == mc.TYPE_INVALID:
                tensor.data_type = mc.TYPE_FP32
            if not tensor.dims:
                features = getattr(estimator, "n_features_in_", None)
                if features is None or len(config.input) > 1:
                    raise ConfigError(f"model '{label}': input '{tensor.name}' needs dims in config.pbtxt")
                tensor.dims.extend([*lead, int(features)])
        data_type, dims = _output_signature(estimator, method)
        if not config.output:
            config.output.add(name="output__0")
        for tensor in config.output:
            if tensor.data_type == mc.TYPE_INVALID:
                tensor.data_type = data_type
            if not tensor.dims:
                tensor.dims.extend([*lead, *dims])
        validate_against_estimator(config, estimator, method)

    def create_instance(self, context: ModelContext) -> SklearnInstance:
        return SklearnInstance(context)


class SklearnInstance(ArrayModelInstance):
    """One loaded estimator; ``run`` joins the inputs into one matrix and calls the method."""

    def __init__(self, context: ModelContext) -> None:
        super().__init__(context)
        config = context.config
        path = context.model_file(DEFAULT_FILENAME)
        if not path.exists():
            raise ConfigError(f"model '{context.name}': model file '{path}' not found")
        self.estimator = load_estimator(path, config)
        self.method_name = _method(config, self.estimator)
        validate_against_estimator(config, self.estimator, self.method_name)
        self._call = getattr(self.estimator, self.method_name)
        output = config.output[0]
        self.output_name = output.name
        self.output_dims = list(output.dims)
        self.output_dtype = common.config_dtype(output.data_type)
        self.text_input = len(config.input) == 1 and config.input[0].data_type == mc.TYPE_STRING

    def _matrix(self, inputs: dict[str, np.ndarray]) -> Any:
        arrays = [inputs[name] for name in self.input_names]
        if self.text_input:
            flat = arrays[0].reshape(-1)
            return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat]
        if any(a.dtype == np.object_ for a in arrays):
            raise InvalidArgument(f"model '{self.context.name}': BYTES inputs must be the only input")
        if len(arrays) == 1 and arrays[0].ndim == 2:
            return arrays[0]
        rows = arrays[0].shape[0] if arrays[0].ndim else 1
        return np.concatenate([a.reshape(rows, -1) for a in arrays], axis=1)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = np.asarray(self._call(self._matrix(inputs)))
        if self.output_dtype == np.object_:
            result = as_bytes_array(result.astype(str) if result.dtype.kind != "O" else result)
        elif result.dtype != self.output_dtype:
            result = result.astype(self.output_dtype)
        return {self.output_name: common.fit_to_dims(result, self.output_dims, self.batched)}


BACKEND = SklearnBackend()
