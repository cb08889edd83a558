"""The loader's signal path: decoding formats, channel policy, segments, resampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from audio_models.audio.io import decode, resample
from audio_models.utils.errors import ExtractionError


def _tone(freq: float, sr: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize(
    ("fmt", "subtype", "atol"),
    [
        ("WAV", "PCM_16", 1e-4),
        ("FLAC", "PCM_16", 1e-4),
        ("OGG", "VORBIS", 0.05),
        ("MP3", "MPEG_LAYER_III", 0.1),
    ],
)
def test_formats_decode(tmp_path: Path, fmt: str, subtype: str, atol: float) -> None:
    signal = _tone(440.0, 16000, 1.0)
    path = tmp_path / f"tone.{fmt.lower()}"
    sf.write(path, signal, 16000, format=fmt, subtype=subtype)
    decoded = decode(str(path))
    assert decoded.sample_rate == 16000
    assert decoded.signal.dtype == np.float32
    # Lossy codecs add encoder delay: compare the RMS, not the samples.
    n = min(len(signal), len(decoded.signal))
    assert abs(np.sqrt(np.mean(decoded.signal[:n] ** 2)) - np.sqrt(np.mean(signal[:n] ** 2))) < atol


def test_channel_policy_and_segment(tmp_path: Path) -> None:
    left, right = _tone(300.0, 8000, 2.0), _tone(500.0, 8000, 2.0, amp=0.25)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 8000, subtype="FLOAT")
    mean = decode(str(path), channel_policy="mean")
    first = decode(str(path), channel_policy="first")
    assert mean.n_channels == 2
    np.testing.assert_allclose(mean.signal, (left + right) / 2, atol=1e-7)
    np.testing.assert_array_equal(first.signal, left)
    part = decode(str(path), start=0.5, end=1.25, channel_policy="first")
    np.testing.assert_array_equal(part.signal, left[4000:10000])
    assert (part.start, part.end, part.duration_s) == (0.5, 1.25, 0.75)


def test_bad_segments_and_files(tmp_path: Path) -> None:
    path = tmp_path / "one_second.wav"
    sf.write(path, _tone(200.0, 16000, 1.0), 16000)
    with pytest.raises(ExtractionError) as info:
        decode(str(path), start=1.5, end=2.0)
    assert info.value.stage == "segment"
    with pytest.raises(ExtractionError) as info:
        decode(str(path), start=0.5, end=0.2)
    assert info.value.stage == "segment"
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF\x00\x00not really a wave file" * 10)
    with pytest.raises(ExtractionError) as info:
        decode(str(junk))
    assert info.value.stage == "decode"


@pytest.mark.parametrize("orig_sr", [22050, 44100, 48000, 8000])
def test_resampling_keeps_frequency_and_level(orig_sr: int) -> None:
    tone = _tone(1000.0, orig_sr, 2.0)
    out = resample(tone, orig_sr, 16000)
    assert abs(len(out) - 32000) <= 1
    spectrum = np.abs(np.fft.rfft(out[2000:-2000] * np.hanning(len(out) - 4000)))
    peak_hz = np.argmax(spectrum) * 16000 / (len(out) - 4000)
    assert abs(peak_hz - 1000.0) < 2.0
    rms = np.sqrt(np.mean(out[2000:-2000] ** 2))
    assert abs(rms - 0.5 / np.sqrt(2)) < 0.005


def test_garbage_after_a_valid_mp3_header_is_a_failure(tmp_path: Path) -> None:
    clip = (0.3 * np.sin(np.arange(48000) / 10)).astype(np.float32)
    good = tmp_path / "good.mp3"
    sf.write(good, clip, 16000, format="MP3")
    assert decode(str(good)).signal.shape[0] == 48000  # a whole MP3 decodes in full
    # A valid header followed by too little audio: the decoder stopped early without an
    # error (this decoded 18479 of 48000 samples as a "good" row).
    broken = tmp_path / "broken.mp3"
    broken.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(ExtractionError, match=r"\d+ of the 48000 frames the header") as info:
        decode(str(broken))
    assert info.value.stage == "decode"
    broken.write_bytes(good.read_bytes()[:2000] + b"garbage " * 500)  # the decoder's own error
    with pytest.raises(ExtractionError) as info:
        decode(str(broken))
    assert info.value.stage == "decode"
