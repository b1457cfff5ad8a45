"""``warm_up_data_path``: requests an instance must answer before it takes traffic.

EAS replays a file of recorded requests against a new instance so that its first real requests
do not pay for lazy initialisation (allocators, caches, JIT, first-touch pages). Our file is JSON
(a list) or JSON Lines; each entry is one request, sent ``count`` times (default 1):

* ``{"model": "add_sub", "version": "1", "inputs": [...], "outputs": [...], "count": 5}`` — a
  KServe v2 infer request (everything but ``model``, ``version`` and ``count`` is the body);
* ``{"path": "/predict", "method": "POST", "body": {...} | "text", "headers": {...}}`` — any HTTP
  request, for custom processors.

The local runtime sends them once the instance's readiness check passes while it is starting,
and publishes the instance only when every one answered 2xx.
"""

from __future__ import annotations

import http.client
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from elastiserve.errors import ConfigError

MAX_COUNT = 10_000


@dataclass
class WarmupRequest:
    method: str
    path: str
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    count: int = 1


def _entries(text: str, source: str) -> list[Any]:
    stripped = text.strip()
    if not stripped:
        raise ConfigError(f"warm_up_data_path '{source}': the file is empty")
    if stripped.startswith("["):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"warm_up_data_path '{source}': not valid JSON ({exc})") from None
        return list(data)
    entries = []
    for number, line in enumerate(stripped.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"warm_up_data_path '{source}': line {number} is not valid JSON ({exc.msg})"
            ) from None
    return entries


def _request(entry: Any, where: str) -> WarmupRequest:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be an object, not {type(entry).__name__}")
    count = entry.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_COUNT:
        raise ConfigError(f"{where}: count must be an integer from 1 to {MAX_COUNT}")
    if "path" in entry:
        path, method = entry["path"], entry.get("method", "POST" if "body" in entry else "GET")
        if not isinstance(path, str) or not path.startswith("/"):
            raise ConfigError(f"{where}: path must be a string starting with '/'")
        if not isinstance(method, str) or method.upper() not in ("GET", "POST", "PUT"):
            raise ConfigError(f"{where}: method must be GET, POST or PUT")
        body = entry.get("body", "")
        headers = entry.get("headers", {})
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            raise ConfigError(f"{where}: headers must be an object of strings")
        if not isinstance(body, str):
            body = json.dumps(body)
            headers = {"Content-Type": "application/json", **headers}
        unknown = set(entry) - {"path", "method", "body", "headers", "count"}
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}")
        return WarmupRequest(method.upper(), path, body, headers, count)
    model = entry.get("model")
    if not isinstance(model, str) or not model:
        raise ConfigError(f"{where}: give 'model' (a KServe v2 infer request) or 'path'")
    version = entry.get("version", "")
    if not isinstance(version, str | int) or isinstance(version, bool):
        raise ConfigError(f"{where}: version must be a string")
    if not isinstance(entry.get("inputs"), list):
        raise ConfigError(f"{where}: inputs must be a list of tensors")
    path = f"/v2/models/{quote(model, safe='')}" + (f"/versions/{version}" if str(version) else "") + "/infer"
    body = {k: v for k, v in entry.items() if k not in ("model", "version", "count")}
    return WarmupRequest("POST", path, json.dumps(body), {"Content-Type": "application/json"}, count)


def load_warmup(path: Path, source: str) -> list[WarmupRequest]:
    """Parse and check a warm-up file; a ConfigError names the entry that is wrong."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"warm_up_data_path '{source}': cannot read it ({exc})") from None
    entries = _entries(text, source)
    if not entries:
        raise ConfigError(f"warm_up_data_path '{source}': no requests in it")
    return [_request(entry, f"warm_up_data_path '{source}', request {i}") for i, entry in enumerate(entries)]


def save(requests: list[WarmupRequest], path: Path) -> None:
    path.write_text(json.dumps([asdict(r) for r in requests]))


def load_saved(path: Path) -> list[WarmupRequest]:
    return [WarmupRequest(**item) for item in json.loads(path.read_text())]


def run_warmup(
    address: str, port: int, requests: list[WarmupRequest], timeout: float = 60.0
) -> tuple[bool, str]:
    """Send every request ``count`` times on one keep-alive connection; the first non-2xx stops."""
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        for index, request in enumerate(requests):
            for _ in range(request.count):
                conn.request(
                    request.method, request.path, body=request.body.encode(), headers=request.headers
                )
                response = conn.getresponse()
                payload = response.read()
                if not 200 <= response.status < 300:
                    detail = payload[:200].decode(errors="replace").strip()
                    return False, (
                        f"warm-up request {index} ({request.method} {request.path}) answered "
                        f"{response.status}: {detail}"
                    )
        return True, ""
    except (OSError, http.client.HTTPException) as exc:
        return False, f"warm-up failed: {exc}"
    finally:
        conn.close()
