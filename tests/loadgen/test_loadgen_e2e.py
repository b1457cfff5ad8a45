"""The generator against a real ``elastiserve serve`` (examples/models), over HTTP and gRPC.

Runs are ~1 s each: enough to check that counts add up, percentiles are ordered, errors are
sorted by kind and the CLI's outputs have their shape, not to measure anything.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from elastiserve.controlplane.spec import parse_spec
from elastiserve.controlplane.store import InstanceRecord
from elastiserve.loadgen import LevelSpec, TargetOptions, build_workload, fetch_metadata, run_benchmark
from elastiserve.loadgen.report import LevelResult
from elastiserve.loadgen.workload import parse_shape_option
from elastiserve.testing import RunningEngine, free_port, running_engine

from ..conftest import ControlPlane

MODEL = "identity_fp32"


@pytest.fixture(scope="module")
def engine(example_repo: Path) -> Iterator[RunningEngine]:
    with running_engine(
        example_repo, args=["--model-control-mode=explicit", f"--load-model={MODEL}"]
    ) as server:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if httpx.get(f"http://{server.http_url}/v2/models/{MODEL}/ready").status_code == 200:
                break
            time.sleep(0.1)
        yield server


def run(url: str, protocol: str, spec: LevelSpec, model: str = MODEL, **options: str) -> LevelResult:
    target = TargetOptions(url=url, protocol=protocol, timeout=5.0, **options)
    shapes = [parse_shape_option("INPUT0:16")]
    workload = build_workload(model, metadata=None, shapes=shapes)
    report = run_benchmark(target, workload, [spec])
    return report.results[0]


def check_consistent(result: LevelResult) -> None:
    lat = result.latency_ms
    assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert result.sent == result.requests + result.error_count
    assert result.throughput_rps == pytest.approx(result.requests / result.duration_s)
    assert 0 <= result.generator_cpu < 2.5


@pytest.mark.parametrize(("protocol", "impl"), [("http", "raw"), ("grpc", "raw"), ("grpc", "aio")])
def test_closed_loop(engine: RunningEngine, protocol: str, impl: str) -> None:
    url = engine.http_url if protocol == "http" else engine.grpc_url
    result = run(url, protocol, LevelSpec(concurrency=4, duration=1.0, warmup=0.2), grpc_impl=impl)
    assert result.errors == {}
    assert result.requests > 50
    check_consistent(result)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_open_loop_keeps_the_rate(engine: RunningEngine, protocol: str) -> None:
    url = engine.http_url if protocol == "http" else engine.grpc_url
    result = run(url, protocol, LevelSpec(rate=300.0, duration=1.5, warmup=0.2, seed=7))
    assert result.errors == {}
    assert 300 * 1.5 * 0.7 < result.requests < 300 * 1.5 * 1.3  # Poisson: ±30% is many sigmas
    assert result.schedule is not None and result.schedule["asked_rps"] == 300.0
    assert result.schedule["dispatch_lag_p50_ms"] < 5
    check_consistent(result)


def test_errors_by_kind(engine: RunningEngine) -> None:
    spec = LevelSpec(concurrency=2, duration=0.5, warmup=0.0)
    http = run(engine.http_url, "http", spec, model="no_such_model")
    assert (
        http.requests == 0 and len(http.errors) == 1 and next(iter(http.errors)) in ("http 400", "http 404")
    )
    grpc = run(engine.grpc_url, "grpc", spec, model="no_such_model")
    assert grpc.requests == 0 and len(grpc.errors) == 1
    assert next(iter(grpc.errors)).startswith("grpc ")
    refused = run(f"127.0.0.1:{free_port()}", "http", spec)
    assert refused.requests == 0 and list(refused.errors) == ["connection refused"]
    assert 0 < refused.errors["connection refused"] < 500  # backs off instead of spinning
    refused_grpc = run(f"127.0.0.1:{free_port()}", "grpc", spec)
    assert list(refused_grpc.errors) == ["connection refused"]


def test_metadata_is_read_from_the_server(engine: RunningEngine) -> None:
    for protocol, url in (("http", engine.http_url), ("grpc", engine.grpc_url)):
        meta = fetch_metadata(TargetOptions(url=url, protocol=protocol), MODEL)
        assert meta is not None and meta["inputs"][0]["shape"] == [-1, 16]
    assert fetch_metadata(TargetOptions(url=engine.http_url), "no_such_model") is None
    with pytest.raises(ConnectionError):
        fetch_metadata(TargetOptions(url=f"127.0.0.1:{free_port()}", timeout=2), MODEL)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "elastiserve", "bench", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env} if env else None,
    )


def test_cli_json_and_csv(engine: RunningEngine, tmp_path: Path) -> None:
    out = cli(
        "-m",
        MODEL,
        "-u",
        engine.http_url,
        "--concurrency",
        "1,2",
        "--duration",
        "0.5",
        "--warmup",
        "0.1",
        "--json",
        "-",
        "--csv",
        str(tmp_path / "r.csv"),
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert [r["concurrency"] for r in report["results"]] == [1, 2]
    assert report["workload"]["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16]}]
    assert set(report["results"][0]["latency_ms"]) == {"min", "mean", "p50", "p90", "p95", "p99", "max"}
    assert "identity_fp32" in out.stderr  # the table moved to stderr, stdout is pure JSON
    rows = list(csv.DictReader(io.StringIO((tmp_path / "r.csv").read_text())))
    assert len(rows) == 2 and float(rows[1]["throughput_rps"]) > 0 and rows[0]["errors"] == "0"


def test_cli_grpc_open_loop_with_token(engine: RunningEngine) -> None:
    out = cli(
        "-m",
        MODEL,
        "-u",
        engine.grpc_url,
        "-i",
        "grpc",
        "--request-rate",
        "100",
        "--duration",
        "0.5",
        "--warmup",
        "0",
        "--token",
        "secret",
        "--json",
        "-",
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["results"][0]["mode"] == "open" and report["target"]["headers"] == ["Authorization"]
    assert "secret" not in out.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["--concurrency", "0"],
        ["--concurrency", "abc"],
        ["--concurrency", "2", "--request-rate", "10"],
        ["--shape", "INPUT0"],
        ["--protocol", "udp"],
        ["--duration", "-1"],
        ["--input-data", "/no/such/file.json"],
        ["-u", "https://127.0.0.1:1"],
        ["-H", "no-colon"],
        ["--bogus"],
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(args: list[str]) -> None:
    out = cli("-m", MODEL, *args)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
    assert "Traceback" not in out.stderr


def test_cli_unreachable_server_is_one_line(tmp_path: Path) -> None:
    out = cli("-m", MODEL, "-u", f"127.0.0.1:{free_port()}", "--duration", "0.2")
    assert out.returncode == 1 and out.stderr.startswith("error: cannot reach"), out.stderr


def test_cli_service_direct_connect_through_the_control_plane(engine: RunningEngine, cp: ControlPlane) -> None:
    spec = {"name": "svc", "processor": "triton", "processor_params": ["--model-repository=/unused"]}
    cp.store.create_service(parse_spec(spec))
    cp.store.upsert_instance(
        InstanceRecord(
            id="svc-1",
            service="svc",
            version=1,
            address="127.0.0.1",
            port=engine.http_port,
            status="Running",
            ready=True,
            extra={"grpc_port": engine.grpc_port},
        )
    )
    env = {"ELASTISERVE_TOKEN": cp.admin}
    common = ["-m", MODEL, "--endpoint", cp.url, "--duration", "0.3", "--warmup", "0", "--json", "-"]
    for protocol, url in (("http", engine.http_url), ("grpc", engine.grpc_url)):
        out = cli("--service", "svc", "--direct", "-i", protocol, *common, env=env)
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        assert report["target"]["url"].endswith(url) and report["results"][0]["requests"] > 0
    # Clear errors: an unknown service, no gateway published, --direct alone.
    out = cli("--service", "nope", *common, env=env)
    assert out.returncode == 1 and "service 'nope' not found" in out.stderr, out.stderr
    out = cli("--service", "svc", *common, env=env)
    assert out.returncode == 2 and "publishes no gateway endpoint" in out.stderr, out.stderr
    out = cli("--direct", *common, env=env)
    assert out.returncode == 2 and out.stderr == "error: --direct needs --service\n", out.stderr
