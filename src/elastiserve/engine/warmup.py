"""Triton's model warm-up (``model_warmup``): sample requests run on every instance at load.

Each sample names its inputs with ``zero_data``, ``random_data`` or ``input_data_file`` (raw
row-major bytes in ``<model>/warmup/``; BYTES elements as a 4-byte little-endian length and the
bytes, as Triton reads them). ``batch_size`` prepends the batch dimension for batching models
and ``count`` repeats the sample. Warm-up runs in the load thread before the registry marks the
model READY, so a model is never ready before it is warm; a failing sample fails the load with
a message that names the sample.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from elastiserve.errors import ConfigError, ElastiserveError
from elastiserve.types import DATATYPE_TO_NUMPY, InferRequest, InferTensor, config_type_to_datatype

if TYPE_CHECKING:
    from tritonclient.grpc.model_config_pb2 import ModelConfig, ModelWarmup

    from elastiserve.engine.model import ModelVersion

log = logging.getLogger(__name__)

WARMUP_DIR = "warmup"


def _fail(config: ModelConfig, sample: str, message: str) -> ConfigError:
    return ConfigError(f"model '{config.name}': failed to run warmup sample '{sample}': {message}")


def _read_file(
    config: ModelConfig,
    model_dir: Path,
    sample: str,
    input_name: str,
    filename: str,
    datatype: str,
    count: int,
) -> np.ndarray:
    base = (model_dir / WARMUP_DIR).resolve()
    path = (base / filename).resolve()
    if not str(path).startswith(str(base) + "/"):
        raise _fail(config, sample, f"input '{input_name}': file '{filename}' is outside {WARMUP_DIR}/")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise _fail(
            config,
            sample,
            f"input '{input_name}': cannot read '{WARMUP_DIR}/{filename}': {exc.strerror or exc}",
        ) from None
    if datatype == "BYTES":
        values: list[bytes] = []
        offset = 0
        while len(values) < count:
            if offset + 4 > len(raw):
                raise _fail(
                    config,
                    sample,
                    f"input '{input_name}': '{WARMUP_DIR}/{filename}' holds {len(values)} BYTES elements, "
                    f"{count} expected",
                )
            (length,) = struct.unpack_from("<I", raw, offset)
            offset += 4
            if offset + length > len(raw):
                raise _fail(config, sample, f"input '{input_name}': '{WARMUP_DIR}/{filename}' is truncated")
            values.append(raw[offset : offset + length])
            offset += length
        array = np.empty(count, dtype=np.object_)
        array[:] = values
        return array
    dtype = DATATYPE_TO_NUMPY[datatype]
    need = count * dtype.itemsize
    if len(raw) < need:
        raise _fail(
            config,
            sample,
            f"input '{input_name}': warmup setting expects {need} bytes, but the data provided from "
            f"'{WARMUP_DIR}/{filename}' only has {len(raw)} bytes",
        )
    return np.frombuffer(raw[:need], dtype=dtype).copy()


def _sample_data(datatype: str, count: int, random: bool, rng: np.random.Generator) -> np.ndarray:
    if datatype == "BYTES":
        array = np.empty(count, dtype=np.object_)
        array[:] = [rng.bytes(8) if random else b"" for _ in range(count)]
        return array
    dtype = DATATYPE_TO_NUMPY[datatype]
    if not random:
        return np.zeros(count, dtype=dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, count).astype(np.bool_)
    if np.issubdtype(dtype, np.floating):
        return rng.random(count).astype(dtype)
    return rng.integers(0, 100, count).astype(dtype)


def build_requests(config: ModelConfig, model_dir: Path, version: int) -> list[tuple[str, int, InferRequest]]:
    """``(sample name, repetitions, request)`` for each ``model_warmup`` sample; ConfigError when invalid."""
    samples: list[tuple[str, int, InferRequest]] = []
    rng = np.random.default_rng(0)
    for index, sample in enumerate(config.model_warmup):
        name = sample.name or f"sample_{index}"
        samples.append(
            (name, max(1, sample.count), _build_request(config, model_dir, version, name, sample, rng))
        )
    return samples


def _build_request(
    config: ModelConfig,
    model_dir: Path,
    version: int,
    name: str,
    sample: ModelWarmup,
    rng: np.random.Generator,
) -> InferRequest:
    batching = config.max_batch_size > 0
    batch_size = sample.batch_size or 1
    if not batching and batch_size != 1:
        raise _fail(config, name, f"batch_size must be 1 for a model that does not batch, got {batch_size}")
    if batching and batch_size > config.max_batch_size:
        raise _fail(config, name, f"batch_size {batch_size} exceeds max_batch_size {config.max_batch_size}")
    if not sample.inputs:
        raise _fail(config, name, "the sample has no inputs")
    tensors: list[InferTensor] = []
    for input_name, spec in sample.inputs.items():
        datatype = config_type_to_datatype(spec.data_type)
        if datatype not in DATATYPE_TO_NUMPY:
            raise _fail(config, name, f"input '{input_name}' has no valid data_type")
        dims = list(spec.dims)
        if any(d < 0 for d in dims):
            raise _fail(config, name, f"input '{input_name}' dims must be fixed, got {dims}")
        count = int(np.prod(dims)) if dims else 1
        kind = spec.WhichOneof("input_data_type")
        if kind == "input_data_file":
            data = _read_file(config, model_dir, name, input_name, spec.input_data_file, datatype, count)
        elif kind in ("zero_data", "random_data"):
            data = _sample_data(datatype, count, kind == "random_data", rng)
        else:
            raise _fail(
                config, name, f"input '{input_name}' must set one of zero_data, random_data, input_data_file"
            )
        data = data.reshape(dims)
        if batching:
            data = np.repeat(data[np.newaxis], batch_size, axis=0)
        tensors.append(InferTensor(input_name, datatype, list(data.shape), data))
    return InferRequest(config.name, tensors, str(version), id=f"warmup_{name}")


def warm_up(model: ModelVersion) -> None:
    """Run every warm-up sample on every instance of ``model``; raises ConfigError naming the sample."""
    config = model.config
    if not config.model_warmup:
        return
    samples = build_requests(config, model.model_dir, model.version)
    scheduler = model.scheduler
    instances = scheduler.instances if scheduler is not None else []
    for position, instance in enumerate(instances):
        for name, repetitions, request in samples:
            for _ in range(repetitions):
                try:
                    results = instance.execute([_copy(request)])
                except ElastiserveError as exc:
                    raise _fail(config, name, f"instance {position}: {exc.message}") from None
                except Exception as exc:
                    raise _fail(config, name, f"instance {position}: {type(exc).__name__}: {exc}") from None
                result = results[0] if len(results) == 1 else None
                if result is None:
                    raise _fail(config, name, f"instance {position}: model returned {len(results)} responses")
                if isinstance(result, ElastiserveError):
                    raise _fail(config, name, f"instance {position}: {result.message}")
    log.info("model '%s' version %d: ran %d warm-up sample(s)", config.name, model.version, len(samples))


def _copy(request: InferRequest) -> InferRequest:
    """A fresh request per execution: backends may add or replace inputs."""
    return InferRequest(
        request.model_name,
        [InferTensor(t.name, t.datatype, list(t.shape), t.data) for t in request.inputs],
        request.model_version,
        request.id,
    )
