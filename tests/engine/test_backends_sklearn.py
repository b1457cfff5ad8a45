"""The sklearn backend against the estimators called directly."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.pipeline import make_pipeline
from tritonclient.grpc import model_config_pb2 as mc

from elastiserve.engine.backends import get_backend
from elastiserve.errors import ConfigError

from .backend_helpers import context, execute_ok, output, parse_config, request

BACKEND = get_backend("sklearn")
RNG = np.random.default_rng(11)
X = RNG.normal(size=(120, 4)).astype(np.float32)
Y3 = (X[:, 0] > 0.5).astype(int) + (X[:, 1] > 0).astype(int)  # 3 classes


def save(model_dir: Path, estimator: Any, filename: str = "model.joblib") -> Path:
    path = model_dir / "1" / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(estimator, path)
    return path


@pytest.fixture(scope="module")
def classifier() -> LogisticRegression:
    return LogisticRegression(max_iter=300).fit(X, Y3)


CLASSIFIER = """
name: "clf"
backend: "sklearn"
max_batch_size: 16
input [{ name: "input__0", data_type: TYPE_FP32, dims: [4] }]
output [{ name: "output__0", data_type: TYPE_INT64, dims: [1] }]
"""

PROBA = """
name: "clf"
backend: "sklearn"
max_batch_size: 16
input [{ name: "input__0", data_type: TYPE_FP32, dims: [4] }]
output [{ name: "output__0", data_type: TYPE_FP32, dims: [3] }]
parameters { key: "method" value { string_value: "predict_proba" } }
"""


def test_predict_batched_matches_estimator(tmp_path: Path, classifier: LogisticRegression) -> None:
    save(tmp_path / "clf", classifier)
    instance = BACKEND.create_instance(context(tmp_path / "clf", parse_config(CLASSIFIER)))
    parts = [X[:2], X[2:7], X[7:8]]
    responses = execute_ok(instance, *(request("clf", input__0=p) for p in parts))
    got = np.concatenate([output(r, "output__0") for r in responses])
    assert got.dtype == np.int64 and got.shape == (8, 1)
    np.testing.assert_array_equal(got[:, 0], classifier.predict(X[:8]))
    assert [output(r, "output__0").shape[0] for r in responses] == [2, 5, 1]


def test_predict_proba_parameter(tmp_path: Path, classifier: LogisticRegression) -> None:
    save(tmp_path / "clf", classifier)
    instance = BACKEND.create_instance(context(tmp_path / "clf", parse_config(PROBA)))
    (response,) = execute_ok(instance, request("clf", input__0=X[:10]))
    got = output(response, "output__0")
    assert got.dtype == np.float32 and got.shape == (10, 3)
    np.testing.assert_allclose(got, classifier.predict_proba(X[:10]), rtol=1e-5)


def test_inputs_are_joined_column_wise(tmp_path: Path, classifier: LogisticRegression) -> None:
    save(tmp_path / "clf", classifier)
    config = parse_config(
        PROBA.replace(
            'input [{ name: "input__0", data_type: TYPE_FP32, dims: [4] }]',
            'input [{ name: "a", data_type: TYPE_FP32, dims: [1] }, { name: "b", data_type: TYPE_FP64, dims: [3] }]',
        )
    )
    instance = BACKEND.create_instance(context(tmp_path / "clf", config))
    (response,) = execute_ok(instance, request("clf", a=X[:6, :1], b=X[:6, 1:].astype(np.float64)))
    np.testing.assert_allclose(output(response, "output__0"), classifier.predict_proba(X[:6]), rtol=1e-5)


def test_unbatched_config(tmp_path: Path, classifier: LogisticRegression) -> None:
    save(tmp_path / "clf", classifier)
    text = CLASSIFIER.replace("max_batch_size: 16", "").replace("dims: [4]", "dims: [-1, 4]")
    instance = BACKEND.create_instance(
        context(tmp_path / "clf", parse_config(text.replace("dims: [1]", "dims: [-1]")))
    )
    (response,) = execute_ok(instance, request("clf", input__0=X[:5]))
    np.testing.assert_array_equal(output(response, "output__0"), classifier.predict(X[:5]))


def test_regressor_output_dtype_follows_config(tmp_path: Path) -> None:
    target = X @ np.array([1.0, -2.0, 0.5, 3.0])
    model = LinearRegression().fit(X, target)
    save(tmp_path / "reg", model)
    text = CLASSIFIER.replace('"clf"', '"reg"').replace("TYPE_INT64", "TYPE_FP64")
    instance = BACKEND.create_instance(context(tmp_path / "reg", parse_config(text)))
    (response,) = execute_ok(instance, request("reg", input__0=X[:4]))
    got = output(response, "output__0")
    assert got.dtype == np.float64
    np.testing.assert_allclose(got[:, 0], model.predict(X[:4]))


def test_string_labels_and_text_input(tmp_path: Path) -> None:
    texts = ["good film", "great plot", "bad acting", "awful film", "great cast", "bad plot"]
    labels = ["pos", "pos", "neg", "neg", "pos", "neg"]
    model = make_pipeline(TfidfVectorizer(), LogisticRegression()).fit(texts, labels)
    save(tmp_path / "text", model)
    config = parse_config(
        """
        name: "text" backend: "sklearn" max_batch_size: 8
        input [{ name: "text", data_type: TYPE_STRING, dims: [1] }]
        output [{ name: "label", data_type: TYPE_STRING, dims: [1] }]
        """
    )
    instance = BACKEND.create_instance(context(tmp_path / "text", config))
    queries = ["great film", "awful acting"]
    (response,) = execute_ok(
        instance, request("text", text=np.array([[q.encode()] for q in queries], dtype=object))
    )
    assert response.outputs[0].datatype == "BYTES"
    assert output(response, "label")[:, 0].tolist() == [s.encode() for s in model.predict(queries)]


def test_pickle_file_by_default_model_filename(tmp_path: Path, classifier: LogisticRegression) -> None:
    path = tmp_path / "clf" / "1" / "model.pkl"
    path.parent.mkdir(parents=True)
    path.write_bytes(pickle.dumps(classifier))
    config = parse_config(CLASSIFIER + 'default_model_filename: "model.pkl"')
    instance = BACKEND.create_instance(context(tmp_path / "clf", config))
    (response,) = execute_ok(instance, request("clf", input__0=X[:3]))
    np.testing.assert_array_equal(output(response, "output__0")[:, 0], classifier.predict(X[:3]))


def test_autocomplete_missing_config(tmp_path: Path, classifier: LogisticRegression) -> None:
    save(tmp_path / "clf", classifier)
    config = mc.ModelConfig()
    BACKEND.auto_complete_config(config, tmp_path / "clf", 1)
    assert config.backend == "sklearn" and config.name == "clf"
    assert config.max_batch_size == 4 and config.HasField("dynamic_batching")
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [("input__0", mc.TYPE_FP32, [4])]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [("output__0", mc.TYPE_INT64, [1])]
    instance = BACKEND.create_instance(context(tmp_path / "clf", config))
    (response,) = execute_ok(instance, request("clf", input__0=X[:3]))
    np.testing.assert_array_equal(output(response, "output__0")[:, 0], classifier.predict(X[:3]))


def test_autocomplete_partial_predict_proba(tmp_path: Path, classifier: LogisticRegression) -> None:
    save(tmp_path / "clf", classifier)
    config = parse_config(
        """
        max_batch_size: 32
        input [{ name: "features" }]
        parameters { key: "method" value { string_value: "predict_proba" } }
        """
    )
    BACKEND.auto_complete_config(config, tmp_path / "clf", 1)
    assert config.max_batch_size == 32 and not config.HasField("dynamic_batching")
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [("features", mc.TYPE_FP32, [4])]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [("output__0", mc.TYPE_FP32, [3])]


@pytest.mark.parametrize(
    ("replace", "needle"),
    [
        (("dims: [4]", "dims: [5]"), "input 'input__0'"),
        (("dims: [3]", "dims: [2]"), "output 'output__0'"),
        (('string_value: "predict_proba"', 'string_value: "fit"'), "'method' must be one of"),
    ],
)
def test_mismatches_are_config_errors(
    tmp_path: Path, classifier: LogisticRegression, replace: tuple[str, str], needle: str
) -> None:
    save(tmp_path / "clf", classifier)
    config = parse_config(PROBA.replace(*replace))
    with pytest.raises(ConfigError) as err:
        BACKEND.create_instance(context(tmp_path / "clf", config))
    assert "model 'clf'" in str(err.value) and needle in str(err.value)


def test_method_the_estimator_lacks(tmp_path: Path) -> None:
    save(tmp_path / "reg", LinearRegression().fit(X, X[:, 0]))
    config = parse_config(PROBA.replace('"clf"', '"reg"'))
    with pytest.raises(ConfigError, match="LinearRegression has no method 'predict_proba'"):
        BACKEND.create_instance(context(tmp_path / "reg", config))


def test_bad_model_file(tmp_path: Path) -> None:
    path = tmp_path / "clf" / "1" / "model.joblib"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00 definitely not a pickle")
    with pytest.raises(ConfigError, match=r"model 'clf': cannot load scikit-learn model"):
        BACKEND.create_instance(context(tmp_path / "clf", parse_config(CLASSIFIER)))
    with pytest.raises(ConfigError, match="not found"):
        BACKEND.create_instance(context(tmp_path / "missing", parse_config(CLASSIFIER)))
