"""The upstream's legacy classifier pickles load in today's scikit-learn with unchanged outputs."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from audio_models.speech.ser_legacy import UnsafePickleError, load_legacy_classifiers
from tests.conftest import SHARED

LEGACY = SHARED / "data" / "ser-legacy"
CLASSES = [
    "SVC",
    "RandomForestClassifier",
    "GradientBoostingClassifier",
    "KNeighborsClassifier",
    "MLPClassifier",
    "BaggingClassifier",
]


@pytest.fixture
def legacy_dir() -> Path:
    if not LEGACY.is_dir():
        pytest.skip("../shared/data/ser-legacy is absent (a fresh clone has no shared data)")
    return LEGACY


@pytest.mark.parametrize("version", ["0.24.2", "0.21.3"])
def test_reproduces_old_probabilities(legacy_dir: Path, version: str) -> None:
    raw = (legacy_dir / f"best_classifiers_sklearn-{version}.pickle").read_bytes()
    with pytest.raises((ValueError, ModuleNotFoundError)):  # what plain pickle does today
        pickle.loads(raw)
    entries = load_legacy_classifiers(raw)
    assert [type(e.estimator).__name__ for e in entries] == CLASSES
    probe = np.load(legacy_dir / "probe_X.npy")
    reference = np.load(legacy_dir / f"predict_proba_sklearn-{version}.npy")
    for entry, expected in zip(entries, reference, strict=True):
        assert list(entry.estimator.classes_) == ["angry", "neutral", "sad"]
        assert entry.estimator.n_features_in_ == 180
        np.testing.assert_allclose(
            entry.estimator.predict_proba(probe), expected, rtol=0, atol=1e-9
        )
        # Upgraded estimators are plain current scikit-learn objects: they round-trip.
        again = pickle.loads(pickle.dumps(entry.estimator))
        np.testing.assert_array_equal(
            again.predict_proba(probe), entry.estimator.predict_proba(probe)
        )
    assert entries[0].params == {"C": 10, "gamma": 0.001, "kernel": "rbf"}


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/audio_models_pwned",))


def test_code_running_pickle_is_refused(tmp_path: Path) -> None:
    marker = Path("/tmp/audio_models_pwned")
    marker.unlink(missing_ok=True)
    with pytest.raises(UnsafePickleError, match=r"(posix|os)\.system"):
        load_legacy_classifiers(pickle.dumps([(_Evil(), {}, 0.5)]))
    assert not marker.exists()


def test_wrong_structure_is_refused() -> None:
    with pytest.raises(pickle.UnpicklingError, match="list of"):
        load_legacy_classifiers(pickle.dumps({"not": "a list"}))
