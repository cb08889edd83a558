"""Shared fixtures: composed configs that force CPU, tiny batches and a temporary tracking store."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import audio_models as am
import audio_models.config
from audio_models.audio.kaldi import KaldiExtractor
from audio_models.audio.librosa_features import LibrosaExtractor
from audio_models.audio.smile import OpenSmileExtractor
from audio_models.extractor import OutputKind

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
SHARED = REPO.parent / "shared"
SPEECH = SHARED / "data" / "speech"

# The signal-level extractors: class, output kind, width (shared by the config and runner
# tests, so that no test module imports another).
EXTRACTORS = {
    "egemaps": (OpenSmileExtractor, OutputKind.VECTOR, 88),
    "egemaps_lld": (OpenSmileExtractor, OutputKind.FRAMES, 25),
    "compare": (OpenSmileExtractor, OutputKind.VECTOR, 6373),
    "librosa": (LibrosaExtractor, OutputKind.VECTOR, 193),
    "fbank": (KaldiExtractor, OutputKind.FRAMES, 80),
    "mfcc": (KaldiExtractor, OutputKind.FRAMES, 13),
}


# What the loader puts in a decoded record's meta, for tests that feed the writer directly.
RECORD_META = {
    "start": 0.0,
    "end": 1.0,
    "duration_s": 1.0,
    "sample_rate": 16000,
    "source_sample_rate": 16000,
    "n_channels": 1,
    "channel_policy": "mean",
    "silence_ratio": 0.0,
    "clipping_ratio": 0.0,
}


def frames_by_id(output_dir: Path) -> pd.DataFrame:
    """Every frame row of a finished frame-level run, ordered by item id, then frame."""
    frames = am.load(output_dir).frames()
    return frames.sort_values(["id", "frame"], kind="stable").reset_index(drop=True)


@pytest.fixture(scope="session", autouse=True)
def _demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # Generated data goes to a temporary cache, never the user's home.
    mp = pytest.MonkeyPatch()
    mp.setenv("AUDIO_MODELS_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture
def speech_dir() -> Path:
    """``../shared/data/speech`` (real recordings); skips where it is absent."""
    if not SPEECH.is_dir():
        pytest.skip("../shared/data/speech is absent (a fresh clone has no shared data)")
    return SPEECH


def compose_extract(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="extract", overrides=overrides)


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose ``conf/extract.yaml`` with test defaults (CPU, no workers, tracking off)."""

    def make(*overrides: str, out: str = "out") -> DictConfig:
        base = [
            "device=cpu",
            "tracking=off",
            "loader.num_workers=0",
            "loader.batch_size=4",
            "progress_bar=false",
            f"output_dir={tmp_path / out}",
        ]
        return compose_extract(base + list(overrides))

    return make


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No network and empty model caches: hub ids must fail with the offline message."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


@pytest.fixture
def mlflow_store(tmp_path: Path) -> tuple[str, list[str]]:
    """A temporary SQLite tracking store: its URI and the overrides that select it."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    return uri, [
        "tracking=mlflow",
        f"tracking.uri={uri}",
        f"tracking.artifact_location={tmp_path}/art",
    ]
