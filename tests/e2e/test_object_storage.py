"""Real engine processes serving model repositories from object storage and http archives.

The S3 endpoint is moto's server on 127.0.0.1 with IAM enforced (tests/storage/moto_support.py),
so wrong credentials really fail; archives come from an http.server thread. Each engine gets its
own cache folder through ELASTISERVE_CACHE_DIR.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from elastiserve.controlplane.runtimes.base import ObservedInstance, Resources
from elastiserve.controlplane.runtimes.local import LocalRuntime
from elastiserve.controlplane.spec import parse_spec
from elastiserve.controlplane.store import Store
from elastiserve.testing import RunningEngine, free_port, running_engine, wait_until
from tests.storage.moto_support import MotoServer, file_server, moto_server

BUCKET = "e2e-models"
MODELS = ("add_sub", "simple_onnx")
CHANGED_ADD_SUB = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            a = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            b = pb_utils.get_input_tensor_by_name(request, "INPUT1").as_numpy()
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("OUTPUT0", (a + b + 100).astype(np.float32)),
                pb_utils.Tensor("OUTPUT1", (a - b).astype(np.float32)),
            ]))
        return responses
"""


@pytest.fixture(scope="module")
def moto(example_repo: Path) -> Iterator[MotoServer]:
    with moto_server() as server:
        for name in MODELS:
            server.upload_dir(BUCKET, f"models/{name}", example_repo / name)
        yield server


def engine_env(moto: MotoServer, cache: Path, **extra: str) -> dict[str, str]:
    return {**moto.env(), "ELASTISERVE_CACHE_DIR": str(cache), **extra}


def wait_ready(engine: RunningEngine, timeout: float = 60.0) -> httpclient.InferenceServerClient:
    client = httpclient.InferenceServerClient(engine.http_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine.process.poll() is not None:
            raise AssertionError(f"engine exited with {engine.process.returncode}\n{engine.log()}")
        try:
            if client.is_server_ready():
                return client
        except Exception:
            pass
        time.sleep(0.1)
    raise AssertionError(f"engine not ready after {timeout}s\n{engine.log()}")


def add_sub(client: httpclient.InferenceServerClient) -> np.ndarray:
    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    inputs = [
        httpclient.InferInput("INPUT0", [1, 16], "FP32"),
        httpclient.InferInput("INPUT1", [1, 16], "FP32"),
    ]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(np.ones_like(a))
    return client.infer("add_sub", inputs).as_numpy("OUTPUT0") - (a + 1)  # 0 for the original model


def serve_and_fail(
    repository: str, env: dict[str, str], timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run an engine that must exit at start; its output is returned."""
    command = [
        sys.executable,
        "-m",
        "elastiserve",
        "serve",
        f"--model-repository={repository}",
        "--http-address=127.0.0.1",
        f"--http-port={free_port()}",
        "--grpc-address=127.0.0.1",
        f"--grpc-port={free_port()}",
        "--allow-metrics=false",
    ]
    return subprocess.run(
        command, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_serve_from_s3_with_a_local_root_then_restart_from_the_cache(
    moto: MotoServer, example_repo: Path, tmp_path: Path
) -> None:
    local = tmp_path / "local"
    shutil.copytree(example_repo / "identity_fp32", local / "identity_fp32")
    env = engine_env(moto, tmp_path / "cache")
    remote = f"s3://{BUCKET}/models"
    with running_engine(remote, local, env=env, log_dir=tmp_path) as engine:
        client = wait_ready(engine)
        assert not add_sub(client).any()
        assert {m["name"]: m.get("state") for m in client.get_model_repository_index()} == {
            "add_sub": "READY",
            "identity_fp32": "READY",
            "simple_onnx": "READY",
        }
        log = engine.log()
        assert f"{remote}: downloaded 4 file(s)" in log
        assert moto.secret_key not in log
    # A restart on the same machine: the cache answers, nothing is downloaded again.
    (tmp_path / "second").mkdir()
    with running_engine(remote, local, env=env, log_dir=tmp_path / "second") as engine:
        client = wait_ready(engine)
        assert not add_sub(client).any()
        log = engine.log()
        assert f"{remote}: up to date in the local cache (4 file(s), nothing downloaded)" in log
        assert "downloaded" not in log.replace("nothing downloaded", "")


def test_poll_mode_reloads_changed_objects_and_survives_a_deleted_bucket(
    moto: MotoServer, example_repo: Path, tmp_path: Path
) -> None:
    bucket = "e2e-poll"
    moto.upload_dir(bucket, "models/add_sub", example_repo / "add_sub")
    args = ["--model-control-mode=poll", "--repository-poll-secs=0.3"]
    env = engine_env(moto, tmp_path / "cache")
    with running_engine(f"s3://{bucket}/models", args=args, env=env, log_dir=tmp_path) as engine:
        client = wait_ready(engine)
        assert not add_sub(client).any()
        s3 = moto.client()
        s3.put_object(Bucket=bucket, Key="models/add_sub/1/model.py", Body=CHANGED_ADD_SUB.encode())
        wait_until(
            "the changed model.py to be served", lambda: (add_sub(client) == 100).all(), log=engine.log
        )
        # A new model appears in the bucket: poll mode loads it.
        moto.upload_dir(bucket, "models/identity_fp32", example_repo / "identity_fp32")
        wait_until("identity_fp32 to load", lambda: client.is_model_ready("identity_fp32"), log=engine.log)
        # add_sub's objects did not change this time: it is not reloaded (loaded at start + once).
        assert engine.log().count("successfully loaded 'add_sub'") == 2, engine.log()
        # The bucket disappears: an error in the log, the loaded models keep serving.
        moto.delete_bucket(bucket)
        wait_until(
            "the poll error", lambda: f"bucket '{bucket}' does not exist" in engine.log(), log=engine.log
        )
        time.sleep(0.7)  # two more polls
        assert client.is_server_ready() and (add_sub(client) == 100).all()
        assert client.is_model_ready("identity_fp32")
        assert "repository poll:" in engine.log() and "Traceback" not in engine.log()


def test_explicit_mode_load_reads_the_bucket_again(
    moto: MotoServer, example_repo: Path, tmp_path: Path
) -> None:
    bucket = "e2e-explicit"
    moto.upload_dir(bucket, "models/add_sub", example_repo / "add_sub")
    args = ["--model-control-mode=explicit", "--load-model=add_sub"]
    env = engine_env(moto, tmp_path / "cache")
    with running_engine(f"s3://{bucket}/models", args=args, env=env, log_dir=tmp_path) as engine:
        client = wait_ready(engine)
        assert not add_sub(client).any()
        # Uploaded after the start: a load request (Triton reads the repository again) finds it.
        moto.upload_dir(bucket, "models/identity_fp32", example_repo / "identity_fp32")
        client.load_model("identity_fp32")
        assert client.is_model_ready("identity_fp32")
        # A changed object is picked up by a reload.
        moto.client().put_object(
            Bucket=bucket, Key="models/add_sub/1/model.py", Body=CHANGED_ADD_SUB.encode()
        )
        client.load_model("add_sub")
        assert (add_sub(client) == 100).all()


def test_wrong_credentials_fail_clearly_and_never_print_the_secret(moto: MotoServer, tmp_path: Path) -> None:
    wrong = "NotTheRightSecret/0123456789abcdefXYZ"
    result = serve_and_fail(
        f"s3://{BUCKET}/models", engine_env(moto, tmp_path / "cache", AWS_SECRET_ACCESS_KEY=wrong)
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f"model repository 's3://{BUCKET}/models': access denied (SignatureDoesNotMatch)" in output
    assert wrong not in output and moto.secret_key not in output and "Traceback" not in output


def test_missing_bucket_fails_at_start(moto: MotoServer, tmp_path: Path) -> None:
    result = serve_and_fail("s3://no-such-bucket/models", engine_env(moto, tmp_path / "cache"))
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert (
        "error: creating server: model repository 's3://no-such-bucket/models': bucket 'no-such-bucket' does not exist"
        in output
    )
    assert "Traceback" not in output


def test_oss_uri_with_oss_environment(moto: MotoServer, tmp_path: Path) -> None:
    env = {
        **moto.oss_env(),
        "ELASTISERVE_CACHE_DIR": str(tmp_path / "cache"),
        "AWS_ACCESS_KEY_ID": "",
        "AWS_SECRET_ACCESS_KEY": "",
    }
    with running_engine(f"oss://{BUCKET}/models", env=env, log_dir=tmp_path) as engine:
        client = wait_ready(engine)
        assert not add_sub(client).any() and client.is_model_ready("simple_onnx")


def test_http_archives_tar_gz_and_zip(example_repo: Path, tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    with tarfile.open(served / "python-models.tar.gz", "w:gz") as tar:
        tar.add(
            example_repo / "add_sub",
            "models/add_sub",
            filter=lambda t: None if "__pycache__" in t.name else t,
        )
    with zipfile.ZipFile(served / "onnx-models.zip", "w") as zf:
        for path in (example_repo / "simple_onnx").rglob("*"):
            zf.write(path, f"simple_onnx/{path.relative_to(example_repo / 'simple_onnx')}")
    env = {"ELASTISERVE_CACHE_DIR": str(tmp_path / "cache")}
    with file_server(served) as base:
        roots = (f"{base}/python-models.tar.gz", f"{base}/onnx-models.zip")
        with running_engine(*roots, env=env, log_dir=tmp_path) as engine:
            client = wait_ready(engine)
            assert not add_sub(client).any() and client.is_model_ready("simple_onnx")


def test_path_traversal_archive_is_refused_at_start(tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    with zipfile.ZipFile(served / "evil.zip", "w") as zf:
        zf.writestr("add_sub/config.pbtxt", 'backend: "python"')
        zf.writestr("../../escaped.py", "print('pwned')")
    with file_server(served) as base:
        result = serve_and_fail(f"{base}/evil.zip", {"ELASTISERVE_CACHE_DIR": str(tmp_path / "cache")})
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "archive member '../../escaped.py' escapes the archive; refusing to extract" in output
    assert not list(tmp_path.rglob("escaped.py"))


# -- the platform: the local runtime with remote model locations ---------------------------------------


def _ready(observed: ObservedInstance | None) -> bool:
    return observed is not None and observed.ready


def test_local_runtime_triton_passthrough_and_onnx_shortcut_from_s3(
    moto: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in moto.env().items():
        monkeypatch.setenv(name, value)  # what the control plane's environment hands to instances
    monkeypatch.delenv("ELASTISERVE_CACHE_DIR", raising=False)
    meta = {"instance": 1, "cpu": 1, "memory": 500}
    triton = parse_spec(
        {
            "name": "triton_s3",
            "processor": "triton",
            "processor_params": [f"--model-repository=s3://{BUCKET}/models", "--allow-http=true"],
            "metadata": meta,
        }
    )
    onnx = parse_spec(
        {
            "name": "mlp",
            "processor": "onnx",
            "model_path": f"s3://{BUCKET}/models/simple_onnx/1/model.onnx",
            "metadata": meta,
        }
    )
    with Store.open(tmp_path / "state") as store:
        runtime = LocalRuntime(store, capacity=Resources(cpu=8, gpu=0, memory=8000))
        try:
            first = runtime.start_instance(triton, "triton-1", version=1)
            second = runtime.start_instance(onnx, "mlp-1", version=1)
            for instance in ("triton-1", "mlp-1"):
                wait_until(
                    f"{instance} ready",
                    lambda i=instance: _ready({o.instance_id: o for o in runtime.list_instances()}.get(i)),
                    timeout=60,
                    log=lambda i=instance: runtime.instance_logs(i).text,
                )
            text = runtime.instance_logs("triton-1").text
            assert f"--model-repository=s3://{BUCKET}/models" in text  # passed through to the engine
            assert moto.secret_key not in text
            client = httpclient.InferenceServerClient(f"127.0.0.1:{first.port}")
            assert not add_sub(client).any()
            mlp = httpclient.InferenceServerClient(f"127.0.0.1:{second.port}")
            assert [(m["name"], m["state"]) for m in mlp.get_model_repository_index()] == [("mlp", "READY")]
            # Both went through one cache in the state folder (the runtime's and the engine's).
            cache = tmp_path / "state" / "cache" / "repositories"
            assert len([p for p in cache.iterdir() if (p / "current").exists()]) == 2
            link = tmp_path / "state" / "instances" / "mlp-1" / "repository" / "mlp" / "1" / "model.onnx"
            assert str(link.readlink()).startswith(str(cache))
        finally:
            runtime.stop_all(grace=2)
            runtime.close()
