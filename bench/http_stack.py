#!/usr/bin/env python3
"""Pick the engine's HTTP stack by numbers: the same KServe v2 handler (``RestApp`` over a fake
in-process identity model) behind (a) ``proto``: our ``asyncio.Protocol`` over ``httptools`` on
uvloop and (b) ``asgi``: uvicorn (httptools + uvloop) through a thin ASGI adapter; the two bare
calibration routes that only echo the tensor (``bare-proto``, ``bare-asgi``); and side by side
real Triton 2.51 (``triton``) and the real engine (``engine``: ``elastiserve serve`` on Triton's
anchor models), all in one interleaved run.

Server pinned to core 0, wrk (via ``shared/anchors/wrkload.py``) to core 1, 16 connections,
binary-tensor identity over HTTP like tritonclient's default. Results go to docs/http-stack.md.

  python bench/http_stack.py run [--modes proto,asgi,bare-asgi,bare-proto] [--repeats 3] [--duration 8]
  python bench/http_stack.py serve --mode proto --port 8000     # one server, for manual runs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WRKLOAD = Path(os.environ.get("WRKLOAD", ROOT.parent / "shared" / "anchors" / "wrkload.py"))
sys.path.insert(0, str(ROOT))  # tests.engine.rest_fake: the fake dataplane (identity model)


def _app() -> Any:
    from elastiserve.engine.frontends.rest import RestApp
    from tests.engine.rest_fake import make_dataplane

    dataplane, _ = make_dataplane()
    return RestApp(dataplane)


def _asgi_adapter(app: Any) -> Any:
    """The full REST handler behind ASGI: what choosing uvicorn would cost."""
    from elastiserve.engine.frontends.http_server import HttpRequest, Response

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            while True:  # lifespan
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        headers = dict(scope["headers"])
        request = HttpRequest(
            scope["method"],
            scope["path"],
            scope["query_string"].decode(),
            headers,
            body,
            True,
            scope["http_version"],
        )
        result = app(request)
        if result.__class__ is not Response:
            result = await result
        payload = result.body if not isinstance(result.body, list) else b"".join(result.body)
        raw = [tuple(line.split(b": ", 1)) for line in result.headers.split(b"\r\n") if line]
        await send(
            {
                "type": "http.response.start",
                "status": result.status,
                "headers": [(b"content-length", str(len(payload)).encode()), *raw],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    return asgi


def _bare_identity(body: bytes, header_length: int) -> tuple[bytes, bytes]:
    """Only the identity: parse the JSON header, view the tensor, echo it back."""
    import numpy as np
    import orjson

    head = orjson.loads(memoryview(body)[:header_length])
    inp = head["inputs"][0]
    data = np.frombuffer(body, np.float32, offset=header_length)
    out = orjson.dumps(
        {
            "model_name": "identity_fp32",
            "model_version": "1",
            "outputs": [
                {
                    "name": "OUTPUT0",
                    "datatype": "FP32",
                    "shape": inp["shape"],
                    "parameters": {"binary_data_size": data.nbytes},
                }
            ],
        }
    )
    return out, data.tobytes()


def _bare_asgi() -> Any:
    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        message = await receive()
        body = message.get("body", b"")
        if not scope["path"].endswith("/infer"):  # health probes
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        header_length = int(dict(scope["headers"])[b"inference-header-content-length"])
        head, data = _bare_identity(body, header_length)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/octet-stream"),
                    (b"inference-header-content-length", str(len(head)).encode()),
                    (b"content-length", str(len(head) + len(data)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": head + data})

    return asgi


def serve(mode: str, port: int) -> None:
    import uvloop

    if mode in ("asgi", "bare-asgi"):
        import uvicorn

        app = _asgi_adapter(_app()) if mode == "asgi" else _bare_asgi()
        uvicorn.run(
            app,
            host="127.0.0.1",
            port=port,
            http="httptools",
            loop="uvloop",
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
        return

    from elastiserve.engine.frontends.http_server import Response, start_server

    if mode == "proto":
        handler = _app()
    else:  # bare-proto

        def handler(request: Any) -> Response:
            if not request.path.endswith("/infer"):  # health probes
                return Response(200)
            header_length = int(request.headers[b"inference-header-content-length"])
            head, data = _bare_identity(request.body, header_length)
            return Response(
                200,
                [head, data],
                b"content-type: application/octet-stream\r\n"
                b"inference-header-content-length: %d\r\n" % len(head),
            )

    async def main() -> None:
        await start_server(handler, "127.0.0.1", port)
        await asyncio.Event().wait()

    uvloop.run(main())


ANCHORS = Path(os.environ.get("ANCHORS", Path.home() / ".cache" / "elastiserve-anchors"))
TRITON_START = ROOT.parent / "shared" / "anchors" / "triton" / "start.sh"


def _start(mode: str, port: int) -> subprocess.Popen[bytes]:
    """The server under test, pinned to core 0 (Triton's Python-backend stubs inherit the pin)."""
    if mode == "triton":
        extra = f"--http-port={port} --grpc-port={port + 1} --metrics-port={port + 2}"
        return subprocess.Popen(
            [
                "taskset", "-c", "0", "bash", str(TRITON_START), str(ANCHORS / "triton-venv"),
                str(ANCHORS / "triton-models"), str(ANCHORS / "triton-backends"),
            ],
            env={**os.environ, "TRITON_EXTRA_ARGS": extra},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
    if mode == "engine":  # the real engine (registry, scheduler, Python backend) on Triton's models
        return subprocess.Popen(
            [
                "taskset", "-c", "0", sys.executable, "-m", "elastiserve", "serve",
                f"--model-repository={TRITON_START.parent / 'models'}", "--http-address=127.0.0.1",
                f"--http-port={port}", "--allow-grpc=false", "--allow-metrics=false",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
    return subprocess.Popen(
        ["taskset", "-c", "0", sys.executable, __file__, "serve", "--mode", mode, "--port", str(port)]
    )


def _cpu_idle(seconds: float = 1.0) -> list[float]:
    """Idle fraction of each core over ``seconds`` (from /proc/stat)."""

    def sample() -> list[tuple[int, int]]:
        rows = []
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("cpu") and line[3].isdigit():
                values = [int(v) for v in line.split()[1:]]
                rows.append((values[3] + values[4], sum(values)))
        return rows

    before = sample()
    time.sleep(seconds)
    after = sample()
    return [(a[0] - b[0]) / max(1, a[1] - b[1]) for a, b in zip(after, before, strict=True)]


def _wait_quiet(threshold: float = 0.85, patience: float = 120.0) -> list[float]:
    """Other engineers share this 2-core machine: wait (a while) until both cores are idle."""
    deadline = time.monotonic() + patience
    while True:
        idle = _cpu_idle()
        if min(idle) >= threshold or time.monotonic() > deadline:
            return idle
        time.sleep(2)


def _wait_http(port: int, timeout: float = 30.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1) as r:
                if r.status == 200:
                    time.sleep(0.3)
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"port {port} not serving")


def _wrk(port: int, connections: int, duration: int) -> dict[str, Any]:
    command = [
        "taskset", "-c", "1", sys.executable, str(WRKLOAD), "--url", f"127.0.0.1:{port}",
        "--model", "identity_fp32", "--connections", str(connections), "--duration", str(duration),
    ]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run(modes: list[str], repeats: int, duration: int, connections: int) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from elastiserve.testing import free_port

    results: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for rep in range(repeats):
        for mode in modes:  # interleaved, so machine noise spreads over all candidates
            port = free_port()
            idle = _wait_quiet()
            server = _start(mode, port)
            try:
                _wait_http(port)
                _wrk(port, connections, 2)  # warm-up
                result = _wrk(port, connections, duration)
                result["idle_before"] = idle
                results[mode].append(result)
                print(
                    f"rep {rep} {mode:10s} {result['throughput_rps']:>9.0f} req/s p50 {result['p50_ms']:.2f} ms "
                    f"p99 {result['p99_ms']:.2f} ms non2xx {result['non2xx']} errors {result['socket_errors']} "
                    f"(cores idle before: {', '.join(f'{i:.0%}' for i in idle)})",
                    flush=True,
                )
            finally:
                server.terminate()
                server.wait(10)
                time.sleep(0.5)
    print("\n| server (core 0) | median req/s | runs | median p50 ms | median p99 ms |")
    print("|---|---|---|---|---|")
    for mode, rs in results.items():
        rps = [r["throughput_rps"] for r in rs]
        print(
            f"| {mode} | {statistics.median(rps):,.0f} | {', '.join(f'{x:,.0f}' for x in rps)} | "
            f"{statistics.median(r['p50_ms'] for r in rs):.2f} | {statistics.median(r['p99_ms'] for r in rs):.2f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--mode", required=True, choices=["proto", "asgi", "bare-asgi", "bare-proto"])
    s.add_argument("--port", type=int, required=True)
    r = sub.add_parser("run")
    r.add_argument("--modes", default="triton,engine,proto,asgi,bare-proto,bare-asgi")
    r.add_argument("--repeats", type=int, default=3)
    r.add_argument("--duration", type=int, default=8)
    r.add_argument("--connections", type=int, default=16)
    a = ap.parse_args()
    if a.cmd == "serve":
        serve(a.mode, a.port)
    else:
        run(a.modes.split(","), a.repeats, a.duration, a.connections)


if __name__ == "__main__":
    main()
