"""The `ser` extractor and `runners.train_ser`: verified loading, shapes, outputs, retraining."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from audio_models.speech.ser import EmotionClassifierExtractor
from audio_models.testing import loaded
from audio_models.utils.errors import UserError
from runners.extract import extract
from runners.train_ser import train
from tests.conftest import CONF_DIR, SHARED
from tests.gitrepos import HEADER, git, make_repo

LEGACY = SHARED / "data" / "ser-legacy" / "best_classifiers_sklearn-0.24.2.pickle"


@pytest.fixture
def legacy() -> tuple[Path, str]:
    if not LEGACY.is_file():
        pytest.skip("../shared/data/ser-legacy is absent (a fresh clone has no shared data)")
    return LEGACY, hashlib.sha256(LEGACY.read_bytes()).hexdigest()


def test_hash_mismatch_and_missing_hash_are_refused(legacy) -> None:
    path, digest = legacy
    with pytest.raises(UserError) as info:
        loaded(EmotionClassifierExtractor(name="ser", model_path=str(path), sha256="0" * 64))
    assert (
        str(path) in str(info.value) and digest in str(info.value) and "0" * 64 in str(info.value)
    )
    with pytest.raises(UserError, match=r"set extractor\.sha256"):
        loaded(EmotionClassifierExtractor(name="ser", model_path=str(path)))
    trusted = loaded(
        EmotionClassifierExtractor(name="ser", model_path=str(path), trust_unverified=True)
    )
    assert trusted.provenance()["ser.verified_by"] == "unverified"
    ok = loaded(EmotionClassifierExtractor(name="ser", model_path=str(path), sha256=digest.upper()))
    assert ok.provenance()["ser.verified_by"] == "sha256"


def test_shape_and_class_mismatches_name_both_sides(legacy) -> None:
    path, digest = legacy
    with pytest.raises(
        UserError, match=r"expects 180 features but extractor.features=\['mfcc'\] gives 40"
    ):
        loaded(
            EmotionClassifierExtractor(
                name="ser", model_path=str(path), sha256=digest, features=["mfcc"]
            )
        )
    with pytest.raises(
        UserError,
        match=r"\['happy', 'sad'\] but the classifier predicts \['angry', 'neutral', 'sad'\]",
    ):
        loaded(
            EmotionClassifierExtractor(
                name="ser", model_path=str(path), sha256=digest, emotions=["sad", "happy"]
            )
        )
    with pytest.raises(UserError, match="no KNeighborsRegressor"):
        loaded(
            EmotionClassifierExtractor(
                name="ser", model_path=str(path), sha256=digest, estimator="KNeighborsRegressor"
            )
        )
    knn = loaded(
        EmotionClassifierExtractor(
            name="ser", model_path=str(path), sha256=digest, estimator="KNeighborsClassifier"
        )
    )
    assert knn.provenance()["ser.estimator"] == "KNeighborsClassifier"


def test_runner_on_emodb(make_cfg, speech_dir: Path, legacy) -> None:
    path, digest = legacy
    cfg = make_cfg(
        "extractor=ser",
        f"extractor.model_path={path}",
        f"extractor.sha256={digest}",
        "extractor.keep_features=true",
        "dataset=folder",
        f"dataset.root={speech_dir / 'emodb-subset'}",
    )
    result = extract(cfg)
    table = pd.read_parquet(result.output_dir / "features.parquet")
    assert len(table) == 23
    probabilities = table[["p_angry", "p_neutral", "p_sad"]].to_numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-12)
    assert set(table["emotion"]) <= {"angry", "neutral", "sad"}
    assert list(table.columns).index("emotion") < list(table.columns).index("p_angry")
    assert "mel_127" in table.columns and "tonnetz_0" not in table.columns
    assert (table["sample_rate"] == 16000).all()  # upstream's 16 kHz mono
    assert result.tags["provenance.ser.estimator"] == "SVC"  # best cv_score, first on ties


def test_default_model_from_checkout_is_verified_by_git(
    tmp_path: Path, monkeypatch, legacy
) -> None:
    path, _ = legacy
    origin = tmp_path / "origin" / "emotion-recognition-using-speech"
    make_repo(origin, 1)
    (origin / "grid").mkdir()
    shutil.copy(path, origin / "grid" / "best_classifiers.pickle")
    git(origin, "add", "-A")
    git(origin, "commit", "-q", "-m", "model")
    pin = git(origin, "rev-parse", "HEAD")
    csv = tmp_path / "requirements.csv"
    csv.write_text(
        HEADER + f"emotion_recognition,{origin.as_uri()},{pin},EMOTION_RECOGNITION_REPO,,,x,MIT\n"
    )
    monkeypatch.setenv("AUDIO_MODELS_REQUIREMENTS", str(csv))
    monkeypatch.setenv("AUDIO_MODELS_EXTERNAL", str(tmp_path / "external"))
    monkeypatch.delenv("EMOTION_RECOGNITION_REPO", raising=False)
    with pytest.raises(UserError, match="setup_audio_repos --only emotion_recognition"):
        loaded(EmotionClassifierExtractor(name="ser"))
    from audio_models.scripts.setup_audio_repos import main as setup_main

    assert setup_main([]) == 0
    extractor = loaded(EmotionClassifierExtractor(name="ser"))
    assert extractor.provenance()["ser.verified_by"] == "git-blob-at-pin"
    assert extractor.upstreams == ("emotion_recognition",)
    # An edited file in the checkout is no longer verified by git: it needs its hash.
    model = (
        tmp_path
        / "external"
        / "emotion-recognition-using-speech"
        / "grid"
        / "best_classifiers.pickle"
    )
    model.write_bytes(model.read_bytes() + b"\0")
    with pytest.raises(UserError, match="refusing to unpickle"):
        loaded(EmotionClassifierExtractor(name="ser"))


def _train_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train_ser", overrides=list(overrides))


def test_retrain_on_emodb_logs_and_loads_back(
    speech_dir: Path, legacy, tmp_path: Path, make_cfg, mlflow_store
) -> None:
    path, digest = legacy
    uri, tracking = mlflow_store
    cfg = _train_cfg(
        *tracking,
        f"dataset.path={speech_dir / 'emodb-subset' / 'labels.csv'}",
        "dataset.label_column=emotion",
        f"estimator.model_path={path}",
        f"estimator.sha256={digest}",
        "loader.num_workers=0",
        "progress_bar=false",
        f"output_dir={tmp_path}/train",
    )
    result = train(cfg)
    run = mlflow.MlflowClient(uri).get_run(result.run_id)
    assert run.data.metrics["n_items"] == 23
    assert run.data.metrics["n_folds"] == 2  # two speakers: grouped by speaker
    assert 0.0 <= run.data.metrics["uar"] <= 1.0 and "accuracy" in run.data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(result.run_id)}
    assert {"ser_model.skops", "confusion_matrix.png", "ser_model.json"} <= artifacts
    assert run.data.params["estimator.model_path"] == str(path)
    # The saved model loads back through the extractor, verified by its hash.
    cfg = make_cfg(
        "extractor=ser",
        f"extractor.model_path={result.model_path}",
        f"extractor.sha256={result.sha256}",
        "dataset=folder",
        f"dataset.root={speech_dir / 'emodb-subset'}",
    )
    table = pd.read_parquet(extract(cfg).output_dir / "features.parquet")
    classes = sorted(pd.read_csv(speech_dir / "emodb-subset" / "labels.csv")["emotion"].unique())
    assert [c for c in table.columns if c.startswith("p_")] == [f"p_{c}" for c in classes]
    np.testing.assert_allclose(table.filter(like="p_").sum(axis=1), 1.0, atol=1e-9)


def test_train_needs_two_examples_per_class(tmp_path: Path, speech_dir: Path) -> None:
    labels = pd.read_csv(speech_dir / "emodb-subset" / "labels.csv")
    labels["path"] = [str(speech_dir / "emodb-subset" / p) for p in labels["path"]]
    labels.loc[0, "emotion"] = "unique"
    manifest = tmp_path / "m.csv"
    labels.to_csv(manifest, index=False)
    cfg = _train_cfg(
        f"dataset.path={manifest}",
        "dataset.label_column=emotion",
        "estimator.source=config",
        "tracking=off",
        "loader.num_workers=0",
        "progress_bar=false",
        f"output_dir={tmp_path}/train",
    )
    with pytest.raises(UserError, match="class 'unique' has 1 example"):
        train(cfg)
