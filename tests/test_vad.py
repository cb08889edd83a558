"""extractor=vad: Silero VAD (the real pretrained model bundled in faster-whisper) against
faster-whisper's own ``get_speech_timestamps``, and its outputs through the runner."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Any

import faster_whisper
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from faster_whisper.vad import VadOptions, get_speech_timestamps

from audio_models.audio.io import decode
from audio_models.speech.vad import SEGMENT_SCHEMA, SileroVadExtractor
from audio_models.utils.errors import UserError
from runners.extract import extract
from tests.conftest import compose_extract

SR = 16000

# faster-whisper's options (ms) and ours (s): the defaults, short silences and pads, a
# low threshold with a minimum speech length, and a maximum that splits segments.
OPTIONS: list[dict[str, Any]] = [
    {},
    {"min_silence_duration_ms": 100, "speech_pad_ms": 30},
    {
        "threshold": 0.3,
        "neg_threshold": 0.2,
        "min_speech_duration_ms": 250,
        "min_silence_duration_ms": 0,
        "speech_pad_ms": 0,
    },
    {"max_speech_duration_s": 1.0, "min_silence_duration_ms": 50, "speech_pad_ms": 100},
]


def _ours(options: dict[str, Any]) -> SileroVadExtractor:
    defaults = VadOptions()
    get = {**vars(defaults), **options}
    max_s = get["max_speech_duration_s"]
    return SileroVadExtractor(
        threshold=get["threshold"],
        neg_threshold=get["neg_threshold"],
        min_speech_s=get["min_speech_duration_ms"] / 1000,
        min_silence_s=get["min_silence_duration_ms"] / 1000,
        speech_pad_s=get["speech_pad_ms"] / 1000,
        max_speech_s=None if max_s == float("inf") else max_s,
    )


def _reference(signal: np.ndarray, options: dict[str, Any]) -> list[tuple[int, int]]:
    found = get_speech_timestamps(signal.copy(), VadOptions(**options), sampling_rate=SR)
    return [(s["start"], s["end"]) for s in found]


def _bursts(seed: int, tail: int) -> np.ndarray:
    """Silence with loud bursts: a tone and noise (which Silero does not call speech) and
    two voice-like stretches (harmonics of 140 Hz, amplitude-modulated at a syllable rate of
    4 Hz, which it does); ``tail`` samples of silence past whole seconds."""
    rng = np.random.default_rng(seed)

    def quiet(seconds: float) -> np.ndarray:
        return 1e-4 * rng.standard_normal(int(seconds * SR))

    def voiced(seconds: float) -> np.ndarray:
        t = np.arange(int(seconds * SR)) / SR
        harmonics = sum(np.sin(2 * np.pi * k * 140 * t) / k for k in range(1, 8))
        return 0.1 * harmonics * (1 + 0.9 * np.sin(2 * np.pi * 4 * t))

    t = np.arange(SR) / SR
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    noise = 0.3 * rng.standard_normal(SR)
    parts = [quiet(1), tone, quiet(1), voiced(1), quiet(2.5), noise, quiet(1), voiced(1.5)]
    return np.concatenate([*parts, quiet(tail / SR)]).astype(np.float32)


def test_defaults_are_faster_whispers_vad_options() -> None:
    from audio_models.speech.vad import VadConfig

    defaults, ours = VadOptions(), VadConfig()
    assert ours.threshold == defaults.threshold
    assert ours.neg_threshold == defaults.neg_threshold
    assert ours.min_speech_s * 1000 == defaults.min_speech_duration_ms
    assert ours.min_silence_s * 1000 == defaults.min_silence_duration_ms
    assert ours.speech_pad_s * 1000 == defaults.speech_pad_ms
    assert ours.max_speech_s is None and defaults.max_speech_duration_s == float("inf")


def test_vad_option_instantiates() -> None:
    from hydra.utils import instantiate

    cfg = compose_extract(["extractor=vad", "extractor.min_silence_s=0.5", "output_dir=unused"])
    extractor = instantiate(cfg.extractor)
    assert isinstance(extractor, SileroVadExtractor) and extractor.name == "vad"
    assert extractor.min_silence == 8000 and extractor.pad == 6400
    assert extractor.neg_threshold == pytest.approx(0.35)
    assert extractor.feature_names == ["speech_ratio", "n_segments", "speech_s"]
    assert extractor.side_tables == {"segments": SEGMENT_SCHEMA}


@pytest.mark.parametrize("options", OPTIONS, ids=range(len(OPTIONS)))
def test_segments_equal_faster_whisper_on_real_speech(
    speech_dir: Path, options: dict[str, Any]
) -> None:
    extractor = _ours(options)
    files = sorted(speech_dir.glob("**/*.wav"))
    assert files
    n_segments = 0
    for path in files:
        signal = decode(str(path), target_sample_rate=SR).signal
        ours = [(s.start, s.end) for s in extractor.segments(signal)]
        assert ours == _reference(signal, options), path.name
        n_segments += len(ours)
    assert n_segments >= len(files)  # every recording holds speech


@pytest.mark.parametrize("options", OPTIONS, ids=range(len(OPTIONS)))
@pytest.mark.parametrize("tail", [0, 100, 470, 511])  # whole windows; ends in the last 64
def test_segments_equal_faster_whisper_on_generated_signals(
    options: dict[str, Any], tail: int
) -> None:
    signal = _bursts(tail, tail)
    ours = _ours(options).segments(signal)
    assert [(s.start, s.end) for s in ours] == _reference(signal, options)
    assert all(0.0 <= s.confidence <= 1.0 for s in ours)
    silence = np.zeros(3 * SR + tail, dtype=np.float32)
    assert _ours(options).segments(silence) == [] == _reference(silence, options)


def test_transform_summary_and_rows() -> None:
    extractor = SileroVadExtractor(min_silence_s=0.1, speech_pad_s=0.03)
    signal = _bursts(0, 0)
    spans = extractor.segments(signal)
    # The two voice-like stretches (3-4 s, 8.5-10 s), not the tone (1-2 s) or noise (5.5-6.5 s).
    assert [(round(s.start / SR), round(s.end / SR)) for s in spans] == [(3, 4), (9, 10)]
    out = extractor.transform(signal, SR)
    speech_s = sum(s.end - s.start for s in spans) / SR
    ratio, count, total = out.values
    assert count == len(spans) and total == pytest.approx(speech_s)
    assert ratio == pytest.approx(speech_s / (signal.size / SR))
    rows = out.extra["segments"]
    assert set(rows) == set(SEGMENT_SCHEMA.names) - {"id"}
    assert rows["start"] == [s.start / SR for s in spans]
    assert rows["end"] == [s.end / SR for s in spans]
    assert rows["segment"] == list(range(len(spans)))
    # The confidence is the mean probability of the windows the speech covered: high for
    # what crossed the threshold.
    assert min(rows["confidence"]) >= extractor.neg_threshold
    # Workers get a pickled copy: the session is rebuilt there, with the same results.
    copy = pickle.loads(pickle.dumps(extractor))
    assert copy._session is None
    assert np.array_equal(copy.transform(signal, SR).values, out.values)


def test_provenance_names_the_model_file_and_versions() -> None:
    extractor = SileroVadExtractor()
    tags = extractor.provenance()
    digest = hashlib.sha256(extractor.path.read_bytes()).hexdigest()
    assert tags["vad.model_sha256"] == digest
    assert tags["vad.model"] == extractor.path.name
    assert extractor.path.parent.name == "assets"
    assert tags["faster_whisper.version"] == faster_whisper.__version__


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": 0.5, "neg_threshold": 0.6}, "neg_threshold"),
        ({"min_silence_s": -1.0}, "min_silence_s"),
        ({"max_speech_s": 0.0}, "max_speech_s"),
    ],
)
def test_bad_options_are_user_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=message):
        SileroVadExtractor(**kwargs)


def _manifest(folder: Path) -> tuple[Path, np.ndarray]:
    """One generated recording, as a whole item and as a segment starting at 1.5 s."""
    folder.mkdir(parents=True, exist_ok=True)
    signal = _bursts(1, 0)
    sf.write(folder / "bursts.wav", signal, SR, subtype="FLOAT")
    path = folder / "manifest.csv"
    pd.DataFrame(
        {
            "path": [str(folder / "bursts.wav")] * 2,
            "id": ["whole", "part"],
            "start": [None, 1.5],
            "end": [None, None],
        }
    ).to_csv(path, index=False)
    return path, signal


def test_runner_writes_summary_and_offset_segments(make_cfg, tmp_path: Path) -> None:
    manifest, signal = _manifest(tmp_path / "data")
    options = ["extractor.min_silence_s=0.1", "extractor.speech_pad_s=0.03"]
    overrides = ["extractor=vad", *options, "dataset=manifest", f"dataset.path={manifest}"]
    overrides.append("dataset.id_column=id")
    result = extract(make_cfg(*overrides))
    out = result.output_dir
    features = pd.read_parquet(out / "features.parquet").set_index("id")
    segments = pd.read_parquet(out / "segments.parquet")
    assert pd.read_parquet(out / "failures.parquet").empty
    assert segments.columns.tolist() == SEGMENT_SCHEMA.names
    assert result.tags["provenance.vad.model_sha256"]
    extractor = SileroVadExtractor(min_silence_s=0.1, speech_pad_s=0.03)
    for item_id, offset in (("whole", 0.0), ("part", 1.5)):
        spans = extractor.segments(signal[int(offset * SR) :])
        rows = segments[segments["id"] == item_id].sort_values("segment")
        assert len(rows) == len(spans) == features.loc[item_id, "n_segments"]
        # Seconds from the recording's start: the segment's offset is added.
        assert np.allclose(rows["start"], [offset + s.start / SR for s in spans])
        assert np.allclose(rows["end"], [offset + s.end / SR for s in spans])
        speech_s = float((rows["end"] - rows["start"]).sum())
        assert features.loc[item_id, "speech_s"] == pytest.approx(speech_s)
        duration = features.loc[item_id, "duration_s"]
        assert features.loc[item_id, "speech_ratio"] == pytest.approx(speech_s / duration)
    # The tone burst at 1-2 s lies before the part's start.
    assert segments[segments["id"] == "part"]["start"].min() >= 1.5
    # A rerun resumes: nothing to do, the side table kept as it was.
    again = extract(make_cfg(*overrides))
    assert again.metrics["n_skipped_resumed"] == 2
    pd.testing.assert_frame_equal(pd.read_parquet(out / "segments.parquet"), segments)
    # In loader worker processes (a pickled extractor, its own session; the rows travel
    # back with the record): the same tables.
    workers = extract(make_cfg(*overrides, "loader.num_workers=2", out="workers")).output_dir
    by_id = ["id", "segment"]
    pd.testing.assert_frame_equal(
        pd.read_parquet(workers / "segments.parquet").sort_values(by_id, ignore_index=True),
        segments.sort_values(by_id, ignore_index=True),
    )


def test_load_reads_a_vad_run_as_features(make_cfg, tmp_path: Path) -> None:
    import audio_models as am

    manifest, _ = _manifest(tmp_path / "data")
    dataset = ["dataset=manifest", f"dataset.path={manifest}", "dataset.id_column=id"]
    result = extract(make_cfg("extractor=vad", *dataset))
    run = am.load(result.output_dir)
    assert not run.transcribed
    assert {"speech_ratio", "n_segments", "speech_s"} <= set(run.features.columns)
    assert len(run.segments) > 0
    # From Python: the summary columns, the segments as records beside them.
    df = am.extract([str(tmp_path / "data" / "bursts.wav")], "vad", num_workers=0)
    assert df["n_segments"].iloc[0] == len(df.attrs["segments"]) > 0


def test_tables_exist_when_every_item_failed(make_cfg, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.wav", "b.wav"):
        (data / name).write_text("not audio")
    with pytest.warns(UserWarning, match="decode failed"):
        result = extract(make_cfg("extractor=vad", "dataset=folder", f"dataset.root={data}"))
    out = result.output_dir
    assert len(pd.read_parquet(out / "failures.parquet")) == 2
    segments = pd.read_parquet(out / "segments.parquet")
    assert segments.empty and segments.columns.tolist() == SEGMENT_SCHEMA.names
    features = pd.read_parquet(out / "features.parquet")
    assert features.empty and {"id", "path", "duration_s"} <= set(features.columns)


def test_writer_side_rows_offset_and_malformed_rows_fail(tmp_path: Path) -> None:
    from audio_models.data.items import Item
    from audio_models.data.loader import Record
    from audio_models.extractor import OutputKind
    from audio_models.pipeline.store import OutputStore
    from audio_models.pipeline.writer import ParquetFeatureWriter
    from tests.conftest import RECORD_META

    items = [Item(id=name, path=f"/{name}.wav") for name in ("good", "late", "bad")]
    store = OutputStore(tmp_path, "hash", tables={"segments": SEGMENT_SCHEMA})
    store.open()
    writer = ParquetFeatureWriter(
        store,
        kind=OutputKind.VECTOR,
        feature_names=["speech_ratio", "n_segments", "speech_s"],
        frame_shift_s=None,
        items=items,
        label_columns=[],
    )
    rows = {"segment": [0, 1], "start": [0.5, 2.0], "end": [1.0, 2.5], "confidence": [0.9, 0.8]}
    records = []
    for item, start, extra in (
        (items[0], 0.0, rows),
        (items[1], 10.0, rows),  # a manifest segment starting at 10 s
        (items[2], 0.0, {"start": [0.5]}),  # columns missing: a failure row, no side rows
    ):
        record = Record(item=item, key=item.id, meta={**RECORD_META, "start": start})
        record.features = np.array([0.5, 2.0, 1.0])
        record.extra = {"segments": extra}
        records.append(record)
    with pytest.warns(UserWarning, match="bad: write failed"):
        writer.consume(records)
    store.finalize(row_group_rows=512, run_id=None, feature_columns=writer.feature_columns)
    segments = pd.read_parquet(tmp_path / "segments.parquet")
    assert segments["id"].tolist() == ["good", "good", "late", "late"]
    assert segments["start"].tolist() == [0.5, 2.0, 10.5, 12.0]
    assert segments["end"].tolist() == [1.0, 2.5, 11.0, 12.5]
    assert segments["confidence"].tolist() == [0.9, 0.8, 0.9, 0.8]
    failures = pd.read_parquet(tmp_path / "failures.parquet")
    assert failures["id"].tolist() == ["bad"] and failures["stage"].tolist() == ["write"]
    assert pd.read_parquet(tmp_path / "features.parquet")["id"].tolist() == ["good", "late"]


def test_features_per_detected_speech_segment(make_cfg, tmp_path: Path) -> None:
    # A VAD run, then egemaps with segments_from=<that run>: one row per speech segment, each
    # equal to the extractor on that cut; a table of one's own works too.
    import audio_models as am
    from audio_models.data.items import Item
    from audio_models.data.windows import segment_items

    manifest, _ = _manifest(tmp_path / "data")
    dataset = ["dataset=manifest", f"dataset.path={manifest}", "dataset.id_column=id"]
    vad = extract(make_cfg("extractor=vad", "extractor.min_silence_s=0.5", *dataset, out="vad"))
    segments = pd.read_parquet(vad.output_dir / "segments.parquet")
    assert len(segments) >= 3
    per = extract(
        make_cfg("extractor=egemaps", *dataset, f"segments_from={vad.output_dir}", out="per")
    )
    table = pd.read_parquet(per.output_dir / "features.parquet")
    expected = sorted(zip(segments["start"].round(6), segments["end"].round(6), strict=True))
    got = sorted(zip(table["start"], table["end"], strict=True))
    np.testing.assert_allclose(np.array(got), np.array(expected), atol=1e-4)  # sample grid
    extractor = am.load_extractor("egemaps")
    row = table.iloc[0]
    direct = extractor.process_file(row["path"], start=row["start"], end=row["end"])
    np.testing.assert_allclose(row[extractor.feature_names].to_numpy(float), direct, rtol=1e-5)
    items = [Item("x", "/x.wav"), Item("quiet", "/q.wav")]
    own = tmp_path / "own.csv"
    own.write_text("id,start,end\nx,2.5,3.0\nx,0.5,1.0\n")
    assert [(i.id, i.start) for i in segment_items(items, str(own))] == [
        ("x@0.5-1", 0.5),
        ("x@2.5-3", 2.5),
    ]
    own.write_text("id,start,end\nother,0,1\n")
    with pytest.raises(UserError, match=r"id\(s\) this dataset does not have"):
        segment_items(items, str(own))
    with pytest.raises(UserError, match="no segments table"):
        segment_items(items, str(tmp_path / "nowhere"))
