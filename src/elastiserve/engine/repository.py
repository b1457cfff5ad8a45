"""Discover models and their versions in one or more Triton model repositories.

A repository is a folder of model folders; a model folder holds ``config.pbtxt`` and numeric
version folders. Which versions are served follows the config's ``version_policy``
(latest N — Triton's default is latest 1 —, all, or specific).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tritonclient.grpc.model_config_pb2 import ModelConfig

from elastiserve.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelLocation:
    name: str
    path: Path
    repository: Path


class ModelRepository:
    """The union of several repository folders (``--model-repository`` may repeat)."""

    def __init__(self, roots: list[str | Path]) -> None:
        self.roots = [Path(str(root).removeprefix("file://")) for root in roots]
        for root in self.roots:
            if not root.is_dir():
                raise ConfigError(f"model repository '{root}' does not exist or is not a directory")

    def discover(self) -> tuple[dict[str, ModelLocation], dict[str, str]]:
        """All model folders by name, and the names that cannot be served with the reason
        (a name present in two repositories is ambiguous, as in Triton)."""
        found: dict[str, ModelLocation] = {}
        conflicts: dict[str, str] = {}
        for root in self.roots:
            for entry in sorted(root.iterdir()):
                if not entry.is_dir() or entry.name.startswith("."):
                    continue
                if entry.name in found:
                    conflicts[entry.name] = (
                        f"model '{entry.name}' appears in more than one repository: "
                        f"{found[entry.name].repository} and {root}"
                    )
                    continue
                found[entry.name] = ModelLocation(entry.name, entry, root)
        for name in conflicts:
            found.pop(name, None)
        return found, conflicts

    def find(self, name: str) -> ModelLocation | None:
        models, conflicts = self.discover()
        if name in conflicts:
            raise ConfigError(conflicts[name])
        return models.get(name)


def available_versions(model_dir: Path) -> list[int]:
    """Numeric version folders present, ascending (other names are ignored, as Triton does)."""
    versions = []
    for entry in model_dir.iterdir():
        if entry.is_dir() and entry.name.isdigit() and not entry.name.startswith("0" * 2):
            versions.append(int(entry.name))
    return sorted(set(versions))


def versions_to_serve(config: ModelConfig, model_dir: Path) -> list[int]:
    """Apply ``version_policy`` to the version folders present."""
    present = available_versions(model_dir)
    policy = config.version_policy
    if policy.HasField("all"):
        chosen = present
    elif policy.HasField("specific"):
        wanted = sorted(set(policy.specific.versions))
        missing = [v for v in wanted if v not in present]
        if missing:
            raise ConfigError(
                f"model '{config.name}': version_policy asks for version(s) {missing} "
                f"but the model folder has {present or 'none'}"
            )
        chosen = wanted
    else:
        latest = policy.latest.num_versions if policy.HasField("latest") else 1
        chosen = present[-latest:] if present else []
    if not chosen:
        raise ConfigError(f"model '{config.name}': no version folder to serve in {model_dir}")
    return chosen
