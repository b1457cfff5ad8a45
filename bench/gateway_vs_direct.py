#!/usr/bin/env python3
"""Gateway cost: the same identity model called directly, through the gateway, and through nginx.

    .venv/bin/python bench/gateway_vs_direct.py [--duration 8] [--rounds 3] [--connections 16]

One ``elastiserve serve`` instance (examples/models, ``identity_fp32``) pinned to core 0;
``wrk`` (C, so the generator is not the bottleneck) pinned to core 1 sends binary-tensor V2
infer requests (as tritonclient does) with the service token. Layouts, as in
``../shared/docs/anchors.md``:

* ``direct``: wrk → instance;
* ``gateway (gen core)`` / ``nginx (gen core)``: the proxy shares core 1 with wrk;
* ``gateway (srv core)`` / ``nginx (srv core)``: the proxy shares core 0 with the instance.

nginx 1.22 (Debian): one worker, keep-alive upstream pool of 64, access log off, run as our own
process with a config in a temp dir, loopback only. The control plane runs in this process
(uvicorn in a thread; idle during measurement). Configurations alternate within each round and
the median of the rounds is reported. Prints a Markdown table and one JSON line per result.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from elastiserve.controlplane.api import create_app, serve_in_thread  # noqa: E402
from elastiserve.controlplane.spec import parse_spec  # noqa: E402
from elastiserve.controlplane.store import InstanceRecord, Store  # noqa: E402
from elastiserve.testing import free_port, wait_http_ready  # noqa: E402

SERVER_CORE, GEN_CORE = "0", "1"
TOKEN = "bench-service-token"
ADMIN = "bench-admin-token"
MODEL = "identity_fp32"
SERVICE = "bench"

LUA = r"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/octet-stream"
wrk.headers["Inference-Header-Content-Length"] = "%(hlen)d"
wrk.headers["Authorization"] = "%(token)s"
local f = io.open("%(body)s", "rb"); wrk.body = f:read("*all"); f:close()
done = function(summary, latency, requests)
  io.write(string.format("JSON {\"requests\": %%d, \"duration_us\": %%d, \"non2xx\": %%d, \"errors\": %%d, \"p50_us\": %%d, \"p99_us\": %%d}\n",
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""

NGINX_CONF = """
worker_processes 1;
master_process off;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  client_max_body_size 64m;
  upstream instance {{ server 127.0.0.1:{upstream}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port} backlog=1024;
    location /api/predict/{service}/ {{
      proxy_pass http://instance/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "";
    }}
  }}
}}
"""


def write_wrk_script(tmp: Path) -> Path:
    data = struct.pack("<16f", *range(16))
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT0",
                    "shape": [1, 16],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(data)},
                }
            ],
            "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
        },
        separators=(",", ":"),
    ).encode()
    body = tmp / "body.bin"
    body.write_bytes(head + data)
    lua = tmp / "v2.lua"
    lua.write_text(LUA % {"hlen": len(head), "body": body, "token": TOKEN})
    return lua


def wrk(url: str, lua: Path, connections: int, duration: int) -> dict[str, float]:
    out = subprocess.run(
        [
            "taskset",
            "-c",
            GEN_CORE,
            "wrk",
            "-t",
            "1",
            "-c",
            str(connections),
            "-d",
            f"{duration}s",
            "-s",
            str(lua),
            url,
        ],
        capture_output=True,
        text=True,
        timeout=duration + 60,
        check=True,
    ).stdout
    match = re.search(r"^JSON (.*)$", out, re.M)
    if match is None:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    r = json.loads(match.group(1))
    secs = r["duration_us"] / 1e6
    return {
        "rps": r["requests"] / secs,
        "p50_ms": r["p50_us"] / 1000,
        "p99_ms": r["p99_us"] / 1000,
        "non2xx": r["non2xx"],
        "errors": r["errors"],
    }


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of ``pid`` so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def process(
    cmd: list[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--no-nginx", action="store_true")
    ap.add_argument(
        "--json-out", type=Path, help="also write the summary rows as JSON (bench/run.py reads it)"
    )
    a = ap.parse_args()
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            print(f"error: {tool} not found (apt-get install -y wrk util-linux)", file=sys.stderr)
            return 2
    nginx = (
        None
        if a.no_nginx
        else shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    )
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "make_models.py")], check=True, capture_output=True
    )
    py = sys.executable
    tmp = Path(tempfile.mkdtemp(prefix="gwbench."))
    lua = write_wrk_script(tmp)
    results: dict[str, list[dict[str, float]]] = {}
    with contextlib.ExitStack() as stack:
        eport = free_port()
        engine = stack.enter_context(
            process(
                [
                    "taskset",
                    "-c",
                    SERVER_CORE,
                    py,
                    "-m",
                    "elastiserve",
                    "serve",
                    f"--model-repository={ROOT / 'examples' / 'models'}",
                    "--model-control-mode=explicit",
                    f"--load-model={MODEL}",
                    "--http-address=127.0.0.1",
                    f"--http-port={eport}",
                    "--allow-grpc=false",
                    "--allow-metrics=false",
                    "--log-verbose=0",
                ],
                tmp / "engine.log",
            )
        )
        wait_http_ready(f"http://127.0.0.1:{eport}/v2/health/ready", process=engine)
        store = Store.open(tmp / "state")
        store.create_service(
            parse_spec(
                {
                    "name": SERVICE,
                    "processor": "triton",
                    "token": TOKEN,
                    "processor_params": ["--model-repository=/unused"],
                }
            )
        )
        store.upsert_instance(
            InstanceRecord(
                id="bench-1",
                service=SERVICE,
                version=1,
                address="127.0.0.1",
                port=eport,
                status="Running",
                ready=True,
                started=time.time(),
            )
        )
        # max_wait=1: the gateway's long-polls end fast when this process shuts the API down.
        cp = stack.enter_context(serve_in_thread(create_app(store, admin_token=ADMIN, max_wait=1)))
        (tmp / "admin_token").write_text(ADMIN)
        suffix = f"/api/predict/{SERVICE}/v2/models/{MODEL}/infer"
        targets: dict[str, str] = {"direct": f"http://127.0.0.1:{eport}/v2/models/{MODEL}/infer"}
        pids: dict[str, int] = {"direct": engine.pid}  # whose CPU per request is reported
        for label, core in (("gateway (gen core)", GEN_CORE), ("gateway (srv core)", SERVER_CORE)):
            gport = free_port()
            gw = stack.enter_context(
                process(
                    [
                        "taskset",
                        "-c",
                        core,
                        py,
                        "-m",
                        "elastiserve.gateway",
                        "--control-plane",
                        cp,
                        "--port",
                        str(gport),
                        "--admin-token-file",
                        str(tmp / "admin_token"),
                        "--log-level",
                        "warning",
                    ],
                    tmp / f"gateway-{gport}.log",
                )
            )
            wait_http_ready(f"http://127.0.0.1:{gport}/readyz", process=gw)
            targets[label] = f"http://127.0.0.1:{gport}{suffix}"
            pids[label] = gw.pid
        if nginx:
            for label, core in (("nginx (gen core)", GEN_CORE), ("nginx (srv core)", SERVER_CORE)):
                nport = free_port()
                ntmp = tmp / f"nginx-{nport}"
                ntmp.mkdir()
                conf = ntmp / "nginx.conf"
                conf.write_text(NGINX_CONF.format(tmp=ntmp, upstream=eport, port=nport, service=SERVICE))
                ng = stack.enter_context(
                    process(
                        ["taskset", "-c", core, nginx, "-p", str(ntmp), "-c", str(conf)], ntmp / "stdout.log"
                    )
                )
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    with contextlib.suppress(httpx.HTTPError):
                        httpx.get(
                            f"http://127.0.0.1:{nport}/api/predict/{SERVICE}/v2/health/ready", timeout=1
                        )
                        break
                    if ng.poll() is not None:
                        raise RuntimeError((ntmp / "nginx-error.log").read_text())
                    time.sleep(0.05)
                targets[label] = f"http://127.0.0.1:{nport}{suffix}"
                pids[label] = ng.pid
        for url in targets.values():  # each path answers before measuring
            r = httpx.post(
                url,
                content=(tmp / "body.bin").read_bytes(),
                headers={
                    "Authorization": TOKEN,
                    "Inference-Header-Content-Length": str(len((tmp / "body.bin").read_bytes()) - 64),
                },
            )
            if r.status_code != 200:
                raise RuntimeError(f"{url}: {r.status_code} {r.text}")
        for rnd in range(a.rounds):
            for label, url in targets.items():
                wrk(url, lua, a.connections, a.warmup)
                before = cpu_seconds(pids[label])
                res = wrk(url, lua, a.connections, a.duration)
                res["cpu_us_per_req"] = (
                    (cpu_seconds(pids[label]) - before) / max(1.0, res["rps"] * a.duration) * 1e6
                )
                results.setdefault(label, []).append(res)
                print(
                    json.dumps({"round": rnd, "target": label, **{k: round(v, 3) for k, v in res.items()}}),
                    flush=True,
                )
    base = statistics.median(r["rps"] for r in results["direct"])
    base_p50 = statistics.median(r["p50_ms"] for r in results["direct"])
    print(
        f"\nidentity_fp32, HTTP binary tensors, {a.connections} connections, wrk on core {GEN_CORE}, "
        f"instance on core {SERVER_CORE}, median of {a.rounds} x {a.duration}s\n"
    )
    print(
        "| path | req/s | vs direct | vs direct, same round | p50 ms | p50 vs direct | p99 ms "
        "| CPU µs/req (instance for direct, else proxy) | non-2xx |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    summary = []
    for label, runs in results.items():
        rps = statistics.median(r["rps"] for r in runs)
        p50 = statistics.median(r["p50_ms"] for r in runs)
        p99 = statistics.median(r["p99_ms"] for r in runs)
        cpu = statistics.median(r["cpu_us_per_req"] for r in runs)
        bad = sum(r["non2xx"] + r["errors"] for r in runs)
        # Runs next to each other share the machine's load best: the median of per-round ratios.
        paired = statistics.median(
            r["rps"] / d["rps"] - 1 for r, d in zip(runs, results["direct"], strict=True)
        )
        print(
            f"| {label} | {rps:,.0f} | {rps / base - 1:+.0%} | {paired:+.0%} | {p50:.2f} | {p50 - base_p50:+.2f} "
            f"| {p99:.2f} | {cpu:.1f} | {bad} |"
        )
        summary.append(
            {
                "path": label,
                "rps": rps,
                "vs_direct_paired": paired,
                "p50_ms": p50,
                "p50_vs_direct_ms": p50 - base_p50,
                "p99_ms": p99,
                "cpu_us_per_req": cpu,
                "failed": bad,
            }
        )
    if a.json_out:
        a.json_out.write_text(
            json.dumps(
                {"connections": a.connections, "rounds": a.rounds, "duration": a.duration, "rows": summary},
                indent=1,
            )
        )
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f} (this machine is shared; spread is large)")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
