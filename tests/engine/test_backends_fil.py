"""The fil backend: XGBoost, LightGBM and scikit-learn forests against the libraries called directly."""

from __future__ import annotations

from pathlib import Path

import joblib
import lightgbm as lgb
import numpy as np
import pytest
import xgboost as xgb
from sklearn.ensemble import RandomForestClassifier
from tritonclient.grpc import model_config_pb2 as mc

from elastiserve.engine.backends import get_backend
from elastiserve.errors import ConfigError, Unsupported

from .backend_helpers import context, execute_ok, output, parse_config, request

BACKEND = get_backend("fil")
RNG = np.random.default_rng(5)
X = RNG.normal(size=(200, 6)).astype(np.float32)
BINARY = (X[:, 0] + X[:, 1] > 0).astype(np.float32)
MULTI = (X[:, 0] > -0.5).astype(int) + (X[:, 1] > 0.5).astype(int)  # 3 classes
TARGET = (2 * X[:, 0] - X[:, 2]).astype(np.float32)


def config(model: str, model_type: str, out_dims: int, max_batch: int = 64, **params: str) -> mc.ModelConfig:
    entries = {"model_type": model_type, **params}
    text = f"""
        name: "{model}" backend: "fil" max_batch_size: {max_batch}
        input [{{ name: "input__0", data_type: TYPE_FP32, dims: [6] }}]
        output [{{ name: "output__0", data_type: TYPE_FP32, dims: [{out_dims}] }}]
    """
    text += "".join(
        f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}\n' for k, v in entries.items()
    )
    return parse_config(text)


def xgb_booster(objective: str = "binary:logistic", labels: np.ndarray = BINARY, **extra: int) -> xgb.Booster:
    params = {"objective": objective, "max_depth": 3, "nthread": 1, **extra}
    return xgb.train(params, xgb.DMatrix(X, label=labels), num_boost_round=8)


def save_xgb(model_dir: Path, booster: xgb.Booster, filename: str, raw_format: str) -> None:
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "1" / filename).write_bytes(bytes(booster.save_raw(raw_format=raw_format)))


@pytest.fixture(scope="module")
def binary_xgb() -> xgb.Booster:
    return xgb_booster()


@pytest.mark.parametrize(
    ("model_type", "filename", "raw_format"),
    [
        ("xgboost_json", "xgboost.json", "json"),
        ("xgboost_ubj", "xgboost.ubj", "ubj"),
        ("xgboost", "xgboost.model", "ubj"),
    ],
)
def test_xgboost_formats_and_default_filenames(
    tmp_path: Path, binary_xgb: xgb.Booster, model_type: str, filename: str, raw_format: str
) -> None:
    save_xgb(tmp_path / "m", binary_xgb, filename, raw_format)
    instance = BACKEND.create_instance(context(tmp_path / "m", config("m", model_type, 1)))
    parts = [X[:3], X[3:4], X[4:9]]
    responses = execute_ok(instance, *(request("m", input__0=p) for p in parts))
    got = np.concatenate([output(r, "output__0") for r in responses])
    assert got.dtype == np.float32 and got.shape == (9, 1)
    np.testing.assert_allclose(got[:, 0], binary_xgb.inplace_predict(X[:9]), rtol=1e-6)


def test_binary_output_class_threshold_and_proba(tmp_path: Path, binary_xgb: xgb.Booster) -> None:
    save_xgb(tmp_path / "m", binary_xgb, "xgboost.json", "json")
    p = binary_xgb.inplace_predict(X[:20])
    cls = BACKEND.create_instance(
        context(tmp_path / "m", config("m", "xgboost_json", 1, output_class="true"))
    )
    (r,) = execute_ok(cls, request("m", input__0=X[:20]))
    np.testing.assert_array_equal(output(r, "output__0")[:, 0], (p > 0.5).astype(np.float32))
    low = BACKEND.create_instance(
        context(tmp_path / "m", config("m", "xgboost_json", 1, output_class="true", threshold="0.3"))
    )
    (r,) = execute_ok(low, request("m", input__0=X[:20]))
    np.testing.assert_array_equal(output(r, "output__0")[:, 0], (p > 0.3).astype(np.float32))
    proba = BACKEND.create_instance(
        context(tmp_path / "m", config("m", "xgboost_json", 2, output_class="true", predict_proba="true"))
    )
    (r,) = execute_ok(proba, request("m", input__0=X[:20]))
    np.testing.assert_allclose(output(r, "output__0"), np.stack([1 - p, p], axis=1), rtol=1e-6, atol=1e-7)


def test_multiclass_xgboost(tmp_path: Path) -> None:
    booster = xgb_booster("multi:softprob", MULTI, num_class=3)
    save_xgb(tmp_path / "m", booster, "xgboost.json", "json")
    probs = booster.inplace_predict(X[:15])
    proba = BACKEND.create_instance(
        context(tmp_path / "m", config("m", "xgboost_json", 3, output_class="true", predict_proba="true"))
    )
    (r,) = execute_ok(proba, request("m", input__0=X[:15]))
    np.testing.assert_allclose(output(r, "output__0"), probs, rtol=1e-6)
    cls = BACKEND.create_instance(
        context(tmp_path / "m", config("m", "xgboost_json", 1, output_class="true"))
    )
    (r,) = execute_ok(cls, request("m", input__0=X[:15]))
    np.testing.assert_array_equal(output(r, "output__0")[:, 0], probs.argmax(axis=1).astype(np.float32))


def lgb_booster(objective: str, labels: np.ndarray, **extra: int) -> lgb.Booster:
    params = {"objective": objective, "num_leaves": 7, "num_threads": 1, "verbose": -1, **extra}
    return lgb.train(params, lgb.Dataset(X, label=labels), num_boost_round=8)


def save_lgb(model_dir: Path, booster: lgb.Booster) -> None:
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    booster.save_model(str(model_dir / "1" / "model.txt"))


def test_lightgbm_regression_binary_multiclass(tmp_path: Path) -> None:
    reg = lgb_booster("regression", TARGET)
    save_lgb(tmp_path / "reg", reg)
    instance = BACKEND.create_instance(context(tmp_path / "reg", config("reg", "lightgbm", 1)))
    responses = execute_ok(instance, request("reg", input__0=X[:4]), request("reg", input__0=X[4:10]))
    got = np.concatenate([output(r, "output__0") for r in responses])[:, 0]
    np.testing.assert_allclose(got, np.asarray(reg.predict(X[:10]), dtype=np.float32), rtol=1e-6)

    binary = lgb_booster("binary", BINARY)
    save_lgb(tmp_path / "bin", binary)
    instance = BACKEND.create_instance(
        context(tmp_path / "bin", config("bin", "lightgbm", 2, output_class="true", predict_proba="true"))
    )
    (r,) = execute_ok(instance, request("bin", input__0=X[:10]))
    p = np.asarray(binary.predict(X[:10]), dtype=np.float32)
    np.testing.assert_allclose(output(r, "output__0"), np.stack([1 - p, p], axis=1), rtol=1e-6, atol=1e-7)

    multi = lgb_booster("multiclass", MULTI, num_class=3)
    save_lgb(tmp_path / "multi", multi)
    instance = BACKEND.create_instance(
        context(tmp_path / "multi", config("multi", "lightgbm", 1, output_class="true"))
    )
    (r,) = execute_ok(instance, request("multi", input__0=X[:10]))
    np.testing.assert_array_equal(
        output(r, "output__0")[:, 0], np.asarray(multi.predict(X[:10])).argmax(axis=1)
    )


def test_sklearn_forest(tmp_path: Path) -> None:
    forest = RandomForestClassifier(n_estimators=5, max_depth=3, random_state=0).fit(X, MULTI)
    (tmp_path / "rf" / "1").mkdir(parents=True)
    joblib.dump(forest, tmp_path / "rf" / "1" / "model.joblib")
    instance = BACKEND.create_instance(
        context(tmp_path / "rf", config("rf", "sklearn", 3, output_class="true", predict_proba="true"))
    )
    (r,) = execute_ok(instance, request("rf", input__0=X[:7]))
    np.testing.assert_allclose(output(r, "output__0"), forest.predict_proba(X[:7]), rtol=1e-6)


def test_fp64_input_is_cast_and_unbatched_config_works(tmp_path: Path, binary_xgb: xgb.Booster) -> None:
    save_xgb(tmp_path / "m", binary_xgb, "xgboost.json", "json")
    cfg = parse_config(
        """
        name: "m" backend: "fil"
        input [{ name: "input__0", data_type: TYPE_FP64, dims: [-1, 6] }]
        output [{ name: "output__0", data_type: TYPE_FP32, dims: [-1, 1] }]
        parameters { key: "model_type" value { string_value: "xgboost_json" } }
        """
    )
    instance = BACKEND.create_instance(context(tmp_path / "m", cfg))
    (r,) = execute_ok(instance, request("m", input__0=X[:5].astype(np.float64)))
    np.testing.assert_allclose(output(r, "output__0")[:, 0], binary_xgb.inplace_predict(X[:5]), rtol=1e-6)


def test_autocomplete_missing_io(tmp_path: Path, binary_xgb: xgb.Booster) -> None:
    save_xgb(tmp_path / "m", binary_xgb, "xgboost.json", "json")
    cfg = parse_config(
        """
        parameters { key: "model_type" value { string_value: "xgboost_json" } }
        parameters { key: "predict_proba" value { string_value: "true" } }
        """
    )
    BACKEND.auto_complete_config(cfg, tmp_path / "m", 1)
    assert cfg.backend == "fil" and cfg.name == "m"
    assert cfg.max_batch_size == 4 and cfg.HasField("dynamic_batching")
    assert [(t.name, t.data_type, list(t.dims)) for t in cfg.input] == [("input__0", mc.TYPE_FP32, [6])]
    assert [(t.name, t.data_type, list(t.dims)) for t in cfg.output] == [("output__0", mc.TYPE_FP32, [2])]
    instance = BACKEND.create_instance(context(tmp_path / "m", cfg))
    (r,) = execute_ok(instance, request("m", input__0=X[:2]))
    assert output(r, "output__0").shape == (2, 2)


def test_treelite_checkpoint_is_unsupported(tmp_path: Path) -> None:
    (tmp_path / "tl" / "1").mkdir(parents=True)
    (tmp_path / "tl" / "1" / "checkpoint.tl").write_bytes(b"\x00")
    with pytest.raises(Unsupported, match="treelite_checkpoint"):
        BACKEND.create_instance(context(tmp_path / "tl", config("tl", "treelite_checkpoint", 1)))


@pytest.mark.parametrize(
    ("cfg", "needle"),
    [
        (config("m", "catboost", 1), "unknown FIL model_type 'catboost'"),
        (config("m", "xgboost_json", 2), "output 'output__0'"),
        (config("m", "xgboost_json", 1, output_class="maybe"), "'output_class'"),
    ],
)
def test_config_errors(tmp_path: Path, binary_xgb: xgb.Booster, cfg: mc.ModelConfig, needle: str) -> None:
    save_xgb(tmp_path / "m", binary_xgb, "xgboost.json", "json")
    with pytest.raises(ConfigError) as err:
        BACKEND.create_instance(context(tmp_path / "m", cfg))
    assert "'m'" in str(err.value) and needle in str(err.value)


def test_feature_count_mismatch(tmp_path: Path, binary_xgb: xgb.Booster) -> None:
    save_xgb(tmp_path / "m", binary_xgb, "xgboost.json", "json")
    cfg = config("m", "xgboost_json", 1)
    cfg.input[0].dims[0] = 7
    with pytest.raises(ConfigError, match=r"model 'm': input 'input__0' .* takes 6 features"):
        BACKEND.create_instance(context(tmp_path / "m", cfg))


@pytest.mark.parametrize(
    ("model_type", "filename"), [("xgboost_json", "xgboost.json"), ("lightgbm", "model.txt")]
)
def test_bad_and_missing_files(tmp_path: Path, model_type: str, filename: str) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    with pytest.raises(ConfigError, match="not found"):
        BACKEND.create_instance(context(tmp_path / "m", config("m", model_type, 1)))
    (tmp_path / "m" / "1" / filename).write_text("garbage, not a tree model")
    with pytest.raises(ConfigError, match=rf"model 'm': cannot load {model_type} model"):
        BACKEND.create_instance(context(tmp_path / "m", config("m", model_type, 1)))
