"""Discover models and their versions in one or more Triton model repositories.

A repository is a folder of model folders; a model folder holds ``config.pbtxt`` and numeric
version folders. Which versions are served follows the config's ``version_policy``
(latest N — Triton's default is latest 1 —, all, or specific).

A root may also be remote (``s3://``, ``oss://``, an http(s) archive; see docs/object-storage.md):
it is synced into the machine's repository cache by :meth:`ModelRepository.refresh` — at start,
and at each poll in poll mode — and discovered from the local copy like any folder, so the
registry's fingerprints notice changed objects without knowing where they came from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tritonclient.grpc.model_config_pb2 import ModelConfig

from elastiserve.errors import ConfigError
from elastiserve.storage.cache import RepositoryCache
from elastiserve.storage.uri import StorageURI, is_remote, parse_uri

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelLocation:
    name: str
    path: Path
    repository: Path


class ModelRepository:
    """The union of several repository folders (``--model-repository`` may repeat)."""

    def __init__(self, roots: list[str | Path], cache: RepositoryCache | None = None) -> None:
        self.roots: list[Path] = []
        #: index in ``roots`` -> remote location; its root is a placeholder until the first refresh.
        self.remote: dict[int, StorageURI] = {}
        self._cache = cache
        for root in roots:
            text = str(root)
            if is_remote(text):
                uri = parse_uri(text)  # a malformed URI is a ConfigError now, before any network
                self.remote[len(self.roots)] = uri
                self.roots.append(Path("/nonexistent-unsynced") / uri.scheme)
                continue
            path = Path(text.removeprefix("file://"))
            if not path.is_dir():
                raise ConfigError(f"model repository '{path}' does not exist or is not a directory")
            self.roots.append(path)

    @property
    def has_remote(self) -> bool:
        return bool(self.remote)

    def refresh(self) -> None:
        """Sync every remote root into the local cache (blocking: call it in a worker thread).

        Downloads only changed objects. A root that fails keeps its last synced copy; the errors
        of all failed roots are raised together afterwards (redacted, naming each URI)."""
        if not self.remote:
            return
        if self._cache is None:
            self._cache = RepositoryCache()
        errors: list[str] = []
        for index, uri in self.remote.items():
            try:
                result = self._cache.sync(uri)
            except ConfigError as exc:
                errors.append(f"model repository {exc}")
                continue
            if not result.path.is_dir():
                errors.append(f"model repository '{uri.redacted}' is a single file, not a folder of models")
                continue
            self.roots[index] = result.path
        if errors:
            raise ConfigError("; ".join(errors))

    def discover(self) -> tuple[dict[str, ModelLocation], dict[str, str]]:
        """All model folders by name, and the names that cannot be served with the reason
        (a name present in two repositories is ambiguous, as in Triton)."""
        found: dict[str, ModelLocation] = {}
        conflicts: dict[str, str] = {}
        for index, root in enumerate(self.roots):
            if index in self.remote and not root.is_dir():
                continue  # not synced yet
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
