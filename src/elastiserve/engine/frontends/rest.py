"""KServe v2 REST protocol with Triton's extensions, on top of :class:`DataPlane`.

Routes, methods, status codes and error messages follow Triton 2.51's ``http_server.cc``
(``{"error": "..."}`` bodies, ``Method Not Allowed`` / ``Not Found``), with one deliberate
difference: request mistakes Triton answers 500 for (malformed JSON, no ``inputs``, data that
does not match its shape) are answered 400 here, with a message that says what was wrong.

The infer path is the hot one: the JSON header is parsed with orjson straight from the body,
binary tensors are numpy views over the body (``np.frombuffer``, no copy; they are read-only),
and the response header is written with orjson (numpy arrays serialised natively) followed by
the outputs' raw bytes.
"""

from __future__ import annotations

import base64
import binascii
import logging
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import numpy as np
import orjson

from elastiserve.engine.frontends.http_server import (
    CONTENT_TYPE_JSON,
    HttpRequest,
    HttpServerHandle,
    Response,
    StreamingResponse,
    error_response,
    json_response,
    start_plain_http_server,
    start_server,
)
from elastiserve.engine.streaming import DecoupledUnary, ResponseStream
from elastiserve.errors import (
    ElastiserveError,
    InvalidArgument,
    NotFound,
    PayloadTooLarge,
    Unsupported,
)
from elastiserve.types import DATATYPE_TO_NUMPY, InferRequest, InferResponse, InferTensor, RequestedOutput

if TYPE_CHECKING:
    from elastiserve.engine.dataplane import DataPlane

logger = logging.getLogger(__name__)

__all__ = [
    "HttpServerHandle",
    "RestApp",
    "model_config_to_json",
    "start_http_server",
    "start_plain_http_server",
]

# Wire dtypes are little-endian whatever the host is (identical to native ones on x86/arm).
_WIRE_DTYPE: dict[str, np.dtype] = {
    name: (dt if name == "BYTES" else dt.newbyteorder("<")) for name, dt in DATATYPE_TO_NUMPY.items()
}
_ITEMSIZE: dict[str, int] = {name: dt.itemsize for name, dt in _WIRE_DTYPE.items() if name != "BYTES"}

_HDR_BINARY = b"content-type: application/octet-stream\r\ninference-header-content-length: %d\r\n"
_EMPTY_OK = Response(200)
_EMPTY_BAD = Response(400)
_NOT_FOUND = error_response(404, "Not Found")
_NOT_ALLOWED = error_response(405, "Method Not Allowed")
_OPT_NUMPY = orjson.OPT_SERIALIZE_NUMPY
_U32 = struct.Struct("<I")
_DEFAULT_TRACE = {
    "trace_level": ["OFF"],
    "trace_rate": "1000",
    "trace_count": "-1",
    "log_frequency": "0",
    "trace_file": "",
    "trace_mode": "triton",
}


async def start_http_server(
    dataplane: DataPlane, host: str, port: int, *, max_body_bytes: int = 64 << 20
) -> HttpServerHandle:
    """Serve the KServe v2 + Triton REST API for ``dataplane`` on ``host:port`` (0: a free port)."""
    app = RestApp(dataplane, max_body_bytes=max_body_bytes)
    return await start_server(app, host, port, max_body_bytes=max_body_bytes)


def _error(exc: ElastiserveError, headers: bytes = b"") -> Response:
    return error_response(exc.http_status, exc.message, headers)


class _Reject(Exception):
    """A response decided while parsing (e.g. 501 with an ``accept-encoding`` header)."""

    def __init__(self, response: Response) -> None:
        self.response = response


class RestApp:
    """The request handler: ``app(request) -> Response | Awaitable[Response]``."""

    def __init__(self, dataplane: DataPlane, *, max_body_bytes: int = 64 << 20) -> None:
        self.dataplane = dataplane
        self.max_body_bytes = max_body_bytes
        self.trace_settings: dict[str, Any] = dict(_DEFAULT_TRACE)
        self.model_trace_settings: dict[str, dict[str, Any]] = {}

    # -- routing --------------------------------------------------------------------------------
    def __call__(self, request: HttpRequest) -> Response | Awaitable[Response]:
        path = request.path
        try:
            if path.startswith("/v2/models/"):
                if path == "/v2/models/stats":
                    if request.method != "GET":
                        return _NOT_ALLOWED
                    return json_response(200, self.dataplane.model_statistics())
                return self._model_route(request, path[11:].split("/"))
            if path == "/v2/health/ready":
                if request.method != "GET":
                    return _NOT_ALLOWED
                return _EMPTY_OK if self.dataplane.ready() else _EMPTY_BAD
            if path == "/v2/health/live":
                if request.method != "GET":
                    return _NOT_ALLOWED
                return _EMPTY_OK if self.dataplane.live() else _EMPTY_BAD
            if path == "/v2":
                if request.method != "GET":
                    return _NOT_ALLOWED
                return json_response(200, self.dataplane.server_metadata())
            if path == "/v2/logging":
                return self._logging(request)
            if path.startswith("/v2/repository/"):
                return self._repository(request, path[15:].split("/"))
            if path == "/v2/trace/setting":
                return self._trace(request, "")
            if path.startswith("/v2/systemsharedmemory/") or path.startswith("/v2/cudasharedmemory/"):
                return self._shared_memory(request, path)
            return _NOT_FOUND
        except ElastiserveError as exc:
            return _error(exc)

    def _model_route(self, request: HttpRequest, parts: list[str]) -> Response | Awaitable[Response]:
        # /v2/models/{m}[/versions/{v}][/(infer|ready|config|stats|trace/setting|generate...)]
        name = parts[0]
        if not name:
            return _NOT_FOUND
        if "%" in name:
            name = unquote(name)
        version = ""
        rest = parts[1:]
        if len(rest) >= 2 and rest[0] == "versions":
            version = rest[1]
            if not version.isdigit() or not version.isascii():
                return _NOT_FOUND
            rest = rest[2:]
        if not rest:
            kind = ""
        elif len(rest) == 1 and rest[0]:
            kind = rest[0]
        elif rest == ["trace", "setting"] and not version:
            return self._trace(request, name)
        else:
            return _NOT_FOUND
        method = request.method
        if kind == "infer":
            if method != "POST":
                return _NOT_ALLOWED
            return self._infer(request, name, version)
        if kind in ("", "ready", "config", "stats"):
            if method != "GET":
                return _NOT_ALLOWED
            dataplane = self.dataplane
            if kind == "ready":
                if dataplane.model_ready(name, version):
                    return _EMPTY_OK
                return error_response(400, "Model version not ready")
            if kind == "":
                return json_response(200, dataplane.model_metadata(name, version))
            if kind == "config":
                return Response(
                    200,
                    orjson.dumps(model_config_to_json(dataplane.model_config(name, version))),
                    CONTENT_TYPE_JSON,
                )
            return json_response(200, dataplane.model_statistics(name, version))
        if kind in ("generate", "generate_stream"):
            if method != "POST":
                return _NOT_ALLOWED
            return self._generate(request, name, version, kind == "generate_stream")
        return _NOT_FOUND

    # -- inference ------------------------------------------------------------------------------
    def _infer(self, request: HttpRequest, model: str, version: str) -> Response | Awaitable[Response]:
        try:
            infer_request, binary_default, binary_outputs = self._parse_infer(request, model, version)
        except ElastiserveError as exc:
            return _error(exc)
        except _Reject as rej:
            return rej.response
        accept = request.headers.get(b"accept-encoding")
        return self._run_infer(infer_request, binary_default, binary_outputs, accept)

    async def _run_infer(
        self,
        infer_request: InferRequest,
        binary_default: bool,
        binary_outputs: dict[str, bool] | None,
        accept_encoding: bytes | None,
    ) -> Response:
        try:
            response = await self.dataplane.infer(infer_request)
            return encode_infer_response(response, binary_default, binary_outputs, accept_encoding)
        except DecoupledUnary:
            return _error(Unsupported(DecoupledUnary.HTTP_MESSAGE))
        except ElastiserveError as exc:
            return _error(exc)

    # -- generate extension (Triton's /generate and /generate_stream) -------------------------------
    def _generate(
        self, request: HttpRequest, model: str, version: str, stream: bool
    ) -> Response | StreamingResponse | Awaitable[Response]:
        """Triton's generate extension: JSON keys that name inputs become tensors shaped by the
        config, other keys (and ``parameters``) become request parameters; each response is the
        outputs as plain JSON values. ``generate_stream`` answers server-sent events, one per
        response, as the model sends them; a client that goes away cancels the request."""
        try:
            infer_request = self._parse_generate(request, model, version)
            responses = self.dataplane.infer_stream(infer_request)
        except ElastiserveError as exc:
            return _error(exc)
        if not stream:
            return _generate_once(responses)
        out = StreamingResponse(None, 200, _CONTENT_TYPE_SSE)  # type: ignore[arg-type]
        out.body = _server_sent_events(responses, out)  # it sets the status from the first response
        return out

    def _parse_generate(self, request: HttpRequest, model: str, version: str) -> InferRequest:
        obj = _json_body(request, "request")
        if obj is None:
            raise InvalidArgument("failed to parse the request JSON buffer: the body is empty")
        declared = {spec["name"]: spec for spec in self.dataplane.model_metadata(model, version)["inputs"]}
        parameters: dict[str, Any] = {}
        inputs: list[InferTensor] = []
        for key, value in obj.items():
            spec = declared.get(key)
            if spec is not None:
                inputs.append(_generate_input(spec, value, model))
            elif key == "parameters" and value.__class__ is dict:
                parameters.update(value)
            else:
                parameters[key] = value
        return InferRequest(model, inputs, version, "", [], parameters)

    def _parse_infer(
        self, request: HttpRequest, model: str, version: str
    ) -> tuple[InferRequest, bool, dict[str, bool] | None]:
        """Body -> InferRequest; also which outputs go back as binary. Raises InvalidArgument."""
        headers = request.headers
        body = request.body
        encoding = headers.get(b"content-encoding")
        if encoding is not None and encoding != b"identity":
            body = self._decompress(body, encoding)
        size = len(body)
        raw_length = headers.get(b"inference-header-content-length")
        if raw_length is None:
            header_length = size
        else:
            try:
                header_length = int(raw_length)
            except ValueError:
                raise InvalidArgument(
                    f"Unable to parse Inference-Header-Content-Length, got: {raw_length.decode('latin-1')}"
                ) from None
            if header_length < 0 or header_length > size:
                raise InvalidArgument(
                    f"inference header size should be in range (0, {size}), got: {header_length}"
                )
        if header_length == 0:
            return self._raw_request(body, model, version)
        try:
            obj = orjson.loads(body if header_length == size else memoryview(body)[:header_length])
        except orjson.JSONDecodeError as exc:
            raise InvalidArgument(f"failed to parse the request JSON buffer: {exc}") from None
        if obj.__class__ is not dict:
            raise InvalidArgument("failed to parse the request JSON buffer: expected a JSON object")

        request_id = obj.get("id", "")
        if request_id.__class__ is not str:
            raise InvalidArgument("Unable to parse 'id': expected a string")
        parameters = obj.get("parameters")
        binary_default = False
        if parameters is None:
            parameters = {}
        elif parameters.__class__ is not dict:
            raise InvalidArgument("Unable to parse 'parameters': expected a JSON object")
        elif parameters:
            for key, value in parameters.items():
                if key == "binary_data_output":
                    if value.__class__ is not bool:
                        raise InvalidArgument("Unable to parse 'binary_data_output': expected a boolean")
                    binary_default = value
                elif key.startswith("triton_"):
                    raise InvalidArgument(
                        "parameter keys starting with 'triton_' are reserved for Triton usage "
                        "and should not be specified."
                    )

        inputs_json = obj.get("inputs")
        if inputs_json.__class__ is not list:
            raise InvalidArgument("Unable to parse 'inputs': the request must carry an 'inputs' array")
        offset = header_length
        inputs: list[InferTensor] = []
        for item in inputs_json:
            tensor, offset = _parse_input(item, body, offset, size, raw_length is not None, model)
            inputs.append(tensor)
        if offset != size:
            raise InvalidArgument(f"unexpected additional input data for model '{model}'")

        outputs: list[RequestedOutput] = []
        binary_outputs: dict[str, bool] | None = None
        outputs_json = obj.get("outputs")
        if outputs_json is not None:
            if outputs_json.__class__ is not list:
                raise InvalidArgument("Unable to parse 'outputs': expected an array")
            binary_outputs = {}
            for item in outputs_json:
                out, binary = _parse_output(item, binary_default)
                outputs.append(out)
                binary_outputs[out.name] = binary
        return (
            InferRequest(model, inputs, version, request_id, outputs, parameters),
            binary_default,
            binary_outputs,
        )

    def _raw_request(self, body: bytes, model: str, version: str) -> tuple[InferRequest, bool, None]:
        """Triton's raw binary request (no JSON header): the whole body is the model's only input,
        outputs come back binary."""
        metadata = self.dataplane.model_metadata(model, version)
        declared = metadata.get("inputs") or []
        if len(declared) != 1:
            raise InvalidArgument(
                f"Raw request must only have 1 input (found 1) to be deduced but got "
                f"{len(declared)} inputs in '{model}' model configuration"
            )
        spec = declared[0]
        datatype = spec["datatype"]
        dims = [int(d) for d in spec["shape"]]
        if datatype == "BYTES":
            data = np.empty(1, dtype=np.object_)
            data[0] = bytes(body)
            shape = [1 for _ in dims] or [1]
            data = data.reshape(shape)
        else:
            itemsize = _ITEMSIZE.get(datatype)
            if itemsize is None:
                raise InvalidArgument(f"invalid datatype '{datatype}' for input '{spec['name']}'")
            if len(body) % itemsize:
                raise InvalidArgument(
                    f"input byte size mismatch for input '{spec['name']}' for model '{model}': "
                    f"{len(body)} bytes is not a whole number of {datatype} elements"
                )
            count = len(body) // itemsize
            shape = _fill_dims(dims, count, spec["name"], model)
            data = np.frombuffer(body, _WIRE_DTYPE[datatype], count).reshape(shape)
        tensor = InferTensor(spec["name"], datatype, shape, data)
        return InferRequest(model, [tensor], version), True, None

    def _decompress(self, body: bytes, encoding: bytes) -> bytes:
        enc = encoding.strip().lower()
        if enc == b"gzip":
            wbits = 31
        elif enc == b"deflate":
            wbits = 15
        else:
            raise _Reject(
                _error(Unsupported("Unsupported compression type"), b"accept-encoding: gzip, deflate\r\n")
            )
        try:
            dec = zlib.decompressobj(wbits)
            out = dec.decompress(body, self.max_body_bytes + 1)
            if len(out) > self.max_body_bytes:
                raise PayloadTooLarge(
                    f"decompressed request body exceeds the limit of {self.max_body_bytes} bytes"
                )
            out += dec.flush()
            if not dec.eof:
                raise InvalidArgument(f"truncated {enc.decode()} request body")
        except zlib.error as exc:
            raise InvalidArgument(f"unable to decompress the {enc.decode()} request body: {exc}") from None
        return out

    # -- repository, logging, trace, shared memory ---------------------------------------------
    def _repository(self, request: HttpRequest, parts: list[str]) -> Response | Awaitable[Response]:
        # /v2/repository[/{repo}]/index | /v2/repository[/{repo}]/models/{m}/(load|unload)
        repo = ""
        if parts and parts[0] not in ("index", "models"):
            repo, parts = parts[0], parts[1:]
        if parts == ["index"]:
            if request.method != "POST":
                return _NOT_ALLOWED
            ready = False
            body = _json_body(request, "index request")
            if body is not None:
                ready = body.get("ready", False)
                if ready.__class__ is not bool:
                    raise InvalidArgument("Unable to parse 'ready': expected a boolean")
            return json_response(200, self.dataplane.repository_index(ready))
        if len(parts) == 3 and parts[0] == "models" and parts[1] and parts[2] in ("load", "unload"):
            if request.method != "POST":
                return _NOT_ALLOWED
            if repo:
                raise Unsupported("'repository_name' specification is not supported")
            name = unquote(parts[1]) if "%" in parts[1] else parts[1]
            body = _json_body(request, "model control request")
            params = (body or {}).get("parameters") or {}
            if params.__class__ is not dict:
                raise InvalidArgument("Unable to parse 'parameters': expected a JSON object")
            if parts[2] == "load":
                config, files = _load_parameters(params)
                return self._await_control(self.dataplane.load_model(name, config, files))
            unload_dependents = params.get("unload_dependents", False)
            if unload_dependents.__class__ is not bool:
                raise InvalidArgument("Unable to parse 'unload_dependents': expected a boolean")
            return self._await_control(self.dataplane.unload_model(name, unload_dependents))
        return _NOT_FOUND

    async def _await_control(self, operation: Awaitable[None]) -> Response:
        try:
            await operation
        except ElastiserveError as exc:
            return _error(exc)
        return Response(200, b"", CONTENT_TYPE_JSON)

    def _logging(self, request: HttpRequest) -> Response:
        settings = self.dataplane.log_settings
        if request.method == "POST":
            body = _json_body(request, "logging request")
            if body is None:
                raise InvalidArgument("failed to parse the request JSON buffer: the body is empty")
            updates: dict[str, Any] = {}
            for key, value in body.items():
                if value is None:
                    continue
                if key in ("log_file", "log_format"):
                    if value.__class__ is not str:
                        raise InvalidArgument(f"Unable to parse '{key}': expected a string")
                    if key == "log_format" and value not in ("default", "ISO8601"):
                        raise InvalidArgument(f"invalid argument for --log_format, got: {value}")
                elif key in ("log_info", "log_warning", "log_error"):
                    if value.__class__ is not bool:
                        raise InvalidArgument(f"Unable to parse '{key}': expected a boolean")
                elif key == "log_verbose_level":
                    if value.__class__ is not int or value < 0:
                        raise InvalidArgument(
                            "Unable to parse 'log_verbose_level': expected an unsigned integer"
                        )
                else:
                    continue  # Triton ignores keys it does not know
                updates[key] = value
            settings.update(updates)
        elif request.method != "GET":
            return _NOT_ALLOWED
        return json_response(200, settings)

    def _trace(self, request: HttpRequest, model: str) -> Response:
        if request.method not in ("GET", "POST"):
            return _NOT_ALLOWED
        if model and not self.dataplane.model_ready(model):
            raise InvalidArgument(f"Request for unknown model : {model}")
        if request.method == "POST":
            body = _json_body(request, "trace request")
            if body is None:
                raise InvalidArgument("failed to parse the request JSON buffer: the body is empty")
            target = self.model_trace_settings.setdefault(model, {}) if model else self.trace_settings
            for key, value in body.items():
                if key not in _DEFAULT_TRACE:
                    continue
                if value is None:  # clear: back to the global (or default) value
                    if model:
                        target.pop(key, None)
                    else:
                        target[key] = _DEFAULT_TRACE[key]
                    continue
                target[key] = _check_trace_value(key, value)
        settings = dict(self.trace_settings)
        if model:
            settings.update(self.model_trace_settings.get(model, {}))
        return json_response(200, settings)

    def _shared_memory(self, request: HttpRequest, path: str) -> Response:
        # /v2/(system|cuda)sharedmemory[/region/{r}]/(status|register|unregister)
        cuda = path.startswith("/v2/cuda")
        parts = path.split("/")[3:]
        region = ""
        if len(parts) == 3 and parts[0] == "region" and parts[1]:
            region, parts = parts[1], parts[2:]
        if len(parts) != 1 or parts[0] not in ("status", "register", "unregister"):
            return _NOT_FOUND
        action = parts[0]
        if (action == "status") != (request.method == "GET") or request.method not in ("GET", "POST"):
            return _NOT_ALLOWED
        kind = "cuda" if cuda else "system"
        if action == "status":
            if region:
                raise NotFound(f"Unable to find {kind} shared memory region: '{region}'")
            return json_response(200, [])
        if action == "unregister":
            return Response(200, b"", CONTENT_TYPE_JSON)  # nothing is ever registered
        if not region:
            raise InvalidArgument(f"'region name' is necessary to register {kind} shared memory region")
        if cuda:
            raise InvalidArgument(
                f"failed to register CUDA shared memory region: '{region}', GPUs not supported"
            )
        raise Unsupported(
            f"failed to register system shared memory region: '{region}', shared memory is not "
            "supported by this server; send tensors in the request body"
        )


# -- infer request parsing ---------------------------------------------------------------------
def _parse_input(
    item: Any, body: bytes, offset: int, size: int, has_header_length: bool, model: str
) -> tuple[InferTensor, int]:
    if item.__class__ is not dict:
        raise InvalidArgument("Unable to parse 'inputs': each input must be a JSON object")
    params = item.get("parameters")
    binary_size = None
    if params:
        if params.__class__ is not dict:
            raise InvalidArgument("Unable to parse 'parameters' of an input: expected a JSON object")
        binary_size = params.get("binary_data_size")
        has_shm = "shared_memory_region" in params
    else:
        has_shm = False
    has_data = "data" in item
    if has_data + (binary_size is not None) + has_shm != 1:
        found = [
            label
            for label, present in (
                ("'data'", has_data),
                ("'binary_data_size'", binary_size is not None),
                ("'shared_memory_region'", has_shm),
            )
            if present
        ]
        raise InvalidArgument(
            "Input must set only one of the following fields: 'data', 'binary_data_size' in "
            "'parameters', 'shared_memory_region' in 'parameters'. But "
            + ("set " + " ".join(found) if found else "no field is set")
        )
    name = item.get("name")
    if name.__class__ is not str:
        raise InvalidArgument("Unable to parse 'name' of an input: expected a string")
    datatype = item.get("datatype")
    if datatype.__class__ is not str:
        raise InvalidArgument(f"Unable to parse 'datatype' of input '{name}': expected a string")
    shape = item.get("shape")
    if shape.__class__ is not list:
        raise InvalidArgument(f"Unable to parse 'shape' of input '{name}': expected an array")
    count = 1
    for dim in shape:
        if dim.__class__ is not int or dim < 0:
            raise InvalidArgument(
                f"Unable to parse 'shape' of input '{name}': dimensions must be non-negative integers"
            )
        count *= dim
    dtype = _WIRE_DTYPE.get(datatype)
    if dtype is None:
        raise InvalidArgument(
            f"invalid datatype '{datatype}' for input '{name}'; expected one of " + ", ".join(_WIRE_DTYPE)
        )
    if has_shm:
        raise InvalidArgument(f"Unable to find shared memory region: '{params['shared_memory_region']}'")
    if binary_size is not None:
        if binary_size.__class__ is not int or binary_size < 0:
            raise InvalidArgument(f"Unable to parse 'binary_data_size' of input '{name}'")
        if binary_size and not has_header_length:
            raise InvalidArgument(
                "must specify valid 'Inference-Header-Content-Length' in request header and "
                "'binary_data_size' when passing inputs in binary data format"
            )
        end = offset + binary_size
        if end > size:
            raise InvalidArgument(
                f"unexpected size for input '{name}', expecting {end - size} additional bytes "
                f"for model '{model}'"
            )
        if datatype == "BYTES":
            data = _deserialize_bytes(body, offset, end, count, name)
        else:
            expected = count * dtype.itemsize
            if binary_size != expected:
                raise InvalidArgument(
                    f"input byte size mismatch for input '{name}' for model '{model}'. "
                    f"Expected {expected}, got {binary_size}"
                )
            data = np.frombuffer(body, dtype, count, offset)
        if len(shape) != 1:
            data = data.reshape(shape)
        offset = end
    else:
        data = _json_data(item["data"], datatype, dtype, shape, count, name)
    extra = params
    if extra and (len(extra) > 1 or binary_size is None):
        extra = {k: v for k, v in extra.items() if k != "binary_data_size"}
    else:
        extra = {}
    return InferTensor(name, datatype, shape, data, extra), offset


def _json_data(
    value: Any, datatype: str, dtype: np.dtype, shape: list[int], count: int, name: str
) -> np.ndarray:
    """JSON ``data`` (flat or nested) -> an array of ``shape``."""
    if value.__class__ is not list:
        raise InvalidArgument(f"Unable to parse 'data' of input '{name}': expected an array")
    mismatch = (
        f"Unable to parse 'data' of input '{name}': shape {shape} does not match the "
        f"number of elements in 'data'"
    )
    if datatype == "BYTES":
        flat = _flatten(value)
        if len(flat) != count:
            raise InvalidArgument(mismatch + f" ({len(flat)} != {count})")
        out = np.empty(count, dtype=np.object_)
        for i, element in enumerate(flat):
            if element.__class__ is str:
                out[i] = element.encode()
            else:
                raise InvalidArgument(
                    f"Unable to parse 'data' of input '{name}': BYTES elements must be strings"
                )
        return out.reshape(shape)
    try:
        array = np.array(value, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidArgument(f"Unable to parse 'data' of input '{name}' as {datatype}: {exc}") from None
    if array.size != count:
        raise InvalidArgument(mismatch + f" ({array.size} != {count})")
    return array.reshape(shape)


def _flatten(value: list[Any]) -> list[Any]:
    if not value or value[0].__class__ is not list:
        return value
    flat: list[Any] = []
    for element in value:
        if element.__class__ is list:
            flat.extend(_flatten(element))
        else:
            flat.append(element)
    return flat


def _deserialize_bytes(body: bytes, offset: int, end: int, count: int, name: str) -> np.ndarray:
    """Triton's binary BYTES: each element is a 4-byte little-endian length and the bytes."""
    out = np.empty(count, dtype=np.object_)
    index = 0
    unpack = _U32.unpack_from
    while offset < end:
        if offset + 4 > end or index >= count:
            break
        length = unpack(body, offset)[0]
        offset += 4
        if offset + length > end:
            raise InvalidArgument(
                f"binary BYTES data of input '{name}' is truncated: element {index} needs {length} "
                f"bytes, {end - offset} left"
            )
        out[index] = bytes(body[offset : offset + length])
        offset += length
        index += 1
    if index != count or offset != end:
        raise InvalidArgument(
            f"unexpected number of string elements for input '{name}': its shape holds {count} "
            f"elements, the binary data {'holds ' + str(index) if offset == end else 'does not split into them'}"
        )
    return out


def _parse_output(item: Any, binary_default: bool) -> tuple[RequestedOutput, bool]:
    if item.__class__ is not dict:
        raise InvalidArgument("Unable to parse 'outputs': each output must be a JSON object")
    name = item.get("name")
    if name.__class__ is not str:
        raise InvalidArgument("Unable to parse 'name' of an output: expected a string")
    params = item.get("parameters")
    binary = binary_default
    if not params:
        return RequestedOutput(name), binary
    if params.__class__ is not dict:
        raise InvalidArgument(f"Unable to parse 'parameters' of output '{name}': expected a JSON object")
    params = dict(params)
    if "shared_memory_region" in params:
        raise InvalidArgument(f"Unable to find shared memory region: '{params['shared_memory_region']}'")
    if "binary_data" in params:
        binary = params["binary_data"]
        if binary.__class__ is not bool:
            raise InvalidArgument(f"Unable to parse 'binary_data' of output '{name}': expected a boolean")
    if "classification" in params:
        classes = params["classification"]
        if classes.__class__ is not int or classes < 0:
            raise InvalidArgument(
                f"Unable to set 'classification' of output '{name}': expected an unsigned integer"
            )
        params["class_count"] = classes
    return RequestedOutput(name, params), binary


def _fill_dims(dims: list[int], count: int, name: str, model: str) -> list[int]:
    """Concrete shape for a raw input of ``count`` elements: variable dims get 1 except the
    last one, which takes what the fixed dims leave."""
    fixed = 1
    for d in dims:
        if d >= 0:
            fixed *= d
    variable = [i for i, d in enumerate(dims) if d < 0]
    if not dims:
        shape = [count]
    elif not variable:
        shape = list(dims)
    else:
        shape = [1 if d < 0 else d for d in dims]
        shape[variable[-1]] = count // fixed if fixed else 0
    total = 1
    for d in shape:
        total *= d
    if total != count:
        raise InvalidArgument(
            f"input byte size mismatch for input '{name}' for model '{model}': {count} elements "
            f"do not fit shape {dims}"
        )
    return shape


# -- generate extension -----------------------------------------------------------------------------
_CONTENT_TYPE_SSE = b"content-type: text/event-stream; charset=utf-8\r\n"
_GENERATE_ONE = (
    "generate expects model to produce exactly 1 response, use generate stream for model that "
    "generates various number of responses"
)


def _generate_input(spec: dict[str, Any], value: Any, model: str) -> InferTensor:
    """A generate-extension JSON value (scalar or nested list) -> a tensor shaped by the config."""
    name = spec["name"]
    datatype = spec["datatype"]
    values = _flatten(value) if value.__class__ is list else [value]
    shape = _fill_dims([int(d) for d in spec["shape"]], len(values), name, model)
    if datatype == "BYTES":
        data = np.empty(len(values), dtype=np.object_)
        for i, element in enumerate(values):
            if element.__class__ is not str:
                raise InvalidArgument(
                    f"Unable to parse '{name}' for model '{model}': BYTES values must be JSON strings"
                )
            data[i] = element.encode()
    else:
        try:
            data = np.array(values, dtype=DATATYPE_TO_NUMPY[datatype])
        except (ValueError, TypeError, OverflowError) as exc:
            raise InvalidArgument(f"Unable to parse '{name}' for model '{model}' as {datatype}: {exc}") from None
    return InferTensor(name, datatype, shape, data.reshape(shape))


def _generate_json(response: InferResponse) -> bytes:
    """Triton's generate response: each output by name, one element as a scalar, more as a flat
    list, BYTES as text; plus ``model_name`` and ``model_version`` (keys sorted, as Triton)."""
    out: dict[str, Any] = {"model_name": response.model_name, "model_version": str(response.model_version)}
    for tensor in response.outputs:
        if tensor.data is None:
            out[tensor.name] = []
            continue
        values = _json_output(tensor)
        if not isinstance(values, list):
            values = values.tolist()
        out[tensor.name] = values[0] if len(values) == 1 else values
    return orjson.dumps(out, default=_json_default, option=orjson.OPT_SORT_KEYS)


async def _generate_once(responses: ResponseStream) -> Response:
    """``generate``: exactly one response is an answer; any other count is Triton's error."""
    results = [result for result, _ in await responses.collect() if result is not None]
    if len(results) == 1:
        result = results[0]
        if isinstance(result, ElastiserveError):
            return _error(result)
        try:
            return Response(200, _generate_json(result), CONTENT_TYPE_JSON)
        except ElastiserveError as exc:
            return _error(exc)
    first = results[0] if results else None
    status = first.http_status if isinstance(first, ElastiserveError) else 200
    return error_response(status, _GENERATE_ONE)


async def _server_sent_events(responses: ResponseStream, out: StreamingResponse) -> AsyncIterator[bytes]:
    """``generate_stream``: ``data: {...}`` per response as it comes, ``data: {"error": ...}`` for
    an error (the stream goes on). The status is the first response's; a request that fails
    before any response (a plain model rejecting its input) is answered as plain JSON."""
    first = True
    try:
        async for result, final in responses:
            if result is None:
                continue
            if isinstance(result, ElastiserveError):
                if first:
                    out.status = result.http_status
                    if final:
                        out.headers = CONTENT_TYPE_JSON
                        yield orjson.dumps({"error": result.message})
                        return
                data = orjson.dumps({"error": result.message})
            else:
                try:
                    data = _generate_json(result)
                except ElastiserveError as exc:
                    data = orjson.dumps({"error": exc.message})
            first = False
            yield b"data: " + data + b"\n\n"
    finally:
        responses.cancel()  # the client went away (a no-op once the stream finished)


# -- infer response encoding ----------------------------------------------------------------------
def encode_infer_response(
    response: InferResponse,
    binary_default: bool,
    binary_outputs: dict[str, bool] | None,
    accept_encoding: bytes | None = None,
) -> Response:
    """InferResponse -> JSON header (+ binary outputs, in order), optionally compressed."""
    outputs_json = []
    buffers: list[Any] = []
    for tensor in response.outputs:
        binary = binary_default
        if binary_outputs is not None:
            binary = binary_outputs.get(tensor.name, binary_default)
        array = tensor.data
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": tensor.shape if array is None else list(array.shape),
        }
        params = tensor.parameters
        if binary:
            raw = _tensor_bytes(tensor)
            entry["parameters"] = (
                {**params, "binary_data_size": len(raw)} if params else {"binary_data_size": len(raw)}
            )
            if len(raw):
                buffers.append(raw)
        else:
            if params:
                entry["parameters"] = params
            entry["data"] = _json_output(tensor)
        outputs_json.append(entry)
    head: dict[str, Any] = {}
    if response.id:
        head["id"] = response.id
    head["model_name"] = response.model_name
    head["model_version"] = str(response.model_version)
    if response.parameters:
        head["parameters"] = response.parameters
    head["outputs"] = outputs_json
    try:
        header = orjson.dumps(head, default=_json_default, option=_OPT_NUMPY)
    except TypeError:  # an array orjson refuses outright (e.g. not native-endian): as lists
        for entry in outputs_json:
            if isinstance(entry.get("data"), np.ndarray):
                entry["data"] = entry["data"].tolist()
        header = orjson.dumps(head, default=_json_default)
    if buffers:
        headers = _HDR_BINARY % len(header)
        body: Any = [header, *buffers]
    else:
        headers = CONTENT_TYPE_JSON
        body = header
    if accept_encoding is not None:
        coding = _response_coding(accept_encoding)
        if coding is not None:
            raw_body = b"".join(body) if buffers else body
            if coding == "gzip":
                compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
                body = compressor.compress(raw_body) + compressor.flush()
            else:
                body = zlib.compress(raw_body)
            headers += b"content-encoding: %s\r\n" % coding.encode()
    return Response(200, body, headers)


def _tensor_bytes(tensor: InferTensor) -> bytes | memoryview:
    array = tensor.data
    if array is None:
        return b""
    if tensor.datatype == "BYTES":
        parts = []
        pack = _U32.pack
        for element in array.reshape(-1):
            if element.__class__ is not bytes:
                element = element.encode() if isinstance(element, str) else bytes(element)  # np.bytes_ too
            parts.append(pack(len(element)))
            parts.append(element)
        return b"".join(parts)
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    if array.ndim != 1:
        array = array.reshape(-1)
    return memoryview(array).cast("B") if array.size else b""


def _json_output(tensor: InferTensor) -> Any:
    array = tensor.data
    if array is None:
        return []
    if tensor.datatype == "BYTES":
        out = []
        for element in array.reshape(-1):
            if isinstance(element, bytes):
                try:
                    element = element.decode()
                except UnicodeDecodeError:
                    raise InvalidArgument(
                        f"output '{tensor.name}' holds bytes that are not UTF-8 text; request it "
                        "with 'binary_data': true"
                    ) from None
            elif not isinstance(element, str):
                element = str(element)
            out.append(element)
        return out
    flat = array.reshape(-1)
    if not flat.flags.c_contiguous or flat.dtype.byteorder == ">":
        return flat.tolist()
    return flat  # orjson writes it natively (OPT_SERIALIZE_NUMPY)


def _json_default(value: Any) -> Any:
    """What orjson cannot write natively (numpy scalars in parameters, bytes, odd arrays)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


def _response_coding(accept: bytes) -> str | None:
    """Triton's CompressionTypeUsed: the highest-weighted of identity/deflate/gzip."""
    best = "identity"
    weight = 0.0
    for item in accept.decode("latin-1").split(","):
        token, _, q = item.strip().partition(";")
        coding = token.strip().lower()
        value = 1.0
        q = q.strip()
        if q:
            if not q.startswith("q="):
                continue
            try:
                value = float(q[2:])
            except ValueError:
                continue
        if coding in ("identity", "deflate", "gzip") and value > weight:
            best, weight = coding, value
    return None if best == "identity" else best


# -- small helpers -----------------------------------------------------------------------------------
def _json_body(request: HttpRequest, what: str) -> dict[str, Any] | None:
    """The request body as a JSON object, or None when empty."""
    if not request.body:
        return None
    try:
        obj = orjson.loads(request.body)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"failed to parse the {what} JSON buffer: {exc}") from None
    if obj.__class__ is not dict:
        raise InvalidArgument(f"failed to parse the {what} JSON buffer: expected a JSON object")
    return obj


def _load_parameters(params: dict[str, Any]) -> tuple[str | None, dict[str, bytes] | None]:
    config = None
    files: dict[str, bytes] = {}
    for key, value in params.items():
        if value.__class__ is not str:
            raise InvalidArgument(f"Unable to parse load parameter '{key}': expected a string")
        if key == "config":
            config = value
        elif key.startswith("file:"):
            try:
                files[key] = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidArgument(f"Unable to decode base64 content of load parameter '{key}'") from None
        else:
            raise InvalidArgument(
                f"unexpected load parameter '{key}': expected 'config' or 'file:<version>/<name>'"
            )
    return config, files or None


def _check_trace_value(key: str, value: Any) -> Any:
    if key == "trace_level":
        if value.__class__ is not list or not all(v.__class__ is str for v in value):
            raise InvalidArgument("Unable to parse 'trace_level': expected an array of strings")
        levels = [v for v in value if v in ("OFF", "TIMESTAMPS", "TENSORS")]
        if "OFF" in levels and len(value) != 1:
            raise InvalidArgument("Expect only one trace level 'OFF' is specified")
        return levels or ["OFF"]
    if value.__class__ is not str:
        raise InvalidArgument(f"Unable to parse '{key}': expected a string")
    if key in ("trace_rate", "trace_count", "log_frequency"):
        try:
            number = int(value)
        except ValueError:
            raise InvalidArgument(f"Unable to parse '{key}', got: {value}") from None
        if number < (-1 if key == "trace_count" else 0):
            raise InvalidArgument(f"Unable to parse '{key}', got: {value}")
    return value


# -- model configuration JSON --------------------------------------------------------------------------
def model_config_to_json(config: Any) -> dict[str, Any]:
    """ModelConfig -> Triton's JSON: proto field names, enum names, defaults included, and 64-bit
    integers as JSON numbers (protobuf's JSON mapping would quote them)."""
    from google.protobuf import json_format

    out = json_format.MessageToDict(
        config, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _fix_int64(config.DESCRIPTOR, out)
    return out


def _fix_int64(descriptor: Any, obj: dict[str, Any]) -> None:
    from google.protobuf.descriptor import FieldDescriptor

    wide = (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64)
    fields = descriptor.fields_by_name
    for key, value in obj.items():
        field = fields.get(key)
        if field is None:
            continue
        message = field.message_type
        if message is not None:
            if message.GetOptions().map_entry:
                value_field = message.fields_by_name["value"]
                if value_field.message_type is not None:
                    for entry in value.values():
                        _fix_int64(value_field.message_type, entry)
                elif value_field.cpp_type in wide:
                    obj[key] = {k: int(v) for k, v in value.items()}
            elif isinstance(value, list):
                for entry in value:
                    _fix_int64(message, entry)
            else:
                _fix_int64(message, value)
        elif field.cpp_type in wide:
            obj[key] = [int(v) for v in value] if isinstance(value, list) else int(value)
