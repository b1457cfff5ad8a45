"""Ensembles: graph validation, validation against composing models, execution in-process
(concurrency, pruning, errors naming the step, statistics) and the registry's dependency rules."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc.model_config_pb2 import ModelConfig

from elastiserve.engine.dataplane import DataPlane
from elastiserve.engine.ensemble import EnsembleModel, parse_steps, validate_composing
from elastiserve.engine.registry import ModelRegistry
from elastiserve.engine.repository import ModelRepository
from elastiserve.errors import ConfigError, ElastiserveError, InvalidArgument
from elastiserve.types import InferRequest, InferTensor, RequestedOutput

from .ensemble_models import SCALE_MODEL, SLEEP, scale_config, write, write_repo
from .python_backend_support import ADD_SUB_MODEL, add_sub_config


def config(text: str) -> ModelConfig:
    return text_format.Parse(text, ModelConfig())


def ensemble(steps: str, inputs: str = "A", outputs: str = "OUT", name: str = "e", extra: str = "") -> str:
    ins = ", ".join(f'{{ name: "{n}" data_type: TYPE_FP32 dims: [ 16 ] }}' for n in inputs.split())
    outs = ", ".join(f'{{ name: "{n}" data_type: TYPE_FP32 dims: [ 16 ] }}' for n in outputs.split())
    return (
        f'name: "{name}" platform: "ensemble" max_batch_size: 8 input [ {ins} ] output [ {outs} ] {extra} '
        f"ensemble_scheduling {{ step [ {steps} ] }}"
    )


def step(model: str, ins: dict[str, str], outs: dict[str, str], version: int = -1) -> str:
    maps = " ".join(f'input_map {{ key: "{k}" value: "{v}" }}' for k, v in ins.items())
    maps += " " + " ".join(f'output_map {{ key: "{k}" value: "{v}" }}' for k, v in outs.items())
    return f'{{ model_name: "{model}" model_version: {version} {maps} }}'


# -- graph validation ----------------------------------------------------------------------------

BAD_GRAPHS = {
    "cycle": (
        ensemble(
            ",".join(
                [
                    step("m", {"X": "A"}, {"Y": "OUT"}),
                    step("p", {"X": "T2"}, {"Y": "T1"}),
                    step("q", {"X": "T1"}, {"Y": "T2"}),
                ]
            )
        ),
        "in ensemble 'e', steps form a cycle: step 1 (model 'p') -> step 2 (model 'q') -> step 1 (model 'p')",
    ),
    "missing producer": (
        ensemble(step("m", {"X": "A", "Z": "NOWHERE"}, {"Y": "OUT"})),
        "in ensemble 'e', step 0 (model 'm'): input 'Z' reads ensemble tensor 'NOWHERE', which is neither an "
        "ensemble input nor produced by any step",
    ),
    "produced twice": (
        ensemble(",".join([step("m", {"X": "A"}, {"Y": "OUT"}), step("n", {"X": "A"}, {"Y": "OUT"})])),
        "in ensemble 'e', step 1 (model 'n'): ensemble tensor 'OUT' is already produced by step 0 (model 'm')",
    ),
    "output never produced": (
        ensemble(step("m", {"X": "A"}, {"Y": "OUT"}), outputs="OUT NEVER"),
        "output 'NEVER' for ensemble 'e' is not written by any step",
    ),
    "input unused": (
        ensemble(step("m", {"X": "A"}, {"Y": "OUT"}), inputs="A B"),
        "ensemble input 'B' for ensemble 'e' is not used by any step",
    ),
    "intermediate unused": (
        ensemble(step("m", {"X": "A"}, {"Y": "OUT", "Z": "LOST"})),
        "ensemble tensor 'LOST' is unused in ensemble 'e': step 0 (model 'm') produces it",
    ),
    "writes an input": (
        ensemble(step("m", {"X": "A"}, {"Y": "A", "Z": "OUT"})),
        "output 'Y' is mapped to ensemble input 'A'",
    ),
    "no steps": (
        'name: "e" platform: "ensemble" ensemble_scheduling { }',
        "must specify 'step' for ensemble 'e'",
    ),
    "no output_map": (
        ensemble('{ model_name: "m" input_map { key: "X" value: "A" } }'),
        "must specify 'output_map' in step 0 of ensemble 'e'",
    ),
    "instance group": (
        ensemble(step("m", {"X": "A"}, {"Y": "OUT"}), extra="instance_group [ { count: 2 } ]"),
        "instance group should not be specified for ensemble 'e'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_GRAPHS))
def test_graph_validation_names_the_problem(case: str) -> None:
    text, message = BAD_GRAPHS[case]
    with pytest.raises(ConfigError) as info:
        parse_steps(config(text))
    assert message in str(info.value)


def test_valid_graph_steps() -> None:
    steps = parse_steps(
        config(
            ensemble(",".join([step("m", {"X": "T"}, {"Y": "OUT"}, 3), step("n", {"X": "A"}, {"Y": "T"})]))
        )
    )
    assert [(s.index, s.model_name, s.model_version) for s in steps] == [(0, "m", "3"), (1, "n", "")]
    assert steps[0].inputs == [("X", "T")] and steps[1].outputs == [("Y", "T")]


def test_composing_validation() -> None:
    e = config(ensemble(step("m", {"X": "A"}, {"Y": "OUT"})))
    steps = parse_steps(e)
    good = config(scale_config("m"))
    validate_composing(e, steps, [good])
    cases = {
        scale_config("m").replace(
            'name: "X"', 'name: "IN"'
        ): "ensemble tensor 'A' is mapping to non-existing input 'X'",
        scale_config("m").replace('name: "Y"', 'name: "OUT0"'): "is mapped from non-existing output 'Y'",
        scale_config("m").replace(
            "TYPE_FP32 dims: [ 16 ] } ]\noutput", "TYPE_INT32 dims: [ 16 ] } ]\noutput"
        ): (
            "in ensemble 'e', ensemble tensor 'A': inconsistent data type: TYPE_FP32 is inferred from ensemble "
            "'e' while TYPE_INT32 is inferred from model 'm'"
        ),
        scale_config("m").replace(
            "dims: [ 16 ] } ]\noutput", "dims: [ 4 ] } ]\noutput"
        ): "inconsistent shape",
        scale_config("m", extra="model_transaction_policy { decoupled: true }"): (
            "in ensemble 'e', step 0 (model 'm'): the model is decoupled"
        ),
        scale_config("m", max_batch_size=4): (
            "ensemble 'e' allows maximum batch size 8, but it contains model 'm' (step 0 (model 'm')) which only "
            "allows maximum batch size to be 4"
        ),
    }
    for composing, message in cases.items():
        with pytest.raises(ConfigError) as info:
            validate_composing(e, steps, [config(composing)])
        assert message in str(info.value), composing
    two_inputs = config(add_sub_config("m"))
    with pytest.raises(
        ConfigError, match="in ensemble 'e', step 0 \\(model 'm'\\): ensemble tensor 'A' is mapping"
    ):
        validate_composing(e, steps, [two_inputs])


# -- in-process execution ---------------------------------------------------------------------------


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[DataPlane, ModelRegistry]]:
    registry = ModelRegistry(ModelRepository([write_repo(tmp_path)]))
    dataplane = DataPlane(registry)
    registry.server = dataplane
    assert await registry.load_initial([]) == []
    try:
        yield dataplane, registry
    finally:
        await registry.close()


def fp32(name: str, value: float, batch: int = 1) -> InferTensor:
    return InferTensor(name, "FP32", [batch, 16], np.full((batch, 16), value, np.float32))


def pipe_request(a: float, b: float, model: str = "pipe", batch: int = 1, **kwargs: object) -> InferRequest:
    return InferRequest(model, [fp32("A", a, batch), fp32("B", b, batch)], **kwargs)  # type: ignore[arg-type]


async def test_pipeline_versions_and_metadata(served: tuple[DataPlane, ModelRegistry]) -> None:
    dataplane, registry = served
    response = await dataplane.infer(pipe_request(3, 1, batch=2, id="r1"))
    assert (response.model_name, response.model_version, response.id) == ("pipe", "1", "r1")
    assert [t.name for t in response.outputs] == ["OUT", "DIFF"]
    np.testing.assert_array_equal(response.output("OUT").data, np.full((2, 16), 8, np.float32))  # type: ignore[union-attr]
    np.testing.assert_array_equal(response.output("DIFF").data, np.full((2, 16), 2, np.float32))  # type: ignore[union-attr]
    latest = await dataplane.infer(pipe_request(3, 1, model="pipe_latest"))  # scale version 2 (x10)
    assert latest.output("OUT").data[0, 0] == 40  # type: ignore[union-attr,index]
    meta = dataplane.model_metadata("pipe")
    assert meta["platform"] == "ensemble" and meta["versions"] == ["1"]
    assert meta["inputs"][0] == {"name": "A", "datatype": "FP32", "shape": [-1, 16]}
    assert isinstance(registry.get("diamond"), EnsembleModel)  # no version folder: version 1
    assert {r["name"]: r["state"] for r in dataplane.repository_index()}["diamond"] == "READY"


async def test_requested_outputs_prune_steps(served: tuple[DataPlane, ModelRegistry]) -> None:
    dataplane, registry = served
    scale = registry.get("scale", "1").stats
    before = scale.execution_count
    response = await dataplane.infer(pipe_request(3, 1, outputs=[RequestedOutput("DIFF")]))
    assert [t.name for t in response.outputs] == ["DIFF"]
    assert scale.execution_count == before  # the scale step was not needed
    with pytest.raises(InvalidArgument, match="unexpected inference output 'SUM' for model 'pipe'"):
        await dataplane.infer(pipe_request(3, 1, outputs=[RequestedOutput("SUM")]))


async def test_independent_steps_run_concurrently(served: tuple[DataPlane, ModelRegistry]) -> None:
    dataplane, _ = served
    await dataplane.infer(InferRequest("diamond", [fp32("A", 1)]))  # warm
    start = time.perf_counter()
    response = await dataplane.infer(InferRequest("diamond", [fp32("A", 1)]))
    elapsed = time.perf_counter() - start
    assert response.output("SUM").data[0, 0] == 5 and response.output("DIFF").data[0, 0] == -1  # type: ignore[union-attr,index]
    assert elapsed < 2 * SLEEP * 0.9, f"branches ran one after the other ({elapsed:.3f}s)"
    # Several ensemble requests at once interleave too.
    start = time.perf_counter()
    await asyncio.gather(*(dataplane.infer(InferRequest("diamond", [fp32("A", i)])) for i in range(2)))
    assert time.perf_counter() - start < 4 * SLEEP * 0.9


async def test_errors_name_the_step_and_count(served: tuple[DataPlane, ModelRegistry]) -> None:
    dataplane, registry = served
    with pytest.raises(ElastiserveError) as info:
        await dataplane.infer(pipe_request(-1000, 1))  # add_sub gives -999: scale refuses it
    assert str(info.value).startswith("in ensemble 'pipe', step 1 (model 'scale'): ")
    assert "scale refuses -999" in str(info.value)
    small = InferTensor("A", "FP32", [1, 4], np.ones((1, 4), np.float32))
    with pytest.raises(InvalidArgument, match=r"unexpected shape for input 'A' for model 'pipe'"):
        await dataplane.infer(InferRequest("pipe", [fp32("B", 1), small]))
    with pytest.raises(InvalidArgument) as bad_shape:  # the composing model's validation, naming the step
        await dataplane.infer(InferRequest("loose", [small]))
    assert str(bad_shape.value).startswith(
        "in ensemble 'loose', step 0 (model 'scale'): [request id: <id_unknown>] unexpected shape for input 'X' "
        "for model 'scale'. Expected [-1,16], got [1,4]."
    )
    stats = registry.get("pipe").stats.as_dict()
    assert (
        stats["inference_stats"]["fail"]["count"] == 1
    )  # the ensemble's own request validation is not counted
    ok = await dataplane.infer(pipe_request(1, 1, batch=3))
    assert ok.output("OUT").data.shape == (3, 16)  # type: ignore[union-attr]
    stats = registry.get("pipe").stats.as_dict()
    assert stats["inference_stats"]["success"]["count"] == 1 and stats["execution_count"] == 1
    assert stats["inference_count"] == 3 and stats["batch_stats"][0]["batch_size"] == 3
    # composing models count their executions as for a direct call
    add_sub = registry.get("add_sub").stats.as_dict()
    assert add_sub["inference_stats"]["success"]["count"] == 2 and add_sub["inference_count"] == 4
    scale = registry.get("scale", "1").stats.as_dict()
    assert (
        scale["inference_stats"]["fail"]["count"] == 1 and scale["inference_stats"]["success"]["count"] == 1
    )


async def test_unknown_version_step_fails_at_load(tmp_path: Path) -> None:
    write(tmp_path, "scale", scale_config("scale"), SCALE_MODEL)
    write(tmp_path, "e", ensemble(step("scale", {"X": "A"}, {"Y": "OUT"}, version=7)))
    registry = ModelRegistry(ModelRepository([tmp_path]))
    failures = await registry.load_initial([])
    try:
        assert failures == ["ensemble 'e' depends on 'scale' whose required version 7 is not loaded"]
        assert registry.is_ready("scale") and not registry.is_ready("e")
    finally:
        await registry.close()


# -- registry: explicit mode, dependencies ------------------------------------------------------------


async def test_explicit_load_brings_composing_models_and_unload_dependents(tmp_path: Path) -> None:
    registry = ModelRegistry(ModelRepository([write_repo(tmp_path)]), control_mode="explicit")
    registry.server = DataPlane(registry)
    assert await registry.load_initial(["pipe"]) == []
    try:
        assert [r["name"] for r in registry.index(ready_only=True)] == ["add_sub", "pipe", "scale", "scale"]
        await registry.load("add_sub")  # now explicitly loaded: stays when pipe goes
        await registry.unload("pipe", unload_dependents=True)
        assert {r["name"] for r in registry.index(ready_only=True)} == {"add_sub"}
        # without unload_dependents the composing models stay
        await registry.load("pipe")
        await registry.unload("pipe")
        assert {r["name"] for r in registry.index(ready_only=True)} == {"add_sub", "scale"}
        # a composing model shared with another ensemble stays while that ensemble uses it
        await registry.load("pipe")
        await registry.load("pipe_latest")
        await registry.unload("pipe", unload_dependents=True)
        assert {r["name"] for r in registry.index(ready_only=True)} == {"add_sub", "pipe_latest", "scale"}
    finally:
        await registry.close()


async def test_unloading_a_composing_model_drops_the_ensemble_until_it_returns(tmp_path: Path) -> None:
    registry = ModelRegistry(ModelRepository([write_repo(tmp_path)]), control_mode="explicit")
    dataplane = DataPlane(registry)
    registry.server = dataplane
    await registry.load_initial(["pipe"])
    try:
        await registry.unload("scale")
        row = next(r for r in registry.index() if r["name"] == "pipe")
        assert row["state"] == "UNAVAILABLE"
        assert row["reason"] == "ensemble 'pipe' contains models that are not available: scale"
        with pytest.raises(ElastiserveError, match="'pipe' has no available versions"):
            await dataplane.infer(pipe_request(1, 1))
        await registry.load("scale")
        assert registry.is_ready("pipe")
        assert (await dataplane.infer(pipe_request(1, 1))).output("OUT").data[0, 0] == 4  # type: ignore[union-attr,index]
    finally:
        await registry.close()


async def test_circular_ensembles_and_missing_models(tmp_path: Path) -> None:
    write(tmp_path, "scale", scale_config("scale"), SCALE_MODEL)
    write(tmp_path, "e1", ensemble(step("e2", {"A": "A"}, {"OUT": "OUT"}), name="e1"))
    write(tmp_path, "e2", ensemble(step("e1", {"A": "A"}, {"OUT": "OUT"}), name="e2"))
    write(tmp_path, "lonely", ensemble(step("ghost", {"X": "A"}, {"Y": "OUT"}), name="lonely"))
    registry = ModelRegistry(ModelRepository([tmp_path]), control_mode="explicit")
    await registry.load_initial([])
    try:
        with pytest.raises(ConfigError, match="circular dependency between ensembles: e1 -> e2 -> e1"):
            await asyncio.wait_for(registry.load("e1"), 10)
        with pytest.raises(
            ConfigError, match="ensemble 'lonely' contains models that are not available: ghost"
        ):
            await registry.load("lonely")
        assert "ghost" not in {r["name"] for r in registry.index()}
    finally:
        await registry.close()


async def test_bad_ensembles_do_not_stop_other_models(tmp_path: Path) -> None:
    write(tmp_path, "add_sub", add_sub_config("add_sub"), ADD_SUB_MODEL)
    write(
        tmp_path,
        "cyc",
        ensemble(
            ",".join([step("add_sub", {"INPUT0": "T", "INPUT1": "A"}, {"OUTPUT0": "OUT", "OUTPUT1": "T"})]),
            name="cyc",
        ),
    )
    registry = ModelRegistry(ModelRepository([tmp_path]))
    failures = await registry.load_initial([])
    try:
        assert len(failures) == 1 and "steps form a cycle" in failures[0]
        assert registry.is_ready("add_sub") and not registry.all_ready()
    finally:
        await registry.close()


async def test_nested_ensembles_load_in_dependency_order(tmp_path: Path) -> None:
    write_repo(tmp_path)
    write(
        tmp_path,
        "a_outer",
        ensemble(step("pipe", {"A": "A", "B": "B"}, {"OUT": "OUT"}), "A B", name="a_outer"),
    )
    registry = ModelRegistry(ModelRepository([tmp_path]))
    dataplane = DataPlane(registry)
    registry.server = dataplane
    assert await registry.load_initial([]) == []  # a_outer sorts first: it loads pipe on demand
    try:
        response = await dataplane.infer(pipe_request(2, 1, model="a_outer"))
        assert [t.name for t in response.outputs] == ["OUT"] and response.output("OUT").data[0, 0] == 6  # type: ignore[union-attr,index]
        assert (
            registry.get("pipe").stats.success.count == 1 and registry.get("add_sub").stats.success.count == 1
        )
        await registry.unload("scale")  # pipe goes, and a_outer with it
        states = {r["name"]: (r["state"], r["reason"]) for r in registry.index()}
        assert states["a_outer"] == (
            "UNAVAILABLE",
            "ensemble 'a_outer' contains models that are not available: pipe",
        )
        await registry.load("scale")  # none mode here, but the registry API still reloads
        assert registry.is_ready("pipe") and registry.is_ready("a_outer")
    finally:
        await registry.close()
