#!/usr/bin/env python3
"""The side-by-side benchmark suite: elastiserve vs real Triton vs MLServer, one client for all.

    .venv/bin/python bench/run.py            # full run, ~10 min on a 2-core box
    .venv/bin/python bench/run.py --quick    # a ~3 min subset (smoke run)
    .venv/bin/python bench/run.py --readme   # also regenerate README's Performance section

Every server serves the same models (identity FP32[16], add_sub, a scikit-learn model, an ONNX
MLP; with and without dynamic batching where the server has it), one server at a time, pinned
to core 0 (``taskset``; Triton's Python stubs inherit the pin), while ``elastiserve bench`` —
the same generator for every server, that's the point — runs pinned to core 1. The in-process
limit (the model called directly in a loop on core 0, no server) bounds what any server can
do, and the generator's own ceiling is measured against trivial servers (nginx returning a fixed
200; an echo-only gRPC server).

Anchors are installed into ``~/.cache/elastiserve-anchors`` when missing (see
``shared/docs/anchors.md``): Triton from the ``nvidia-pytriton`` wheel (Python backend, so no
ONNX/sklearn rows for Triton), MLServer 1.7.1 in its own venv (JSON tensors over HTTP: it
rejects binary ones; its best setting ``parallel_workers: 0``), nginx from Debian.

Writes ``bench/results/<date>-<host>.json|md|png``. Never part of the CI tests.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
ANCHORS = Path(os.environ.get("ELASTISERVE_ANCHORS", ROOT.parent / "shared" / "anchors"))
CACHE = Path(os.environ.get("ELASTISERVE_ANCHOR_CACHE", Path.home() / ".cache" / "elastiserve-anchors"))
SERVER_CPUS = os.environ.get("BENCH_SERVER_CPUS", "0")
GEN_CPUS = os.environ.get("BENCH_GEN_CPUS", "1")
SERVERS = ("elastiserve", "triton", "mlserver")


# -- the cases ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    model: str
    shapes: tuple[str, ...]
    outputs: tuple[str, ...]
    servers: tuple[str, ...]
    sweep: bool = False  # concurrency sweep (the chart); otherwise one level
    inprocess: str | None = None  # the model family called in-process (the limit)
    quick: bool = False
    mlserver_outputs: tuple[str, ...] | None = None
    formats: tuple[str, ...] = ("binary",)  # HTTP input formats for elastiserve

    def outputs_for(self, server: str) -> tuple[str, ...]:
        return (
            self.mlserver_outputs
            if server == "mlserver" and self.mlserver_outputs is not None
            else self.outputs
        )


ALL = SERVERS
CASES = [
    Case(
        "identity_fp32", ("INPUT0:16",), ("OUTPUT0",), ALL, sweep=True, quick=True, formats=("binary", "json")
    ),
    Case("add_sub", ("INPUT0:16", "INPUT1:16"), ("OUTPUT0", "OUTPUT1"), ALL),
    Case("identity_fp32_dynbatch", ("INPUT0:16",), ("OUTPUT0",), ALL, quick=True),
    Case(
        "sklearn_iris",
        ("input__0:4",),
        ("output__0",),
        ("elastiserve", "mlserver"),
        inprocess="sklearn",
        mlserver_outputs=("predict_proba",),
    ),
    Case(
        "sklearn_iris_dynbatch",
        ("input__0:4",),
        ("output__0",),
        ("elastiserve", "mlserver"),
        inprocess="sklearn",
        mlserver_outputs=("predict_proba",),
        quick=True,
    ),
    Case("onnx_mlp", ("x:256",), ("y",), ("elastiserve", "mlserver"), inprocess="onnx"),
    Case("onnx_mlp_dynbatch", ("x:256",), ("y",), ("elastiserve", "mlserver"), inprocess="onnx", quick=True),
]
# The ONNX MLP of the "served at >= 80% of its in-process limit" target: big enough that its
# compute (~30 us a call on one core) is what a user pays for, not a 4 us toy that only
# measures per-request overhead (examples/models/simple_onnx is that toy).
MLP_SHAPE = {"inputs": 256, "hidden": 2048, "outputs": 16}
TINY = ("identity_fp32", "add_sub")  # the models of the xTriton / xMLServer targets
TARGET_CLIENTS = 16


# -- helpers -----------------------------------------------------------------------------------------------
def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def pinned(cpus: str, command: list[str]) -> list[str]:
    return (
        ["taskset", "-c", cpus, *command]
        if shutil.which("taskset") and (os.cpu_count() or 1) > 1
        else command
    )


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (held open together while chosen, so none repeats)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def free_port() -> int:
    return free_ports(1)[0]


def http_ok(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until(check: Any, what: str, process: subprocess.Popen[bytes] | None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {process.returncode}")
        if check():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f}s")


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a process we started (by its PID), then make sure it is gone."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


# -- anchors and models ----------------------------------------------------------------------------------
def ensure_anchors(servers: list[str], install: bool) -> dict[str, str]:
    """Install what is missing; returns server → reason for the ones that cannot run."""
    missing: dict[str, str] = {}
    jobs = {
        "triton": (CACHE / "triton-venv", ["nvidia-pytriton==0.7.0", "tritonclient[http,grpc]", "numpy"]),
        "mlserver": (
            CACHE / "mlserver-venv",
            ["mlserver==1.7.1", "mlserver-sklearn==1.7.1", "uvloop==0.21.0", "onnxruntime"],
        ),
    }
    for server, (venv, packages) in jobs.items():
        if server not in servers or (venv / "bin" / "python").exists():
            continue
        if not install:
            missing[server] = f"no venv at {venv} (run without --no-install)"
            continue
        log(f"installing {server} into {venv} (once)")
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
        result = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *packages], check=False)
        if result.returncode:
            shutil.rmtree(venv, ignore_errors=True)
            missing[server] = f"pip install {' '.join(packages)} failed"
    if "triton" in servers and not (ANCHORS / "triton" / "start.sh").exists():
        missing["triton"] = f"no {ANCHORS / 'triton' / 'start.sh'} (set ELASTISERVE_ANCHORS)"
    if shutil.which("nginx") is None and install:
        log("installing nginx from Debian (for the generator-ceiling calibration)")
        subprocess.run(["apt-get", "install", "-y", "-q", "nginx-light"], check=False, capture_output=True)
        if shutil.which("nginx") is None:
            subprocess.run(["apt-get", "install", "-y", "-q", "nginx"], check=False, capture_output=True)
    return missing


def _make_models_module() -> Any:
    spec = importlib.util.spec_from_file_location("make_models", ROOT / "examples" / "make_models.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MLSERVER_RUNTIMES = '''\
"""MLServer custom runtimes for the benchmark (the same models the other servers serve)."""
import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceResponse


class Identity(MLModel):
    async def load(self) -> bool:
        return True

    async def predict(self, payload):
        x = NumpyCodec.decode_input(payload.inputs[0])
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output("OUTPUT0", x)])


class AddSub(MLModel):
    async def load(self) -> bool:
        return True

    async def predict(self, payload):
        a = NumpyCodec.decode_input(payload.inputs[0])
        b = NumpyCodec.decode_input(payload.inputs[1])
        outputs = [NumpyCodec.encode_output("OUTPUT0", a + b), NumpyCodec.encode_output("OUTPUT1", a - b)]
        return InferenceResponse(model_name=self.name, outputs=outputs)


class OnnxMLP(MLModel):
    async def load(self) -> bool:
        import onnxruntime as ort
        from mlserver.utils import get_model_uri

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        path = await get_model_uri(self.settings)
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        return True

    async def predict(self, payload):
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32)
        (y,) = self.session.run(None, {"x": x})
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output("y", y)])
'''


def build_repositories(work: Path) -> dict[str, Path]:
    """Model repositories for each server under ``work`` (regenerated each run: a few ms)."""
    make = _make_models_module()
    onnx_bytes, sklearn_bytes = make.onnx_mlp_bytes(**MLP_SHAPE), make.sklearn_iris_bytes()
    repos = {
        "elastiserve": work / "elastiserve",
        "mlserver": work / "mlserver",
        "triton": ANCHORS / "triton" / "models",
    }
    es = repos["elastiserve"]
    for name in ("identity_fp32", "add_sub", "identity_fp32_dynbatch"):
        shutil.copytree(ANCHORS / "triton" / "models" / name, es / name, dirs_exist_ok=True)
    for name, batching in (("sklearn_iris", False), ("sklearn_iris_dynbatch", True)):
        (es / name / "1").mkdir(parents=True, exist_ok=True)
        (es / name / "1" / "model.joblib").write_bytes(sklearn_bytes)
        (es / name / "config.pbtxt").write_text(
            f'name: "{name}"\nbackend: "sklearn"\nmax_batch_size: 64\n'
            'input [{ name: "input__0", data_type: TYPE_FP32, dims: [ 4 ] }]\n'
            'output [{ name: "output__0", data_type: TYPE_FP32, dims: [ 3 ] }]\n'
            'parameters { key: "method" value { string_value: "predict_proba" } }\n'
            + ("dynamic_batching { max_queue_delay_microseconds: 500 }\n" if batching else "")
            + "instance_group [{ count: 1, kind: KIND_CPU }]\n"
        )
    for name, batching in (("onnx_mlp", False), ("onnx_mlp_dynbatch", True)):
        (es / name / "1").mkdir(parents=True, exist_ok=True)
        (es / name / "1" / "model.onnx").write_bytes(onnx_bytes)
        (es / name / "config.pbtxt").write_text(
            f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: 64\n'
            + ("dynamic_batching { max_queue_delay_microseconds: 500 }\n" if batching else "")
            + "instance_group [{ count: 1, kind: KIND_CPU }]\n"
        )
    ml = repos["mlserver"]
    ml.mkdir(parents=True, exist_ok=True)
    mlserver_models: dict[str, dict[str, Any]] = {
        "identity_fp32": {"implementation": "runtimes.Identity"},
        "identity_fp32_dynbatch": {"implementation": "runtimes.Identity", "batching": True},
        "add_sub": {"implementation": "runtimes.AddSub"},
        "sklearn_iris": {"implementation": "mlserver_sklearn.SKLearnModel", "uri": "model.joblib"},
        "sklearn_iris_dynbatch": {
            "implementation": "mlserver_sklearn.SKLearnModel",
            "uri": "model.joblib",
            "batching": True,
        },
        "onnx_mlp": {"implementation": "runtimes.OnnxMLP", "uri": "model.onnx"},
        "onnx_mlp_dynbatch": {"implementation": "runtimes.OnnxMLP", "uri": "model.onnx", "batching": True},
    }
    for name, spec in mlserver_models.items():
        folder = ml / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "runtimes.py").write_text(MLSERVER_RUNTIMES)
        settings: dict[str, Any] = {"name": name, "implementation": spec["implementation"]}
        if "uri" in spec:
            data = sklearn_bytes if spec["uri"].endswith("joblib") else onnx_bytes
            (folder / spec["uri"]).write_bytes(data)
            settings["parameters"] = {"uri": f"./{spec['uri']}"}
        if spec.get("batching"):  # MLServer's adaptive batching, like Triton's dynamic batching
            settings |= {"max_batch_size": 64, "max_batch_time": 0.0005}
        (folder / "model-settings.json").write_text(json.dumps(settings, indent=2))
    return repos


# -- servers -----------------------------------------------------------------------------------------------
@dataclass
class Server:
    name: str
    http: int
    grpc: int
    process: subprocess.Popen[bytes]
    log_path: Path


@contextmanager
def serving(name: str, repos: dict[str, Path], work: Path, models: list[str]) -> Iterator[Server]:
    http, grpc, metrics = free_ports(3)
    log_path = work / f"{name}.log"
    env = dict(os.environ)
    if name == "elastiserve":
        command = [
            PYTHON,
            "-m",
            "elastiserve",
            "serve",
            f"--model-repository={repos[name]}",
            "--http-address=127.0.0.1",
            f"--http-port={http}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={grpc}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={metrics}",
            "--log-info=false",
        ]
    elif name == "triton":
        env["TRITON_EXTRA_ARGS"] = f"--http-port={http} --grpc-port={grpc} --metrics-port={metrics}"
        command = [
            str(ANCHORS / "triton" / "start.sh"),
            str(CACHE / "triton-venv"),
            str(repos[name]),
            str(CACHE / "triton-backends"),
        ]
    else:
        settings = {
            "debug": False,
            "parallel_workers": 0,
            "host": "127.0.0.1",
            "http_port": http,
            "grpc_port": grpc,
            "metrics_port": metrics,
            "load_models_at_startup": True,
        }
        (repos[name] / "settings.json").write_text(json.dumps(settings))
        command = [str(CACHE / "mlserver-venv" / "bin" / "mlserver"), "start", str(repos[name])]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            pinned(SERVER_CPUS, command), stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=work
        )
    server = Server(name, http, grpc, process, log_path)
    try:
        for model in models:
            wait_until(
                lambda m=model: http_ok(f"http://127.0.0.1:{http}/v2/models/{m}/ready"),
                f"{name} model {model}",
                process,
            )
        yield server
    finally:
        stop(process)


# -- measuring ---------------------------------------------------------------------------------------------
def bench(
    url: str,
    protocol: str,
    model: str,
    shapes: tuple[str, ...],
    outputs: tuple[str, ...],
    clients: list[int],
    args: argparse.Namespace,
    input_format: str = "binary",
) -> dict[str, Any]:
    """One ``elastiserve bench`` run on the generator's core; its JSON report (or an error)."""
    command = [
        PYTHON,
        "-m",
        "elastiserve",
        "bench",
        "-m",
        model,
        "-u",
        url,
        "-i",
        protocol,
        "--concurrency",
        ",".join(map(str, clients)),
        "--duration",
        str(args.duration),
        "--warmup",
        str(args.warmup),
        "--json",
        "-",
        "--no-progress",
        "--timeout",
        "10",
    ]
    for shape in shapes:
        command += ["--shape", shape]
    for output in outputs:
        command += ["--output", output]
    if protocol == "http":
        command += ["--input-format", input_format]
    limit = len(clients) * (args.duration + args.warmup + 12) + 60
    out = subprocess.run(
        pinned(GEN_CPUS, command), capture_output=True, text=True, timeout=limit, check=False
    )
    if out.returncode not in (0, 1) or not out.stdout.strip():
        return {"error": (out.stderr or out.stdout).strip()[-400:]}
    return json.loads(out.stdout)


def run_server(
    name: str, repos: dict[str, Path], work: Path, cases: list[Case], args: argparse.Namespace
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    models = [c.model for c in cases if name in c.servers]
    if not models:
        return rows
    started = time.monotonic()
    try:
        with serving(name, repos, work, models) as server:
            log(f"{name} ready in {time.monotonic() - started:.1f}s")
            for case in cases:
                if name not in case.servers:
                    continue
                clients = args.sweep if case.sweep else [TARGET_CLIENTS]
                for protocol in ("http", "grpc"):
                    formats = ["json"] if name == "mlserver" and protocol == "http" else ["binary"]
                    if name == "elastiserve" and protocol == "http":
                        formats = list(case.formats)
                    for fmt in formats:
                        url = f"127.0.0.1:{server.http if protocol == 'http' else server.grpc}"
                        report = bench(
                            url, protocol, case.model, case.shapes, case.outputs_for(name), clients, args, fmt
                        )
                        row = {
                            "server": name,
                            "model": case.model,
                            "protocol": protocol,
                            "input_format": fmt if protocol == "http" else "raw",
                            **report,
                        }
                        rows.append(row)
                        summary = ", ".join(
                            f"c{r['concurrency']}: {r['throughput_rps']:,.0f}/s p99 {r['latency_ms']['p99'] or 0:.2f}ms"
                            + (f" errors {sum(r['errors'].values())}" if r["errors"] else "")
                            for r in report.get("results", [])
                        ) or report.get("error", "?")
                        log(f"{name:11s} {case.model:22s} {protocol:4s} {fmt:6s} {summary}")
    except (RuntimeError, TimeoutError) as exc:
        log(f"{name}: {exc}; log tail:\n{_tail(work / f'{name}.log')}")
        rows.append({"server": name, "error": str(exc)})
    return rows


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def inprocess_limit(family: str, seconds: float) -> dict[str, Any]:
    """The model called directly in a loop on the server's core: calls/s at batch 1."""
    code = f"""
import json, time, io, sys, importlib.util
import numpy as np
spec = importlib.util.spec_from_file_location("mm", {str(ROOT / "examples" / "make_models.py")!r})
mm = importlib.util.module_from_spec(spec); spec.loader.exec_module(mm)
family = {family!r}
if family == "onnx":
    import onnxruntime as ort
    o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.inter_op_num_threads = 1
    sess = ort.InferenceSession(mm.onnx_mlp_bytes(**{MLP_SHAPE!r}), o, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, {MLP_SHAPE["inputs"]})).astype(np.float32)
    call = lambda: sess.run(None, {{"x": x}})
else:
    import joblib
    model = joblib.load(io.BytesIO(mm.sklearn_iris_bytes()))
    x = np.random.default_rng(0).standard_normal((1, 4)).astype(np.float32)
    call = lambda: model.predict_proba(x)
for _ in range(200): call()
n, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < {seconds}:
    for _ in range(100): call()
    n += 100
dt = time.perf_counter() - t0
print(json.dumps({{"calls_per_s": n / dt, "us_per_call": dt / n * 1e6}}))
"""
    out = subprocess.run(
        pinned(SERVER_CPUS, [PYTHON, "-c", code]), capture_output=True, text=True, timeout=120, check=False
    )
    if out.returncode:
        return {"error": out.stderr.strip()[-300:]}
    return json.loads(out.stdout)


NGINX_CONF = """worker_processes 1;
master_process off;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body;
  keepalive_requests 100000000;
  server {{
    listen 127.0.0.1:{port} backlog=1024;
    location / {{ default_type application/json; return 200 '{{"model_name":"x","outputs":[]}}'; }}
  }}
}}
"""


def generator_ceiling(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """The generator on its core against servers that do (almost) nothing on the other core."""
    rows: list[dict[str, Any]] = []
    clients = [16, 64]
    if shutil.which("nginx"):
        tmp = Path(tempfile.mkdtemp(prefix="nginx.", dir=work))
        port = free_port()
        (tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, port=port))
        process = subprocess.Popen(
            pinned(SERVER_CPUS, ["nginx", "-c", str(tmp / "nginx.conf"), "-e", str(tmp / "error.log")]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/"), "nginx", process, 20)
            report = bench(f"127.0.0.1:{port}", "http", "x", ("INPUT0:16",), ("OUTPUT0",), clients, args)
            rows.append({"server": "nginx (fixed 200)", "protocol": "http", **report})
            if shutil.which("wrk"):
                out = subprocess.run(
                    pinned(
                        GEN_CPUS,
                        [
                            "wrk",
                            "-t1",
                            "-c64",
                            f"-d{max(2, int(args.duration))}s",
                            f"http://127.0.0.1:{port}/",
                        ],
                    ),
                    capture_output=True,
                    text=True,
                    timeout=120,
                    check=False,
                )
                for line in out.stdout.splitlines():
                    if line.startswith("Requests/sec:"):
                        rows[-1]["wrk_rps"] = float(line.split()[1])
        except (RuntimeError, TimeoutError) as exc:
            rows.append({"server": "nginx", "error": str(exc)})
        finally:
            stop(process)
    port = free_port()
    process = subprocess.Popen(
        pinned(
            SERVER_CPUS,
            [
                PYTHON,
                str(ROOT / "bench" / "grpc_stack.py"),
                "serve",
                "--mode",
                "bare-h2",
                "--port",
                str(port),
            ],
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    try:
        time.sleep(2.0)
        report = bench(
            f"127.0.0.1:{port}", "grpc", "identity_fp32", ("INPUT0:16",), ("OUTPUT0",), clients, args
        )
        rows.append(
            {"server": "echo-only gRPC (bench/grpc_stack.py bare-h2)", "protocol": "grpc", **report}
        )
    finally:
        stop(process)
    for row in rows:
        for r in row.get("results", []):
            log(
                f"ceiling {row['server']} {row['protocol']} c{r['concurrency']}: {r['throughput_rps']:,.0f}/s, "
                f"generator CPU {r['generator_cpu']:.0%}"
            )
    return rows


# -- summarizing -------------------------------------------------------------------------------------------
def level(
    rows: list[dict[str, Any]], server: str, model: str, protocol: str, clients: int, fmt: str | None = None
) -> dict[str, Any] | None:
    for row in rows:
        if (row.get("server"), row.get("model"), row.get("protocol")) != (server, model, protocol):
            continue
        if fmt is not None and row.get("input_format") != fmt:
            continue
        for r in row.get("results", []):
            if r["concurrency"] == clients and r["requests"] > 0:
                return r
    return None


def ratios(rows: list[dict[str, Any]], inprocess: dict[str, Any]) -> list[dict[str, Any]]:
    """elastiserve/Triton and elastiserve/MLServer at every shared level, and the in-process fraction."""
    out: list[dict[str, Any]] = []
    seen = {(r["model"], r["protocol"]) for r in rows if r.get("server") == "elastiserve" and "model" in r}
    for model, protocol in sorted(seen):
        for peer in ("triton", "mlserver"):
            for clients in sorted({r2["concurrency"] for r in rows for r2 in r.get("results", [])}):
                # MLServer takes JSON tensors only: compare with elastiserve's binary default and, where measured,
                # elastiserve on JSON too (like for like).
                fmts = ["binary", "json"] if protocol == "http" else ["raw"]
                for fmt in fmts:
                    ours = level(rows, "elastiserve", model, protocol, clients, fmt)
                    theirs = level(rows, peer, model, protocol, clients)
                    if ours and theirs:
                        out.append(
                            {
                                "key": f"{model}/{protocol}{'/' + fmt if fmt == 'json' else ''}/c{clients}/vs-{peer}",
                                "model": model,
                                "protocol": protocol,
                                "clients": clients,
                                "peer": peer,
                                "format": fmt,
                                "ratio": round(ours["throughput_rps"] / theirs["throughput_rps"], 3),
                            }
                        )
        case = next((c for c in CASES if c.model == model), None)
        limit = inprocess.get(case.inprocess or "", {}) if case else {}
        ours = level(
            rows, "elastiserve", model, protocol, TARGET_CLIENTS, "binary" if protocol == "http" else "raw"
        )
        if ours and limit.get("calls_per_s"):
            out.append(
                {
                    "key": f"{model}/{protocol}/c{TARGET_CLIENTS}/of-inprocess",
                    "model": model,
                    "protocol": protocol,
                    "clients": TARGET_CLIENTS,
                    "peer": "in-process",
                    "format": "binary",
                    "ratio": round(ours["throughput_rps"] / limit["calls_per_s"], 3),
                }
            )
    return out


def targets(ratio_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each met or not (None: not measured in this run)."""
    checks = []
    for model in TINY:
        for protocol in ("http", "grpc"):
            for peer, goal in (("triton", 1.2), ("mlserver", 4.0)):
                found = [
                    r
                    for r in ratio_rows
                    if (r["model"], r["protocol"], r["clients"], r["peer"], r["format"])
                    == (model, protocol, TARGET_CLIENTS, peer, "binary" if protocol == "http" else "raw")
                ]
                value = found[0]["ratio"] if found else None
                checks.append(
                    {
                        "what": f"{model} {protocol} {TARGET_CLIENTS} clients >= {goal}x {peer}",
                        "ratio": value,
                        "goal": goal,
                        "met": None if value is None else value >= goal,
                    }
                )
    for protocol in ("http", "grpc"):
        found = [
            r
            for r in ratio_rows
            if r["key"] == f"onnx_mlp_dynbatch/{protocol}/c{TARGET_CLIENTS}/of-inprocess"
        ]
        value = found[0]["ratio"] if found else None
        checks.append(
            {
                "what": f"onnx_mlp_dynbatch {protocol} >= 0.8 of in-process",
                "ratio": value,
                "goal": 0.8,
                "met": None if value is None else value >= 0.8,
            }
        )
    return checks


def _n(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown(data: dict[str, Any]) -> str:
    rows = data["runs"]
    lines = [
        f"# Benchmark {data['date']} on {data['host']['hostname']}",
        "",
        f"`{data['command']}` — {data['host']['cpus']} CPUs ({data['host']['cpu_model']}), Python {data['host']['python']}; "
        f"servers pinned to CPU {SERVER_CPUS}, `elastiserve bench` pinned to CPU {GEN_CPUS}; "
        f"{data['config']['duration']} s measured after {data['config']['warmup']} s warm-up per level; batch 1; "
        "HTTP binary tensors except MLServer (JSON: it rejects binary), gRPC raw_input_contents.",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for check in data["targets"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[check["met"]]
        lines.append(f"| {check['what']} | {_n(check['ratio'], 3)} | {met} |")
    lines += [
        "",
        f"## {TARGET_CLIENTS} clients",
        "",
        "| model | protocol | elastiserve req/s | p99 ms | Triton req/s | p99 ms | MLServer req/s | p99 ms | xTriton | xMLServer |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratio_by_key = {r["key"]: r["ratio"] for r in data["ratios"]}
    for case in CASES:
        for protocol in ("http", "grpc"):
            fmt = "binary" if protocol == "http" else "raw"
            cells = []
            for server in SERVERS:
                r = level(
                    rows,
                    server,
                    case.model,
                    protocol,
                    TARGET_CLIENTS,
                    fmt if server == "elastiserve" else None,
                )
                cells += [_n(r["throughput_rps"]) if r else "-", _n(r["latency_ms"]["p99"], 2) if r else "-"]
            if all(c == "-" for c in cells):
                continue
            rt = ratio_by_key.get(f"{case.model}/{protocol}/c{TARGET_CLIENTS}/vs-triton")
            rm = ratio_by_key.get(f"{case.model}/{protocol}/c{TARGET_CLIENTS}/vs-mlserver")
            lines.append(f"| {case.model} | {protocol} | {' | '.join(cells)} | {_n(rt, 2)} | {_n(rm, 2)} |")
    json_rows = [r for r in data["ratios"] if r["format"] == "json"]
    if json_rows:
        lines += [
            "",
            "Like for like with MLServer (elastiserve on JSON tensors too): "
            + ", ".join(
                f"{r['model']} {r['clients']} clients {r['ratio']:.2f}x"
                for r in json_rows
                if r["peer"] == "mlserver"
            ),
        ]
    lines += [
        "",
        "## Concurrency sweep (identity_fp32)",
        "",
        "| server | protocol | clients | req/s | p50 ms | p99 ms | generator CPU |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.get("model") != "identity_fp32" or (
            row.get("input_format") == "json" and row["server"] != "mlserver"
        ):
            continue
        for r in row.get("results", []):
            lines.append(
                f"| {row['server']} | {row['protocol']} | {r['concurrency']} | {_n(r['throughput_rps'])} | "
                f"{_n(r['latency_ms']['p50'], 3)} | {_n(r['latency_ms']['p99'], 3)} | {r['generator_cpu']:.0%} |"
            )
    lines += [
        "",
        "## In-process limit (batch 1, the model called in a loop on the server's core)",
        "",
        "| model | calls/s | us/call | elastiserve HTTP | gRPC (fraction of the limit) |",
        "|---|---|---|---|---|",
    ]
    for case in CASES:
        limit = data["inprocess"].get(case.inprocess or "")
        if not limit or "calls_per_s" not in limit:
            continue
        fh = ratio_by_key.get(f"{case.model}/http/c{TARGET_CLIENTS}/of-inprocess")
        fg = ratio_by_key.get(f"{case.model}/grpc/c{TARGET_CLIENTS}/of-inprocess")
        lines.append(
            f"| {case.model} | {_n(limit['calls_per_s'])} | {_n(limit['us_per_call'], 1)} | {_n(fh, 2)} | {_n(fg, 2)} |"
        )
    if data.get("ceiling"):
        lines += [
            "",
            "## Generator ceiling (against servers that do nothing)",
            "",
            "| server | protocol | clients | req/s | generator CPU |",
            "|---|---|---|---|---|",
        ]
        for row in data["ceiling"]:
            for r in row.get("results", []):
                lines.append(
                    f"| {row['server']} | {row['protocol']} | {r['concurrency']} | {_n(r['throughput_rps'])} | {r['generator_cpu']:.0%} |"
                )
            if "wrk_rps" in row:
                lines.append(f"| {row['server']} with wrk (C) | http | 64 | {_n(row['wrk_rps'])} | - |")
    gateway = data.get("gateway")
    if gateway and gateway.get("rows"):
        lines += [
            "",
            f"## Gateway vs direct vs nginx (identity_fp32, HTTP, {gateway['connections']} connections, "
            f"wrk, median of {gateway['rounds']} x {gateway['duration']} s)",
            "",
            "| path | req/s | vs direct (same round) | p50 ms | p50 vs direct | p99 ms | proxy CPU µs/req | failed |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for g in gateway["rows"]:
            lines.append(
                f"| {g['path']} | {_n(g['rps'])} | {g['vs_direct_paired']:+.0%} | {g['p50_ms']:.2f} | "
                f"{g['p50_vs_direct_ms']:+.2f} | {g['p99_ms']:.2f} | {g['cpu_us_per_req']:.1f} | {g['failed']} |"
            )
    elif gateway and gateway.get("error"):
        lines += ["", f"Gateway comparison failed: {gateway['error']}"]
    errors = [r for r in rows if r.get("error")]
    warnings = sorted({w for row in rows for r in row.get("results", []) for w in r.get("warnings", [])})
    if errors or warnings:
        lines += ["", "## Problems", ""]
        lines += [
            f"- {r.get('server')} {r.get('model', '')} {r.get('protocol', '')}: {r['error']}" for r in errors
        ]
        lines += [f"- warning: {w}" for w in warnings]
    if data.get("chart"):
        lines += ["", f"![throughput and p99 vs concurrency]({data['chart']})"]
    return "\n".join(lines) + "\n"


def chart(data: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing (pip install -e '.[bench]'): no chart")
        return False
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for column, protocol in enumerate(("http", "grpc")):
        for server in SERVERS:
            for row in data["runs"]:
                if (row.get("server"), row.get("model"), row.get("protocol")) != (
                    server,
                    "identity_fp32",
                    protocol,
                ):
                    continue
                if row.get("input_format") == "json" and server == "elastiserve":
                    continue
                points = [r for r in row.get("results", []) if r["requests"] > 0]
                xs = [r["concurrency"] for r in points]
                axes[0][column].plot(xs, [r["throughput_rps"] for r in points], marker="o", label=server)
                axes[1][column].plot(xs, [r["latency_ms"]["p99"] for r in points], marker="o", label=server)
        ratio_text = ", ".join(
            f"{r['ratio']:.2f}x {r['peer']}"
            for r in data["ratios"]
            if r["key"]
            in (
                f"identity_fp32/{protocol}/c{TARGET_CLIENTS}/vs-triton",
                f"identity_fp32/{protocol}/c{TARGET_CLIENTS}/vs-mlserver",
            )
        )
        axes[0][column].set_title(
            f"identity_fp32 {protocol} req/s ({ratio_text}, {TARGET_CLIENTS} clients)", fontsize=9
        )
        axes[1][column].set_title(f"identity_fp32 {protocol}: p99 latency", fontsize=9)
        axes[0][column].set_ylabel("req/s")
        axes[1][column].set_ylabel("p99 ms")
        for row_axes in axes:
            row_axes[column].set_xscale("log", base=2)
            row_axes[column].set_xlabel("concurrent clients")
            row_axes[column].grid(alpha=0.3)
            row_axes[column].legend(fontsize=8)
    fig.suptitle(
        f"{data['date']} {data['host']['hostname']}: server on CPU {SERVER_CPUS}, generator on CPU {GEN_CPUS}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# -- main --------------------------------------------------------------------------------------------------
def gateway_comparison(args: argparse.Namespace, work: Path) -> dict[str, Any] | None:
    """The platform's gateway next to nginx (Debian) in front of the same instance, both layouts
    (proxy on the generator's core / on the instance's core): ``bench/gateway_vs_direct.py``,
    which drives all of them with wrk (C) so the proxies are what is measured."""
    out = work / "gateway.json"
    rounds, duration = ("1", "3") if args.quick else ("3", "5")
    log("gateway vs direct vs nginx ...")
    done = subprocess.run(
        [PYTHON, str(ROOT / "bench" / "gateway_vs_direct.py"), "--rounds", rounds, "--duration", duration,
         "--json-out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )  # fmt: skip
    if done.returncode != 0 or not out.exists():
        log(f"gateway comparison failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        return {"error": (done.stderr or done.stdout).strip()[-500:] or f"exit code {done.returncode}"}
    return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a ~3 min subset: fewer models, shorter levels")
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--models", default="", help="comma-separated subset of the models")
    parser.add_argument("--duration", type=float, default=None, help="measured s per level [5; quick 2]")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up s per level [2; quick 1]")
    parser.add_argument("--sweep", default=None, help="clients for the sweep [1,4,16,64; quick 1,16]")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--name", default=None, help="results file stem [<date>-<host>]")
    parser.add_argument("--no-install", action="store_true", help="do not install missing anchors")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the generator-ceiling calibration")
    parser.add_argument(
        "--no-gateway", action="store_true", help="skip the gateway vs direct vs nginx comparison"
    )
    parser.add_argument(
        "--readme", action="store_true", help="regenerate README's Performance section from the results"
    )
    parser.add_argument(
        "--render", type=Path, metavar="JSON", help="only rewrite the .md and .png of a results file"
    )
    args = parser.parse_args()
    if args.render:
        data = json.loads(args.render.read_text())
        png = args.render.with_suffix(".png")
        if chart(data, png):
            data["chart"] = png.name
        args.render.with_suffix(".md").write_text(markdown(data))
        log(f"rewrote {args.render.with_suffix('.md')} and .png")
        return 0
    args.duration = args.duration or (2.0 if args.quick else 5.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    args.sweep = [int(c) for c in (args.sweep or ("1,16" if args.quick else "1,4,16,64")).split(",")]
    servers = [s for s in args.servers.split(",") if s]
    unknown = set(servers) - set(SERVERS)
    if unknown:
        parser.error(f"unknown servers {sorted(unknown)} (choose from {', '.join(SERVERS)})")
    cases = [
        c
        for c in CASES
        if (c.quick or not args.quick) and (not args.models or c.model in args.models.split(","))
    ]
    started = time.monotonic()
    missing = ensure_anchors(servers, install=not args.no_install)
    for server, reason in missing.items():
        log(f"skipping {server}: {reason}")
    servers = [s for s in servers if s not in missing]
    now = dt.datetime.now()
    host = socket.gethostname()
    stem = args.name or f"{now:%Y-%m-%d}-{host}"
    command = "python bench/run.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    data: dict[str, Any] = {
        "date": f"{now:%Y-%m-%d %H:%M}",
        "command": command,
        "host": {
            "hostname": host,
            "cpus": os.cpu_count(),
            "cpu_model": cpu_model(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_before": os.getloadavg(),
        },
        "config": {
            "duration": args.duration,
            "warmup": args.warmup,
            "sweep": args.sweep,
            "quick": args.quick,
            "servers": servers,
            "server_cpus": SERVER_CPUS,
            "generator_cpus": GEN_CPUS,
            "clients": TARGET_CLIENTS,
        },
        "runs": [],
        "inprocess": {},
        "skipped": missing,
    }
    with tempfile.TemporaryDirectory(prefix="elastiserve-bench.") as tmp:
        work = Path(tmp)
        repos = build_repositories(work)
        for family in sorted({c.inprocess for c in cases if c.inprocess}):
            data["inprocess"][family] = inprocess_limit(family, 1.0 if args.quick else 3.0)
            log(f"in-process {family}: {data['inprocess'][family]}")
        for server in servers:
            data["runs"] += run_server(server, repos, work, cases, args)
        data["ceiling"] = [] if args.no_ceiling else generator_ceiling(args, work)
        data["gateway"] = None if args.no_gateway else gateway_comparison(args, work)
    data["ratios"] = ratios(data["runs"], data["inprocess"])
    data["targets"] = targets(data["ratios"])
    data["elapsed_s"] = round(time.monotonic() - started, 1)
    data["host"]["load_after"] = os.getloadavg()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    png = args.out_dir / f"{stem}.png"
    if chart(data, png):
        data["chart"] = png.name
    (args.out_dir / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
    (args.out_dir / f"{stem}.md").write_text(markdown(data))
    log(f"wrote {args.out_dir / stem}.json|md|png in {data['elapsed_s']:.0f}s")
    print(markdown(data))
    if args.readme:
        subprocess.run(
            [PYTHON, str(ROOT / "bench" / "readme.py"), str(args.out_dir / f"{stem}.json")], check=True
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
