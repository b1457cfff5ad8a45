"""What the generator sends: the model's inputs (names, shapes, data) serialized once, up front.

Every request of a run is one of a few *variants* built before the first byte is sent, so the
hot loop only writes bytes that already exist (a Python generator that builds each request
measures itself, not the server). Data comes from ``zero``, ``random`` (fixed seed) or a
perf_analyzer-style JSON file ``{"data": [{"INPUT0": [...]}, ...]}`` (one variant per entry; an
input may also be ``{"content": [...], "shape": [...]}``). Shapes come from ``--shape NAME:DIMS``
or the model's metadata, asked once before the run.

Three wire forms, the ones tritonclient produces: the HTTP binary-tensor extension (a JSON header
with ``binary_data_size`` then the raw bytes, ``Inference-Header-Content-Length``), plain JSON
tensors (for servers that reject binary ones, like MLServer) and a serialized gRPC
``ModelInferRequest`` with ``raw_input_contents``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DTYPES",
    "TensorSpec",
    "Workload",
    "WorkloadError",
    "build_workload",
    "parse_shape_option",
]


class WorkloadError(ValueError):
    """Bad input description (shape, data file, datatype): a usage error, shown as one line."""


# KServe v2 datatype → numpy dtype (little-endian, as on the wire).
DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("bool"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype("object"),
}


@dataclass(frozen=True)
class TensorSpec:
    """One input as the server describes it: ``dims`` excludes the batch dimension when ``batched``."""

    name: str
    datatype: str
    dims: tuple[int, ...]


@dataclass
class Workload:
    """The model, its inputs, and the request variants (each a dict name → array) to cycle through."""

    model: str
    version: str
    inputs: list[TensorSpec]
    outputs: list[str]
    batched: bool
    batch_size: int
    variants: list[dict[str, np.ndarray]] = field(default_factory=list)

    def shape_of(self, spec: TensorSpec) -> list[int]:
        return [self.batch_size, *spec.dims] if self.batched else list(spec.dims)

    # -- wire forms -------------------------------------------------------------------------------
    def infer_path(self, prefix: str = "") -> str:
        version = f"/versions/{self.version}" if self.version else ""
        return f"{prefix.rstrip('/')}/v2/models/{self.model}{version}/infer"

    def http_binary_bodies(self) -> list[tuple[bytes, int]]:
        """(body, JSON header length) per variant: the binary tensor extension, outputs binary too."""
        bodies = []
        for variant in self.variants:
            raws = [_raw_bytes(variant[spec.name], spec.datatype) for spec in self.inputs]
            header: dict[str, Any] = {
                "inputs": [
                    {
                        "name": spec.name,
                        "shape": list(variant[spec.name].shape),
                        "datatype": spec.datatype,
                        "parameters": {"binary_data_size": len(raw)},
                    }
                    for spec, raw in zip(self.inputs, raws, strict=True)
                ]
            }
            if self.outputs:
                header["outputs"] = [{"name": n, "parameters": {"binary_data": True}} for n in self.outputs]
            else:
                header["parameters"] = {"binary_data_output": True}
            head = json.dumps(header, separators=(",", ":")).encode()
            bodies.append((head + b"".join(raws), len(head)))
        return bodies

    def http_json_bodies(self) -> list[bytes]:
        """Plain JSON tensors (flat data lists, as tritonclient sends them without binary_data)."""
        bodies = []
        for variant in self.variants:
            body: dict[str, Any] = {
                "inputs": [
                    {
                        "name": spec.name,
                        "shape": list(variant[spec.name].shape),
                        "datatype": spec.datatype,
                        "data": _json_data(variant[spec.name], spec.datatype),
                    }
                    for spec in self.inputs
                ]
            }
            if self.outputs:
                body["outputs"] = [{"name": n} for n in self.outputs]
            bodies.append(json.dumps(body, separators=(",", ":")).encode())
        return bodies

    def grpc_messages(self) -> list[bytes]:
        """Serialized ``ModelInferRequest`` per variant, tensors in ``raw_input_contents``."""
        from tritonclient.grpc import service_pb2

        messages = []
        for variant in self.variants:
            request = service_pb2.ModelInferRequest(model_name=self.model, model_version=self.version)
            for spec in self.inputs:
                tensor = request.inputs.add(name=spec.name, datatype=spec.datatype)
                tensor.shape.extend(variant[spec.name].shape)
                request.raw_input_contents.append(_raw_bytes(variant[spec.name], spec.datatype))
            for name in self.outputs:
                request.outputs.add(name=name)
            messages.append(request.SerializeToString())
        return messages


def _raw_bytes(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(item)) + item for item in (_as_bytes(x) for x in array.flat))
    return np.ascontiguousarray(array, dtype=DTYPES[datatype]).tobytes()


def _as_bytes(item: Any) -> bytes:
    return item if isinstance(item, bytes) else str(item).encode()


def _json_data(array: np.ndarray, datatype: str) -> list[Any]:
    if datatype == "BYTES":
        return [_as_bytes(x).decode("utf-8", "replace") for x in array.flat]
    return array.reshape(-1).tolist()


# -- building ---------------------------------------------------------------------------------------
def parse_shape_option(text: str) -> TensorSpec:
    """``NAME:DIMS[:DATATYPE]`` with DIMS like ``16``, ``3,224,224`` or ``3x224x224`` (no batch dim)."""
    parts = text.rsplit(":", 2) if text.count(":") >= 2 else text.rsplit(":", 1)
    if len(parts) < 2 or not parts[0]:
        raise WorkloadError(f"--shape {text!r}: expected NAME:DIMS (e.g. INPUT0:16 or INPUT0:3,224,224)")
    name, dims_text = parts[0], parts[1]
    datatype = parts[2].upper() if len(parts) == 3 else ""
    if datatype and datatype not in DTYPES:
        raise WorkloadError(f"--shape {text!r}: unknown datatype {datatype!r} (one of {', '.join(DTYPES)})")
    try:
        dims = tuple(int(d) for d in dims_text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise WorkloadError(f"--shape {text!r}: dimensions must be integers") from None
    if any(d < 0 for d in dims):
        raise WorkloadError(f"--shape {text!r}: dimensions must be >= 0")
    return TensorSpec(name, datatype, dims)


def build_workload(
    model: str,
    *,
    metadata: dict[str, Any] | None,
    shapes: Sequence[TensorSpec] = (),
    outputs: Sequence[str] = (),
    input_data: str = "random",
    batch_size: int = 1,
    version: str = "",
    seed: int = 0,
    variants: int = 1,
) -> Workload:
    """Merge metadata (may be None: not asked or not answered) with ``--shape`` options and data.

    Without metadata the model is taken to batch (the batch size is prepended), which is what
    every server measured here expects for the tiny models.
    """
    if batch_size < 1:
        raise WorkloadError("--batch-size must be >= 1")
    by_name: dict[str, TensorSpec] = {}
    batched = True
    meta_inputs = (metadata or {}).get("inputs") or []
    for entry in meta_inputs:
        shape = [int(d) for d in entry.get("shape", [])]
        batched = bool(shape) and shape[0] == -1
        dims = tuple(shape[1:] if batched else shape)
        by_name[entry["name"]] = TensorSpec(entry["name"], str(entry.get("datatype", "FP32")).upper(), dims)
    for spec in shapes:
        known = by_name.get(spec.name)
        datatype = spec.datatype or (known.datatype if known else "FP32")
        by_name[spec.name] = TensorSpec(spec.name, datatype, spec.dims)
    file_rows: list[dict[str, Any]] | None = None
    if input_data not in ("zero", "random"):
        file_rows = _read_data_file(Path(input_data))
        for name in file_rows[0]:
            if name not in by_name:
                by_name[name] = TensorSpec(name, "FP32", ())  # shape from the data below
    if not by_name:
        raise WorkloadError(
            f"model {model!r}: no input shapes (the server gave no metadata): pass --shape NAME:DIMS"
        )
    for spec in by_name.values():
        if spec.datatype not in DTYPES:
            raise WorkloadError(f"input {spec.name!r}: unsupported datatype {spec.datatype!r}")
        if any(d < 0 for d in spec.dims) and file_rows is None:
            raise WorkloadError(
                f"input {spec.name!r} has a variable dimension {list(spec.dims)}: pass --shape {spec.name}:DIMS"
            )
    inputs = list(by_name.values())
    output_names = list(outputs) or [o["name"] for o in (metadata or {}).get("outputs") or [] if "name" in o]
    workload = Workload(model, version, inputs, output_names, batched, batch_size)
    if file_rows is not None:
        workload.variants = [_variant_from_row(workload, row, i) for i, row in enumerate(file_rows)]
        workload.inputs = [
            TensorSpec(s.name, s.datatype, _dims_from(workload, workload.variants[0][s.name])) for s in inputs
        ]
    else:
        rng = np.random.default_rng(seed)
        workload.variants = [
            {spec.name: _generate(spec, workload.shape_of(spec), input_data, rng) for spec in inputs}
            for _ in range(max(1, variants))
        ]
    return workload


def _dims_from(workload: Workload, array: np.ndarray) -> tuple[int, ...]:
    return tuple(array.shape[1:] if workload.batched else array.shape)


def _generate(spec: TensorSpec, shape: list[int], kind: str, rng: np.random.Generator) -> np.ndarray:
    if spec.datatype == "BYTES":
        count = int(np.prod(shape)) if shape else 1
        if kind == "zero":
            items = [b""] * count
        else:
            items = [bytes(rng.integers(97, 123, 8, dtype=np.uint8)) for _ in range(count)]
        return np.array(items, dtype=object).reshape(shape)
    dtype = DTYPES[spec.datatype]
    if kind == "zero":
        return np.zeros(shape, dtype=dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -100), min(info.max, 100), shape, endpoint=True).astype(dtype)


def _read_data_file(path: Path) -> list[dict[str, Any]]:
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise WorkloadError(f"--input-data {str(path)!r}: no such file (or use zero|random)") from None
    except (OSError, ValueError) as exc:
        raise WorkloadError(f"--input-data {str(path)!r}: not a readable JSON file ({exc})") from None
    rows = document.get("data") if isinstance(document, dict) else None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and r for r in rows):
        raise WorkloadError(
            f'--input-data {str(path)!r}: expected {{"data": [{{"INPUT0": [...]}}, ...]}} with at least one entry'
        )
    names = set(rows[0])
    for i, row in enumerate(rows):
        if set(row) != names:
            raise WorkloadError(
                f"--input-data {str(path)!r}: entry {i} names {sorted(row)}, entry 0 {sorted(names)}"
            )
    return rows


def _variant_from_row(workload: Workload, row: dict[str, Any], index: int) -> dict[str, np.ndarray]:
    variant = {}
    for spec in workload.inputs:
        value = row[spec.name]
        explicit_shape: list[int] | None = None
        if isinstance(value, dict):
            explicit_shape = value.get("shape")
            value = value.get("content", value.get("b64"))
            if value is None:
                raise WorkloadError(
                    f"data entry {index}, input {spec.name!r}: expected 'content' and 'shape'"
                )
        flat = np.array(
            list(_flatten(value)), dtype=object if spec.datatype == "BYTES" else DTYPES[spec.datatype]
        )
        if explicit_shape is not None:
            dims = [int(d) for d in explicit_shape]
        elif spec.dims and all(d >= 0 for d in spec.dims):
            dims = list(spec.dims)
        else:
            dims = [flat.size]
        sample = int(np.prod(dims)) if dims else 1
        if flat.size != sample:
            raise WorkloadError(
                f"data entry {index}, input {spec.name!r}: {flat.size} values do not fill shape {dims}"
            )
        array = flat.reshape(dims)
        if workload.batched:
            array = np.stack([array] * workload.batch_size)
        variant[spec.name] = array
    return variant


def _flatten(value: Any) -> Iterable[Any]:
    if isinstance(value, list):
        for item in value:
            yield from _flatten(item)
    elif isinstance(value, str):
        yield value.encode()
    else:
        yield value
