"""config.pbtxt -> ``tritonclient.grpc.model_config_pb2.ModelConfig``, validation and defaults.

Parsing is protobuf's ``text_format`` (so field names, enums and "unknown field" errors are
exactly Triton's); this module adds what Triton's model_config_utils does around it: the
model name must match its directory, default instance groups, backend auto-detection from the
files present, and the structural checks that make a config unusable.
"""

from __future__ import annotations

import re
from pathlib import Path

from google.protobuf import json_format, text_format
from tritonclient.grpc.model_config_pb2 import DataType, ModelConfig, ModelInstanceGroup

from elastiserve.errors import ConfigError

CONFIG_FILENAME = "config.pbtxt"

# File present in a version folder -> backend, used when a config names none (Triton does this
# for ONNX/TorchScript/Python when auto-complete is enabled).
_FILE_TO_BACKEND = {
    "model.onnx": "onnxruntime",
    "model.pt": "pytorch",
    "model.py": "python",
    "model.joblib": "sklearn",
    "model.pkl": "sklearn",
}

_LINE_COL = re.compile(r"^(\d+):(\d+)\s*:\s*(.*)$", re.S)


def parse_config_text(text: str, model_name: str, source: str = CONFIG_FILENAME) -> ModelConfig:
    """Parse config text; a syntax error names the model, file, line and field."""
    config = ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        detail = str(exc)
        match = _LINE_COL.match(detail)
        if match:
            line, col, msg = match.groups()
            raise ConfigError(
                f"model '{model_name}': {source} line {line} column {col}: {msg.strip()}"
            ) from None
        raise ConfigError(f"model '{model_name}': {source}: {detail}") from None
    return config


def parse_config_json(text: str, model_name: str) -> ModelConfig:
    """A config given as JSON (the repository-load ``config`` override)."""
    config = ModelConfig()
    try:
        json_format.Parse(text, config)
    except json_format.ParseError as exc:
        raise ConfigError(f"model '{model_name}': invalid config override: {exc}") from None
    return config


def read_model_config(model_dir: Path, strict: bool) -> ModelConfig:
    """Read ``<model_dir>/config.pbtxt``; without it (and not strict) start from an empty config."""
    name = model_dir.name
    path = model_dir / CONFIG_FILENAME
    if path.is_file():
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"model '{name}': cannot read {CONFIG_FILENAME}: {exc}") from None
        return parse_config_text(text, name)
    if strict:
        raise ConfigError(
            f"model '{name}': {CONFIG_FILENAME} not found (and --strict-model-config does not "
            "allow auto-completing it)"
        )
    return ModelConfig()


def detect_backend(model_dir: Path, config: ModelConfig) -> None:
    """Fill ``backend`` from the files of the version folders when neither backend nor platform is set."""
    if config.backend or config.platform:
        return
    for version_dir in sorted(model_dir.iterdir(), reverse=True):
        if not version_dir.is_dir() or not version_dir.name.isdigit():
            continue
        filename = config.default_model_filename
        if filename and (version_dir / filename).exists():
            suffix_backend = _FILE_TO_BACKEND.get("model" + Path(filename).suffix)
            if suffix_backend:
                config.backend = suffix_backend
                return
        for candidate, backend in _FILE_TO_BACKEND.items():
            if (version_dir / candidate).exists():
                config.backend = backend
                return
    raise ConfigError(
        f"model '{model_dir.name}': no backend or platform in the config and none can be inferred "
        "from the model files"
    )


def apply_defaults(config: ModelConfig, model_name: str) -> None:
    """Defaults Triton fills in before a model loads."""
    if not config.name:
        config.name = model_name
    if not config.instance_group:
        config.instance_group.append(ModelInstanceGroup(count=1, kind=ModelInstanceGroup.KIND_CPU))
    for index, group in enumerate(config.instance_group):
        if not group.name:
            group.name = f"{config.name}_{index}"
        if group.count < 1:
            group.count = 1
        if group.kind in (ModelInstanceGroup.KIND_AUTO, ModelInstanceGroup.KIND_GPU):
            # No GPU here: Triton's KIND_AUTO resolves to CPU without GPUs; KIND_GPU is served on CPU.
            group.kind = ModelInstanceGroup.KIND_CPU
    if config.HasField("dynamic_batching") and config.max_batch_size > 0:
        batching = config.dynamic_batching
        if not batching.preferred_batch_size:
            pass  # Triton: batch up to max_batch_size when no preferred size is given.


def validate_config(config: ModelConfig, model_name: str) -> None:
    """Structural checks; each failure names the model and the offending field."""
    prefix = f"model '{model_name}'"
    if config.name != model_name:
        raise ConfigError(
            f"{prefix}: config name '{config.name}' does not match the model directory '{model_name}'"
        )
    if config.max_batch_size < 0:
        raise ConfigError(f"{prefix}: max_batch_size must be >= 0, got {config.max_batch_size}")
    is_ensemble = config.platform == "ensemble"
    for kind, tensors in (("input", config.input), ("output", config.output)):
        seen: set[str] = set()
        for tensor in tensors:
            if not tensor.name:
                raise ConfigError(f"{prefix}: an {kind} has no name")
            if tensor.name in seen:
                raise ConfigError(f"{prefix}: {kind} '{tensor.name}' is declared twice")
            seen.add(tensor.name)
            if tensor.data_type == DataType.TYPE_INVALID:
                raise ConfigError(f"{prefix}: {kind} '{tensor.name}' has no data_type")
            if not tensor.dims and not tensor.HasField("reshape") and not is_ensemble and config.max_batch_size == 0:
                raise ConfigError(f"{prefix}: {kind} '{tensor.name}' must specify dims")
            for dim in tensor.dims:
                if dim == 0 or dim < -1:
                    raise ConfigError(
                        f"{prefix}: {kind} '{tensor.name}' dims must be positive or -1, got {list(tensor.dims)}"
                    )
    if config.HasField("dynamic_batching"):
        for size in config.dynamic_batching.preferred_batch_size:
            if size < 1 or (config.max_batch_size > 0 and size > config.max_batch_size):
                raise ConfigError(
                    f"{prefix}: dynamic_batching preferred_batch_size {size} must be in "
                    f"[1, max_batch_size={config.max_batch_size}]"
                )
    policy = config.version_policy
    if policy.HasField("latest") and policy.latest.num_versions < 1:
        raise ConfigError(f"{prefix}: version_policy latest num_versions must be >= 1")


def config_to_json_dict(config: ModelConfig) -> dict:
    """The config as Triton prints it over JSON: proto field names, all fields, int64 as numbers."""
    data = json_format.MessageToDict(
        config, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return _int64_strings_to_numbers(config.DESCRIPTOR, data)


def _int64_strings_to_numbers(descriptor, data):  # type: ignore[no-untyped-def]
    """MessageToDict renders (u)int64 as strings; Triton's JSON has numbers."""
    from google.protobuf.descriptor import FieldDescriptor

    int64_types = {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        if field.type in int64_types:
            if isinstance(value, list):
                data[field.name] = [int(v) for v in value]
            else:
                data[field.name] = int(value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            sub = field.message_type
            if sub.GetOptions().map_entry:
                value_field = sub.fields_by_name["value"]
                if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                    for key in value:
                        _int64_strings_to_numbers(value_field.message_type, value[key])
                elif value_field.type in int64_types:
                    data[field.name] = {k: int(v) for k, v in value.items()}
            elif isinstance(value, list):
                for item in value:
                    _int64_strings_to_numbers(sub, item)
            elif isinstance(value, dict):
                _int64_strings_to_numbers(sub, value)
    return data


def control_input_names(config: ModelConfig) -> set[str]:
    """Inputs the sequence batcher injects (control inputs and implicit state): never sent by
    clients, but inputs of the model all the same."""
    if not config.HasField("sequence_batching"):
        return set()
    names = {c.name for c in config.sequence_batching.control_input}
    names.update(s.input_name for s in config.sequence_batching.state)
    return names
