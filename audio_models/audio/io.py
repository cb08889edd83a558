"""Decoding, channel policy, segment selection and resampling: the loader's signal path."""

from __future__ import annotations

import io
import math
import os
import stat
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from audio_models.audio import CHANNEL_POLICIES, ChannelPolicy
from audio_models.utils.errors import ExtractionError

# torchaudio's band-limited sinc resampler with its defaults, spelled out so that the
# run records exactly which filter produced the numbers.
RESAMPLER = "torchaudio.functional.resample(sinc_interp_hann, lowpass_filter_width=6, rolloff=0.99)"


@dataclass
class Decoded:
    """A mono float32 signal ready for an extractor, with where it came from."""

    signal: np.ndarray
    sample_rate: int
    source_sample_rate: int
    n_channels: int
    start: float
    end: float

    @property
    def duration_s(self) -> float:
        return self.end - self.start


# Frames a decoder may legitimately deliver fewer than its header's count: two MPEG audio
# frames (encoder padding estimates); PCM formats are exact.
_FRAME_SLACK = 2 * 1152

_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
}


def check_regular_file(path: str) -> os.stat_result:
    """``os.stat`` of ``path`` (links followed), refusing anything but a regular file: a link
    to ``/dev/zero`` would be read forever and a FIFO blocks in ``open``.

    Raises:
        ExtractionError: stage ``"decode"``; ``OSError`` for a missing file or a link loop.
    """
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        kind = _KINDS.get(stat.S_IFMT(info.st_mode), "not a regular file")
        raise ExtractionError("decode", f"not a regular file: {path} is {kind}")
    return info


def decode(
    path: str,
    *,
    start: float | None = None,
    end: float | None = None,
    channel_policy: ChannelPolicy = "mean",
    target_sample_rate: int | None = None,
    data: bytes | None = None,
) -> Decoded:
    """Read ``[start, end)`` seconds of a WAV/FLAC/OGG/MP3 file as mono float32.

    Args:
        path: the audio file.
        data: the file's bytes, decoded from memory instead of reading ``path`` (audio
            embedded in a table); the same decoder, so the same samples as the file gives.
        start: offset in seconds (``None``: 0).
        end: end in seconds (``None``: the file's end).
        channel_policy: ``"mean"`` averages the channels, ``"first"`` keeps channel 0.
        target_sample_rate: resample to this rate (``None``: keep the file's rate).

    Returns:
        The decoded signal and its metadata.

    Raises:
        ExtractionError: stage ``"decode"`` for unreadable/empty files, ``"segment"`` for a
            segment outside the file.
    """
    if channel_policy not in CHANNEL_POLICIES:
        raise ValueError(
            f"channel_policy must be one of {CHANNEL_POLICIES}, got {channel_policy!r}"
        )
    if data is None:
        try:
            check_regular_file(path)
        except OSError as exc:
            raise ExtractionError("decode", f"cannot read file: {exc}") from exc
    if data is not None and not data:
        raise ExtractionError("decode", "no audio bytes")
    try:
        handle = sf.SoundFile(path if data is None else io.BytesIO(data))
    except Exception as exc:  # libsndfile reports corrupt and non-audio files alike
        if data is not None:  # not "Error opening <_io.BytesIO object at 0x...>: ..."
            reason = getattr(exc, "error_string", None) or str(exc)
            raise ExtractionError("decode", f"cannot read audio bytes: {reason}") from exc
        raise ExtractionError("decode", f"cannot read audio: {exc}") from exc
    with handle:
        sr = int(handle.samplerate)
        total = int(handle.frames)
        if total <= 0:
            raise ExtractionError("decode", "file contains no audio frames")
        file_duration = total / sr
        begin_s = 0.0 if start is None else float(start)
        stop_s = file_duration if end is None else float(end)
        if begin_s < 0 or stop_s <= begin_s:
            raise ExtractionError("segment", f"invalid segment [{begin_s}, {stop_s})")
        if begin_s >= file_duration or stop_s > file_duration + 1.0 / sr:
            raise ExtractionError(
                "segment",
                f"segment [{begin_s:.3f}, {stop_s:.3f}) s lies past the file's end "
                f"({file_duration:.3f} s)",
            )
        first = round(begin_s * sr)
        last = min(total, round(stop_s * sr))
        try:
            if first:
                handle.seek(first)
            data = handle.read(last - first, dtype="float32", always_2d=True)
        except Exception as exc:
            raise ExtractionError("decode", f"cannot decode audio: {exc}") from exc
    if data.shape[0] == 0:
        raise ExtractionError("decode", "decoded no samples")
    if last - first - data.shape[0] > _FRAME_SLACK:
        # The header announced more audio than the decoder could read: a truncated file, or
        # garbage after a valid MP3 header that the decoder gave up on without an error.
        raise ExtractionError(
            "decode",
            f"decoded {data.shape[0]} of the {last - first} frames the header announces "
            "(truncated or corrupt)",
        )
    n_channels = data.shape[1]
    signal = data[:, 0] if channel_policy == "first" or n_channels == 1 else data.mean(axis=1)
    signal = np.ascontiguousarray(signal, dtype=np.float32)
    if not np.all(np.isfinite(signal)):
        raise ExtractionError("decode", "decoded signal contains NaN or infinite samples")
    out_sr = sr
    if target_sample_rate is not None and target_sample_rate != sr:
        signal = resample(signal, sr, target_sample_rate)
        out_sr = target_sample_rate
    return Decoded(
        signal=signal,
        sample_rate=out_sr,
        source_sample_rate=sr,
        n_channels=n_channels,
        start=first / sr,
        end=last / sr,
    )


def resample(signal: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """Resample with :data:`RESAMPLER` (reduced by the rates' gcd, as torchaudio does)."""
    if orig_sr == new_sr:
        return signal
    g = math.gcd(orig_sr, new_sr)
    out = AF.resample(torch.from_numpy(signal), orig_sr // g, new_sr // g)
    return out.numpy().astype(np.float32, copy=False)
