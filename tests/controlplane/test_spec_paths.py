"""Relative local paths in specs (resolved by the CLI) and containers[].readiness_check."""

from __future__ import annotations

from pathlib import Path

import pytest

from elastiserve.controlplane.spec import SpecError, absolute_assignments, parse_spec, with_absolute_paths


def test_relative_paths_resolve_against_the_base(tmp_path: Path) -> None:
    data = {
        "name": "svc",
        "processor": "triton",
        "processor_params": ["--model-repository=models", "--model-store", "more", "--log-verbose=1"],
        "model_path": "m/model.onnx",
        "warm_up_data_path": "oss://bucket/warmup.bin",
    }
    out = with_absolute_paths(data, tmp_path)
    assert out["processor_params"] == [
        f"--model-repository={tmp_path / 'models'}",
        "--model-store",
        str(tmp_path / "more"),
        "--log-verbose=1",
    ]
    assert out["model_path"] == str(tmp_path / "m" / "model.onnx")
    assert out["warm_up_data_path"] == "oss://bucket/warmup.bin"  # schemes are left alone
    assert data["model_path"] == "m/model.onnx"  # the input is not modified
    untouched = {
        "name": "s",
        "processor": "onnx",
        "model_path": "/abs/m.onnx",
        "processor_params": ["--x=~/m"],
    }
    assert with_absolute_paths(untouched, tmp_path) == untouched


def test_assignments_resolve_against_the_working_directory(tmp_path: Path) -> None:
    out = absolute_assignments(
        [
            "metadata.instance=3",
            "model_path=models/a.onnx",
            'processor_params=["--model-repository=repo", "--id=x"]',
            "processor_params[0]=--model-repository=other",
            "model_path=s3://bucket/a.onnx",
        ],
        tmp_path,
    )
    assert out[0] == "metadata.instance=3"
    assert out[1] == f'model_path="{tmp_path / "models" / "a.onnx"}"'
    spec = parse_spec(
        {"name": "s", "processor": "triton", "processor_params": ["--model-repository=x"]}
    ).to_dict()
    from elastiserve.controlplane.spec import apply_assignments

    assert apply_assignments(spec, [out[2]]).processor_params == [
        f"--model-repository={tmp_path / 'repo'}",
        "--id=x",
    ]
    assert apply_assignments(spec, [out[3]]).processor_params == [f"--model-repository={tmp_path / 'other'}"]
    assert out[4] == "model_path=s3://bucket/a.onnx"


def test_readiness_check_is_validated() -> None:
    base = {"name": "web", "containers": [{"command": "run", "port": 8000}]}
    ok = parse_spec(
        {
            **base,
            "containers": [
                {"command": "run", "port": 8000, "readiness_check": {"http_get": {"path": "/ping"}}}
            ],
        }
    )
    assert ok.containers and ok.containers[0].readiness_check is not None
    with pytest.raises(
        SpecError, match=r"containers\[0\]\.readiness_check\.http_get\.path: must start with '/'"
    ):
        parse_spec(
            {
                **base,
                "containers": [
                    {"command": "run", "port": 8000, "readiness_check": {"http_get": {"path": "ping"}}}
                ],
            }
        )
    with pytest.raises(SpecError, match="not both"):
        parse_spec(
            {
                **base,
                "containers": [
                    {"command": "r", "port": 1, "readiness_check": {"http_get": {}, "tcp_socket": {}}}
                ],
            }
        )
    with pytest.raises(SpecError, match=r"readiness_check\.exec: unknown field"):
        parse_spec({**base, "containers": [{"command": "r", "port": 1, "readiness_check": {"exec": {}}}]})
