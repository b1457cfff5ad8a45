"""Loaded models: load / unload / reload, readiness, versions and the repository index.

Model control modes are Triton's: ``none`` loads everything at start and never changes,
``poll`` also rescans the repositories every ``--repository-poll-secs``, ``explicit`` loads
only what ``--load-model`` names and what the repository API asks for. Loading runs in a
worker thread so the event loop keeps serving while a model initialises; a reload brings the
new versions up before the old ones are unloaded, so a model never goes unavailable because
it was reloaded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tritonclient.grpc.model_config_pb2 import ModelConfig

from elastiserve.engine.backends import backend_name, get_backend
from elastiserve.engine.backends.base import ModelContext, ModelInstance
from elastiserve.engine.config import (
    apply_defaults,
    detect_backend,
    parse_config_json,
    read_model_config,
    validate_config,
)
from elastiserve.engine.ensemble import EnsembleSupport
from elastiserve.engine.model import ModelVersion
from elastiserve.engine.repository import ModelLocation, ModelRepository, versions_to_serve
from elastiserve.engine.response_cache import ResponseCache, make_model_version
from elastiserve.engine.scheduler import Scheduler
from elastiserve.engine.sequence import SequenceScheduler, validate_sequence_config
from elastiserve.engine.warmup import warm_up
from elastiserve.errors import ConfigError, ElastiserveError, InvalidArgument, NotFound, Unavailable

log = logging.getLogger(__name__)

READY, UNAVAILABLE, LOADING, UNLOADING = "READY", "UNAVAILABLE", "LOADING", "UNLOADING"


@dataclass
class ModelEntry:
    """Everything the registry knows about one model name."""

    name: str
    state: str = UNAVAILABLE
    reason: str = ""
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    # Fingerprint of the files the loaded versions came from (poll mode reload detection).
    fingerprint: tuple = ()
    override_dir: Path | None = None


def _fingerprint(path: Path) -> tuple:
    items = []
    for file in sorted(path.rglob("*")):
        if "__pycache__" in file.parts:
            continue
        with contextlib.suppress(OSError):
            stat = file.stat()
            items.append((str(file.relative_to(path)), stat.st_size, stat.st_mtime_ns))
    return tuple(items)


class ModelRegistry:
    """The models of one server."""

    def __init__(
        self,
        repository: ModelRepository,
        control_mode: str = "none",
        strict_config: bool = False,
        strict_readiness: bool = True,
    ) -> None:
        self.repository = repository
        self.control_mode = control_mode
        self.strict_config = strict_config
        self.strict_readiness = strict_readiness
        self.models: dict[str, ModelEntry] = {}
        self.server: Any = None  # the DataPlane, handed to backends for BLS
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's loop, for backends calling back
        self._locks: dict[str, asyncio.Lock] = {}
        # False until the initial models were attempted: the server is not ready before that.
        self.initialized = False
        self.response_cache: ResponseCache | None = None  # --cache-config; models opt in (response_cache.py)
        self.ensembles = EnsembleSupport(self)  # ensemble loading order, dependencies (ensemble.py)

    # -- queries (hot path: plain dict lookups) --------------------------------------------------
    def get(self, name: str, version: str = "") -> ModelVersion:
        entry = self.models.get(name)
        if entry is None or not entry.versions:
            if entry is None:
                raise NotFound(f"Request for unknown model: '{name}' is not found")
            raise Unavailable(f"Request for unknown model: '{name}' has no available versions")
        versions = entry.versions
        if not version:
            return versions[max(versions)]
        try:
            found = versions.get(int(version))
        except ValueError:
            raise InvalidArgument(f"invalid model version '{version}' for model '{name}'") from None
        if found is None:
            raise NotFound(f"Request for unknown model: '{name}' version {version} is not found")
        return found

    def metadata(self, name: str, version: str = "") -> dict[str, Any]:
        model = self.get(name, version)
        entry = self.models[name]
        return model.metadata([str(v) for v in sorted(entry.versions)])

    def is_ready(self, name: str, version: str = "") -> bool:
        entry = self.models.get(name)
        if entry is None or entry.state != READY or not entry.versions:
            return False
        if not version:
            return True
        return version.isdigit() and int(version) in entry.versions

    def all_ready(self) -> bool:
        if not self.initialized:
            return False
        if not self.strict_readiness:
            return True
        return all(
            entry.state == READY
            for entry in self.models.values()
            if not (entry.state == UNAVAILABLE and entry.reason == "unloaded")
        )

    def statistics(self, name: str = "", version: str = "") -> list[dict[str, Any]]:
        if name:
            if name not in self.models or not self.models[name].versions:
                raise InvalidArgument(f"requested model '{name}' is not available")
            if version:
                return [self.get(name, version).stats.as_dict()]
            return [m.stats.as_dict() for _, m in sorted(self.models[name].versions.items())]
        return [
            m.stats.as_dict()
            for entry in sorted(self.models.values(), key=lambda e: e.name)
            for _, m in sorted(entry.versions.items())
        ]

    def index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        found, conflicts = self.repository.discover()
        names = sorted(set(found) | set(self.models) | set(conflicts))
        rows: list[dict[str, Any]] = []
        for name in names:
            entry = self.models.get(name)
            if entry is None:
                if not ready_only:
                    rows.append(
                        {"name": name}
                        if name not in conflicts
                        else {"name": name, "state": UNAVAILABLE, "reason": conflicts[name]}
                    )
                continue
            if entry.versions:
                for version in sorted(entry.versions):
                    rows.append(
                        {"name": name, "version": str(version), "state": entry.state, "reason": entry.reason}
                    )
            elif not ready_only:
                rows.append({"name": name, "state": entry.state, "reason": entry.reason})
        if ready_only:
            rows = [r for r in rows if r.get("state") == READY]
        return rows

    # -- lifecycle ------------------------------------------------------------------------------------
    async def load_initial(self, load_models: list[str]) -> list[str]:
        """Load the models the mode asks for at start; returns the failures' messages."""
        self.loop = asyncio.get_running_loop()
        found, conflicts = self.repository.discover()
        if self.control_mode == "explicit":
            names = sorted(found) if "*" in load_models else list(dict.fromkeys(load_models))
        else:
            names = sorted(found)
        failures = [f"{name}: {reason}" for name, reason in conflicts.items()]
        for name, reason in conflicts.items():
            self.models[name] = ModelEntry(name, UNAVAILABLE, reason)
        for name in self.ensembles.order(names, found):
            if name in self.models and self.models[name].versions:
                continue  # already loaded as a composing model of an ensemble
            try:
                await self.load(name)
            except ElastiserveError as exc:
                failures.append(str(exc))
        self.initialized = True
        return failures

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    async def load(
        self, name: str, config_json: str | None = None, files: dict[str, bytes] | None = None
    ) -> None:
        """(Re)load a model; on failure the previous versions keep serving and the error is raised."""
        async with self._lock(name):
            entry = self.models.setdefault(name, ModelEntry(name))
            previous = dict(entry.versions)
            if not previous:
                entry.state, entry.reason = LOADING, ""
            override_dir: Path | None = None
            try:
                if files:
                    if config_json is None:
                        raise InvalidArgument(
                            f"failed to load '{name}': a 'config' parameter is required when 'file:' "
                            "overrides are given"
                        )
                    override_dir = _write_override_files(name, files)
                    location = ModelLocation(name, override_dir, override_dir.parent)
                else:
                    if self.initialized and self.control_mode == "explicit" and self.repository.has_remote:
                        # Triton reads the repository again on a load request: sync changed objects.
                        try:
                            await asyncio.to_thread(self.repository.refresh)
                        except ElastiserveError as exc:
                            log.error("repository sync for loading '%s': %s; using the last copy", name, exc)
                    location = self.repository.find(name)
                    if location is None:
                        raise NotFound(
                            f"failed to load '{name}', failed to poll from model repository"
                            if self.control_mode == "explicit"
                            else f"model '{name}' is not in the model repository"
                        )
                fingerprint = _fingerprint(location.path)
                versions = await asyncio.to_thread(self._build_versions, location, config_json)
                await self.ensembles.prepare(name, versions)
            except ElastiserveError as exc:
                if override_dir is not None:
                    shutil.rmtree(override_dir, ignore_errors=True)
                if not previous:
                    entry.state, entry.reason = UNAVAILABLE, str(exc)
                log.error("failed to load model '%s': %s", name, exc)
                raise
            except Exception as exc:  # a backend failing in an unexpected way
                log.exception("failed to load model '%s'", name)
                if not previous:
                    entry.state, entry.reason = UNAVAILABLE, f"{type(exc).__name__}: {exc}"
                raise ConfigError(f"failed to load '{name}': {type(exc).__name__}: {exc}") from exc
            old_override = entry.override_dir
            entry.versions = versions
            entry.state, entry.reason = READY, ""
            entry.fingerprint = fingerprint
            entry.override_dir = override_dir
            log.info("successfully loaded '%s' version(s) %s", name, sorted(versions))
            await _close_versions(previous)
            if old_override is not None:
                shutil.rmtree(old_override, ignore_errors=True)
        await self.ensembles.after_load(name)

    async def unload(self, name: str, unload_dependents: bool = False) -> None:
        async with self._lock(name):
            entry = self.models.get(name)
            if entry is None:
                found = self.repository.find(name) if self.control_mode != "none" else None
                if found is None:
                    raise NotFound(f"failed to unload '{name}', model is not found")
                self.models[name] = ModelEntry(name, UNAVAILABLE, "unloaded")
                return
            previous = entry.versions
            entry.versions = {}
            entry.state, entry.reason = UNLOADING, ""
            await _close_versions(previous)
            entry.state, entry.reason = UNAVAILABLE, "unloaded"
            if entry.override_dir is not None:
                shutil.rmtree(entry.override_dir, ignore_errors=True)
                entry.override_dir = None
            log.info("successfully unloaded '%s'", name)
        await self.ensembles.after_unload(name, unload_dependents)

    async def poll(self) -> None:
        """Poll mode: load new models, reload changed ones, unload removed ones."""
        if self.repository.has_remote:  # re-sync remote roots; on failure keep serving the last copy
            try:
                await asyncio.to_thread(self.repository.refresh)
            except ElastiserveError as exc:
                log.error("repository poll: %s; the models already loaded keep serving", exc)
        found, conflicts = self.repository.discover()
        for name in list(self.models):
            entry = self.models[name]
            if entry.override_dir is not None:
                continue
            if name not in found:
                if entry.versions:
                    await self.unload(name)
                if name not in conflicts:
                    self.models.pop(name, None)
        for name, location in found.items():
            entry = self.models.get(name)
            if entry is not None and entry.fingerprint == _fingerprint(location.path):
                continue
            with contextlib.suppress(ElastiserveError):
                await self.load(name)
                continue
            if name in self.models:  # failed: remember the fingerprint so we do not retry in a loop
                self.models[name].fingerprint = _fingerprint(location.path)

    async def close(self) -> None:
        for name in list(self.models):
            entry = self.models[name]
            await _close_versions(entry.versions)
            entry.versions = {}

    # -- building -----------------------------------------------------------------------------------
    def _build_versions(self, location: ModelLocation, config_json: str | None) -> dict[int, ModelVersion]:
        name, model_dir = location.name, location.path
        config = (
            parse_config_json(config_json, name)
            if config_json
            else read_model_config(model_dir, self.strict_config)
        )
        if not config.name:
            config.name = name
        detect_backend(model_dir, config)
        backend_id = backend_name(config.backend, config.platform)
        if backend_id == "ensemble":
            return self.ensembles.build(location, config)
        backend = get_backend(backend_id)
        if not self.strict_config:
            serve = versions_to_serve(config, model_dir)
            backend.auto_complete_config(config, model_dir, serve[-1])
        apply_defaults(config, name)
        validate_config(config, name)
        validate_sequence_config(config, model_dir)
        versions: dict[int, ModelVersion] = {}
        try:
            for version in versions_to_serve(config, model_dir):
                versions[version] = self._build_version(name, version, config, location, backend)
                warm_up(versions[version])  # before READY: the load fails if a sample fails
        except BaseException:
            for built in versions.values():
                if built.scheduler is not None:
                    for instance in built.scheduler.instances:
                        with contextlib.suppress(Exception):
                            instance.close()
            raise
        return versions

    def _build_version(
        self, name: str, version: int, config: ModelConfig, location: ModelLocation, backend: Any
    ) -> ModelVersion:
        instances: list[ModelInstance] = []
        loop = self.loop
        for group_index, group in enumerate(config.instance_group):
            for index in range(group.count):
                context = ModelContext(
                    name=name,
                    version=version,
                    config=config,
                    model_dir=location.path,
                    repository=location.repository,
                    instance_name=f"{group.name or name}_{index}"
                    if group.name
                    else f"{name}_{group_index}_{index}",
                    instance_index=len(instances),
                    instance_kind="KIND_CPU",
                    device_id=0,
                    server=self.server,
                    extra={"loop": loop},
                )
                try:
                    instances.append(backend.create_instance(context))
                except BaseException:
                    for instance in instances:
                        with contextlib.suppress(Exception):
                            instance.close()
                    raise
        placement = "auto"
        param = config.parameters.get("execution_placement")
        if param is not None and param.string_value in ("auto", "inline", "thread"):
            placement = param.string_value
        # Instances waiting on another process, or calling back into the loop (Python BLS, async
        # execute), must never run inline on the event loop.
        if backend.parallelism == "process" or any(
            getattr(i, "out_of_process", False) or getattr(i, "requires_thread", False) for i in instances
        ):
            placement = "thread"
        model = make_model_version(name, version, config, location.path, self.response_cache)
        if config.HasField("sequence_batching"):
            model.scheduler = SequenceScheduler(  # type: ignore[assignment]
                config, instances, model.stats, placement, location.path
            )
        else:
            model.scheduler = Scheduler(config, instances, model.stats, placement)
        return model


async def _close_versions(versions: dict[int, ModelVersion]) -> None:
    for model in versions.values():
        if model.scheduler is not None:
            await model.scheduler.close()


def _write_override_files(name: str, files: dict[str, bytes]) -> Path:
    """Triton's repository-load ``file:<path>`` overrides: the model is served from these files only."""
    root = Path(tempfile.mkdtemp(prefix="elastiserve-override-"))
    model_dir = root / name
    model_dir.mkdir()
    for key, content in files.items():
        relative = key.removeprefix("file:")
        target = (model_dir / relative).resolve()
        if not str(target).startswith(str(model_dir.resolve()) + "/"):
            shutil.rmtree(root, ignore_errors=True)
            raise InvalidArgument(
                f"failed to load '{name}': file override path '{relative}' escapes the model"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            content = base64.b64decode(content)
        target.write_bytes(content)
    return model_dir
