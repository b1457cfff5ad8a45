"""The service spec: one pydantic model that is the JSON file, the REST body and the stored record.

Field names are EAS's (PAI-EAS service description) so a ``service.json`` written for EAS works
here unchanged. Every model forbids unknown fields, and :func:`parse_spec` turns pydantic's
errors into :class:`SpecError`, whose lines name the field path (``metadata.instnace: unknown
field``), so no user ever sees a traceback for a typo.

EAS writes nested metadata both ways, ``{"rpc": {"keepalive": 5000}}`` and
``{"rpc.keepalive": 5000}``; both are accepted and normalised to the nested form.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from elastiserve.errors import ConfigError

#: Processors that take ``model_path`` and build a model repository themselves.
SHORTCUT_PROCESSORS: tuple[str, ...] = ("onnx", "sklearn", "xgboost", "lightgbm", "pytorch", "python")
#: Every processor name a spec may give; a custom service gives ``containers`` instead.
PROCESSORS: tuple[str, ...] = ("triton", *SHORTCUT_PROCESSORS)
#: URL schemes ``model_path`` (and ``warm_up_data_path``) may use; no scheme means a local path.
MODEL_PATH_SCHEMES: tuple[str, ...] = ("s3", "oss", "http", "https", "file")

# DNS-label-ish, plus '_' because EAS names (the seed's "triton_test") use it. A name is a URL path
# segment and a file name on disk, so '.', '/', '%' and upper case are never allowed.
NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
NAME_RULE = "lowercase letters, digits, '_' and '-', starting with a letter, at most 63 characters"
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PERCENT_RE = re.compile(r"^(\d{1,3})%$")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

#: Fields accepted but not acted on yet: path → what happens instead. Setting one gives a warning
#: (see :func:`spec_warnings`); each must be listed in docs/service-spec.md (a test checks).
#: Remove an entry in the same change that implements the field.
NOT_YET_IMPLEMENTED: dict[str, str] = {
    "autoscaler": "stored; enforced once the autoscaler lands",
    "metadata.rpc.batching": "stored; configure dynamic batching in the model's config.pbtxt",
    "metadata.rpc.max_batch_size": "stored; configure dynamic batching in the model's config.pbtxt",
    "metadata.rpc.max_batch_timeout": "stored; configure dynamic batching in the model's config.pbtxt",
    "metadata.rpc.worker_threads": "stored; not passed to instances",
    "metadata.rpc.keepalive": "stored; the gateway applies its own request timeout",
    "metadata.workers": "EAS compatibility; ignored",
    "metadata.gpu_memory": "EAS compatibility; GPUs are allocated whole",
    "metadata.qos": "EAS compatibility; ignored",
    "metadata.cuda": "EAS compatibility; ignored",
    "containers[].image": "used by cluster runtimes only; the local runtime runs command/script directly",
    "oss_endpoint": "stored; configure object storage credentials and endpoint in the environment",
    "cloud": "EAS compatibility (public resource group); ignored",
}


class SpecError(ConfigError):
    """A service spec that cannot be used; ``errors`` holds one ``path: message`` line per problem."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors or ["invalid service spec"]
        super().__init__("; ".join(self.errors))


class _Model(BaseModel):
    """Base for every spec model: strict types, unknown fields rejected, dotted keys expanded."""

    model_config = ConfigDict(extra="forbid", strict=True, protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _expand_dotted_keys(cls, data: Any) -> Any:
        return _expand_dotted(data) if isinstance(data, Mapping) else data


def _expand_dotted(data: Mapping[str, Any]) -> dict[str, Any]:
    """``{"rpc.keepalive": 1}`` → ``{"rpc": {"keepalive": 1}}`` (EAS writes metadata both ways)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str) or "." not in key:
            if key in out and isinstance(out[key], dict) and isinstance(value, Mapping):
                out[key] = _merge_unique(out[key], dict(value), str(key))
            else:
                if key in out:
                    raise PydanticCustomError("at:" + str(key), "given twice")
                out[key] = value
            continue
        head, rest = key.split(".", 1)
        existing = out.get(head)
        if existing is not None and not isinstance(existing, dict):
            raise PydanticCustomError("at:" + key, "conflicts with {head}", {"head": head})
        merged = dict(existing or {})
        out[head] = _merge_unique(merged, {rest: value}, head)
    return out


def _merge_unique(base: dict[str, Any], extra: dict[str, Any], where: str) -> dict[str, Any]:
    for key, value in extra.items():
        if key in base and not (isinstance(base[key], dict) and isinstance(value, Mapping)):
            raise PydanticCustomError("at:" + f"{where}.{key}", "given twice")
        base[key] = _merge_unique(base[key], dict(value), f"{where}.{key}") if key in base else value
    return base


def _int_or_percent(value: Any) -> int | str:
    """Rolling-update sizes are an instance count or a percentage of instances, as in EAS."""
    if isinstance(value, bool):
        raise PydanticCustomError("int_or_percent", "expected an integer or a percentage like '25%'")
    if isinstance(value, int):
        if value < 0:
            raise PydanticCustomError("int_or_percent", "must be >= 0")
        return value
    if isinstance(value, str):
        match = _PERCENT_RE.match(value.strip())
        if match and int(match.group(1)) <= 100:
            return f"{int(match.group(1))}%"
    raise PydanticCustomError("int_or_percent", "expected an integer or a percentage like '25%'")


IntOrPercent = Annotated[
    int | str,
    PlainValidator(_int_or_percent),
    WithJsonSchema(
        {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": r"^\d{1,3}%$"}]}
    ),
]


class Rpc(_Model):
    """EAS ``metadata.rpc``: request handling knobs applied by the gateway and the engine."""

    batching: bool = False
    max_batch_size: int | None = Field(None, ge=1)
    max_batch_timeout: int | None = Field(None, ge=0, description="milliseconds")
    max_queue_size: int | None = Field(None, ge=1, description="queued requests per instance; over it: 450")
    worker_threads: int | None = Field(None, ge=1)
    keepalive: int | None = Field(None, ge=1, description="request timeout, milliseconds")
    rate_limit: int | None = Field(None, ge=1, description="requests per second per service; over it: 429")


class RollingStrategy(_Model):
    """How a rolling update replaces instances (EAS ``metadata.rolling_strategy``)."""

    max_surge: IntOrPercent = 1
    max_unavailable: IntOrPercent = 0

    def resolve(self, replicas: int) -> tuple[int, int]:
        """(surge, unavailable) as instance counts for ``replicas`` instances.

        Percentages round up for surge and down for unavailable (as Kubernetes does); if both
        come out 0 the update could never progress, so surge becomes 1.
        """
        surge = _resolve(self.max_surge, replicas, math.ceil)
        unavailable = _resolve(self.max_unavailable, replicas, math.floor)
        if surge == 0 and unavailable == 0:
            surge = 1
        return surge, unavailable


def _resolve(value: int | str, replicas: int, rounding: Any) -> int:
    if isinstance(value, int):
        return value
    return int(rounding(replicas * int(value.rstrip("%")) / 100))


class EasMeta(_Model):
    termination_grace_period: int = Field(
        30, ge=0, description="seconds an instance drains before it is killed"
    )


class Metadata(_Model):
    """EAS ``metadata``: instance count and per-instance resources."""

    instance: int = Field(1, ge=0, description="number of instances")
    cpu: float = Field(1, gt=0, description="CPU cores per instance")
    gpu: int = Field(0, ge=0, description="GPUs per instance")
    memory: int = Field(1000, ge=1, description="memory per instance, MB")
    resource: str = Field("", description="resource group; '' is the default group (this machine)")
    enable_grpc: bool = False
    rpc: Rpc = Field(default_factory=Rpc)
    rolling_strategy: RollingStrategy = Field(default_factory=RollingStrategy)
    eas: EasMeta = Field(default_factory=EasMeta)
    # EAS fields accepted for compatibility (see NOT_YET_IMPLEMENTED).
    workers: int | None = Field(None, ge=1)
    gpu_memory: int | None = Field(None, ge=0)
    qos: str | None = None
    cuda: str | None = None

    @field_serializer("cpu")
    def _cpu_as_written(self, cpu: float) -> float | int:
        # Keep "cpu": 4 as 4 in the stored record and in `desc`, not 4.0.
        return int(cpu) if float(cpu).is_integer() else cpu


class EnvVar(_Model):
    name: str
    value: str

    @field_validator("name")
    @classmethod
    def _env_name(cls, name: str) -> str:
        if not _ENV_NAME_RE.match(name):
            raise PydanticCustomError(
                "env_name", "'{name}' is not a valid environment variable name", {"name": name}
            )
        return name


class Prepare(_Model):
    pythonRequirements: list[str] = Field(default_factory=list)


class HttpGet(_Model):
    path: str = Field("/", description="HTTP path; a status in 200-399 means ready")
    port: int | None = Field(None, ge=1, le=65535, description="default: the container's port")

    @field_validator("path")
    @classmethod
    def _absolute(cls, path: str) -> str:
        if not path.startswith("/"):
            raise PydanticCustomError("http_path", "must start with '/'")
        return path


class TcpSocket(_Model):
    port: int | None = Field(None, ge=1, le=65535, description="default: the container's port")


class ReadinessCheck(_Model):
    """EAS ``containers[].readiness_check``: how a custom process shows it is ready (default: a
    TCP connection to its port succeeds)."""

    http_get: HttpGet | None = None
    tcp_socket: TcpSocket | None = None
    initial_delay_seconds: float = Field(0, ge=0)
    period_seconds: float = Field(1, gt=0)
    timeout_seconds: float = Field(1, gt=0)
    failure_threshold: int = Field(3, ge=1)

    @model_validator(mode="after")
    def _one_method(self) -> ReadinessCheck:
        if self.http_get is not None and self.tcp_socket is not None:
            raise PydanticCustomError("readiness_check", "give one of http_get or tcp_socket, not both")
        return self


class Container(_Model):
    """A custom service process: ``command`` (a shell command) or ``script`` (a script's text)."""

    image: str | None = None
    command: str | None = None
    script: str | None = None
    port: int | None = Field(None, ge=1, le=65535, description="port the process listens on")
    env: list[EnvVar] = Field(default_factory=list)
    prepare: Prepare | None = None
    readiness_check: ReadinessCheck | None = None

    @model_validator(mode="after")
    def _one_entrypoint(self) -> Container:
        if (self.command is None) == (self.script is None):
            raise PydanticCustomError("container", "exactly one of command or script is required")
        return self


class ScaleStrategy(_Model):
    metricName: str
    threshold: float
    service: str | None = None


class Autoscaler(_Model):
    """EAS ``autoscaler``: stored now, enforced by the autoscaler (both EAS forms accepted)."""

    min: int = Field(1, ge=0)
    max: int = Field(1, ge=1)
    scaleStrategies: list[ScaleStrategy] = Field(default_factory=list)
    strategies: dict[str, float] = Field(
        default_factory=dict, description="older EAS form: {metric: threshold}"
    )
    behavior: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaler:
        if self.min > self.max:
            raise PydanticCustomError(
                "at:min", "greater than max ({max})", {"min": self.min, "max": self.max}
            )
        return self


class RuntimeOptions(_Model):
    enable_crash_block: bool = Field(
        False, description="leave a crash-looping instance stopped for inspection"
    )
    startup_timeout: float = Field(
        600,
        gt=0,
        description="seconds an instance may take to become ready; one still not ready is killed and "
        "restarted like a crashed one (an instance alive but never ready never serves)",
    )


class ServiceSpec(_Model):
    """An EAS-style service description: ``eascmd create service.json``'s file."""

    name: str = Field(description=f"service name: {NAME_RULE}")
    processor: str | None = Field(
        None, description="one of " + ", ".join(PROCESSORS) + "; omit for containers"
    )
    processor_params: list[str] = Field(default_factory=list, description="passed verbatim to the engine")
    model_path: str | None = Field(None, description="local path, s3://, oss://, http(s):// (archive)")
    model_entry: str | None = None
    # "model_config" is pydantic's own attribute name, so the field lives under another one.
    triton_model_config: dict[str, Any] | str | None = Field(None, alias="model_config")
    token: str | None = Field(None, description="service token for the gateway; generated when omitted")
    labels: dict[str, str] = Field(default_factory=dict)
    warm_up_data_path: str | None = None
    metadata: Metadata = Field(default_factory=Metadata)
    containers: list[Container] | None = None
    autoscaler: Autoscaler | None = None
    runtime: RuntimeOptions = Field(default_factory=RuntimeOptions)
    oss_endpoint: str | None = None
    cloud: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _name_from_metadata(cls, data: Any) -> Any:
        # Newer EAS files put the name in metadata.name; the stored record keeps it at the top.
        if isinstance(data, Mapping):
            data = _expand_dotted(data)
            meta = data.get("metadata")
            if isinstance(meta, Mapping) and "name" in meta:
                meta = dict(meta)
                inner = meta.pop("name")
                if "name" in data and data["name"] != inner:
                    raise PydanticCustomError(
                        "at:name", "'{a}' differs from metadata.name '{b}'", {"a": data["name"], "b": inner}
                    )
                data = {**data, "name": inner, "metadata": meta}
        return data

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        check_service_name(name, error=lambda msg: PydanticCustomError("service_name", msg))
        return name

    @field_validator("token")
    @classmethod
    def _valid_token(cls, token: str | None) -> str | None:
        if token is not None and (len(token) < 8 or any(c.isspace() or ord(c) < 32 for c in token)):
            raise PydanticCustomError(
                "token", "must be at least 8 characters with no spaces or control characters"
            )
        return token

    @field_validator("model_path", "warm_up_data_path")
    @classmethod
    def _valid_location(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not value.strip():
            raise PydanticCustomError("location", "must not be empty")
        match = _SCHEME_RE.match(value)
        if match and match.group(1).lower() not in MODEL_PATH_SCHEMES:
            raise PydanticCustomError(
                "location",
                "unsupported scheme '{scheme}' (use a local path or one of {schemes})",
                {"scheme": match.group(1), "schemes": ", ".join(f"{s}://" for s in MODEL_PATH_SCHEMES)},
            )
        return value

    @model_validator(mode="after")
    def _processor_rules(self) -> ServiceSpec:
        if self.containers is not None:
            if self.processor is not None:
                raise PydanticCustomError(
                    "at:processor",
                    "cannot be combined with containers (a custom service gives only containers)",
                )
            if not self.containers:
                raise PydanticCustomError("at:containers", "must list at least one container")
            if self.containers[0].port is None:
                raise PydanticCustomError(
                    "at:containers[0].port", "required (the port the service listens on)"
                )
            return self
        if self.processor is None:
            raise PydanticCustomError(
                "at:processor",
                "required (one of {names}), or give containers for a custom service",
                {"names": ", ".join(PROCESSORS)},
            )
        if self.processor not in PROCESSORS:
            raise PydanticCustomError(
                "at:processor",
                "unknown processor '{p}' (expected one of {names}, or containers)",
                {"p": self.processor, "names": ", ".join(PROCESSORS)},
            )
        if self.processor == "triton":
            has_repo = any(
                p.startswith("--model-repository") or p.startswith("--model-store")
                for p in self.processor_params
            )
            if not has_repo and self.model_path is None:
                raise PydanticCustomError(
                    "at:processor_params", "the triton processor needs --model-repository=... (or model_path)"
                )
        elif self.model_path is None:
            raise PydanticCustomError(
                "at:model_path", "required by the '{p}' processor", {"p": self.processor}
            )
        return self

    # -- conveniences -------------------------------------------------------------------------

    @property
    def is_custom(self) -> bool:
        """A custom service runs ``containers`` instead of one of our processors."""
        return self.containers is not None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (EAS field names, ``None`` left out): what is stored and returned."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    def redacted(self) -> dict[str, Any]:
        """``to_dict()`` with the token hidden, for readers without the admin token."""
        data = self.to_dict()
        if "token" in data:
            data["token"] = REDACTED
        return data

    def release_key(self) -> dict[str, Any]:
        """Everything but the instance count: two specs with equal keys differ only in scale,
        which is not a release (no new version, no rolling update)."""
        data = self.to_dict()
        data["metadata"].pop("instance", None)
        return data

    def instance_key(self) -> dict[str, Any]:
        """What a running instance is made from. A release that changes only the rest — the
        token, labels (group weights), the autoscaler, the gateway's ``rpc`` limits, the rollout
        strategy — is recorded as a version but keeps the running instances (no restart)."""
        data = self.release_key()
        for key in ("token", "labels", "autoscaler"):
            data.pop(key, None)
        data["metadata"].pop("rpc", None)
        data["metadata"].pop("rolling_strategy", None)
        return data


REDACTED = "********"


def check_service_name(name: str, error: Any = None) -> str:
    """Raise unless ``name`` is usable as a service name (it is a URL segment and a file name)."""
    make = error or (lambda msg: SpecError([msg]))
    if not isinstance(name, str) or not NAME_RE.match(name):
        shown = name if isinstance(name, str) and len(name) <= 80 else f"{str(name)[:77]}..."
        raise make(f"{shown!r} is not a valid service name ({NAME_RULE})")
    return name


def format_loc(loc: Iterable[int | str]) -> str:
    """``("containers", 0, "port")`` → ``containers[0].port``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


_UNION_TAGS = re.compile(
    r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|function-.*|json-or-python.*|.*\[.*\])$"
)


def format_validation_error(exc: ValidationError, prefix: Iterable[int | str] = ()) -> list[str]:
    """One ``path: message`` line per pydantic error, deduplicated, in EAS field names."""
    return format_errors(exc.errors(include_url=False), prefix)


def format_errors(errors: Iterable[Mapping[str, Any]], prefix: Iterable[int | str] = ()) -> list[str]:
    """:func:`format_validation_error` for error dicts (FastAPI hands the API these)."""
    lines: list[str] = []
    prefix = list(prefix)
    for err in errors:
        loc = [*prefix, *err.get("loc", ())]
        # Drop union-member tags ("str", "dict[str,any]") that pydantic inserts into locations.
        loc = [p for p in loc if isinstance(p, int) or not _UNION_TAGS.match(p)]
        path = format_loc(loc)
        kind = err.get("type", "")
        if kind == "extra_forbidden":
            message = "unknown field"
        elif kind == "missing":
            message = "required"
        else:
            message = str(err.get("msg", "invalid"))
            for noise in ("Value error, ", "Assertion failed, "):
                message = message.removeprefix(noise)
        if kind.startswith("at:"):
            # Cross-field errors raised by a model validator name their field through the type.
            path = format_loc([*loc, *_split_rel(kind[3:])])
        line = f"{path}: {message}" if path else message
        if line not in lines:
            lines.append(line)
    return lines


def _split_rel(rel: str) -> list[int | str]:
    parts: list[int | str] = []
    for piece in rel.split("."):
        name, *indices = piece.replace("]", "").split("[")
        parts.append(name)
        parts.extend(int(i) for i in indices)
    return parts


def parse_spec(data: Any) -> ServiceSpec:
    """Validate a decoded JSON document into a :class:`ServiceSpec`, or raise :class:`SpecError`."""
    if not isinstance(data, Mapping):
        raise SpecError([f"a service spec must be a JSON object, not {type(data).__name__}"])
    try:
        return ServiceSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc)) from None


def parse_spec_text(text: str | bytes, source: str = "spec") -> ServiceSpec:
    """Parse JSON text (a file's content or a request body) into a spec; one clear line on error."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(
            [f"{source}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"]
        ) from None
    except UnicodeDecodeError:
        raise SpecError([f"{source}: not UTF-8 text"]) from None
    return parse_spec(data)


def spec_warnings(spec: ServiceSpec) -> list[str]:
    """One line per field that is set and listed in :data:`NOT_YET_IMPLEMENTED`."""
    warnings: list[str] = []
    for path, note in NOT_YET_IMPLEMENTED.items():
        for shown in _set_paths(spec, path.split(".")):
            warnings.append(f"{shown}: not implemented yet ({note})")
    return warnings


def _set_paths(obj: Any, parts: list[str], shown: str = "") -> list[str]:
    """Concrete paths (with list indices) at which ``parts`` is explicitly set in ``obj``."""
    if not parts:
        return [shown]
    head, rest = parts[0], parts[1:]
    many = head.endswith("[]")
    head = head.removesuffix("[]")
    if not isinstance(obj, BaseModel):
        return []
    field = head
    for attr, info in type(obj).model_fields.items():
        if info.alias == head:
            field = attr
    if field not in obj.model_fields_set:
        return []
    value = getattr(obj, field)
    info = type(obj).model_fields[field]
    default = info.get_default(call_default_factory=True)
    if value is None or value == [] or value == {} or value == default:
        return []
    path = f"{shown}.{head}" if shown else head
    if many:
        found: list[str] = []
        for i, item in enumerate(value or []):
            found += _set_paths(item, rest, f"{path}[{i}]")
        return found
    return _set_paths(value, rest, path)


# -- -Dkey=value modification ---------------------------------------------------------------


def parse_assignment(text: str) -> tuple[list[str | int], Any]:
    """``metadata.instance=3`` → (["metadata", "instance"], 3). Values are JSON when they parse as
    JSON (numbers, true/false, null, lists, objects, quoted strings), else the raw string."""
    if "=" not in text:
        raise SpecError([f"-D{text}: expected key=value"])
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise SpecError([f"-D{text}: empty key"])
    path: list[str | int] = []
    for part in re.split(r"\.(?![^\[]*\])", key):
        match = re.fullmatch(r"([^\[\]]+)((?:\[\d+\])*)", part)
        if not match:
            raise SpecError([f"-D{text}: cannot read key {key!r}"])
        path.append(match.group(1))
        path.extend(int(i) for i in re.findall(r"\[(\d+)\]", match.group(2)))
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return path, value


def apply_assignments(spec: ServiceSpec | Mapping[str, Any], assignments: Iterable[str]) -> ServiceSpec:
    """Apply ``-Dkey=value`` modifications (dotted paths) and validate the result as a new spec.

    ``containers[0].port=9000`` and ``containers.0.port=9000`` both index lists; missing objects
    on the way are created, so ``-Dmetadata.rpc.rate_limit=100`` works on a spec without rpc.
    """
    data = spec.to_dict() if isinstance(spec, ServiceSpec) else copy.deepcopy(dict(spec))
    for text in assignments:
        path, value = parse_assignment(text)
        if path and path[0] == "labels":
            value = _label_values(path, value)
        _assign(data, path, value, text)
    return parse_spec(data)


def _label_text(value: Any) -> Any:
    # bool before int: True is an int. JSON spelling: 50 -> "50", true -> "true".
    return json.dumps(value) if isinstance(value, (bool, int, float)) else value


def _label_values(path: list[str | int], value: Any) -> Any:
    """Label values are strings: ``-Dlabels.group_weight=50`` means ``"50"``, as does a number in
    ``-Dlabels={"group_weight": 50}``. Other values (lists, objects, null) are left to validation."""
    if len(path) == 2:
        return _label_text(value)
    if len(path) == 1 and isinstance(value, dict):
        return {k: _label_text(v) for k, v in value.items()}
    return value


def _assign(data: Any, path: list[str | int], value: Any, text: str) -> None:
    node = data
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, list):
            index = int(part) if isinstance(part, int) or str(part).isdigit() else None
            if index is None or index >= len(node):
                raise SpecError([f"-D{text}: {format_loc(path[: i + 1])}: no such list item"])
            if last:
                node[index] = value
            else:
                if not isinstance(node[index], (dict, list)):
                    node[index] = {}
                node = node[index]
        elif isinstance(node, dict):
            key = str(part)
            if last:
                node[key] = value
            else:
                if not isinstance(node.get(key), (dict, list)):
                    node[key] = {}
                node = node[key]
        else:
            raise SpecError([f"-D{text}: {format_loc(path[:i])} is not an object"])


_REPOSITORY_FLAGS = ("--model-repository", "--model-store")


def with_absolute_paths(data: Mapping[str, Any], base: str | os.PathLike[str]) -> dict[str, Any]:
    """The spec dict with relative local paths made absolute against ``base``.

    The CLI calls this with the spec file's directory, so ``"--model-repository=models"`` in
    ``examples/service.json`` means ``examples/models`` wherever the command runs and wherever the
    control plane runs. Paths with a scheme (``oss://``, ``s3://``, ``file://``), absolute paths and
    ``~`` paths are left alone.
    """
    root = Path(base).resolve()

    def fix(value: Any) -> Any:
        if not isinstance(value, str) or not value or _SCHEME_RE.match(value):
            return value
        if value.startswith("~") or Path(value).is_absolute():
            return value
        return str(root / value)

    out = copy.deepcopy(dict(data))
    for key in ("model_path", "warm_up_data_path"):
        if key in out:
            out[key] = fix(out[key])
    params = out.get("processor_params")
    if isinstance(params, list):
        fixed: list[Any] = []
        take_next = False
        for item in params:
            if take_next:
                fixed.append(fix(item))
                take_next = False
                continue
            if isinstance(item, str) and "=" in item and item.split("=", 1)[0] in _REPOSITORY_FLAGS:
                flag, value = item.split("=", 1)
                fixed.append(f"{flag}={fix(value)}")
            else:
                take_next = isinstance(item, str) and item in _REPOSITORY_FLAGS
                fixed.append(item)
        out["processor_params"] = fixed
    return out


def absolute_assignments(assignments: Iterable[str], base: str | os.PathLike[str]) -> list[str]:
    """``-Dkey=value`` texts with local paths in ``model_path``, ``warm_up_data_path`` and
    ``processor_params`` made absolute against ``base`` (the CLI passes its working directory,
    as a shell user expects of a relative path typed on the command line)."""
    out: list[str] = []
    for text in assignments:
        path, value = parse_assignment(text)
        head = path[0] if path else None
        if head in ("model_path", "warm_up_data_path", "processor_params"):
            if len(path) == 1:
                fixed = with_absolute_paths({head: value}, base)[head]
            elif head == "processor_params" and len(path) == 2:
                fixed = with_absolute_paths({head: [value]}, base)[head][0]
            else:
                fixed = value
            if fixed != value:
                text = f"{text.split('=', 1)[0]}={json.dumps(fixed)}"
        out.append(text)
    return out


def spec_json_schema() -> dict[str, Any]:
    """The JSON Schema of a service file (what ``elastiserve schema`` prints)."""
    schema = ServiceSpec.model_json_schema(by_alias=True)
    schema["title"] = "elastiserve service spec"
    return schema
