"""Protocol-neutral health, metadata, repository and inference: the only API frontends call.

HTTP and gRPC frontends translate their wire formats to and from these calls and the types in
:mod:`elastiserve.types`; every failure is an :class:`~elastiserve.errors.ElastiserveError`
whose code the frontend maps to a status. Dicts returned here are already in the shape of
Triton's JSON (KServe v2 REST) responses; the gRPC frontend converts them with
``google.protobuf.json_format.ParseDict`` into the matching ``service_pb2`` messages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from elastiserve import SERVER_NAME, TRITON_COMPAT_VERSION
from elastiserve.engine.streaming import ResponseStream, single_response
from elastiserve.errors import Unavailable
from elastiserve.types import InferRequest, InferResponse

if TYPE_CHECKING:
    from tritonclient.grpc.model_config_pb2 import ModelConfig

    from elastiserve.engine.registry import ModelRegistry

# Extensions reported in server metadata (what our frontends implement).
EXTENSIONS = [
    "classification",
    "sequence",
    "model_repository",
    "model_repository(unload_dependents)",
    "schedule_policy",
    "model_configuration",
    "binary_tensor_data",
    "parameters",
    "statistics",
    "logging",
]


class DataPlane:
    """Facade over the model registry; one per server process."""

    def __init__(self, registry: ModelRegistry, server_id: str = SERVER_NAME) -> None:
        self.registry = registry
        self.server_id = server_id
        self.shutting_down = False
        # Triton's logging extension settings (GET/POST /v2/logging).
        self.log_settings: dict[str, Any] = {
            "log_file": "",
            "log_info": True,
            "log_warning": True,
            "log_error": True,
            "log_verbose_level": 0,
            "log_format": "default",
        }

    # -- health -------------------------------------------------------------------------------
    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        """Ready when not shutting down and every model the server was asked to load is ready."""
        return not self.shutting_down and self.registry.all_ready()

    def model_ready(self, name: str, version: str = "") -> bool:
        """False (never an error) for unknown models; HTTP answers 400, gRPC ``ready: false``."""
        return self.registry.is_ready(name, version)

    # -- metadata -----------------------------------------------------------------------------
    def server_metadata(self) -> dict[str, Any]:
        return {"name": self.server_id, "version": TRITON_COMPAT_VERSION, "extensions": EXTENSIONS}

    def model_metadata(self, name: str, version: str = "") -> dict[str, Any]:
        """``{"name", "versions", "platform", "inputs": [{"name","datatype","shape"}], "outputs"}``."""
        return self.registry.metadata(name, version)

    def model_config(self, name: str, version: str = "") -> ModelConfig:
        return self.registry.get(name, version).config

    def model_statistics(self, name: str = "", version: str = "") -> dict[str, Any]:
        """``{"model_stats": [...]}`` in Triton's JSON shape; all models when ``name`` is empty."""
        return {"model_stats": self.registry.statistics(name, version)}

    # -- inference ----------------------------------------------------------------------------
    async def infer(self, request: InferRequest) -> InferResponse:
        """Validate, schedule and run one request; outputs filtered to those requested and
        classification applied. Raises ElastiserveError."""
        model = self.registry.get(request.model_name, request.model_version)
        return await model.infer(request)

    def infer_stream(self, request: InferRequest) -> ResponseStream:
        """Start one request and return its responses as they come: ``async for result, final in
        stream`` (``result`` an InferResponse, an ElastiserveError, or None for a bare FINAL).
        Decoupled models send zero or more; other models exactly one. ``stream.cancel()`` when
        the client goes away. Raises ElastiserveError for unknown models and invalid requests."""
        model = self.registry.get(request.model_name, request.model_version)
        infer_stream = getattr(model, "infer_stream", None)
        if infer_stream is None:  # a model kind with only unary inference: its one response
            return single_response(model.infer(request))
        return infer_stream(request)

    # -- repository ---------------------------------------------------------------------------
    def repository_index(self, ready: bool = False) -> list[dict[str, Any]]:
        """``[{"name", "version", "state", "reason"}]``; only READY models when ``ready``."""
        return self.registry.index(ready_only=ready)

    async def load_model(
        self, name: str, config: str | None = None, files: dict[str, bytes] | None = None
    ) -> None:
        """Load or reload ``name`` (explicit mode). ``config`` is JSON of a ModelConfig that overrides
        config.pbtxt; ``files`` maps ``file:<version>/<name>`` to contents (Triton's override)."""
        self._require_explicit_mode()
        await self.registry.load(name, config_json=config, files=files)

    async def unload_model(self, name: str, unload_dependents: bool = False) -> None:
        self._require_explicit_mode()
        await self.registry.unload(name, unload_dependents=unload_dependents)

    def _require_explicit_mode(self) -> None:
        if self.registry.control_mode != "explicit":
            # Triton's message, even in mode "none".
            raise Unavailable("explicit model load / unload is not allowed if polling is enabled")
