"""Sliding windows: the cut, and each row equal to the extractor on that cut of the signal."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

import audio_models as am
from audio_models.data.items import Item
from audio_models.data.windows import window_items
from audio_models.utils.errors import UserError
from runners.extract import extract


def _bounds(items: list[Item]) -> list[tuple[float | None, float | None]]:
    return [(i.start, i.end) for i in items]


def test_adjacent_overlapping_partial_and_dropped_windows() -> None:
    five = [Item("a.wav", "/a.wav", labels={"spk": "09"})]
    duration = {"a.wav": 5.0}.get

    def of(item: Item) -> float | None:
        return duration(item.id)

    assert _bounds(window_items(five, 2.0, duration_of=of)) == [(0, 2), (2, 4), (4, 5)]
    assert _bounds(window_items(five, 2.0, last="drop", duration_of=of)) == [(0, 2), (2, 4)]
    overlapping = window_items(five, 2.0, 1.0, duration_of=of)
    assert _bounds(overlapping) == [(0, 2), (1, 3), (2, 4), (3, 5)]  # no window past the end
    assert [w.id for w in overlapping][:2] == ["a.wav@0-2", "a.wav@1-3"]
    assert all(w.labels == {"spk": "09"} and w.path == "/a.wav" for w in overlapping)
    # A segment item: absolute times inside its bounds.
    segment = [Item("a.wav@10-13.5", "/a.wav", 10.0, 13.5)]
    assert _bounds(window_items(segment, 1.5)) == [(10, 11.5), (11.5, 13), (13, 13.5)]
    # Float steps do not drift: 0.1 s hops over 1 s give ten exact windows.
    tenths = window_items([Item("b", "/b", 0.0, 1.0)], 0.1)
    assert len(tenths) == 10 and tenths[-1].end == 1.0 and tenths[3].start == 0.3


def test_short_unreadable_and_bad_settings(caplog: pytest.LogCaptureFixture) -> None:
    items = [Item("short", "/s", 0.0, 0.5), Item("gone", "/nonexistent.wav")]
    with caplog.at_level(logging.WARNING):
        kept = window_items(items, 1.0, last="drop")
    assert [w.id for w in kept] == ["gone"]  # kept whole: the loader records its failure
    assert "have no window" in caplog.text and "kept whole" in caplog.text
    assert _bounds(window_items(items[:1], 1.0)) == [(0, 0.5)]  # partial: one short window
    for size, hop, last in [(0.0, None, "partial"), (1.0, -1.0, "partial"), (1.0, 1.0, "pad")]:
        with pytest.raises(UserError, match="windows"):
            window_items(items, size, hop, last)


@pytest.fixture
def voice(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    t = np.arange(int(3.3 * 16000)) / 16000
    pitch = 140 + 30 * np.sin(3 * t)
    x = 0.3 * np.sin(2 * np.pi * pitch * t) + 0.01 * rng.standard_normal(t.size)
    path = tmp_path / "voice.wav"
    sf.write(path, x.astype(np.float32), 16000)
    return path


def test_each_window_row_equals_the_extractor_on_that_cut(make_cfg, voice: Path) -> None:
    result = extract(
        make_cfg(
            "extractor=egemaps",
            "dataset=manifest",
            f"dataset.path={_manifest(voice)}",
            "windows.size_s=1.0",
            "windows.hop_s=0.5",
        )
    )
    table = pd.read_parquet(result.output_dir / "features.parquet").set_index("id")
    expected_bounds = [(0, 1), (0.5, 1.5), (1, 2), (1.5, 2.5), (2, 3), (2.5, 3.3)]
    bounds = [(s, e) for s, e in zip(table["start"], table["end"], strict=True)]
    assert bounds == expected_bounds
    extractor = am.load_extractor("egemaps")
    names = extractor.feature_names
    for _, row in table.iterrows():
        direct = extractor.process_file(str(voice), start=row["start"], end=row["end"])
        np.testing.assert_allclose(row[names].to_numpy(float), direct, rtol=1e-5, atol=1e-6)


def test_windows_from_python(voice: Path) -> None:
    df = am.extract(
        [str(voice)], "egemaps", num_workers=0, overrides=["windows.size_s=2", "windows.last=drop"]
    )
    assert list(df.index.get_level_values("file")) == [str(voice)]
    ends = df.index.get_level_values("end")
    assert list(ends) == [pd.Timedelta(seconds=2)]


def _manifest(path: Path) -> Path:
    manifest = path.parent / "m.csv"
    manifest.write_text(f"path,speaker\n{path},09\n")
    return manifest


def test_settings_hash_covers_windows_and_reduced_precision(make_cfg) -> None:
    # A resume into the same output_dir with other windows or at bf16 must not mix rows:
    # the hash differs, and the store refuses the directory.
    from runners.extract import settings_hash

    extractor = am.load_extractor("egemaps")
    base = settings_hash(make_cfg(), extractor)
    assert settings_hash(make_cfg("device.precision=32-true"), extractor) == base
    others = [
        make_cfg("device.precision=bf16-mixed"),
        make_cfg("windows.size_s=2"),
        make_cfg("windows.size_s=2", "windows.hop_s=1"),
    ]
    hashes = {settings_hash(cfg, extractor) for cfg in others}
    assert len(hashes) == 3 and base not in hashes


@pytest.mark.parametrize(
    ("duration", "size", "hop"), [(2.0, 0.5, 0.3), (10.0, 0.7, 0.3), (1.55, 0.7, 0.05)]
)
def test_no_redundant_last_window_from_float_sums(duration: float, size: float, hop: float) -> None:
    windows = window_items([Item("a", "/a")], size, hop, duration_of=lambda _: duration)
    ends = [w.end for w in windows]
    assert ends.count(duration) == 1  # one window reaches the end, not two
