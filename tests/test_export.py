"""Transcript exports: each format equal to what whisperX's own writers make of the result."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audio_models.pipeline.store import SEGMENT_SCHEMA, WORD_SCHEMA
from runners.export import export, results

SEGMENTS = [
    ("talk/a.wav", 0, 0.0, 2.5, " Hello there.", "SPEAKER_00", -0.2),
    ("talk/a.wav", 1, 2.5, 3661.0254, " A long --> one\tlater.", None, -0.3),
    ("b.wav", 0, 0.12, 0.9996, " Hi.", None, -0.1),
    ("c.wav", 0, 1.0, 2.0, " Plain --> text.", "SPEAKER_01", -0.1),  # not aligned: no words
]
WORDS = [
    ("talk/a.wav", 0, 0, "Hello", 0.0, 0.8, 0.9, "SPEAKER_00"),
    ("talk/a.wav", 0, 1, "there.", 0.9, 2.5, 0.8, "SPEAKER_00"),
    ("talk/a.wav", 1, 0, "A", 2.5, 2.7, 0.7, None),
    ("b.wav", 0, 0, "42.", None, None, None, None),  # whisperX leaves numbers unaligned
]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    out = tmp_path / "run"
    out.mkdir()
    pq.write_table(
        pa.table(
            {
                "id": ["talk/a.wav", "b.wav", "silent.wav", "c.wav"],
                "text": ["Hello there. A long one later.", "Hi.", "", "Plain --> text."],
                "language": ["en", "en", None, "en"],
            }
        ),
        out / "transcripts.parquet",
    )
    seg = {name: [row[i] for row in SEGMENTS] for i, name in enumerate(SEGMENT_SCHEMA.names)}
    pq.write_table(pa.table(seg, schema=SEGMENT_SCHEMA), out / "segments.parquet")
    words = {name: [row[i] for row in WORDS] for i, name in enumerate(WORD_SCHEMA.names)}
    pq.write_table(pa.table(words, schema=WORD_SCHEMA), out / "words.parquet")
    return out


@pytest.mark.parametrize("fmt", ["srt", "vtt", "txt", "tsv", "json"])
def test_each_format_equals_whisperx_writers(run_dir: Path, tmp_path: Path, fmt: str) -> None:
    from whisperx.utils import WriteJSON, WriteSRT, WriteTSV, WriteTXT, WriteVTT

    writer = {"srt": WriteSRT, "vtt": WriteVTT, "txt": WriteTXT, "tsv": WriteTSV}.get(
        fmt, WriteJSON
    )(str(tmp_path))
    options = {"max_line_width": None, "max_line_count": None, "highlight_words": False}
    files = export(run_dir, fmt, tmp_path / "ours")
    names = ["talk%2Fa.wav", "b.wav", "silent.wav", "c.wav"]
    assert [f.name for f in files] == [f"{name}.{fmt}" for name in names]
    for (item_id, result), path in zip(results(run_dir).items(), files, strict=True):
        expected = io.StringIO()
        writer.write_result(result, file=expected, options=options)
        assert path.read_text(encoding="utf-8") == expected.getvalue(), item_id


def test_results_keep_speakers_words_and_what_is_missing(run_dir: Path) -> None:
    got = results(run_dir)
    first = got["talk/a.wav"]["segments"][0]
    assert first["speaker"] == "SPEAKER_00" and [w["word"] for w in first["words"]] == [
        "Hello",
        "there.",
    ]
    assert "speaker" not in got["talk/a.wav"]["segments"][1]
    assert got["b.wav"]["segments"][0]["words"] == [{"word": "42."}]  # no times: left out
    assert got["silent.wav"] == {"segments": [], "word_segments": []}
    assert "words" not in got["c.wav"]["segments"][0]  # unaligned, as whisperX leaves it
    srt = (run_dir / "exports").exists()
    assert not srt  # results() writes nothing


def test_the_command(run_dir: Path, tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "runners.export", *args]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)

    ok = run(f"output_dir={run_dir}", "format=vtt")
    assert ok.returncode == 0, ok.stderr
    assert "4 vtt files in" in ok.stdout
    vtt = (run_dir / "exports" / "vtt" / "b.wav.vtt").read_text()
    # An aligned item: the cue is its words; an unalignable word keeps the segment's times.
    assert vtt == "WEBVTT\n\n00:00.120 --> 00:01.000\n42.\n\n"
    data = json.loads(
        (run(f"output_dir={run_dir}", "format=json", f"dest={tmp_path}/j"), tmp_path / "j")[1]
        .joinpath("talk%2Fa.wav.json")
        .read_text()
    )
    assert data["language"] == "en" and len(data["word_segments"]) == 3
    features = tmp_path / "features_run"
    features.mkdir()
    for args, message in [
        ([f"output_dir={features}"], "no transcripts.parquet"),
        ([f"output_dir={run_dir}", "format=docx"], "format must be one of"),
        ([f"output_dir={run_dir}", "fromat=srt"], "fromat"),
    ]:
        bad = run(*args)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr


def test_long_ids_get_short_distinct_names() -> None:
    from runners.export import file_stem

    long_a, long_b = "语音" * 40 + "a.wav", "语音" * 40 + "b.wav"
    stems = {file_stem(long_a), file_stem(long_b)}
    assert len(stems) == 2 and all(len(stem.encode()) <= 200 for stem in stems)
    assert file_stem("../x/y.wav") == "..%2Fx%2Fy.wav"  # no path escape
