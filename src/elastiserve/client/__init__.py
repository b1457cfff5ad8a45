"""Client SDK: the control plane API client (and, later, direct-connect and gateway clients)."""

from elastiserve.client.controlplane import (
    DEFAULT_ENDPOINT,
    DEFAULT_PORT,
    ENV_ENDPOINT,
    ENV_TOKEN,
    ControlPlaneClient,
    ControlPlaneError,
    Endpoints,
    ServiceList,
)

__all__ = [
    "DEFAULT_ENDPOINT",
    "DEFAULT_PORT",
    "ENV_ENDPOINT",
    "ENV_TOKEN",
    "ControlPlaneClient",
    "ControlPlaneError",
    "Endpoints",
    "ServiceList",
]
