"""Voice activity detection: Silero VAD speech segments per item, with onnxruntime.

The model is the Silero VAD ONNX file that ships inside the installed faster-whisper package
(``faster_whisper/assets/*.onnx``): no download, no network. It scores 32 ms windows (512
samples at 16 kHz), each given the last 64 samples of the window before it, with a recurrent
state carried from window to window. The probabilities become segments the way
``faster_whisper.vad.get_speech_timestamps`` makes them (same thresholds, same minimum
durations, same padding), so the segments equal faster-whisper's on the same audio and
options (tested), and whisperX/faster-whisper users get the boundaries they already know.

Per item the main table gets ``speech_ratio``, ``n_segments`` and ``speech_s`` (of the padded
segments); ``segments.parquet`` gets one row per segment: ``id``, ``segment``, ``start``,
``end`` (seconds from the recording's start) and ``confidence`` (the mean speech probability
of the segment's windows before padding).

The work is per item on the CPU, in the loader workers: each worker runs its own onnxruntime
session with one thread, so workers, not threads, give the parallelism.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from audio_models.extractor import Extractor, Output, OutputKind, Placement
from audio_models.registry import register_extractor
from audio_models.utils.errors import UserError
from audio_models.utils.provenance import sha256_file

#: The rate the bundled model was trained for (its window and context sizes are for 16 kHz).
SAMPLE_RATE = 16000
WINDOW = 512  # samples the model scores at once (32 ms)
CONTEXT = 64  # samples of the previous window prepended to each window
#: Windows per onnxruntime call (as faster-whisper: the state carries across calls, so this
#: only bounds memory; kept equal so the float results are the same).
_CALL_WINDOWS = 10000
#: A pause inside speech at least this long (98 ms) is where an over-long segment is split.
_SPLIT_PAUSE = SAMPLE_RATE * 98 // 1000

FEATURES = ["speech_ratio", "n_segments", "speech_s"]
SEGMENT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("segment", pa.int32()),
        ("start", pa.float64()),
        ("end", pa.float64()),
        ("confidence", pa.float64()),
    ]
)


def model_path() -> Path:
    """The Silero VAD ONNX file bundled with the installed faster-whisper (found without
    importing faster-whisper, which would load CTranslate2: ~0.8 s per process).

    Raises:
        UserError: faster-whisper is not installed, or ships no (or more than one) model.
    """
    spec = importlib.util.find_spec("faster_whisper")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "extractor=vad needs faster-whisper (its package holds the Silero VAD model)"
        )
    assets = Path(next(iter(spec.submodule_search_locations))) / "assets"
    found = sorted(assets.glob("*.onnx"))
    if len(found) != 1:
        raise UserError(
            f"expected one Silero VAD .onnx file in {assets}, found {[p.name for p in found]} "
            "(a faster-whisper version this code does not know)"
        )
    return found[0]


@dataclass(frozen=True)
class SpeechSpan:
    """One detected segment, in samples at 16 kHz from the start of the signal."""

    start: int
    end: int
    confidence: float  # mean speech probability of the windows before padding


@dataclass
class VadConfig:
    """Silero VAD (faster-whisper's bundled ONNX model); defaults are faster-whisper's
    ``VadOptions`` (its ``*_ms`` options here in seconds)."""

    _target_: str = "audio_models.speech.vad.SileroVadExtractor"
    name: str = "vad"
    threshold: float = 0.5  # a window at or above this probability starts speech
    neg_threshold: float | None = None  # below this speech ends; None: max(threshold-0.15, 0.01)
    min_speech_s: float = 0.0  # shorter segments are dropped
    min_silence_s: float = 2.0  # silence this long ends a segment
    speech_pad_s: float = 0.4  # added on each side of a segment
    max_speech_s: float | None = None  # longer segments are split; None: no limit


@register_extractor("vad", config=VadConfig)
class SileroVadExtractor(Extractor):
    """Silero VAD speech segments and their summary per item.

    Durations are rounded to whole samples at 16 kHz; the defaults are faster-whisper's
    ``VadOptions`` (``min_speech_duration_ms=0``, ``min_silence_duration_ms=2000``,
    ``speech_pad_ms=400``, no maximum).

    Args:
        name: the extractor's registered name.
        threshold: a window whose speech probability is at least this starts speech.
        neg_threshold: a window below this (inside speech) starts a silence; between the two
            thresholds speech goes on. ``None``: ``max(threshold - 0.15, 0.01)``.
        min_speech_s: segments not longer than this are dropped.
        min_silence_s: a silence this long ends a segment (shorter ones stay inside it).
        speech_pad_s: seconds added on each side of a segment; where two segments are closer
            than twice this, each gets half of the gap.
        max_speech_s: longer segments are split at the last pause of at least 98 ms, else
            cut just before this length. ``None``: no limit.

    Raises:
        UserError: an option out of range, or no model found.
    """

    kind = OutputKind.VECTOR
    placement = Placement.WORKER

    def __init__(
        self,
        *,
        name: str = "vad",
        threshold: float = 0.5,
        neg_threshold: float | None = None,
        min_speech_s: float = 0.0,
        min_silence_s: float = 2.0,
        speech_pad_s: float = 0.4,
        max_speech_s: float | None = None,
    ) -> None:
        super().__init__(name=name, sample_rate=SAMPLE_RATE)
        if not 0.0 < threshold <= 1.0:
            raise UserError(f"extractor.threshold must be in (0, 1], got {threshold}")
        if neg_threshold is None:
            neg_threshold = max(threshold - 0.15, 0.01)
        if not 0.0 <= neg_threshold <= threshold:
            raise UserError(
                f"extractor.neg_threshold must be in [0, threshold={threshold}], "
                f"got {neg_threshold}"
            )
        for key, value in (
            ("min_speech_s", min_speech_s),
            ("min_silence_s", min_silence_s),
            ("speech_pad_s", speech_pad_s),
        ):
            if value < 0:
                raise UserError(f"extractor.{key} must be >= 0, got {value}")
        if max_speech_s is not None and max_speech_s <= 0:
            raise UserError(f"extractor.max_speech_s must be > 0 or null, got {max_speech_s}")
        self.threshold = threshold
        self.neg_threshold = neg_threshold
        self.min_speech = round(min_speech_s * SAMPLE_RATE)
        self.min_silence = round(min_silence_s * SAMPLE_RATE)
        self.pad = round(speech_pad_s * SAMPLE_RATE)
        # A segment may grow to this before it is split: the limit less one window and the
        # padding both sides will add (faster-whisper's budget).
        self.max_speech = (
            math.inf
            if max_speech_s is None
            else round(max_speech_s * SAMPLE_RATE) - WINDOW - 2 * self.pad
        )
        self.path = model_path()
        # Hashed here (1.2 MB): describing the extractor names the exact weights, and a
        # missing file is an error before any work.
        self._sha256 = sha256_file(self.path)
        self._session: Any = None
        self._session_pid = os.getpid()

    @property
    def feature_names(self) -> list[str]:
        return list(FEATURES)

    @property
    def side_tables(self) -> dict[str, pa.Schema]:
        return {"segments": SEGMENT_SCHEMA}

    def provenance(self) -> dict[str, str]:
        import onnxruntime  # its version, whichever distribution (-gpu, say) installed it

        return {
            "vad.model": self.path.name,
            "vad.model_sha256": self._sha256,
            "faster_whisper.version": importlib.metadata.version("faster-whisper"),
            "onnxruntime.version": onnxruntime.__version__,
        }

    # -- the model ------------------------------------------------------------------------
    def _model(self) -> Any:
        if self._session is None or self._session_pid != os.getpid():
            # One session per process, one thread each: a forked worker builds its own rather
            # than share its parent's native state, and the loader's workers are the
            # parallelism (threads per worker would only compete for the same cores).
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            options.log_severity_level = 4  # its warnings about unused initialisers are noise
            self._session = onnxruntime.InferenceSession(
                str(self.path), sess_options=options, providers=["CPUExecutionProvider"]
            )
            self._session_pid = os.getpid()
        return self._session

    def probabilities(self, signal: np.ndarray) -> np.ndarray:
        """Speech probability of each 512-sample window of a 16 kHz mono signal.

        The signal is zero-padded to whole windows, always by at least one sample (a
        length that is a multiple of 512 gets a window of zeros), as faster-whisper pads it.
        """
        n = signal.shape[0]
        windows = np.zeros((n // WINDOW + 1, WINDOW), dtype=np.float32)
        windows.reshape(-1)[:n] = signal
        context = np.zeros((windows.shape[0], CONTEXT), dtype=np.float32)
        context[1:] = windows[:-1, -CONTEXT:]
        # faster-whisper's model wrapper zeroes the last 64 samples of the final window too
        # (it builds the context through a view of the audio); done here so the
        # probabilities, and the segments, equal its own. It matters only when the signal
        # ends in those samples (length mod 512 above 448).
        windows[-1, -CONTEXT:] = 0.0
        inputs = np.concatenate([context, windows], axis=1)
        session = self._model()
        h = np.zeros((1, 1, 128), dtype=np.float32)
        c = np.zeros((1, 1, 128), dtype=np.float32)
        out = []
        for first in range(0, inputs.shape[0], _CALL_WINDOWS):
            probs, h, c = session.run(
                None, {"input": inputs[first : first + _CALL_WINDOWS], "h": h, "c": c}
            )
            out.append(np.asarray(probs, dtype=np.float32).reshape(-1))
        return np.concatenate(out)

    # -- probabilities to segments --------------------------------------------------------
    def spans(self, probs: np.ndarray, n_samples: int) -> list[SpeechSpan]:
        """Segments of a signal of ``n_samples`` from its window probabilities.

        Speech starts at the first window at or above ``threshold``. Inside speech, a run of
        windows below ``neg_threshold`` that lasts ``min_silence`` ends the segment where the
        run began; a window at or above ``threshold`` cancels the run. A segment that would
        outgrow ``max_speech`` is closed at its last pause of 98 ms or more (speech resumes
        where it came back), or cut at the current window when it had none.
        """
        cores: list[tuple[int, int]] = []
        start: int | None = None  # where the open segment began (None: outside speech)
        silence_from = 0  # where the current run of low windows began (0: no run)
        pause_end = 0  # where the latest pause of >= 98 ms began (0: none yet)
        resume_at = 0  # where speech came back after that pause
        for index, prob in enumerate(probs.tolist()):
            at = index * WINDOW
            speech = prob >= self.threshold
            if start is None:
                if speech:
                    start = at
                continue
            if speech and silence_from:
                silence_from = 0
                if resume_at < pause_end:
                    resume_at = at
            if at - start > self.max_speech:
                if pause_end:
                    cores.append((start, pause_end))
                    # Still in speech when it came back after the pause: go on from there.
                    start = resume_at if resume_at >= pause_end else None
                    silence_from = pause_end = resume_at = 0
                    if start is None:
                        continue
                else:
                    cores.append((start, at))
                    start, silence_from, pause_end, resume_at = None, 0, 0, 0
                    continue
            if prob < self.neg_threshold:
                if not silence_from:
                    silence_from = at
                if at - silence_from > _SPLIT_PAUSE:
                    pause_end = silence_from
                if at - silence_from >= self.min_silence:
                    if silence_from - start > self.min_speech:
                        cores.append((start, silence_from))
                    start, silence_from, pause_end, resume_at = None, 0, 0, 0
        if start is not None and n_samples - start > self.min_speech:
            cores.append((start, n_samples))
        bounds = self._padded(cores, n_samples)
        return [
            SpeechSpan(
                start=first,
                end=last,
                confidence=float(probs[core[0] // WINDOW : -(-core[1] // WINDOW)].mean()),
            )
            for (first, last), core in zip(bounds, cores, strict=True)
        ]

    def _padded(self, cores: list[tuple[int, int]], n_samples: int) -> list[tuple[int, int]]:
        """Each segment widened by ``pad`` on both sides; a gap narrower than two pads is
        shared half and half, so padded segments never overlap."""
        starts = [start for start, _ in cores]
        ends = [end for _, end in cores]
        if starts:
            starts[0] = max(0, starts[0] - self.pad)
        for k in range(len(cores)):
            if k + 1 == len(cores):
                ends[k] = min(n_samples, ends[k] + self.pad)
                break
            gap = starts[k + 1] - ends[k]
            if gap < 2 * self.pad:
                ends[k] += gap // 2
                starts[k + 1] = max(0, starts[k + 1] - gap // 2)
            else:
                ends[k] = min(n_samples, ends[k] + self.pad)
                starts[k + 1] = max(0, starts[k + 1] - self.pad)
        return list(zip(starts, ends, strict=True))

    def segments(self, signal: np.ndarray) -> list[SpeechSpan]:
        """Speech segments of a 16 kHz mono float signal (samples from its start)."""
        signal = np.asarray(signal, dtype=np.float32).reshape(-1)
        return self.spans(self.probabilities(signal), signal.shape[0])

    def transform(self, signal: np.ndarray, sample_rate: int) -> Output:
        if sample_rate != SAMPLE_RATE:
            # The loader resamples to sample_rate; a caller of transform must as well.
            raise ValueError(f"Silero VAD needs {SAMPLE_RATE} Hz audio, got {sample_rate} Hz")
        spans = self.segments(signal)
        duration = signal.shape[0] / SAMPLE_RATE
        speech = sum(s.end - s.start for s in spans) / SAMPLE_RATE
        values = np.array(
            [speech / duration if duration else 0.0, len(spans), speech], dtype=np.float64
        )
        rows = {
            "segment": list(range(len(spans))),
            "start": [s.start / SAMPLE_RATE for s in spans],
            "end": [s.end / SAMPLE_RATE for s in spans],
            "confidence": [s.confidence for s in spans],
        }
        return Output(values=values, extra={"segments": rows})

    def __getstate__(self) -> dict[str, Any]:
        # An onnxruntime session does not pickle; each worker builds its own on first use.
        state = self.__dict__.copy()
        state["_session"] = None
        return state
