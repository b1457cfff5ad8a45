"""Triton's response cache: identical requests to a model answered without running it.

Enabled per server with ``--cache-config=local,size=<bytes>`` and per model with
``response_cache { enable: true }``. The key hashes the model name and version, every input
(name, datatype, shape, bytes), the requested outputs with their parameters and the request
parameters that can change a result. Entries are evicted least recently used first so the
cached tensors never exceed ``size`` bytes. Like Triton, decoupled and sequence models are
never cached, and a model that asks for the cache on a server without one gets a warning.

Cost: the choice is made when a model version is built (:func:`make_model_version`), so
models without the cache keep the plain :class:`ModelVersion` and pay nothing.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any

import numpy as np

from elastiserve.engine.model import ModelVersion
from elastiserve.types import InferRequest, InferResponse, InferTensor

if TYPE_CHECKING:
    from tritonclient.grpc.model_config_pb2 import ModelConfig

log = logging.getLogger(__name__)

# Request parameters that never change what a model computes (transport, scheduling).
_NEUTRAL_PARAMETERS = frozenset({"binary_data_output", "timeout", "priority", "headers"})
_ENTRY_OVERHEAD = 64  # bytes counted per tensor and per entry on top of the data


@dataclass(slots=True)
class _Entry:
    response: InferResponse
    size: int


def _tensor_bytes(data: np.ndarray | None) -> int:
    if data is None:
        return 0
    if data.dtype == np.object_:
        return sum(len(v) if isinstance(v, bytes | str) else 8 for v in data.flat) + 8 * data.size
    return int(data.nbytes)


class ResponseCache:
    """LRU cache of responses bounded by the bytes of their tensors; event-loop thread only."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self.evictions = 0
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(model: str, version: str, request: InferRequest) -> bytes:
        digest = hashlib.blake2b(digest_size=20)
        update = digest.update
        update(f"{model}\0{version}\0".encode())
        for tensor in sorted(request.inputs, key=lambda t: t.name):
            update(f"{tensor.name}\0{tensor.datatype}\0{tensor.shape}\0".encode())
            data = tensor.data
            if data is None:
                continue
            if data.dtype == np.object_:
                for value in data.flat:
                    raw = value if isinstance(value, bytes) else str(value).encode()
                    update(len(raw).to_bytes(8, "little"))
                    update(raw)
            else:
                update(np.ascontiguousarray(data).data)
        for output in request.outputs:
            params = {k: v for k, v in output.parameters.items() if k != "binary_data"}
            update(f"out\0{output.name}\0{sorted(params.items())!r}\0".encode())
        if request.parameters:
            params = {k: v for k, v in request.parameters.items() if k not in _NEUTRAL_PARAMETERS}
            if params:
                update(f"params\0{sorted(params.items(), key=lambda kv: kv[0])!r}".encode())
        return digest.digest()

    def lookup(self, key: bytes, request_id: str) -> InferResponse | None:
        """A fresh copy of the cached response (tensors shared, read-only), or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        cached = entry.response
        return InferResponse(
            cached.model_name,
            cached.model_version,
            [
                InferTensor(t.name, t.datatype, list(t.shape), t.data, dict(t.parameters))
                for t in cached.outputs
            ],
            id=request_id,
            parameters=dict(cached.parameters),
        )

    def insert(self, key: bytes, response: InferResponse) -> bool:
        """Store a copy of ``response``; False when it is larger than the whole cache."""
        outputs = []
        size = _ENTRY_OVERHEAD + len(key)
        for tensor in response.outputs:
            data = tensor.data
            if data is not None:
                data = data.copy()
                data.flags.writeable = False
            outputs.append(
                InferTensor(tensor.name, tensor.datatype, list(tensor.shape), data, dict(tensor.parameters))
            )
            size += _ENTRY_OVERHEAD + _tensor_bytes(data)
        if size > self.capacity:
            log.debug(
                "response of %d bytes is larger than the cache (%d bytes): not cached", size, self.capacity
            )
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self.used -= old.size
        while self._entries and self.used + size > self.capacity:
            _, evicted = self._entries.popitem(last=False)
            self.used -= evicted.size
            self.evictions += 1
        stored = InferResponse(
            response.model_name, response.model_version, outputs, parameters=dict(response.parameters)
        )
        self._entries[key] = _Entry(stored, size)
        self.used += size
        return True


class CachedModelVersion(ModelVersion):
    """A model version whose successful responses are cached; hits skip validation and execution."""

    cache: ResponseCache

    async def infer(self, request: InferRequest) -> InferResponse:
        start = perf_counter_ns()
        cache = self.cache
        key = cache.key(self.name, self.version_str, request)
        hit = cache.lookup(key, request.id)
        if hit is not None:
            elapsed = perf_counter_ns() - start
            self.stats.cache_hit.add(elapsed)
            self.stats.record_request(True, elapsed, 0)
            return hit
        lookup_ns = perf_counter_ns() - start
        response = await super().infer(request)
        insert_start = perf_counter_ns()
        cache.insert(key, response)
        self.stats.cache_miss.add(lookup_ns + perf_counter_ns() - insert_start)
        return response


def cache_applies(config: ModelConfig, cache: ResponseCache | None) -> bool:
    """Whether this model's responses are cached; warns when asked for but impossible (Triton's rules)."""
    if not (config.HasField("response_cache") and config.response_cache.enable):
        return False
    if cache is None:
        log.warning(
            "model '%s' enables response_cache but the server has no cache configured "
            "(--cache-config=local,size=<bytes>): responses are not cached",
            config.name,
        )
        return False
    if config.model_transaction_policy.decoupled:
        log.warning(
            "model '%s': the response cache does not support decoupled models; not cached", config.name
        )
        return False
    if config.HasField("sequence_batching"):
        log.warning(
            "model '%s': the response cache does not support sequence models; not cached", config.name
        )
        return False
    return True


def make_model_version(
    name: str, version: int, config: ModelConfig, model_dir: Path, cache: ResponseCache | None
) -> ModelVersion:
    """A :class:`CachedModelVersion` when the cache applies to this model, else a plain one."""
    if cache_applies(config, cache):
        assert cache is not None
        model = CachedModelVersion(name, version, config, model_dir, None)
        model.cache = cache
        return model
    return ModelVersion(name, version, config, model_dir, None)


def cache_stats(cache: ResponseCache | None) -> dict[str, Any]:
    """Size and occupancy, for logs and tests."""
    if cache is None:
        return {}
    return {
        "capacity": cache.capacity,
        "used": cache.used,
        "entries": len(cache),
        "evictions": cache.evictions,
    }
