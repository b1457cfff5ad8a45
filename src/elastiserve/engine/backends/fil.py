"""Tree models the way Triton's FIL backend serves them: ``backend: "fil"``.

Runs XGBoost (``xgboost.Booster.inplace_predict``) and LightGBM (``lightgbm.Booster.predict``)
natively rather than through RAPIDS FIL, with FIL's model configuration and output semantics,
so a FIL model directory works unchanged. Both libraries are called through ctypes, which
releases the GIL, and their predict calls are thread-safe: ``parallelism = "thread"``.

Config keys (``parameters``, string values, as FIL names them):

* ``model_type``: ``xgboost`` (default; file ``xgboost.model``), ``xgboost_json``
  (``xgboost.json``), ``xgboost_ubj`` (``xgboost.ubj``), ``lightgbm`` (``model.txt``),
  ``sklearn`` (ours: a joblib/pickle tree ensemble, ``model.joblib``; same trust boundary as the
  sklearn backend, a pickle runs code when loaded), ``treelite_checkpoint`` (``checkpoint.tl``)
  is recognised and refused with an Unsupported error: re-export the model in a native format.
* ``output_class`` (default ``false``): a classifier returns class ids (FP32): argmax for
  multi-class, ``score > threshold`` for binary. ``false`` returns the model's score.
* ``predict_proba`` (default ``false``): one probability per class; a binary model returns two
  columns ``[1 - p, p]``, as FIL does.
* ``threshold`` (default ``0.5``): binary decision threshold.
* ``cpu_nthread``: threads per prediction; default: the CPUs this process may use shared among
  the model's instances (at most 4).

I/O as FIL names it: input ``input__0`` ``TYPE_FP32`` ``[features]``, output ``output__0``
``TYPE_FP32`` (``[1]``, or ``[classes]`` with ``predict_proba``). Inputs of another numeric
type are cast to FP32 (FIL computes in single precision). Auto-complete (ours; Triton's FIL has
none) fills missing ``input``/``output`` entries from the model, and when the config lists no
inputs a ``max_batch_size`` of 0 becomes 4 with ``dynamic_batching {}``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from elastiserve.engine.backends import _common as common
from elastiserve.engine.backends.base import ArrayModelInstance, ModelContext, Parallelism
from elastiserve.errors import ConfigError, InvalidArgument, Unsupported

if TYPE_CHECKING:
    from tritonclient.grpc.model_config_pb2 import ModelConfig

log = logging.getLogger(__name__)

# FIL's default file name for each model_type.
DEFAULT_FILENAMES: dict[str, str] = {
    "xgboost": "xgboost.model",
    "xgboost_json": "xgboost.json",
    "xgboost_ubj": "xgboost.ubj",
    "lightgbm": "model.txt",
    "treelite_checkpoint": "checkpoint.tl",
    "sklearn": "model.joblib",
}
DEFAULT_MAX_BATCH_SIZE = 4


@dataclass(slots=True)
class Forest:
    """A loaded tree model: ``predict`` gives scores, ``[N]`` (binary/regression) or ``[N, C]``."""

    predict: Callable[[np.ndarray], np.ndarray]
    num_features: int
    num_classes: int  # 1 for regression and binary models, as in Treelite
    class_ids_only: bool = False  # e.g. XGBoost multi:softmax already returns class ids


def model_type(config: ModelConfig) -> str:
    kind = (common.param_str(config, "model_type", "xgboost") or "xgboost").strip()
    if kind not in DEFAULT_FILENAMES:
        raise ConfigError(
            f"model '{common.model_label(config)}': unknown FIL model_type '{kind}'; expected one of "
            f"{', '.join(DEFAULT_FILENAMES)}"
        )
    return kind


def _load_xgboost(path: Path, threads: int) -> Forest:
    import xgboost as xgb

    booster = xgb.Booster()
    # From bytes, so XGBoost detects JSON/UBJSON/legacy binary by content, not file extension.
    booster.load_model(bytearray(path.read_bytes()))
    booster.set_param({"nthread": threads})
    learner = json.loads(booster.save_config())["learner"]
    num_class = int(learner["learner_model_param"].get("num_class", "0") or 0)
    objective = learner.get("objective", {}).get("name", "")

    def predict(x: np.ndarray) -> np.ndarray:
        return np.asarray(booster.inplace_predict(x, validate_features=False))

    return Forest(predict, booster.num_features(), max(num_class, 1), objective == "multi:softmax")


def _load_lightgbm(path: Path, threads: int) -> Forest:
    import lightgbm as lgb

    booster = lgb.Booster(model_file=str(path))
    num_classes = max(1, booster.num_model_per_iteration())  # C for multi-class, else 1

    def predict(x: np.ndarray) -> np.ndarray:
        return np.asarray(booster.predict(x, num_threads=threads))

    return Forest(predict, booster.num_feature(), num_classes)


def _load_sklearn(path: Path, config: ModelConfig) -> Forest:
    from elastiserve.engine.backends.sklearn import load_estimator

    estimator = load_estimator(path, config)
    features = int(getattr(estimator, "n_features_in_", 0) or 0)
    classes = getattr(estimator, "classes_", None)
    if classes is not None and callable(getattr(estimator, "predict_proba", None)):
        n = len(classes)

        def proba(x: np.ndarray) -> np.ndarray:
            p = estimator.predict_proba(x)
            return p[:, 1] if n == 2 else p

        return Forest(proba, features, 1 if n == 2 else n)
    return Forest(estimator.predict, features, 1)


def load_forest(path: Path, kind: str, config: ModelConfig, threads: int = 1) -> Forest:
    """Load ``path`` as ``kind``; unreadable files become a ConfigError naming model and file."""
    label = common.model_label(config)
    if kind == "treelite_checkpoint":
        raise Unsupported(
            f"model '{label}': FIL model_type 'treelite_checkpoint' is not supported by elastiserve; "
            "export the model as XGBoost JSON/UBJSON or LightGBM text and set model_type accordingly"
        )
    if not path.exists():
        raise ConfigError(f"model '{label}': model file '{path}' not found (model_type '{kind}')")
    if kind == "sklearn":
        return _load_sklearn(path, config)
    try:
        if kind == "lightgbm":
            return _load_lightgbm(path, threads)
        return _load_xgboost(path, threads)
    except Exception as exc:
        raise ConfigError(
            f"model '{label}': cannot load {kind} model '{path}': {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None


@dataclass(slots=True)
class Options:
    """FIL's output parameters."""

    output_class: bool
    predict_proba: bool
    threshold: float

    @classmethod
    def from_config(cls, config: ModelConfig) -> Options:
        return cls(
            common.param_bool(config, "output_class", False),
            common.param_bool(config, "predict_proba", False),
            common.param_float(config, "threshold", 0.5),
        )


def output_width(forest: Forest, options: Options) -> int:
    """Values per row of ``output__0``."""
    if options.predict_proba:
        return 2 if forest.num_classes == 1 else forest.num_classes
    return 1


def postprocess(scores: np.ndarray, forest: Forest, options: Options) -> np.ndarray:
    """FIL's output semantics on raw scores -> FP32 ``[N, width]``."""
    scores = np.asarray(scores, dtype=np.float32)
    rows = scores.shape[0]
    if options.predict_proba:
        if scores.ndim == 1:
            return np.stack([1.0 - scores, scores], axis=1)
        return scores.reshape(rows, -1)
    if options.output_class:
        if forest.class_ids_only:
            return scores.reshape(rows, 1)
        if scores.ndim > 1 and scores.shape[1] > 1:
            return np.argmax(scores, axis=1).astype(np.float32).reshape(rows, 1)
        return (scores.reshape(rows, 1) > options.threshold).astype(np.float32)
    return scores.reshape(rows, -1)


class FilBackend:
    """``BACKEND`` for ``backend: "fil"``."""

    name = "fil"
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
        kind = model_type(config)
        path = common.find_model_file(config, model_dir, version, DEFAULT_FILENAMES[kind])
        forest = load_forest(path, kind, config)
        options = Options.from_config(config)
        if config.max_batch_size == 0 and not config.input:
            config.max_batch_size = DEFAULT_MAX_BATCH_SIZE
            if not config.HasField("dynamic_batching") and not config.HasField("sequence_batching"):
                config.dynamic_batching.SetInParent()
        lead = [] if config.max_batch_size > 0 else [-1]
        if not config.input:
            config.input.add(name="input__0")
        if not config.output:
            config.output.add(name="output__0")
        for tensor, width in (
            (config.input[0], forest.num_features),
            (config.output[0], output_width(forest, options)),
        ):
            if tensor.data_type == mc.TYPE_INVALID:
                tensor.data_type = mc.TYPE_FP32
            if not tensor.dims:
                tensor.dims.extend([*lead, width])
        validate(config, forest, options)

    def create_instance(self, context: ModelContext) -> FilInstance:
        return FilInstance(context)


def validate(config: ModelConfig, forest: Forest, options: Options) -> None:
    """One input with the model's feature count; one output whose width matches the options."""
    label = common.model_label(config)
    if len(config.input) != 1 or len(config.output) != 1:
        raise ConfigError(
            f"model '{label}': a FIL model has one input (input__0) and one output (output__0; FIL's "
            f"treeshap_output is not supported); the config lists {len(config.input)} inputs and "
            f"{len(config.output)} outputs"
        )
    lead = 0 if config.max_batch_size > 0 else 1
    tensor = config.input[0]
    dims = list(tensor.dims)[lead:]
    if forest.num_features and dims and -1 not in dims and int(np.prod(dims)) != forest.num_features:
        raise ConfigError(
            f"model '{label}': input '{tensor.name}' has dims {common.shape_str(tensor.dims)} but the "
            f"model takes {forest.num_features} features"
        )
    out = config.output[0]
    dims = list(out.dims)[lead:]
    width = output_width(forest, options)
    if dims and -1 not in dims and int(np.prod(dims)) != width:
        raise ConfigError(
            f"model '{label}': output '{out.name}' has dims {common.shape_str(out.dims)} but the model "
            f"returns {width} values per row with output_class={str(options.output_class).lower()}, "
            f"predict_proba={str(options.predict_proba).lower()}"
        )


class FilInstance(ArrayModelInstance):
    """One loaded forest; FP32 ``[N, features]`` in, FP32 ``output__0`` out."""

    def __init__(self, context: ModelContext) -> None:
        super().__init__(context)
        config = context.config
        kind = model_type(config)
        threads = common.param_int(config, "cpu_nthread", -1)
        if threads <= 0:
            threads = common.default_threads(config)
        self.forest = load_forest(context.model_file(DEFAULT_FILENAMES[kind]), kind, config, threads)
        self.options = Options.from_config(config)
        validate(config, self.forest, self.options)
        self.output_name = config.output[0].name
        self.output_dims = list(config.output[0].dims)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x: Any = inputs[self.input_names[0]]
        if x.dtype == np.object_:
            raise InvalidArgument(f"model '{self.context.name}': input '{self.input_names[0]}' must be FP32")
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        if x.ndim != 2:
            x = x.reshape(x.shape[0] if x.ndim else 1, -1)
        result = postprocess(self.forest.predict(x), self.forest, self.options)
        return {self.output_name: common.fit_to_dims(result, self.output_dims, self.batched)}


BACKEND = FilBackend()
