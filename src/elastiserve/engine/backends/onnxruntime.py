"""ONNX models on ONNX Runtime's CPU execution provider (Triton's ``onnxruntime`` backend).

Config keys read (``parameters { key: K value { string_value: V } }``, named as Triton's
onnxruntime_backend names them):

* ``intra_op_thread_count``: threads inside one operator. Not set -> the CPUs this process may
  use shared among the model's instances, at most 4; ``"0"`` -> ONNX Runtime's own default
  (one per core), as in Triton.
* ``inter_op_thread_count``, ``execution_mode`` (0 sequential, 1 parallel),
  ``enable_mem_arena``, ``enable_mem_pattern``, ``optimization { graph { level } }``.
* any ``session.*`` key is passed to ``SessionOptions.add_session_config_entry``. We default
  ``session.intra_op.allow_spinning`` and ``session.inter_op.allow_spinning`` to ``"0"``: idle
  pool threads that spin would show up as CPU load and mislead CPU-based autoscaling.

Auto-complete follows Triton's backend (``AutoCompleteConfig``/``AutoCompleteMaxBatch``): a
model whose inputs and outputs all have a dynamic first dimension can batch, so a
``max_batch_size`` of 0 becomes :attr:`OnnxRuntimeBackend.default_max_batch_size` (4, Triton's
``default-max-batch-size``) and ``dynamic_batching {}`` is added when no scheduler is set;
missing ``input``/``output`` lists are filled from the graph. Beyond Triton, an entry the user
wrote with only a name gets its ``data_type``/``dims`` from the graph. Every configured tensor is
then checked against the graph; a mismatch is a :class:`ConfigError` naming model and tensor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort
from tritonclient.grpc import model_config_pb2 as mc

from elastiserve.engine.backends import _common as common
from elastiserve.engine.backends.base import ArrayModelInstance, ModelContext, Parallelism
from elastiserve.engine.config import control_input_names
from elastiserve.errors import ConfigError, InvalidArgument
from elastiserve.types import as_bytes_array

if TYPE_CHECKING:
    from tritonclient.grpc.model_config_pb2 import ModelConfig

log = logging.getLogger(__name__)

DEFAULT_FILENAME = "model.onnx"

# ONNX Runtime's NodeArg.type strings -> config data types.
_ONNX_TO_CONFIG: dict[str, int] = {
    "tensor(bool)": mc.TYPE_BOOL,
    "tensor(uint8)": mc.TYPE_UINT8,
    "tensor(uint16)": mc.TYPE_UINT16,
    "tensor(uint32)": mc.TYPE_UINT32,
    "tensor(uint64)": mc.TYPE_UINT64,
    "tensor(int8)": mc.TYPE_INT8,
    "tensor(int16)": mc.TYPE_INT16,
    "tensor(int32)": mc.TYPE_INT32,
    "tensor(int64)": mc.TYPE_INT64,
    "tensor(float16)": mc.TYPE_FP16,
    "tensor(float)": mc.TYPE_FP32,
    "tensor(double)": mc.TYPE_FP64,
    "tensor(string)": mc.TYPE_STRING,
    "tensor(bfloat16)": mc.TYPE_BF16,
}


@dataclass(slots=True)
class _TensorInfo:
    """What the graph says about one input or output."""

    name: str
    onnx_type: str
    dims: list[int]  # -1 for dynamic (symbolic or unknown) dimensions

    @property
    def config_type(self) -> int | None:
        return _ONNX_TO_CONFIG.get(self.onnx_type)

    @property
    def is_tensor(self) -> bool:
        return self.onnx_type.startswith("tensor(")


def _infos(args: list[Any]) -> dict[str, _TensorInfo]:
    out: dict[str, _TensorInfo] = {}
    for arg in args:
        shape = arg.shape if isinstance(arg.shape, list | tuple) else []
        dims = [d if isinstance(d, int) and d >= 0 else -1 for d in shape]
        out[arg.name] = _TensorInfo(arg.name, arg.type, dims)
    return out


def _session_options(config: ModelConfig) -> ort.SessionOptions:
    """Triton's onnxruntime_backend options, with thread defaults sized for a small shared box."""
    label = common.model_label(config)
    options = ort.SessionOptions()
    level = config.optimization.graph.level if config.HasField("optimization") else 0
    options.graph_optimization_level = {
        -1: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        1: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        2: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }.get(level, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)

    mode = common.param_int(config, "execution_mode", 0)
    if mode not in (0, 1):
        raise ConfigError(f"model '{label}': execution_mode must be 0 or 1, got {mode}")
    options.execution_mode = ort.ExecutionMode.ORT_PARALLEL if mode else ort.ExecutionMode.ORT_SEQUENTIAL

    intra = common.param_int(config, "intra_op_thread_count", -1)
    options.intra_op_num_threads = common.default_threads(config) if intra < 0 else intra
    inter = common.param_int(config, "inter_op_thread_count", 0)
    if inter > 0:
        options.inter_op_num_threads = inter

    if "enable_mem_arena" in config.parameters:
        options.enable_cpu_mem_arena = common.param_bool(config, "enable_mem_arena", True)
    if "enable_mem_pattern" in config.parameters:
        options.enable_mem_pattern = common.param_bool(config, "enable_mem_pattern", True)

    entries = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}
    for key, value in config.parameters.items():
        if key.startswith("session."):
            entries[key] = value.string_value
    for key, value in entries.items():
        try:
            options.add_session_config_entry(key, value)
        except Exception as exc:
            raise ConfigError(f"model '{label}': session option '{key}'='{value}' rejected: {exc}") from None
    return options


def _load_session(path: Path, config: ModelConfig, options: ort.SessionOptions) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ConfigError(
            f"model '{common.model_label(config)}': cannot load ONNX model '{path}': {exc}"
        ) from None


def _model_dims(tensor: mc.ModelInput | mc.ModelOutput) -> list[int]:
    """The shape the model sees for a config tensor: its ``reshape`` when given, else ``dims``."""
    return list(tensor.reshape.shape) if tensor.HasField("reshape") else list(tensor.dims)


def _check_tensor(
    config: ModelConfig, kind: str, tensor: mc.ModelInput | mc.ModelOutput, infos: dict[str, _TensorInfo]
) -> None:
    """Triton's ValidateInputs/ValidateOutputs for one configured tensor."""
    label = common.model_label(config)
    info = infos.get(tensor.name)
    if info is None:
        allowed = ", ".join(f"'{n}'" for n in infos)
        raise ConfigError(
            f"unable to load model '{label}', configuration expects {kind} '{tensor.name}' "
            f"which the model does not provide; model {kind}s are: {allowed}"
        )
    if not info.is_tensor or info.config_type is None:
        raise ConfigError(
            f"unable to load model '{label}', {kind} '{tensor.name}' has type {info.onnx_type}, which "
            "cannot be served (for scikit-learn conversions use skl2onnx's zipmap=False)"
        )
    if tensor.data_type != info.config_type:
        raise ConfigError(
            f"unable to load model '{label}', configuration expects datatype "
            f"{common.type_name(tensor.data_type)} for {kind} '{tensor.name}', model provides "
            f"{common.type_name(info.config_type)}"
        )
    dims = _model_dims(tensor)
    if config.max_batch_size > 0:
        if not info.dims or info.dims[0] != -1 or not common.dims_compatible(dims, info.dims[1:]):
            raise ConfigError(
                f"model '{label}', tensor '{tensor.name}': for the model to support batching the shape "
                "should have at least 1 dimension and the first dimension must be -1, followed by "
                f"the configured dims {common.shape_str(dims)}; but shape expected by the model is "
                f"{common.shape_str(info.dims)}"
            )
    elif not common.dims_compatible(dims, info.dims):
        raise ConfigError(
            f"model '{label}', tensor '{tensor.name}': the model expects {len(info.dims)} dimensions "
            f"(shape {common.shape_str(info.dims)}) but the model configuration specifies "
            f"{len(dims)} dimensions (shape {common.shape_str(dims)})"
        )


def validate_against_model(
    config: ModelConfig,
    inputs: dict[str, _TensorInfo],
    outputs: dict[str, _TensorInfo],
    initializers: dict[str, _TensorInfo] | None = None,
) -> None:
    """Every configured input/output exists in the graph with the same type and compatible dims.

    ``initializers`` (overridable initializers) may be configured as ``optional`` inputs, as in
    Triton; the required inputs must be exactly the graph's inputs.
    """
    label = common.model_label(config)
    known = {**(initializers or {}), **inputs}
    controls = control_input_names(config)  # fed by the sequence batcher, not listed in `input`
    for tensor in config.input:
        _check_tensor(config, "input", tensor, known)
    for name in sorted(controls):
        if name not in inputs:
            raise ConfigError(
                f"unable to load model '{label}', sequence batching control or state input '{name}' "
                "is not an input of the model"
            )
    required = [t.name for t in config.input if not t.optional and t.name not in controls] + sorted(controls)
    if len(required) != len(inputs):
        raise ConfigError(
            f"unable to load model '{label}', configuration expects {len(required)} inputs, "
            f"model provides {len(inputs)}"
        )
    for tensor in config.output:
        _check_tensor(config, "output", tensor, outputs)


def _fill(
    config: ModelConfig,
    existing: Any,  # RepeatedCompositeFieldContainer of ModelInput or ModelOutput
    infos: dict[str, _TensorInfo],
    kind: str,
) -> None:
    """Fill a missing list from the graph, or the missing type/dims of entries the user named.

    A partial ``input`` list also gets the graph inputs it leaves out (every input is required);
    a partial ``output`` list is kept as it is, since serving a subset of outputs is legitimate.
    """
    batched = config.max_batch_size > 0
    named = {t.name for t in existing} | (control_input_names(config) if kind == "input" else set())
    if len(existing) == 0 or kind == "input":
        for info in infos.values():
            if info.name in named:
                continue
            if not info.is_tensor or info.config_type is None:
                log.warning(
                    "model '%s': %s '%s' of type %s cannot be served and is left out of the config",
                    common.model_label(config),
                    kind,
                    info.name,
                    info.onnx_type,
                )
                continue
            tensor = existing.add()
            tensor.name = info.name
            _fill_entry(tensor, info, batched)
    for tensor in existing:
        found = infos.get(tensor.name)
        if found is not None and found.is_tensor and found.config_type is not None:
            if tensor.data_type == mc.TYPE_INVALID:
                tensor.data_type = found.config_type
            if not tensor.dims and not tensor.HasField("reshape"):
                _fill_entry(tensor, found, batched, type_too=False)


def _fill_entry(tensor: Any, info: _TensorInfo, batched: bool, type_too: bool = True) -> None:
    if type_too:
        assert info.config_type is not None
        tensor.data_type = info.config_type
    dims = info.dims[1:] if batched else list(info.dims)
    if dims:
        tensor.dims.extend(dims)
    else:  # a scalar per batch item: Triton writes dims [1] with an empty reshape
        tensor.dims.append(1)
        if batched:
            tensor.reshape.SetInParent()


def _needs_completion(config: ModelConfig) -> bool:
    if not config.input or not config.output:
        return True
    tensors = list(config.input) + list(config.output)
    return any(t.data_type == mc.TYPE_INVALID or (not t.dims and not t.HasField("reshape")) for t in tensors)


class OnnxRuntimeBackend:
    """``BACKEND`` for ``backend: "onnxruntime"`` / ``platform: "onnxruntime_onnx"``."""

    name = "onnxruntime"
    parallelism: Parallelism = "thread"  # InferenceSession.run releases the GIL and is thread-safe

    def __init__(self) -> None:
        # Triton's --backend-config=onnxruntime,default-max-batch-size=N (4 unless set).
        self.default_max_batch_size = 4

    def auto_complete_config(self, config: ModelConfig, model_dir: Path, version: int | None) -> None:
        if not config.backend and not config.platform:
            config.backend = self.name
        if not config.platform:
            config.platform = "onnxruntime_onnx"
        if not config.name:
            config.name = model_dir.name
        if not _needs_completion(config):
            return  # Triton skips auto-complete when inputs and outputs are given
        path = common.find_model_file(config, model_dir, version, DEFAULT_FILENAME)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = _load_session(path, config, options)
        inputs, outputs = _infos(session.get_inputs()), _infos(session.get_outputs())
        initializers = _infos(session.get_overridable_initializers())
        del session

        can_batch = all(
            info.dims and info.dims[0] == -1
            for info in [*inputs.values(), *outputs.values()]
            if info.is_tensor
        )
        label = common.model_label(config, model_dir)
        if can_batch:
            if config.max_batch_size == 0:
                config.max_batch_size = max(self.default_max_batch_size, 0)
                log.warning(
                    "autofilled max_batch_size to %d for model '%s' since batching is supported but no "
                    "max_batch_size is specified in model configuration",
                    config.max_batch_size,
                    label,
                )
            has_scheduler = config.HasField("dynamic_batching") or config.HasField("sequence_batching")
            if config.max_batch_size > 1 and not has_scheduler:
                config.dynamic_batching.SetInParent()
        elif config.max_batch_size != 0:
            raise ConfigError(
                f"autofill failed for model '{label}': model does not support batching while non-zero "
                "max_batch_size is specified"
            )
        _fill(config, config.input, inputs, "input")
        _fill(config, config.output, outputs, "output")
        validate_against_model(config, inputs, outputs, initializers)

    def create_instance(self, context: ModelContext) -> OnnxRuntimeInstance:
        return OnnxRuntimeInstance(context)


class OnnxRuntimeInstance(ArrayModelInstance):
    """One ``InferenceSession``; inputs are cast to the graph's types only when they differ."""

    def __init__(self, context: ModelContext) -> None:
        super().__init__(context)
        config = context.config
        path = context.model_file(DEFAULT_FILENAME)
        if not path.exists():
            raise ConfigError(f"model '{context.name}': model file '{path}' not found")
        self.session = _load_session(path, config, _session_options(config))
        graph_inputs = _infos(self.session.get_inputs())
        initializers = _infos(self.session.get_overridable_initializers())
        outputs = _infos(self.session.get_outputs())
        validate_against_model(config, graph_inputs, outputs, initializers)
        inputs = {**initializers, **graph_inputs}
        # Optional (initializer) inputs keep their stored values: only required inputs are fed.
        controls = control_input_names(config)
        self.input_names = [
            t.name for t in config.input if not t.optional and t.name not in controls
        ] + sorted(controls) or list(graph_inputs)
        # Only configured outputs; all (tensor) outputs when the config lists none.
        self.output_names = [o.name for o in config.output] or [
            i.name for i in outputs.values() if i.is_tensor and i.config_type is not None
        ]
        self._dtypes = {
            name: common.config_dtype(info.config_type)
            for name, info in inputs.items()
            if info.config_type is not None and info.config_type != mc.TYPE_BF16
        }
        self._string_inputs = {name for name, info in inputs.items() if info.config_type == mc.TYPE_STRING}
        self._input_reshape = {t.name: list(t.reshape.shape) for t in config.input if t.HasField("reshape")}
        self._output_dims = {t.name: list(t.dims) for t in config.output}

    def _prepare(self, name: str, array: np.ndarray) -> np.ndarray:
        if name in self._input_reshape:
            lead = [array.shape[0]] if self.batched and array.ndim else []
            array = array.reshape(lead + self._input_reshape[name])
        if name in self._string_inputs:
            if array.dtype.kind != "U":  # ORT wants str; BYTES arrive as bytes objects
                flat = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in array.flat]
                array = np.array(flat, dtype=object).reshape(array.shape)
            return array
        expected = self._dtypes.get(name)
        if expected is not None and array.dtype != expected:
            if array.dtype == np.object_:
                raise InvalidArgument(
                    f"input '{name}' of model '{self.context.name}' must be {expected}, got BYTES"
                )
            array = array.astype(expected)
        return array

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {name: self._prepare(name, array) for name, array in inputs.items()}
        results = self.session.run(self.output_names, feed)
        out: dict[str, np.ndarray] = {}
        for name, value in zip(self.output_names, results, strict=True):
            array = np.asarray(value)
            if array.dtype == np.object_ or array.dtype.kind == "U":
                array = as_bytes_array(array)
            dims = self._output_dims.get(name)
            out[name] = common.fit_to_dims(array, dims, self.batched) if dims else array
        return out

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]


BACKEND = OnnxRuntimeBackend()
