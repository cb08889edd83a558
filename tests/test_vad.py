"""extractor=vad: Silero VAD (the real pretrained model bundled in faster-whisper) against
faster-whisper's own ``get_speech_timestamps``, and its outputs through the runner;
extractor=vad_pyannote: whisperX's bundled pyannote model against whisperX's own VAD."""

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
from audio_models.speech.vad import SEGMENT_SCHEMA, PyannoteVadExtractor, SileroVadExtractor
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


# -- extractor=vad_pyannote -------------------------------------------------------------------

# Our options and whisperX's Binarize keywords: its defaults (chunk_size 30 s), short
# segments cut, other thresholds with a minimum length, and gaps bridged (no maximum then).
PYANNOTE_OPTIONS: list[tuple[dict[str, Any], dict[str, Any]]] = [
    ({}, {"max_duration": 30.0}),
    ({"max_speech_s": 1.5}, {"max_duration": 1.5}),
    (
        {"onset": 0.7, "offset": 0.4, "min_speech_s": 0.3},
        {"onset": 0.7, "offset": 0.4, "min_duration_on": 0.3, "max_duration": 30.0},
    ),
    (
        {"min_silence_s": 0.3, "min_speech_s": 0.2, "max_speech_s": None},
        {"min_duration_off": 0.3, "min_duration_on": 0.2},
    ),
]


def _whisperx_binarize(scores: Any, options: dict[str, Any]) -> list[tuple[float, float]]:
    """The speech regions whisperX's ``merge_chunks`` makes before merging them into chunks
    (its ``Binarize``, onset 0.5 and offset 0.363 unless given)."""
    from whisperx.vads.pyannote import Binarize

    options = {"onset": 0.5, "offset": 0.363, **options}
    return [(s.start, s.end) for s in Binarize(**options)(scores).get_timeline()]


@pytest.fixture(scope="module")
def pyannote() -> Any:
    """The extractor, loaded once (reading the checkpoint and importing pyannote.audio)."""
    extractor = PyannoteVadExtractor(window_batch=7)
    extractor.load()
    return extractor


@pytest.fixture(scope="module")
def whisperx_vad() -> Any:
    """whisperX's own pyannote VAD pipeline on the CPU (its telemetry off: no network)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYANNOTE_METRICS_ENABLED", "false")
        from whisperx.vads.pyannote import load_vad_model

        pipeline = load_vad_model("cpu")

        def scores(signal: np.ndarray) -> Any:
            import torch

            return pipeline({"waveform": torch.from_numpy(signal)[None], "sample_rate": SR})

        yield scores


def _speech_signals(speech_dir: Path) -> dict[str, np.ndarray]:
    """Every recording at 16 kHz, and the Harvard sentences one after another (0.5 s of
    silence after each: a signal of many windows, long enough to split)."""
    files = sorted(speech_dir.glob("**/*.wav"))
    assert files
    signals = {
        str(p.relative_to(speech_dir)): decode(str(p), target_sample_rate=SR).signal for p in files
    }
    harvard = [s for name, s in signals.items() if name.startswith("harvard/")]
    pause = np.zeros(SR // 2, dtype=np.float32)
    signals["harvard-joined"] = np.concatenate([np.concatenate([s, pause]) for s in harvard])
    return signals


def _padded(signals: list[np.ndarray]) -> tuple[Any, Any]:
    import torch

    lengths = torch.tensor([s.size for s in signals])
    batch = torch.zeros(len(signals), int(lengths.max()))
    for row, signal in enumerate(signals):
        batch[row, : signal.size] = torch.from_numpy(signal)
    return batch, lengths


def test_pyannote_equals_whisperx_on_real_speech(
    speech_dir: Path, pyannote: PyannoteVadExtractor, whisperx_vad: Any
) -> None:
    """All recordings in one batch (their windows 7 to a forward, so forwards straddle
    items): the frame scores equal whisperX's pipeline's to float32 rounding, and the
    segments, for each set of options, equal whisperX's binarizer's on whisperX's scores."""
    signals = _speech_signals(speech_dir)
    windows = pyannote.window_scores(*_padded(list(signals.values())))
    totals = dict.fromkeys(range(len(PYANNOTE_OPTIONS)), 0)
    for (name, signal), own in zip(signals.items(), windows, strict=True):
        reference = whisperx_vad(signal)
        scores, times = pyannote.frame_scores(own, signal.size)
        frames = reference.sliding_window
        assert times.tolist() == [frames[i].middle for i in range(len(reference))], name
        np.testing.assert_allclose(scores, reference.data[:, 0], rtol=0, atol=1e-6, err_msg=name)
        for k, (ours, theirs) in enumerate(PYANNOTE_OPTIONS):
            extractor = PyannoteVadExtractor(**ours)
            spans = extractor.spans(scores, times)
            found = [(times[s.first], times[s.last]) for s in spans]
            assert found == _whisperx_binarize(reference, theirs), (name, ours)
            totals[k] += len(found)
            if not ours:  # whisperX's defaults: every recording holds speech
                assert found, name
    # The 30-s default splits nothing here, 1.5 s splits the sentences.
    assert totals[1] > totals[0] >= len(signals)
    # The sentences are spoken nearly throughout: the segments cover most of each.
    joined = signals["harvard-joined"]
    found = pyannote._segments(windows[-1], joined.size)  # whisperX's defaults
    speech = sum(end - start for start, end, _ in found)
    assert 0.6 < speech / (joined.size / SR) < 1.0
    assert all(0.363 < confidence <= 1.0 for _, _, confidence in found)


def test_pyannote_batched_equals_one_by_one(
    speech_dir: Path, pyannote: PyannoteVadExtractor
) -> None:
    import torch

    signals = list(_speech_signals(speech_dir).values())
    chosen = [signals[0], signals[-1], signals[-2]]  # 2 s, 28 s, 5.25 s: 1, 47 and 2 windows
    batched = pyannote.forward(*_padded(chosen))
    for signal, out in zip(chosen, batched, strict=True):
        alone = pyannote.forward(torch.from_numpy(signal)[None], torch.tensor([signal.size]))[0]
        assert out.extra == alone.extra
        assert torch.equal(out.values, alone.values)
        assert out.values[1] == len(out.extra["segments"]["start"]) > 0


def test_pyannote_silence_and_noise_give_no_speech(
    pyannote: PyannoteVadExtractor, whisperx_vad: Any
) -> None:
    rng = np.random.default_rng(0)
    t = np.arange(3 * SR) / SR
    for name, signal in {
        "silence": np.zeros(3 * SR),
        "white noise": 0.3 * rng.standard_normal(3 * SR),
        "quiet noise": 1e-4 * rng.standard_normal(7 * SR),  # two windows
        "tone": 0.5 * np.sin(2 * np.pi * 440 * t),
    }.items():
        signal = signal.astype(np.float32)
        assert pyannote.segments(signal) == [], name
        assert _whisperx_binarize(whisperx_vad(signal), {"max_duration": 30.0}) == [], name
        out = pyannote.process_signal(signal, SR)
        assert out.values.tolist() == [0.0, 0.0, 0.0]
        assert out.extra["segments"]["start"] == []


@pytest.mark.parametrize("options", PYANNOTE_OPTIONS, ids=range(len(PYANNOTE_OPTIONS)))
def test_pyannote_binarize_equals_whisperx_on_made_up_scores(
    options: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    """The binarizer alone (no model) on smoothed random scores that cross the thresholds
    often: starting in speech or not, thresholds hit exactly, segments of one frame."""
    from pyannote.core import SlidingWindow, SlidingWindowFeature

    ours, theirs = options
    extractor = PyannoteVadExtractor(**ours)
    frames = SlidingWindow(start=0.0, duration=0.0619375, step=0.016875)
    rng = np.random.default_rng(len(ours))
    for trial in range(20):
        n = int(rng.integers(1, 400))
        raw = np.convolve(rng.random(n + 8), np.ones(9) / 9, mode="valid")
        scores = np.clip((raw - 0.5) * 4 + 0.5, 0, 1).astype(np.float32)
        scores[rng.integers(0, n, size=3)] = np.float32(extractor.offset)
        reference = SlidingWindowFeature(scores[:, None].copy(), frames)
        starts = frames.start + np.arange(n) * frames.step
        times = 0.5 * (starts + (starts + frames.duration))
        found = [(times[s.first], times[s.last]) for s in extractor.spans(scores, times)]
        assert found == _whisperx_binarize(reference, theirs), trial


def test_pyannote_option_instantiates_and_describes_itself() -> None:
    from hydra.utils import instantiate

    from audio_models.speech.vad import PyannoteVadConfig

    cfg = compose_extract(["extractor=vad_pyannote", "extractor.onset=0.6", "output_dir=x"])
    extractor = instantiate(cfg.extractor)
    assert isinstance(extractor, PyannoteVadExtractor) and extractor.name == "vad_pyannote"
    assert extractor.onset == 0.6 and extractor._model is None  # nothing read yet
    assert extractor.feature_names == ["speech_ratio", "n_segments", "speech_s"]
    assert extractor.side_tables == {"segments": SEGMENT_SCHEMA}
    assert extractor.sample_rate == SR
    # whisperX's defaults: load_model's vad_onset/vad_offset/chunk_size.
    defaults = PyannoteVadConfig()
    assert (defaults.onset, defaults.offset, defaults.max_speech_s) == (0.5, 0.363, 30.0)
    tags = extractor.provenance()
    digest = hashlib.sha256(extractor.path.read_bytes()).hexdigest()
    assert tags["vad.model_sha256"] == digest
    assert tags["vad.model"] == "whisperx/assets/pytorch_model.bin"
    assert tags["whisperx.version"] and tags["pyannote.audio.version"]


def test_pyannote_weights_load_with_weights_only(
    pyannote: PyannoteVadExtractor, tmp_path: Path
) -> None:
    """The weights equal those whisperX loads (with weights_only=False); the file is read by
    torch's restricted unpickler, which refuses a checkpoint naming anything else."""
    import torch
    from whisperx.vads.pyannote import load_vad_model

    from audio_models.speech.vad import _Inert, read_pyannote_checkpoint

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYANNOTE_METRICS_ENABLED", "false")
        theirs = load_vad_model("cpu")._segmentation.model.state_dict()
    ours = pyannote.torch_module().state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    checkpoint = read_pyannote_checkpoint(pyannote.path)
    assert isinstance(checkpoint["pyannote.audio"]["specifications"], _Inert)
    hostile = tmp_path / "hostile.bin"
    torch.save({"state_dict": {}, "run": print}, hostile)  # a callable: code a pickle could run
    with pytest.raises(pickle.UnpicklingError):
        read_pyannote_checkpoint(hostile)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"onset": 1.0}, "onset"),
        ({"offset": 0.6}, "offset"),
        ({"min_speech_s": -1.0}, "min_speech_s"),
        ({"min_silence_s": 0.1}, "max_speech_s=null"),
        ({"max_speech_s": 0.0}, "max_speech_s"),
        ({"window_batch": 0}, "window_batch"),
    ],
)
def test_pyannote_bad_options_are_user_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=message):
        PyannoteVadExtractor(**kwargs)


def test_pyannote_runner_writes_summary_and_offset_segments(make_cfg, tmp_path: Path) -> None:
    manifest, signal = _manifest(tmp_path / "data")
    overrides = ["extractor=vad_pyannote", "dataset=manifest", f"dataset.path={manifest}"]
    result = extract(make_cfg(*overrides, "dataset.id_column=id", "extractor.max_speech_s=2"))
    out = result.output_dir
    features = pd.read_parquet(out / "features.parquet").set_index("id")
    segments = pd.read_parquet(out / "segments.parquet")
    assert pd.read_parquet(out / "failures.parquet").empty
    assert segments.columns.tolist() == SEGMENT_SCHEMA.names
    assert result.tags["provenance.vad.model_sha256"]
    extractor = PyannoteVadExtractor(max_speech_s=2.0)
    for item_id, offset in (("whole", 0.0), ("part", 1.5)):
        found = extractor.segments(signal[int(offset * SR) :])
        rows = segments[segments["id"] == item_id].sort_values("segment")
        assert len(rows) == len(found) == features.loc[item_id, "n_segments"]
        # Seconds from the recording's start: the segment's offset is added.
        assert np.allclose(rows["start"], [offset + start for start, _, _ in found])
        assert np.allclose(rows["end"], [offset + end for _, end, _ in found])
        assert np.allclose(rows["confidence"], [c for _, _, c in found])
        speech_s = float((rows["end"] - rows["start"]).sum())
        assert features.loc[item_id, "speech_s"] == pytest.approx(speech_s, rel=1e-6)
        duration = features.loc[item_id, "duration_s"]
        assert features.loc[item_id, "speech_ratio"] == pytest.approx(speech_s / duration, 1e-6)
