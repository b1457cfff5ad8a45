"""`elastiserve serve` accepts tritonserver's flags with their meaning."""

from __future__ import annotations

import subprocess
import sys

import pytest

from elastiserve.engine.options import HelpRequested, parse_serve_args
from elastiserve.errors import ConfigError


def test_triton_flags_and_repeatable_repository() -> None:
    options = parse_serve_args(
        [
            "--model-repository=/a",
            "--model-repository",
            "/b",
            "--http-port=9000",
            "--grpc-port=9001",
            "--metrics-port=9002",
            "--allow-grpc=false",
            "--model-control-mode=explicit",
            "--load-model=m1",
            "--load-model=*",
            "--strict-model-config=true",
            "--exit-on-error=true",
            "--log-verbose=1",
            "--id=srv",
            "--repository-poll-secs=2",
        ]
    )
    assert options.model_repository == ["/a", "/b"]
    assert (options.http_port, options.grpc_port, options.metrics_port) == (9000, 9001, 9002)
    assert options.allow_grpc is False and options.allow_http is True
    assert options.load_model == ["m1", "*"] and options.model_control_mode == "explicit"
    assert options.strict_model_config and options.exit_on_error and options.id == "srv"


def test_meaningless_triton_flags_warn() -> None:
    options = parse_serve_args(["--model-repository=/a", "--backend-directory=/opt/x", "--pinned-memory-pool-byte-size=0"])
    assert any("--backend-directory" in w for w in options.warnings)
    assert any("--pinned-memory-pool-byte-size" in w for w in options.warnings)


def test_disable_auto_complete_means_strict() -> None:
    assert parse_serve_args(["--model-repository=/a", "--disable-auto-complete-config"]).strict_model_config


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model-repository=/a", "--frobnicate=1"], "unknown flag '--frobnicate=1'"),
        ([], "--model-repository is required"),
        (["--model-repository=/a", "--load-model=x"], "requires --model-control-mode=explicit"),
        (["--model-repository=/a", "--model-control-mode=sometimes"], "invalid choice"),
        (["--model-repository=/a", "--allow-http=maybe"], "expected true or false"),
        (["--model-repository=/a", "--http-port=abc"], "invalid int value"),
    ],
)
def test_bad_flags_are_named(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")):
        parse_serve_args(argv)


def test_help_lists_flags() -> None:
    with pytest.raises(HelpRequested) as info:
        parse_serve_args(["--help"])
    assert "--model-repository" in str(info.value)


def test_cli_unknown_flag_exits_2_with_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "elastiserve", "serve", "--model-repository=/tmp", "--bogus"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "unknown flag '--bogus'" in result.stderr and "Traceback" not in result.stderr


def test_cli_missing_repository_exits_1(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = subprocess.run(
        [sys.executable, "-m", "elastiserve", "serve", f"--model-repository={tmp_path}/missing"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr
