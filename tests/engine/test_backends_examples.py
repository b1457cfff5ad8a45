"""examples/make_models.py builds a repository whose models load and answer like their frameworks."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import joblib
import lightgbm as lgb
import numpy as np
import onnxruntime as ort
import pytest
import xgboost as xgb

from elastiserve.engine.backends import backend_name, get_backend

from .backend_helpers import context, execute_ok, output, parse_config, request

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
RNG = np.random.default_rng(1)


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_models", EXAMPLES / "make_models.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("examples")
    assert load_script().main(["make_models.py", str(out)]) == 0
    return out


def load(repo: Path, name: str):  # type: ignore[no-untyped-def]
    """What the registry does: parse, auto-complete, create one instance."""
    config = parse_config((repo / name / "config.pbtxt").read_text())
    assert config.name == name
    backend = get_backend(backend_name(config.backend, config.platform))
    backend.auto_complete_config(config, repo / name, 1)
    return config, backend.create_instance(context(repo / name, config))


def test_generation_is_deterministic_and_idempotent(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = load_script()
    script.main(["make_models.py", str(tmp_path)])
    for path in sorted(p for p in repo.rglob("*") if p.is_file()):
        assert (tmp_path / path.relative_to(repo)).read_bytes() == path.read_bytes(), path.name
    capsys.readouterr()
    script.main(["make_models.py", str(tmp_path)])
    assert "written" not in capsys.readouterr().out


def test_committed_configs_match_the_script() -> None:
    script = load_script()
    for name, text in script.CONFIGS.items():
        committed = EXAMPLES / "models" / name / "config.pbtxt"
        assert committed.read_text() == text, f"run examples/make_models.py to refresh {committed}"


def test_simple_onnx_autocompletes_and_matches_onnxruntime(repo: Path) -> None:
    config, instance = load(repo, "simple_onnx")
    assert [(t.name, list(t.dims)) for t in config.input] == [("x", [16])]
    assert [(t.name, list(t.dims)) for t in config.output] == [("y", [4])]
    assert config.max_batch_size == 64
    x = RNG.normal(size=(5, 16)).astype(np.float32)
    (response,) = execute_ok(instance, request("simple_onnx", x=x))
    session = ort.InferenceSession(
        str(repo / "simple_onnx" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    np.testing.assert_allclose(output(response, "y"), session.run(["y"], {"x": x})[0], rtol=1e-5, atol=1e-6)


def test_sklearn_iris(repo: Path) -> None:
    _, instance = load(repo, "sklearn_iris")
    x = RNG.normal(5.5, 1.0, size=(6, 4)).astype(np.float32)
    (response,) = execute_ok(instance, request("sklearn_iris", input__0=x))
    model = joblib.load(repo / "sklearn_iris" / "1" / "model.joblib")
    np.testing.assert_allclose(output(response, "output__0"), model.predict_proba(x), rtol=1e-5)


def test_xgboost_model(repo: Path) -> None:
    _, instance = load(repo, "xgboost_model")
    x = RNG.normal(size=(6, 8)).astype(np.float32)
    (response,) = execute_ok(instance, request("xgboost_model", input__0=x))
    booster = xgb.Booster()
    booster.load_model(str(repo / "xgboost_model" / "1" / "model.json"))
    p = booster.inplace_predict(x)
    np.testing.assert_allclose(
        output(response, "output__0"), np.stack([1 - p, p], axis=1), rtol=1e-6, atol=1e-7
    )


def test_lightgbm_model(repo: Path) -> None:
    _, instance = load(repo, "lightgbm_model")
    x = RNG.normal(size=(6, 8)).astype(np.float32)
    (response,) = execute_ok(instance, request("lightgbm_model", input__0=x))
    booster = lgb.Booster(model_file=str(repo / "lightgbm_model" / "1" / "model.txt"))
    np.testing.assert_allclose(
        output(response, "output__0")[:, 0], np.asarray(booster.predict(x), dtype=np.float32), rtol=1e-6
    )


@pytest.mark.parametrize("name", ["identity_fp32", "add_sub"])
def test_python_example_configs(name: str) -> None:
    config = parse_config((EXAMPLES / "models" / name / "config.pbtxt").read_text())
    assert config.name == name and config.backend == "python" and config.max_batch_size == 64
    assert all(list(t.dims) == [16] for t in [*config.input, *config.output])
    source = EXAMPLES / "models" / name / "1" / "model.py"
    compile(source.read_text(), str(source), "exec")
