"""Extractor outputs equal the reference implementations, batched or not."""

from __future__ import annotations

import pickle
from pathlib import Path

import librosa
import numpy as np
import opensmile
import pandas as pd
import pytest
import soundfile
import torch
import torchaudio
from torchaudio.compliance import kaldi

from audio_models.audio.kaldi import KaldiExtractor
from audio_models.audio.smile import OpenSmileExtractor
from audio_models.utils.errors import ExtractionError
from benchmarks.reliability import voice
from runners.extract import extract


def _upstream_extract_feature(file_name: str) -> np.ndarray:
    """utils.extract_feature of x4nth055/emotion-recognition-using-speech, all parts on."""
    with soundfile.SoundFile(file_name) as sound_file:
        X = sound_file.read(dtype="float32")
        sample_rate = sound_file.samplerate
        stft = np.abs(librosa.stft(X))
        result = np.array([])
        mfccs = np.mean(librosa.feature.mfcc(y=X, sr=sample_rate, n_mfcc=40).T, axis=0)
        result = np.hstack((result, mfccs))
        chroma = np.mean(librosa.feature.chroma_stft(S=stft, sr=sample_rate).T, axis=0)
        result = np.hstack((result, chroma))
        mel = np.mean(librosa.feature.melspectrogram(y=X, sr=sample_rate).T, axis=0)
        result = np.hstack((result, mel))
        contrast = np.mean(librosa.feature.spectral_contrast(S=stft, sr=sample_rate).T, axis=0)
        result = np.hstack((result, contrast))
        tonnetz = np.mean(
            librosa.feature.tonnetz(y=librosa.effects.harmonic(X), sr=sample_rate).T, axis=0
        )
        result = np.hstack((result, tonnetz))
    return result


def _speech_files(speech_dir: Path) -> list[str]:
    return [
        "harvard/spk1_snt1.wav",
        "harvard/spk2_snt3.wav",
        "emodb-subset/wav/03a01Fa.wav",
        "emodb-subset/wav/08a02Tb.wav",
        "opensmile-test/test.wav",
    ]


@pytest.mark.parametrize(
    ("name", "feature_set", "level"),
    [
        ("egemaps", "eGeMAPSv02", "Functionals"),
        ("compare", "ComParE_2016", "Functionals"),
        ("egemaps_lld", "eGeMAPSv02", "LowLevelDescriptors"),
    ],
)
def test_opensmile_equals_process_file(
    make_cfg, speech_dir: Path, name: str, feature_set: str, level: str
) -> None:
    files = _speech_files(speech_dir)
    cfg = make_cfg(
        f"extractor={name}",
        "dataset=folder",
        f"dataset.root={speech_dir}",
        f"dataset.pattern=[{','.join(files)}]",
    )
    result = extract(cfg)
    table = pd.read_parquet(result.output_dir / "features.parquet").set_index("id")
    assert sorted(table.index) == sorted(files)
    smile = opensmile.Smile(
        feature_set=opensmile.FeatureSet[feature_set], feature_level=opensmile.FeatureLevel[level]
    )
    for rel in files:
        reference = smile.process_file(str(speech_dir / rel))
        if level == "Functionals":
            ours = table.loc[rel, smile.feature_names].to_numpy(dtype=reference.dtypes.iloc[0])
            np.testing.assert_array_equal(ours, reference.to_numpy()[0])
        else:
            row = table.loc[rel]
            shard = pd.read_parquet(result.output_dir / row["shard"])
            frames = shard.iloc[row["offset"] : row["offset"] + row["n_frames"]]
            assert (frames["id"] == rel).all()
            np.testing.assert_array_equal(
                frames[smile.feature_names].to_numpy(), reference.to_numpy()
            )
            assert row["frame_shift_s"] == pytest.approx(0.01)


def test_librosa_equals_upstream_extract_feature(make_cfg, speech_dir: Path) -> None:
    files = _speech_files(speech_dir)[1:4]  # 16 kHz and 22.05 kHz files
    cfg = make_cfg(
        "extractor=librosa",
        "dataset=folder",
        f"dataset.root={speech_dir}",
        f"dataset.pattern=[{','.join(files)}]",
    )
    result = extract(cfg)
    table = pd.read_parquet(result.output_dir / "features.parquet").set_index("id")
    names = [
        c
        for c in table.columns
        if c.split("_")[0] in {"mfcc", "chroma", "mel", "contrast", "tonnetz"}
    ]
    assert len(names) == 193
    for rel in files:
        np.testing.assert_allclose(
            table.loc[rel, names].to_numpy(float),
            _upstream_extract_feature(str(speech_dir / rel)),
            rtol=1e-12,
            atol=1e-12,
        )


def _kaldi_reference(path: Path, **options: float) -> torch.Tensor:
    waveform, sr = torchaudio.load(str(path))
    waveform = torchaudio.functional.resample(waveform.mean(0, keepdim=True), sr, 16000)
    return kaldi.fbank(waveform * 32768.0, sample_frequency=16000, **options)


@pytest.mark.parametrize(
    "rel", ["emodb-subset/wav/03a02Nc.wav", "opensmile-test/test.wav", "harvard/spk1_snt2.wav"]
)
def test_fbank_resamples_shared_files_like_torchaudio(make_cfg, speech_dir: Path, rel: str) -> None:
    """22.05 kHz and 44.1 kHz recordings reach the torch extractor correctly resampled."""
    cfg = make_cfg(
        "extractor=fbank",
        "dataset=folder",
        f"dataset.root={speech_dir}",
        f"dataset.pattern=[{rel}]",
    )
    result = extract(cfg)
    row = pd.read_parquet(result.output_dir / "features.parquet").iloc[0]
    assert row["sample_rate"] == 16000
    assert row["source_sample_rate"] == soundfile.info(str(speech_dir / rel)).samplerate
    frames = pd.read_parquet(result.output_dir / row["shard"]).iloc[
        row["offset"] : row["offset"] + row["n_frames"]
    ]
    reference = _kaldi_reference(speech_dir / rel, num_mel_bins=80)
    ours = frames[[f"fbank_{i}" for i in range(80)]].to_numpy()
    assert ours.shape == tuple(reference.shape)
    np.testing.assert_allclose(ours, reference.numpy(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    ("options", "reference"),
    [
        ({"num_mel_bins": 80}, lambda w: kaldi.fbank(w, num_mel_bins=80)),
        (
            {"num_mel_bins": 40, "use_energy": True, "window_type": "hamming"},
            lambda w: kaldi.fbank(w, num_mel_bins=40, use_energy=True, window_type="hamming"),
        ),
        # torchaudio's MFCC defaults (23 bins); KaldiExtractor's are KaldiConfig's (80).
        ({"num_ceps": 13, "num_mel_bins": 23}, lambda w: kaldi.mfcc(w)),
        (
            {"num_ceps": 20, "num_mel_bins": 40, "use_energy": True, "raw_energy": False},
            lambda w: kaldi.mfcc(
                w, num_ceps=20, num_mel_bins=40, use_energy=True, raw_energy=False
            ),
        ),
    ],
)
def test_batched_kaldi_equals_torchaudio_per_item(options: dict, reference) -> None:
    generator = torch.Generator().manual_seed(0)
    lengths = [16000, 7999, 12345, 400, 401]
    waveforms = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        waveforms[i, :n] = torch.randn(n, generator=generator) * 3000.0
    extractor = KaldiExtractor(name="k", waveform_scale=1.0, **options)
    batched = extractor.forward(waveforms, torch.tensor(lengths))
    for i, n in enumerate(lengths):
        expected = reference(waveforms[i : i + 1, :n])
        alone = extractor.forward(waveforms[i : i + 1, :n], torch.tensor([n]))[0]
        assert batched[i].shape == expected.shape
        torch.testing.assert_close(batched[i], expected, rtol=1e-5, atol=1e-4)
        # Only float32 summation order differs between batch shapes.
        torch.testing.assert_close(batched[i], alone, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    ("feature_set", "level"),
    [
        ("eGeMAPSv02", "Functionals"),
        ("eGeMAPSv02", "LowLevelDescriptors"),
        ("ComParE_2016", "Functionals"),
    ],
)
def test_reused_opensmile_instance_equals_a_fresh_one(feature_set: str, level: str) -> None:
    # The extractor resets one openSMILE instance per sample rate between items; interleaved
    # rates, a clip too short for any frame and a pickled copy must not change a number.
    rng = np.random.default_rng(0)
    signals = []
    for rate, seconds in [(16000, 1.3), (22050, 0.8), (16000, 0.01), (44100, 1.1), (16000, 2.0)]:
        wave = voice(seconds, f0=rng.uniform(100, 250), sr=rate)
        signals.append(((wave + 0.01 * rng.standard_normal(wave.size)).astype(np.float32), rate))
    extractor = OpenSmileExtractor(name="x", feature_set=feature_set, feature_level=level)
    fresh = opensmile.Smile(
        feature_set=opensmile.FeatureSet[feature_set], feature_level=opensmile.FeatureLevel[level]
    )
    for copy in (extractor, pickle.loads(pickle.dumps(extractor))):
        for signal, rate in signals * 2:
            if signal.size < rate * 0.1:
                with pytest.raises(ExtractionError, match="too short") as caught:
                    copy.transform(signal, rate)
                assert caught.value.stage == "preflight"
                continue
            reference = fresh.process_signal(signal, rate).to_numpy()
            ours = copy.transform(signal, rate)
            np.testing.assert_array_equal(ours.reshape(reference.shape), reference)
        assert sorted(copy._engines) == [16000, 22050, 44100]


def test_fbank_process_signal_equals_forward() -> None:
    """process_signal finds the device of a module with buffers only (Kaldi's filterbanks)."""
    import audio_models as am

    signal = voice(0.8, 140, 16000)
    extractor = am.load_extractor("fbank")
    alone = extractor.process_signal(signal, 16000)
    x = torch.from_numpy(signal)[None] * 1.0
    expected = extractor.forward(x, torch.tensor([signal.shape[0]]))[0].numpy()
    np.testing.assert_array_equal(alone, expected)


def test_opensmile_aliases_keep_their_canonical_provenance() -> None:
    """GeMAPSv01a is openSMILE's alias of GeMAPS: the tags (and so the settings hash of
    earlier outputs, which a resume checks) name the canonical set."""
    extractor = OpenSmileExtractor(name="x", feature_set="GeMAPSv01a")
    assert extractor.provenance()["opensmile.feature_set"] == "GeMAPS"
