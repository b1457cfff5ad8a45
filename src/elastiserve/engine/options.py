"""``elastiserve serve`` command line: tritonserver's flags with tritonserver's meaning.

Triton flags that have no meaning here (GPU memory pools, backend directories, …) are accepted
and ignored with a warning, so a ``processor_params`` list written for Triton works unchanged;
a flag Triton does not know either is an error that names it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from elastiserve.errors import ConfigError

# Triton flags accepted for compatibility and ignored (each takes a value unless listed in _IGNORED_BARE).
IGNORED_FLAGS = [
    "backend-directory",
    "repoagent-directory",
    "backend-config",
    "pinned-memory-pool-byte-size",
    "cuda-memory-pool-byte-size",
    "cuda-virtual-address-size",
    "min-supported-compute-capability",
    "allow-gpu-metrics",
    "allow-cpu-metrics",
    "gpu-metrics",
    "metrics-interval-ms",
    "metrics-config",
    "cache-directory",
    "rate-limit",
    "rate-limit-resource",
    "buffer-manager-thread-count",
    "model-load-thread-count",
    "model-load-retry-count",
    "model-namespacing",
    "trace-config",
    "trace-file",
    "trace-level",
    "trace-rate",
    "trace-count",
    "trace-log-frequency",
    "http-thread-count",
    "http-header-forward-pattern",
    "http-restricted-api",
    "grpc-restricted-api",
    "grpc-infer-allocation-pool-size",
    "grpc-max-response-pool-size",
    "grpc-use-ssl",
    "grpc-use-ssl-mutual",
    "grpc-server-cert",
    "grpc-server-key",
    "grpc-root-cert",
    "grpc-infer-response-compression-level",
    "grpc-keepalive-time",
    "grpc-keepalive-timeout",
    "grpc-keepalive-permit-without-calls",
    "grpc-http2-max-pings-without-data",
    "grpc-http2-min-recv-ping-interval-without-data",
    "grpc-http2-max-ping-strikes",
    "grpc-header-forward-pattern",
    "host-policy",
    "response-cache-byte-size",
    "allow-sagemaker",
    "sagemaker-port",
    "sagemaker-safe-port-range",
    "sagemaker-thread-count",
    "allow-vertex-ai",
    "vertex-ai-port",
    "vertex-ai-thread-count",
    "vertex-ai-default-model",
    "log-format",
    "log-file",
    "exit-timeout-secs-per-model",
    "model-config-name",
    "metrics-address-v6",
    "reuse-http-port",
    "reuse-grpc-port",
    "enable-peer-access",
]


class HelpRequested(Exception):
    """``--help`` was given; the message is the help text."""


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


@dataclass
class ServeOptions:
    model_repository: list[str] = field(default_factory=list)
    http_address: str = "0.0.0.0"
    http_port: int = 8000
    grpc_address: str = "0.0.0.0"
    grpc_port: int = 8001
    metrics_address: str = "0.0.0.0"
    metrics_port: int = 8002
    allow_http: bool = True
    allow_grpc: bool = True
    allow_metrics: bool = True
    model_control_mode: str = "none"
    load_model: list[str] = field(default_factory=list)
    repository_poll_secs: float = 15.0
    strict_model_config: bool = False
    strict_readiness: bool = True
    exit_on_error: bool = False
    exit_timeout_secs: float = 30.0
    log_verbose: int = 0
    log_info: bool = True
    log_warning: bool = True
    log_error: bool = True
    id: str = "elastiserve"
    http_max_body_bytes: int = 64 << 20
    grpc_max_message_bytes: int = 64 << 20
    cache_config: list[str] = field(default_factory=list)
    cache_size: int = 0  # bytes of the response cache from --cache-config; 0 = no cache
    warnings: list[str] = field(default_factory=list)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"elastiserve serve: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="elastiserve serve",
        allow_abbrev=False,
        add_help=False,
        description="Run the Triton-compatible inference engine (tritonserver's flags).",
    )
    add = parser.add_argument
    add(
        "--model-repository",
        "--model-store",
        dest="model_repository",
        action="append",
        default=[],
        help="model repository path or URI; repeatable",
    )
    add("--http-address", default="0.0.0.0")
    add("--http-port", type=int, default=8000)
    add("--grpc-address", default="0.0.0.0")
    add("--grpc-port", type=int, default=8001)
    add("--metrics-address", default="0.0.0.0")
    add("--metrics-port", type=int, default=8002)
    add("--allow-http", type=_bool, default=True, nargs="?", const=True)
    add("--allow-grpc", type=_bool, default=True, nargs="?", const=True)
    add("--allow-metrics", type=_bool, default=True, nargs="?", const=True)
    add("--model-control-mode", choices=["none", "poll", "explicit"], default="none")
    add("--load-model", action="append", default=[], help="model to load in explicit mode; '*' for all")
    add("--repository-poll-secs", type=float, default=15.0)
    add("--strict-model-config", type=_bool, default=False, nargs="?", const=True)
    add("--strict-readiness", type=_bool, default=True, nargs="?", const=True)
    add("--exit-on-error", type=_bool, default=False, nargs="?", const=True)
    add("--exit-timeout-secs", type=float, default=30.0)
    add("--log-verbose", type=int, default=0)
    add("--log-info", type=_bool, default=True, nargs="?", const=True)
    add("--log-warning", type=_bool, default=True, nargs="?", const=True)
    add("--log-error", type=_bool, default=True, nargs="?", const=True)
    add("--id", default="elastiserve")
    add(
        "--http-max-body-bytes",
        type=int,
        default=64 << 20,
        help="larger request bodies get 413 (elastiserve)",
    )
    add("--grpc-max-message-bytes", type=int, default=64 << 20, help="gRPC message size limit (elastiserve)")
    add(
        "--cache-config",
        action="append",
        default=[],
        help="response cache: local,size=<bytes> (Triton's syntax; repeatable)",
    )
    add("-h", "--help", action="store_true")
    for flag in IGNORED_FLAGS:
        add(f"--{flag}", dest=f"ignored_{flag.replace('-', '_')}", action="append", default=None)
    add("--disable-auto-complete-config", action="store_true", help="same as --strict-model-config=true")
    return parser


def parse_serve_args(argv: list[str]) -> ServeOptions:
    parser = build_parser()
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        raise ConfigError(f"elastiserve serve: unknown flag {unknown[0]!r} (not a tritonserver flag)")
    values = vars(namespace)
    options = ServeOptions()
    for key, value in values.items():
        if key.startswith("ignored_"):
            if value is not None:
                flag = key.removeprefix("ignored_").replace("_", "-")
                options.warnings.append(f"--{flag} has no effect in elastiserve and is ignored")
            continue
        if key in ("help", "disable_auto_complete_config"):
            continue
        setattr(options, key, value)
    if namespace.help:
        raise HelpRequested(parser.format_help())
    if namespace.disable_auto_complete_config:
        options.strict_model_config = True
    if not options.model_repository:
        raise ConfigError("elastiserve serve: --model-repository is required")
    if options.model_control_mode != "explicit" and options.load_model:
        raise ConfigError("elastiserve serve: --load-model requires --model-control-mode=explicit")
    if options.repository_poll_secs <= 0:
        raise ConfigError("elastiserve serve: --repository-poll-secs must be > 0")
    options.cache_size = parse_cache_config(options.cache_config)
    return options


def parse_cache_config(values: list[str]) -> int:
    """``--cache-config`` values (``local,size=<bytes>``, repeatable) -> cache size in bytes (0: off)."""
    size = 0
    for value in values:
        cache, _, setting = value.partition(",")
        cache = cache.strip()
        if cache != "local":
            raise ConfigError(
                f"elastiserve serve: --cache-config={value}: cache '{cache}' is not supported "
                "(only 'local', as in --cache-config=local,size=1048576)"
            )
        key, sep, text = setting.partition("=")
        if not sep or key.strip() != "size":
            raise ConfigError(
                f"elastiserve serve: --cache-config={value}: expected 'local,size=<bytes>' "
                "(for example --cache-config=local,size=1048576)"
            )
        try:
            size = int(text.strip())
        except ValueError:
            size = -1
        if size <= 0:
            raise ConfigError(
                f"elastiserve serve: --cache-config={value}: size must be a positive number of bytes"
            )
    return size
