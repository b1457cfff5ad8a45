"""config.pbtxt parsing, defaults, validation and version policies."""

from __future__ import annotations

from pathlib import Path

import pytest

from elastiserve.engine.config import (
    apply_defaults,
    config_to_json_dict,
    detect_backend,
    parse_config_text,
    read_model_config,
    validate_config,
)
from elastiserve.engine.repository import ModelRepository, versions_to_serve
from elastiserve.errors import ConfigError

GOOD = """
name: "m"
backend: "python"
max_batch_size: 8
input [ { name: "IN" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""


def make_model(root: Path, name: str, config: str | None, versions: list[int]) -> Path:
    model = root / name
    model.mkdir(parents=True)
    if config is not None:
        (model / "config.pbtxt").write_text(config)
    for version in versions:
        (model / str(version)).mkdir()
        (model / str(version) / "model.py").write_text("# placeholder\n")
    return model


def test_parse_good_config_into_triton_modelconfig() -> None:
    config = parse_config_text(GOOD, "m")
    assert config.max_batch_size == 8
    assert config.input[0].dims == [4]
    apply_defaults(config, "m")
    validate_config(config, "m")
    assert len(config.instance_group) == 1 and config.instance_group[0].count == 1


def test_unknown_field_names_model_line_and_field() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config_text('name: "m"\nmax_batch_sizee: 4\n', "m")
    message = str(info.value)
    assert "model 'm'" in message and "line 2" in message and "max_batch_sizee" in message


def test_bad_enum_value_is_named() -> None:
    with pytest.raises(ConfigError, match="TYPE_FLOAT99"):
        parse_config_text('input [ { name: "a" data_type: TYPE_FLOAT99 dims: [1] } ]', "m")


def test_name_must_match_directory() -> None:
    config = parse_config_text(GOOD.replace('name: "m"', 'name: "other"'), "m")
    apply_defaults(config, "m")
    with pytest.raises(ConfigError, match="does not match the model directory"):
        validate_config(config, "m")


@pytest.mark.parametrize(
    ("snippet", "message"),
    [
        ('input [ { name: "A" data_type: TYPE_FP32 dims: [ 0 ] } ]', "dims must be positive"),
        ('input [ { name: "A" dims: [ 1 ] } ]', "has no data_type"),
        (
            'input [ { name: "A" data_type: TYPE_FP32 dims: [1] }, { name: "A" data_type: TYPE_FP32 dims: [1] } ]',
            "declared twice",
        ),
        ("max_batch_size: 4 dynamic_batching { preferred_batch_size: [ 8 ] }", "preferred_batch_size 8"),
    ],
)
def test_structural_errors(snippet: str, message: str) -> None:
    config = parse_config_text(f'name: "m" backend: "python" {snippet}', "m")
    apply_defaults(config, "m")
    with pytest.raises(ConfigError, match=message):
        validate_config(config, "m")


def test_missing_config_is_error_only_when_strict(tmp_path: Path) -> None:
    model = make_model(tmp_path, "m", None, [1])
    assert read_model_config(model, strict=False).name == ""
    with pytest.raises(ConfigError, match="not found"):
        read_model_config(model, strict=True)


def test_backend_detected_from_files(tmp_path: Path) -> None:
    model = make_model(tmp_path, "m", None, [1])
    config = read_model_config(model, strict=False)
    detect_backend(model, config)
    assert config.backend == "python"


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("", [3]),
        ("version_policy { latest { num_versions: 2 } }", [2, 3]),
        ("version_policy { all { } }", [1, 2, 3]),
        ("version_policy { specific { versions: [ 1, 3 ] } }", [1, 3]),
    ],
)
def test_version_policies(tmp_path: Path, policy: str, expected: list[int]) -> None:
    model = make_model(tmp_path, "m", GOOD + policy, [1, 2, 3])
    config = read_model_config(model, strict=True)
    assert versions_to_serve(config, model) == expected


def test_specific_version_missing_is_an_error(tmp_path: Path) -> None:
    model = make_model(tmp_path, "m", GOOD + "version_policy { specific { versions: [ 7 ] } }", [1])
    with pytest.raises(ConfigError, match=r"\[7\]"):
        versions_to_serve(read_model_config(model, strict=True), model)


def test_duplicate_model_across_repositories_is_reported(tmp_path: Path) -> None:
    make_model(tmp_path / "a", "m", GOOD, [1])
    make_model(tmp_path / "b", "m", GOOD, [1])
    make_model(tmp_path / "b", "n", GOOD.replace('"m"', '"n"'), [1])
    models, conflicts = ModelRepository([tmp_path / "a", tmp_path / "b"]).discover()
    assert sorted(models) == ["n"] and "more than one repository" in conflicts["m"]


def test_missing_repository_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        ModelRepository([tmp_path / "nope"])


def test_config_json_has_numbers_not_strings() -> None:
    data = config_to_json_dict(parse_config_text(GOOD, "m"))
    assert data["input"][0]["dims"] == [4]
    assert data["max_batch_size"] == 8
    assert data["input"][0]["data_type"] == "TYPE_FP32"
