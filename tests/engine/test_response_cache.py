"""Response cache: --cache-config parsing, keys, LRU bound in bytes, hits skip the model, stats and
metrics, and Triton's rules (no server cache -> warning, decoupled/sequence models not cached)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from elastiserve.engine.config import apply_defaults, parse_config_text
from elastiserve.engine.metrics import EngineMetrics
from elastiserve.engine.model import ModelVersion
from elastiserve.engine.options import parse_cache_config, parse_serve_args
from elastiserve.engine.registry import ModelRegistry
from elastiserve.engine.repository import ModelRepository
from elastiserve.engine.response_cache import CachedModelVersion, ResponseCache, make_model_version
from elastiserve.engine.scheduler import Scheduler
from elastiserve.errors import ConfigError, ElastiserveError
from elastiserve.types import InferRequest, InferResponse, InferTensor, RequestedOutput

from .python_backend_support import ADD_SUB_MODEL, add_sub_config, write_model

CONFIG = """
name: "m" backend: "python" max_batch_size: 8
input [ { name: "IN" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ -1 ] }, { name: "NEG" data_type: TYPE_FP32 dims: [ -1 ] } ]
response_cache { enable: true }
"""


class Counting:
    """Doubles IN; counts executions."""

    def __init__(self) -> None:
        self.calls = 0

    def execute(self, requests: list[InferRequest]) -> list[InferResponse | ElastiserveError]:
        self.calls += 1
        out: list[InferResponse | ElastiserveError] = []
        for r in requests:
            data = r.inputs[0].data
            assert data is not None
            shape = list(data.shape)
            out.append(
                InferResponse(
                    "m",
                    "1",
                    [InferTensor("OUT", "FP32", shape, data * 2), InferTensor("NEG", "FP32", shape, -data)],
                )
            )
        return out

    def close(self) -> None:
        pass


def make(cache: ResponseCache | None, text: str = CONFIG) -> tuple[ModelVersion, Counting]:
    config = parse_config_text(text, "m")
    apply_defaults(config, "m")
    instance = Counting()
    model = make_model_version("m", 1, config, Path("."), cache)
    model.scheduler = Scheduler(config, [instance], model.stats, "inline")
    return model, instance


def req(values: list[float], req_id: str = "", outputs: list[str] | None = None) -> InferRequest:
    data = np.asarray([values], np.float32)
    return InferRequest(
        "m",
        [InferTensor("IN", "FP32", list(data.shape), data)],
        id=req_id,
        outputs=[RequestedOutput(o) for o in outputs or []],
    )


def test_cache_config_flag() -> None:
    assert parse_cache_config([]) == 0
    assert parse_cache_config(["local,size=1048576"]) == 1048576
    options = parse_serve_args(["--model-repository=/m", "--cache-config", "local,size=4096"])
    assert options.cache_size == 4096 and not options.warnings
    for bad, message in (
        ("local,size=abc", "size must be a positive number of bytes"),
        ("local,size=0", "size must be a positive number of bytes"),
        ("local", "expected 'local,size=<bytes>'"),
        ("redis,host=localhost", "cache 'redis' is not supported"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_serve_args(["--model-repository=/m", f"--cache-config={bad}"])


async def test_hit_returns_a_copy_without_running_the_model() -> None:
    cache = ResponseCache(1 << 20)
    model, instance = make(cache)
    assert isinstance(model, CachedModelVersion)
    first = await model.infer(req([1, 2], "a"))
    second = await model.infer(req([1, 2], "b"))
    assert instance.calls == 1 and second.id == "b" and first.id == "a"
    np.testing.assert_array_equal(second.outputs[0].data, [[2, 4]])  # type: ignore[arg-type]
    assert second.outputs is not first.outputs and second.outputs[0] is not first.outputs[0]
    with pytest.raises(ValueError):
        second.outputs[0].data[0, 0] = 7  # type: ignore[index]  # cached tensors are read-only
    await model.infer(req([1, 3]))  # another input: a miss
    await model.infer(req([1, 2], outputs=["NEG"]))  # other requested outputs: a miss
    assert instance.calls == 3
    hit = await model.infer(req([1, 2], outputs=["NEG"]))
    assert [o.name for o in hit.outputs] == ["NEG"] and instance.calls == 3
    stats = model.stats.as_dict()
    assert stats["inference_stats"]["cache_hit"]["count"] == 2
    assert stats["inference_stats"]["cache_miss"]["count"] == 3
    assert stats["inference_stats"]["success"]["count"] == 5
    assert stats["inference_count"] == 3 and stats["execution_count"] == 3  # hits are not inferences
    assert stats["inference_stats"]["cache_hit"]["ns"] > 0


async def test_failed_requests_are_not_cached() -> None:
    model, instance = make(ResponseCache(1 << 20))
    bad = InferRequest("m", [InferTensor("IN", "INT32", [1, 1], np.zeros((1, 1), np.int32))])
    for _ in range(2):
        with pytest.raises(ElastiserveError, match="data-type"):
            await model.infer(bad)
    assert instance.calls == 0 and model.stats.cache_miss.count == 0


def test_lru_is_bounded_by_bytes() -> None:
    cache = ResponseCache(1100)
    keys = [cache.key("m", "1", req([float(i)] * 4)) for i in range(4)]
    assert len(set(keys)) == 4
    response = InferResponse("m", "1", [InferTensor("OUT", "FP32", [1, 50], np.zeros((1, 50), np.float32))])
    for key in keys[:3]:
        assert cache.insert(key, response)  # 200 bytes of data + overhead each
    assert len(cache) == 3 and cache.used <= 1100
    assert cache.lookup(keys[0], "") is not None  # now the most recently used
    assert cache.insert(keys[3], response)
    assert len(cache) == 3 and cache.evictions == 1 and cache.used <= 1100
    assert cache.lookup(keys[1], "") is None  # the least recently used went
    assert cache.lookup(keys[0], "") is not None and cache.lookup(keys[3], "") is not None
    huge = InferResponse("m", "1", [InferTensor("OUT", "FP32", [1, 500], np.zeros((1, 500), np.float32))])
    assert not cache.insert(keys[1], huge) and len(cache) == 3


def test_key_covers_model_version_shape_datatype_and_parameters() -> None:
    base = req([1, 2])
    key = ResponseCache.key("m", "1", base)
    assert ResponseCache.key("m", "1", req([1, 2], "other-id")) == key
    assert ResponseCache.key("n", "1", base) != key and ResponseCache.key("m", "2", base) != key
    reshaped = req([1, 2])
    reshaped.inputs[0].shape = [2, 1]
    assert ResponseCache.key("m", "1", reshaped) != key
    with_param = req([1, 2])
    with_param.parameters = {"custom": 1}
    assert ResponseCache.key("m", "1", with_param) != key
    with_param.parameters = {"binary_data_output": True, "timeout": 5}
    assert ResponseCache.key("m", "1", with_param) == key
    strings = InferRequest("m", [InferTensor("IN", "BYTES", [2], np.array([b"a", b"bc"], dtype=np.object_))])
    other = InferRequest("m", [InferTensor("IN", "BYTES", [2], np.array([b"ab", b"c"], dtype=np.object_))])
    assert ResponseCache.key("m", "1", strings) != ResponseCache.key("m", "1", other)


def test_models_that_are_never_cached(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        model, _ = make(None)
    assert type(model) is ModelVersion
    assert "enables response_cache but the server has no cache configured" in caplog.text
    decoupled = CONFIG + "model_transaction_policy { decoupled: true }"
    assert type(make(ResponseCache(100), decoupled)[0]) is ModelVersion
    assert (
        type(make(ResponseCache(100), CONFIG.replace("response_cache { enable: true }", ""))[0])
        is ModelVersion
    )
    sequence = CONFIG + "sequence_batching { }"
    config = parse_config_text(sequence, "m")
    assert type(make_model_version("m", 1, config, Path("."), ResponseCache(100))) is ModelVersion


async def test_registry_models_use_the_server_cache_and_metrics(tmp_path: Path) -> None:
    write_model(
        tmp_path, "cached", ADD_SUB_MODEL, add_sub_config("cached", extra="response_cache { enable: true }")
    )
    write_model(tmp_path, "plain", ADD_SUB_MODEL, add_sub_config("plain"))
    registry = ModelRegistry(ModelRepository([str(tmp_path)]), control_mode="explicit")
    registry.response_cache = ResponseCache(1 << 20)
    try:
        assert await registry.load_initial(["*"]) == []
        cached, plain = registry.get("cached"), registry.get("plain")
        assert isinstance(cached, CachedModelVersion) and type(plain) is ModelVersion
        for model in (cached, plain):
            for _ in range(2):
                request = InferRequest(
                    model.name,
                    [
                        InferTensor("INPUT0", "FP32", [1, 16], np.ones((1, 16), np.float32)),
                        InferTensor("INPUT1", "FP32", [1, 16], np.ones((1, 16), np.float32)),
                    ],
                )
                await model.infer(request)
        text = EngineMetrics(registry).render().decode()
        assert 'nv_cache_num_hits_per_model{model="cached",version="1"} 1.0' in text
        assert 'nv_cache_num_misses_per_model{model="cached",version="1"} 1.0' in text
        assert 'nv_cache_num_hits_per_model{model="plain",version="1"} 0.0' in text
        assert 'nv_cache_hit_duration_per_model{model="cached",version="1"}' in text
        assert 'nv_inference_exec_count{model="cached",version="1"} 1.0' in text
        stats = registry.statistics("cached")[0]["inference_stats"]
        assert stats["cache_hit"]["count"] == 1 and stats["cache_miss"]["count"] == 1
    finally:
        await registry.close()
