"""Ensembles (``platform: "ensemble"``): a DAG of models run inside the server.

An ensemble is a :class:`~elastiserve.engine.model.ModelVersion` without a scheduler: its
``infer`` runs each step as soon as all its input tensors exist, independent steps concurrently
on the event loop, by calling the composing model's own ``infer`` (so the composing model's
validation, batching, statistics and metrics are exactly those of a direct call). Tensors move
between steps as the same numpy arrays: nothing is serialised or copied.

Validation follows Triton in two stages: the step graph alone when the config is read
(``validate_graph``: every tensor produced once, every step input available, no cycle, every
output written, nothing unused), then against the composing models' configs once they are
loaded (``validate_composing``: mapped names exist, datatypes and shapes agree, batch sizes).
Errors name the ensemble, the step (index and model) and the tensor.

:class:`EnsembleSupport` is the registry's side: load ordering, loading composing models
on demand (explicit mode), Triton's ``unload_dependents``, and dropping an ensemble whose
composing model was unloaded (Triton's dependency graph does the same).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any

from google.protobuf import text_format
from tritonclient.grpc.model_config_pb2 import DataType, ModelConfig

from elastiserve.engine.config import CONFIG_FILENAME, validate_config
from elastiserve.engine.model import ModelVersion
from elastiserve.engine.repository import available_versions, versions_to_serve
from elastiserve.errors import ConfigError, ElastiserveError, Internal, Unavailable, Unsupported
from elastiserve.types import InferRequest, InferResponse, InferTensor, RequestedOutput

if TYPE_CHECKING:
    from elastiserve.engine.registry import ModelRegistry
    from elastiserve.engine.repository import ModelLocation

log = logging.getLogger(__name__)

ENSEMBLE_PLATFORM = "ensemble"

# Ensembles being loaded by the current task, outermost first: detects circular ensembles and
# tells an on-demand (implicit) load of a composing model from an explicit one.
_LOAD_CHAIN: ContextVar[tuple[str, ...]] = ContextVar("ensemble_load_chain", default=())


@dataclass(slots=True)
class Step:
    """One ``ensemble_scheduling.step``, precomputed for the hot path."""

    index: int
    model_name: str
    model_version: str  # "" = latest (Triton's -1)
    inputs: list[tuple[str, str]]  # (composing model input, ensemble tensor)
    outputs: list[tuple[str, str]]  # (composing model output, ensemble tensor)
    requested: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"step {self.index} (model '{self.model_name}')"


def is_ensemble_config(config: ModelConfig) -> bool:
    return config.platform == ENSEMBLE_PLATFORM or config.HasField("ensemble_scheduling")


def _dims_match(a: list[int], b: list[int]) -> bool:
    """Triton's CompareDimsWithWildcard."""
    return len(a) == len(b) and all(x == -1 or y == -1 or x == y for x, y in zip(a, b, strict=True))


def _type_name(data_type: int) -> str:
    return DataType.Name(data_type)


# -- graph validation (the config alone) -----------------------------------------------------------


def parse_steps(config: ModelConfig) -> list[Step]:
    """The steps of an ensemble config after Triton's structural checks (no composing models needed)."""
    name = config.name
    if not config.HasField("ensemble_scheduling") or not config.ensemble_scheduling.step:
        raise ConfigError(f"must specify 'step' for ensemble '{name}'")
    if config.platform != ENSEMBLE_PLATFORM:
        raise ConfigError(
            f"ensemble scheduling cannot be set for model '{name}' whose platform is not {ENSEMBLE_PLATFORM}"
        )
    if config.instance_group:
        raise ConfigError(f"instance group should not be specified for ensemble '{name}'")
    if config.model_warmup:
        raise ConfigError(f"model_warmup can not be specified for ensemble '{name}'")
    steps: list[Step] = []
    for index, raw in enumerate(config.ensemble_scheduling.step):
        for what, present in (
            ("model_name", raw.model_name),
            ("input_map", raw.input_map),
            ("output_map", raw.output_map),
        ):
            if not present:
                raise ConfigError(f"must specify '{what}' in step {index} of ensemble '{name}'")
        if raw.model_version < -1:
            raise ConfigError(
                f"in ensemble '{name}', step {index} (model '{raw.model_name}'): model_version must be "
                f"-1 (latest) or a version number, got {raw.model_version}"
            )
        steps.append(
            Step(
                index=index,
                model_name=raw.model_name,
                # -1 is Triton's "latest"; 0 (the field left out) is taken to mean the same.
                model_version="" if raw.model_version <= 0 else str(raw.model_version),
                inputs=sorted(raw.input_map.items()),
                outputs=sorted(raw.output_map.items()),
            )
        )
    validate_graph(name, config, steps)
    return steps


def validate_graph(name: str, config: ModelConfig, steps: list[Step]) -> None:
    """Every tensor produced once, every step input available, no cycle, all outputs written."""
    inputs = [t.name for t in config.input]
    outputs = [t.name for t in config.output]
    producer: dict[str, Step] = {}
    for step in steps:
        for model_output, tensor in step.outputs:
            if tensor in inputs:
                raise ConfigError(
                    f"in ensemble '{name}', {step.label}: output '{model_output}' is mapped to ensemble "
                    f"input '{tensor}'; an ensemble input cannot be produced by a step"
                )
            if tensor in producer:
                raise ConfigError(
                    f"in ensemble '{name}', {step.label}: ensemble tensor '{tensor}' is already produced by "
                    f"{producer[tensor].label}; an ensemble tensor can appear in an output map only once"
                )
            producer[tensor] = step
    for step in steps:
        for model_input, tensor in step.inputs:
            if tensor not in producer and tensor not in inputs:
                raise ConfigError(
                    f"in ensemble '{name}', {step.label}: input '{model_input}' reads ensemble tensor "
                    f"'{tensor}', which is neither an ensemble input nor produced by any step"
                )
    # Data flow: a step runs once all its inputs exist; what never runs is on a cycle.
    available = set(inputs)
    done: set[int] = set()
    progress = True
    while progress:
        progress = False
        for step in steps:
            if step.index not in done and all(t in available for _, t in step.inputs):
                done.add(step.index)
                available.update(t for _, t in step.outputs)
                progress = True
    if len(done) < len(steps):
        raise ConfigError(f"in ensemble '{name}', steps form a cycle: {_find_cycle(steps, producer, done)}")
    for output in outputs:
        if output not in producer:
            raise ConfigError(f"output '{output}' for ensemble '{name}' is not written by any step")
    consumed = {t for step in steps for _, t in step.inputs}
    for tensor in inputs:
        if tensor not in consumed:
            raise ConfigError(f"ensemble input '{tensor}' for ensemble '{name}' is not used by any step")
    for tensor, step in producer.items():
        if tensor not in consumed and tensor not in outputs:
            raise ConfigError(
                f"ensemble tensor '{tensor}' is unused in ensemble '{name}': {step.label} produces it, but "
                "no step reads it and it is not an ensemble output"
            )


def _find_cycle(steps: list[Step], producer: dict[str, Step], done: set[int]) -> str:
    """``step 0 (model 'a') -> step 1 (model 'b') -> step 0 (model 'a')`` among the steps that never ran."""
    waiting = [s for s in steps if s.index not in done]
    start = waiting[0]
    path: list[Step] = []
    seen: dict[int, int] = {}
    current = start
    while current.index not in seen:
        seen[current.index] = len(path)
        path.append(current)
        # Follow an input that is produced by another step that never ran.
        current = next(
            producer[t] for _, t in current.inputs if t in producer and producer[t].index not in done
        )
    cycle = [*path[seen[current.index] :], current]
    return " -> ".join(s.label for s in cycle)


# -- validation against the composing models ----------------------------------------------------


def _full_dims(dims: list[int], batching: bool) -> list[int]:
    return ([-1] if batching else []) + dims


def validate_composing(ensemble: ModelConfig, steps: list[Step], configs: list[ModelConfig]) -> None:
    """Triton's ValidateEnsembleConfig: names exist, datatypes and shapes agree, batch sizes fit.

    ``configs[i]`` is the (completed) config of step i's composing model."""
    name = ensemble.name
    batching = ensemble.max_batch_size > 0
    # tensor -> (data_type, dims, full_dims, where it was inferred from)
    known: dict[str, tuple[int, list[int], list[int], str]] = {}

    def note(tensor: str, data_type: int, dims: list[int], model_batching: bool, source: str) -> None:
        entry = (data_type, dims, _full_dims(dims, model_batching), source)
        previous = known.get(tensor)
        if previous is None:
            known[tensor] = entry
            return
        if previous[0] != data_type:
            raise ConfigError(
                f"in ensemble '{name}', ensemble tensor '{tensor}': inconsistent data type: "
                f"{_type_name(previous[0])} is inferred from {previous[3]} while {_type_name(data_type)} "
                f"is inferred from {source}"
            )
        if not _dims_match(previous[1], dims) and not _dims_match(previous[2], entry[2]):
            raise ConfigError(
                f"in ensemble '{name}', ensemble tensor '{tensor}': inconsistent shape: {previous[2]} is "
                f"inferred from {previous[3]} while {entry[2]} is inferred from {source}"
            )

    for tensors in (ensemble.input, ensemble.output):
        for t in tensors:
            dims = list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)
            note(t.name, t.data_type, dims, batching, f"ensemble '{name}'")
    for step, config in zip(steps, configs, strict=True):
        where = f"in ensemble '{name}', {step.label}"
        if 0 < config.max_batch_size < ensemble.max_batch_size:
            raise ConfigError(
                f"ensemble '{name}' allows maximum batch size {ensemble.max_batch_size}, but it contains "
                f"model '{step.model_name}' ({step.label}) which only allows maximum batch size to be "
                f"{config.max_batch_size}"
            )
        if config.model_transaction_policy.decoupled:
            raise ConfigError(
                f"{where}: the model is decoupled; decoupled composing models are not supported yet"
            )
        model_batching = config.max_batch_size > 0
        source = f"model '{step.model_name}'"
        model_inputs = {t.name: t for t in config.input}
        model_outputs = {t.name: t for t in config.output}
        if model_inputs:  # a config that declares no inputs (left to the backend) is not checked
            for model_input, tensor in step.inputs:
                spec = model_inputs.get(model_input)
                if spec is None:
                    raise ConfigError(
                        f"{where}: ensemble tensor '{tensor}' is mapping to non-existing input "
                        f"'{model_input}' (the model's inputs: {', '.join(model_inputs)})"
                    )
                note(tensor, spec.data_type, list(spec.dims), model_batching, source)
            mapped = {i for i, _ in step.inputs}
            for spec in config.input:
                if spec.name not in mapped and not spec.optional:
                    raise ConfigError(f"{where}: input '{spec.name}' is not mapped to any ensemble tensor")
        if model_outputs:
            for model_output, tensor in step.outputs:
                spec = model_outputs.get(model_output)
                if spec is None:
                    raise ConfigError(
                        f"{where}: ensemble tensor '{tensor}' is mapped from non-existing output "
                        f"'{model_output}' (the model's outputs: {', '.join(model_outputs)})"
                    )
                note(tensor, spec.data_type, list(spec.dims), model_batching, source)


# -- execution ------------------------------------------------------------------------------------


def _reshape_for(dims: tuple[int, ...], batching: bool, tensor_batch: int, shape: list[int]) -> list[int]:
    """Triton's ReshapeTensorDims: add or strip a batch dimension of 1 between batching and
    non-batching models; otherwise the shape passes through unchanged."""
    if batching != (tensor_batch != 0):
        if batching:
            if _dims_match(list(dims), shape):
                return [1, *shape]
        elif not _dims_match(list(dims), shape) and tensor_batch == 1:
            return shape[1:]
    return shape


@dataclass(slots=True)
class _Plan:
    """The steps needed for one set of requested outputs (Triton prunes the others)."""

    steps: list[Step]
    waiting: dict[int, int]  # step index -> number of distinct input tensors
    consumers: dict[str, list[Step]]


def _consume(task: asyncio.Task[Any]) -> None:
    """Retrieve a background step's exception (the ensemble already failed or went away)."""
    if not task.cancelled():
        task.exception()


class EnsembleModel(ModelVersion):
    """One version of an ensemble: same interface as a scheduled :class:`ModelVersion`."""

    def __init__(
        self, name: str, version: int, config: ModelConfig, model_dir: Path, steps: list[Step], registry: Any
    ) -> None:
        super().__init__(name, version, config, model_dir, None)
        self.steps = steps
        self.registry = registry
        self.composing = sorted({s.model_name for s in steps})
        for step in steps:
            step.requested = [o for o, _ in step.outputs]
        self._plans: dict[frozenset[str], _Plan] = {}

    def _plan(self, wanted: frozenset[str]) -> _Plan:
        plan = self._plans.get(wanted)
        if plan is not None:
            return plan
        producer = {t: s for s in self.steps for _, t in s.outputs}
        needed: set[int] = set()
        todo = [producer[t] for t in wanted if t in producer]
        while todo:
            step = todo.pop()
            if step.index in needed:
                continue
            needed.add(step.index)
            todo.extend(producer[t] for _, t in step.inputs if t in producer)
        steps = [s for s in self.steps if s.index in needed]
        consumers: dict[str, list[Step]] = {}
        for step in steps:
            for tensor in dict.fromkeys(t for _, t in step.inputs):
                consumers.setdefault(tensor, []).append(step)
        waiting = {s.index: len({t for _, t in s.inputs}) for s in steps}
        plan = self._plans[wanted] = _Plan(steps, waiting, consumers)
        return plan

    async def infer(self, request: InferRequest) -> InferResponse:
        request_batch = self.validate(request)
        stats = self.stats
        start = perf_counter_ns()
        stats.pending += 1
        try:
            outputs, compute_ns = await self._run(request, request_batch if self.max_batch_size > 0 else 0)
        except ElastiserveError as exc:
            reason = "REJECTED" if isinstance(exc, Unavailable) else "BACKEND"
            stats.record_request(False, perf_counter_ns() - start, 0, reason)
            raise
        finally:
            stats.pending -= 1
        stats.record_execution(max(1, request_batch), 0, compute_ns, 0)
        stats.record_request(True, perf_counter_ns() - start, 0)
        response = InferResponse(self.name, self.version_str, outputs, id=request.id)
        return self.shape_outputs(request, response)

    async def _run(self, request: InferRequest, batch: int) -> tuple[list[InferTensor], int]:
        wanted = frozenset(o.name for o in request.outputs) if request.outputs else frozenset(self.outputs)
        plan = self._plan(wanted)
        # ensemble tensor -> (tensor, its batch size; 0 when it comes from a non-batching source)
        tensors: dict[str, tuple[InferTensor, int]] = {t.name: (t, batch) for t in request.inputs}
        waiting = dict(plan.waiting)
        ready: list[Step] = []
        for tensor in self.inputs:  # ensemble inputs exist from the start (given or optional)
            for step in plan.consumers.get(tensor, ()):
                waiting[step.index] -= 1
                if not waiting[step.index]:
                    ready.append(step)
        running: dict[asyncio.Task[tuple[list[InferTensor], int, int]], Step] = {}
        compute_ns = 0

        def publish(step: Step, produced: list[InferTensor], step_batch: int) -> None:
            by_name = {t.name: t for t in produced}
            for model_output, tensor in step.outputs:
                found = by_name.get(model_output)
                if found is None:
                    raise Internal(
                        f"in ensemble '{self.name}', {step.label}: the model did not produce output "
                        f"'{model_output}'"
                    )
                tensors[tensor] = (found, step_batch)
                for consumer in plan.consumers.get(tensor, ()):
                    waiting[consumer.index] -= 1
                    if not waiting[consumer.index]:
                        ready.append(consumer)

        try:
            while ready or running:
                if len(ready) == 1 and not running:  # a chain: no task needed
                    step = ready.pop()
                    produced, step_batch, ns = await self._run_step(step, request, tensors)
                    compute_ns += ns
                    publish(step, produced, step_batch)
                    continue
                for step in ready:
                    task = asyncio.ensure_future(self._run_step(step, request, tensors))
                    running[task] = step
                ready.clear()
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    step = running.pop(task)
                    produced, step_batch, ns = task.result()  # raises the step's error
                    compute_ns += ns
                    publish(step, produced, step_batch)
        finally:
            for task in running:  # a failed step: the others finish on their own, ignored
                task.add_done_callback(_consume)
        outputs: list[InferTensor] = []
        batching = self.max_batch_size > 0
        for name in self.outputs:
            if name not in wanted:
                continue
            found = tensors.get(name)
            if found is None:
                raise Internal(f"in ensemble '{self.name}', output '{name}' was not produced")
            tensor, tensor_batch = found
            spec = self.outputs[name]
            shape = _reshape_for(spec.reshape or spec.dims, batching, tensor_batch, list(tensor.shape))
            data = tensor.data
            if shape != list(tensor.shape) and data is not None:
                data = data.reshape(shape)
            outputs.append(InferTensor(name, tensor.datatype, shape, data))
        return outputs, compute_ns

    async def _run_step(
        self, step: Step, request: InferRequest, tensors: dict[str, tuple[InferTensor, int]]
    ) -> tuple[list[InferTensor], int, int]:
        """Run one step on its composing model; errors say which step failed."""
        started = perf_counter_ns()
        try:
            model = self.registry.get(step.model_name, step.model_version)
            batching = model.max_batch_size > 0
            inputs: list[InferTensor] = []
            for model_input, name in step.inputs:
                found = tensors.get(name)
                if found is None:  # an optional ensemble input the client did not send
                    continue
                tensor, tensor_batch = found
                spec = model.inputs.get(model_input)
                shape = list(tensor.shape)
                data = tensor.data
                if spec is not None:
                    new_shape = _reshape_for(spec.dims, batching, tensor_batch, shape)
                    if new_shape != shape:
                        shape = new_shape
                        data = data.reshape(shape) if data is not None else None
                inputs.append(InferTensor(model_input, tensor.datatype, shape, data))
            parameters = {k: v for k, v in request.parameters.items() if k != "timeout"}
            sub = InferRequest(
                model_name=step.model_name,
                inputs=inputs,
                model_version=step.model_version,
                id=request.id,
                outputs=[RequestedOutput(o) for o in step.requested],
                parameters=parameters,
            )
            response = await model.infer(sub)
        except ElastiserveError as exc:
            raise _in_step(exc, f"in ensemble '{self.name}', {step.label}: ") from None
        except Exception as exc:  # a composing model failing in an unexpected way
            log.exception("ensemble '%s' %s failed", self.name, step.label)
            raise Internal(f"in ensemble '{self.name}', {step.label}: {type(exc).__name__}: {exc}") from exc
        step_batch = inputs[0].shape[0] if batching and inputs and inputs[0].shape else 0
        return response.outputs, step_batch, perf_counter_ns() - started


# -- the registry's side --------------------------------------------------------------------------


def read_is_ensemble(model_dir: Path) -> bool:
    """Cheap check used to order loading: does ``config.pbtxt`` declare an ensemble?"""
    path = model_dir / CONFIG_FILENAME
    try:
        config = text_format.Parse(path.read_text(), ModelConfig())
    except Exception:  # unreadable or invalid: the real load reports it
        return False
    return is_ensemble_config(config)


class EnsembleSupport:
    """Ensemble bookkeeping for one :class:`~elastiserve.engine.registry.ModelRegistry`."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self.composing: dict[str, set[str]] = {}  # ensemble -> composing model names (last load)
        self.explicit: set[str] = set()  # models loaded by name (not only as a composing model)
        self.dropped: dict[str, set[str]] = {}  # ensemble -> composing models whose unload dropped it

    # -- building (worker thread) --
    def build(self, location: ModelLocation, config: ModelConfig) -> dict[int, ModelVersion]:
        """The versions of an ensemble, graph-validated. Composing models are checked by ``prepare``."""
        name = location.name
        validate_config(config, name)
        steps = parse_steps(config)
        # Triton wants an (empty) version folder; without one, serve version 1.
        versions = versions_to_serve(config, location.path) if available_versions(location.path) else [1]
        return {
            v: EnsembleModel(name, v, config, location.path, [_copy_step(s) for s in steps], self.registry)
            for v in versions
        }

    # -- hooks called by the registry --
    def order(self, names: list[str], found: dict[str, ModelLocation]) -> list[str]:
        """Start-up order: plain models first, then ensembles (which need them loaded)."""
        flags = {n: n in found and read_is_ensemble(found[n].path) for n in names}
        return sorted(names, key=lambda n: flags[n]) if any(flags.values()) else names

    async def prepare(self, name: str, versions: dict[int, ModelVersion]) -> None:
        """Before an ensemble is published: load missing composing models (explicit mode, or
        not yet attempted), then validate the ensemble against their configs."""
        models = [m for m in versions.values() if isinstance(m, EnsembleModel)]
        if not models:
            return
        registry = self.registry
        chain = _LOAD_CHAIN.get()
        token = _LOAD_CHAIN.set((*chain, name))
        try:
            for composing in models[0].composing:
                if composing == name or composing in chain:
                    start = chain.index(composing) if composing in chain else len(chain)
                    cycle = " -> ".join([*chain[start:], name, composing])
                    raise ConfigError(f"circular dependency between ensembles: {cycle}")
                entry = registry.models.get(composing)
                if entry is not None and entry.versions:
                    continue
                if entry is None or registry.control_mode == "explicit":
                    if registry.repository.find(composing) is None:
                        raise ConfigError(
                            f"ensemble '{name}' contains models that are not available: {composing}"
                        )
                    try:
                        await registry.load(composing)
                    except ElastiserveError as exc:
                        raise ConfigError(
                            f"ensemble '{name}' depends on '{composing}' which has no loaded version. Model "
                            f"'{composing}' loading failed with error: {exc}"
                        ) from None
                else:
                    detail = f" Model '{composing}' failed with error: {entry.reason}" if entry.reason else ""
                    raise ConfigError(
                        f"ensemble '{name}' depends on '{composing}' which has no loaded version.{detail}"
                    )
        finally:
            _LOAD_CHAIN.reset(token)
        for model in models:
            self._check(model)

    def _check(self, model: EnsembleModel) -> None:
        registry = self.registry
        configs = []
        for step in model.steps:
            try:
                configs.append(registry.get(step.model_name, step.model_version).config)
            except ElastiserveError:
                if step.model_version:
                    raise ConfigError(
                        f"ensemble '{model.name}' depends on '{step.model_name}' whose required version "
                        f"{step.model_version} is not loaded"
                    ) from None
                raise ConfigError(
                    f"ensemble '{model.name}' depends on '{step.model_name}' which has no loaded version"
                ) from None
        validate_composing(model.config, model.steps, configs)

    async def after_load(self, name: str) -> None:
        """After ``name`` loaded: remember explicit loads, re-check ensembles that use it, bring
        back ensembles that were dropped only because it was missing."""
        registry = self.registry
        chain = _LOAD_CHAIN.get()  # ensembles still being loaded by this task: never touch them here
        if not chain:
            self.explicit.add(name)
        entry = registry.models.get(name)
        models = list(entry.versions.values()) if entry is not None else []
        if models and isinstance(models[0], EnsembleModel):
            self.composing[name] = set(models[0].composing)
            self.dropped.pop(name, None)
        for ensemble in self._users_of(name):
            if ensemble in chain:
                continue
            ensemble_entry = registry.models[ensemble]
            for model in list(ensemble_entry.versions.values()):
                try:
                    self._check(model)  # type: ignore[arg-type]
                except ConfigError as exc:
                    await self._drop(ensemble, str(exc), set())
                    break
        if chain:  # inside an ensemble's load: the outermost load brings dropped ensembles back
            return
        for ensemble, missing in list(self.dropped.items()):
            if all(registry.models.get(m) is not None and registry.models[m].versions for m in missing):
                self.dropped.pop(ensemble, None)
                with contextlib.suppress(ElastiserveError):
                    await registry.load(ensemble)

    async def after_unload(self, name: str, unload_dependents: bool) -> None:
        """After ``name`` was unloaded: ensembles using it become unavailable (Triton's
        dependency graph); with ``unload_dependents``, composing models of ``name`` that were
        loaded only for it and serve no other ensemble are unloaded too."""
        self.explicit.discard(name)
        self.dropped.pop(name, None)
        for ensemble in self._users_of(name):
            await self._drop(
                ensemble, f"ensemble '{ensemble}' contains models that are not available: {name}", {name}
            )
        if unload_dependents:
            for composing in sorted(self.composing.get(name, ())):
                entry = self.registry.models.get(composing)
                if entry is None or not entry.versions or composing in self.explicit:
                    continue
                if self._users_of(composing):
                    continue
                with contextlib.suppress(ElastiserveError):
                    await self.registry.unload(composing, unload_dependents=True)

    def _users_of(self, name: str) -> list[str]:
        """Loaded ensembles with a step on ``name``."""
        users = []
        for entry in self.registry.models.values():
            for model in entry.versions.values():
                if isinstance(model, EnsembleModel) and name in model.composing:
                    users.append(entry.name)
                    break
        return users

    async def _drop(self, ensemble: str, reason: str, missing: set[str]) -> None:
        from elastiserve.engine.registry import UNAVAILABLE

        registry = self.registry
        async with registry._lock(ensemble):
            entry = registry.models.get(ensemble)
            if entry is None or not entry.versions:
                return
            entry.versions = {}
            entry.state, entry.reason = UNAVAILABLE, reason
        log.error("%s", reason)
        if missing:
            self.dropped.setdefault(ensemble, set()).update(missing)
        # Ensembles built on this one lose a composing model in turn.
        for user in self._users_of(ensemble):
            await self._drop(
                user, f"ensemble '{user}' contains models that are not available: {ensemble}", {ensemble}
            )


def _in_step(exc: ElastiserveError, prefix: str) -> ElastiserveError:
    """The same error (class, code) with the ensemble and step in front of its message."""
    if exc.code == "unsupported" and type(exc) is not Unsupported:  # e.g. a decoupled model's
        return Unsupported(prefix + exc.message)  # frontends rewrite that one's message
    error = copy.copy(exc)
    error.message = prefix + exc.message
    error.args = (error.message,)
    return error


def _copy_step(step: Step) -> Step:
    return Step(step.index, step.model_name, step.model_version, list(step.inputs), list(step.outputs))
