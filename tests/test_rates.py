"""Mixed sample rates: extractors that keep each file's rate warn and list the rates found."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from audio_models.audio.kaldi import KaldiExtractor
from audio_models.audio.librosa_features import LibrosaExtractor
from audio_models.audio.smile import OpenSmileExtractor
from audio_models.data.items import Item
from audio_models.data.loader import ExtractionDataModule, sample_rate_tags
from runners.extract import extract

RATES = {"a.wav": 8000, "b.wav": 16000, "c.wav": 16000, "d.flac": 48000}


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """Four half-second vowel-like files at 8, 16 (two) and 48 kHz."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name, rate in RATES.items():
        t = np.arange(rate // 2) / rate
        x = sum(np.sin(2 * np.pi * k * 150 * t) / k for k in range(1, 6))
        sf.write(folder / name, (0.1 * x).astype(np.float32), rate)
    return folder


def _items(folder: Path) -> list[Item]:
    # The same file twice (two segments) counts once.
    items = [Item(id=name, path=str(folder / name)) for name in RATES]
    return [*items, Item(id="b.wav@0-0.2", path=str(folder / "b.wav"), start=0.0, end=0.2)]


def test_native_rate_extractors_warn_and_tag_the_rates(mixed: Path) -> None:
    items = _items(mixed)
    expected = r"mixes sample rates: 8000 Hz \(1 file\), 16000 Hz \(2 files\), 48000 Hz \(1 file\)"
    for extractor in (OpenSmileExtractor(name="egemaps"), LibrosaExtractor(name="librosa")):
        with pytest.warns(UserWarning, match=expected + r".*extractor\.sample_rate"):
            tags = sample_rate_tags(items, extractor)
        assert tags == {"source_sample_rates": "8000,16000,48000"}
    # The data module surveys once, before any work, and keeps the tags for the run.
    with pytest.warns(UserWarning, match=expected):
        module = ExtractionDataModule(
            items=items, extractor=OpenSmileExtractor(name="egemaps"), num_workers=0
        )
    assert module.sample_rate_tags == {"source_sample_rates": "8000,16000,48000"}


def test_one_rate_or_a_fixed_rate_is_silent(mixed: Path) -> None:
    items = _items(mixed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        # A fixed rate: every file is resampled to it, nothing to survey.
        assert sample_rate_tags(items, KaldiExtractor(name="fbank")) == {}
        assert sample_rate_tags(items, OpenSmileExtractor(name="egemaps", sample_rate=16000)) == {}
        assert sample_rate_tags(items, LibrosaExtractor(name="librosa", sample_rate=16000)) == {}
        one = [i for i in items if i.id.startswith("b.wav")]
        tags = sample_rate_tags(one, OpenSmileExtractor(name="egemaps"))
    assert tags == {"source_sample_rates": "16000"}


def test_runner_warns_on_mixed_rates_and_sample_rate_resamples(make_cfg, mixed: Path) -> None:
    common = ["extractor=egemaps", "dataset=folder", f"dataset.root={mixed}"]
    with pytest.warns(UserWarning, match=r"mixes sample rates: 8000 Hz"):
        result = extract(make_cfg(*common, out="native"))
    native = pd.read_parquet(result.output_dir / "features.parquet").set_index("id")
    assert dict(native["sample_rate"]) == RATES  # each file at its own rate
    assert result.tags["source_sample_rates"] == "8000,16000,48000"
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*mixes sample rates")
        result = extract(make_cfg(*common, "extractor.sample_rate=16000", out="fixed"))
    fixed = pd.read_parquet(result.output_dir / "features.parquet").set_index("id")
    assert (fixed["sample_rate"] == 16000).all()
    assert dict(fixed["source_sample_rate"]) == RATES
    # Resuming the native-rate run: it warned when it started, its outputs are the same.
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*mixes sample rates")
        again = extract(make_cfg(*common, out="native"))
    assert again.metrics["n_skipped_resumed"] == len(RATES)
