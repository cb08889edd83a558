"""Voice activity detection: speech segments per item, two backends with one output format.

``extractor=vad`` is Silero VAD with onnxruntime (:class:`SileroVadExtractor`);
``extractor=vad_pyannote`` is the pyannote segmentation model that whisperX bundles
(:class:`PyannoteVadExtractor`). They are two registered names rather than one name with a
``backend`` switch: their options differ in kind (Silero's padding and negative threshold,
pyannote's onset/offset hysteresis and whisperX's 30-s split), and they run in different places
(Silero per item in the loader workers, pyannote batched on the device), so each name has its
own schema, which refuses the other's keys. Both write the same tables: per item the main
table gets ``speech_ratio``, ``n_segments`` and ``speech_s``; ``segments.parquet`` gets one
row per segment: ``id``, ``segment``, ``start``, ``end`` (seconds from the recording's start)
and ``confidence`` (a mean speech probability or score, see each class).

Silero VAD: the model is the ONNX file that ships inside the installed faster-whisper package
(``faster_whisper/assets/*.onnx``): no download, no network. It scores 32 ms windows (512
samples at 16 kHz), each given the last 64 samples of the window before it, with a recurrent
state carried from window to window. The probabilities become segments the way
``faster_whisper.vad.get_speech_timestamps`` makes them (same thresholds, same minimum
durations, same padding), so the segments equal faster-whisper's on the same audio and
options (tested), and whisperX/faster-whisper users get the boundaries they already know.
Its ``speech_s`` is of the padded segments, its ``confidence`` the mean speech probability of
a segment's windows before padding. The work is per item on the CPU, in the loader workers:
each worker runs its own onnxruntime session with one thread, so workers, not threads, give
the parallelism.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from audio_models.extractor import Extractor, Output, OutputKind, Placement
from audio_models.registry import register_extractor
from audio_models.utils.errors import UserError
from audio_models.utils.provenance import sha256_file

if TYPE_CHECKING:
    import torch

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
        # Located here, so a missing package is an error before any work; hashed by load().
        self.path = model_path()
        self._sha256: str | None = None
        self._session: Any = None
        self._session_pid = os.getpid()

    @property
    def feature_names(self) -> list[str]:
        return list(FEATURES)

    @property
    def side_tables(self) -> dict[str, pa.Schema]:
        return {"segments": SEGMENT_SCHEMA}

    def load(self) -> None:
        # The session itself is built per process on first use (see _model); the hash names
        # the exact weights in the provenance.
        if self._sha256 is None:
            self._sha256 = sha256_file(self.path)

    def provenance(self) -> dict[str, str]:
        import onnxruntime  # its version, whichever distribution (-gpu, say) installed it

        self.load()
        return {
            "vad.model": self.path.name,
            "vad.model_sha256": str(self._sha256),
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


# -- pyannote (whisperX's bundled segmentation model) -------------------------------------------

#: Classes the bundled checkpoint's pickle names besides tensors and plain containers (its
#: pyannote task specifications, OmegaConf hyper-parameter nodes): each is read into an inert
#: :class:`_Inert` instead of being imported, so ``torch.load(weights_only=True)`` accepts the
#: file and no pyannote or OmegaConf code runs while it is read.
_CHECKPOINT_CLASSES = (
    "pyannote.audio.core.task.Specifications",
    "pyannote.audio.core.task.Problem",
    "pyannote.audio.core.task.Resolution",
    "pyannote.audio.core.model.Introspection",
    "omegaconf.base.Metadata",
    "omegaconf.base.ContainerMetadata",
    "omegaconf.listconfig.ListConfig",
    "omegaconf.nodes.AnyNode",
)
_PYANNET = {"module": "pyannote.audio.models.segmentation.PyanNet", "class": "PyanNet"}
_MULTI_LABEL = 2  # pyannote.audio.core.task.Problem.MULTI_LABEL_CLASSIFICATION
_FRAME = 1  # pyannote.audio.core.task.Resolution.FRAME
#: pyannote.core's Segment is empty (and an Annotation skips it) unless longer than this.
_SEGMENT_PRECISION = 1e-6


class _Inert:
    """What the checkpoint's pyannote/OmegaConf objects are read as: their constructor
    arguments and pickled state, nothing run."""

    def __init__(self, *args: Any) -> None:
        self.args = args
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


def pyannote_model_path() -> Path:
    """whisperX's bundled pyannote segmentation checkpoint (``whisperx/assets/
    pytorch_model.bin``, the file ``whisperx.vads.pyannote.load_vad_model`` loads), found
    without importing whisperX.

    Raises:
        UserError: whisperX is not installed, or its package holds no such file.
    """
    spec = importlib.util.find_spec("whisperx")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("extractor=vad_pyannote needs whisperx (its package holds the model)")
    path = Path(next(iter(spec.submodule_search_locations))) / "assets" / "pytorch_model.bin"
    if not path.is_file():
        raise UserError(f"no pyannote segmentation model at {path} (a whisperx without it)")
    return path


def read_pyannote_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's contents, read with ``torch.load(weights_only=True)``.

    whisperX loads this file through ``pyannote.audio.Model.from_pretrained``, which unpickles
    it unrestricted (any code the pickle names would run). Here the restricted
    unpickler reads it: plain containers and tensors as they are, and the few classes the
    pickle names (:data:`_CHECKPOINT_CLASSES`) as :class:`_Inert` stand-ins, so nothing but
    data comes out of it. Anything else the file might name is refused by torch.
    """
    import collections
    import typing

    import torch
    from torch.torch_version import TorchVersion

    allowed: list[Any] = [(type(name, (_Inert,), {}), name) for name in _CHECKPOINT_CLASSES]
    allowed += [dict, list, int, collections.defaultdict, typing.Any, TorchVersion]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


@dataclass(frozen=True)
class ScoredSpan:
    """One detected segment, as frame indices of the aggregated scores: speech from the centre
    of frame ``first`` to the centre of frame ``last``."""

    first: int
    last: int


@dataclass
class PyannoteVadConfig:
    """pyannote segmentation VAD (the model bundled in whisperX); defaults are whisperX's
    (``load_model``'s ``vad_onset``/``vad_offset``/``chunk_size``, its binarizer's zero
    minimum durations)."""

    _target_: str = "audio_models.speech.vad.PyannoteVadExtractor"
    name: str = "vad_pyannote"
    onset: float = 0.5  # speech starts at a frame whose score is above this
    offset: float = 0.363  # and ends at the first frame below this
    min_speech_s: float = 0.0  # shorter segments are dropped
    min_silence_s: float = 0.0  # shorter gaps are bridged (needs max_speech_s: null)
    max_speech_s: float | None = 30.0  # longer segments are split; None: no limit
    window_batch: int = 32  # 5-s windows per forward, across the batch's items


@register_extractor("vad_pyannote", config=PyannoteVadConfig)
class PyannoteVadExtractor(Extractor):
    """Speech segments and their summary per item from whisperX's bundled pyannote
    segmentation model (PyanNet, ``pyannote/segmentation``), as whisperX computes them.

    The model scores 5-s windows taken every 0.5 s (the last one zero-padded), 293 frames of
    3 speaker activities each. As pyannote's ``VoiceActivityDetection`` (whisperX's pipeline)
    does, a frame's speech score is the largest of its speakers', and the windows' scores are
    overlap-added with a Hamming window (``pyannote.audio.Inference.aggregate``); the scores
    become segments with whisperX's ``Binarize`` (its ``merge_chunks`` step before the chunks
    are merged). Segment boundaries are frame centres (every ~16.9 ms, the first at ~31 ms;
    the last segment may end up to half a frame past the signal), in seconds. The windows of
    all items of a batch go through the model together, on the run's device.

    Per item the main table gets ``speech_ratio``, ``n_segments`` and ``speech_s``;
    ``segments.parquet`` gets ``segment``, ``start``, ``end`` and ``confidence`` (the mean
    speech score of the frames from the segment's start up to its end).

    Args:
        name: the extractor's registered name.
        onset: speech starts at a frame whose score is above this (whisperX's ``vad_onset``).
        offset: speech ends at the first frame whose score is below this (``vad_offset``);
            at most ``onset``.
        min_speech_s: segments shorter than this are dropped (``min_duration_on``).
        min_silence_s: gaps shorter than this are bridged (``min_duration_off``); whisperX's
            binarizer cannot do that and split long segments, so it needs ``max_speech_s``
            null.
        max_speech_s: a segment longer than this is cut at the lowest score in its second
            half (whisperX's ``chunk_size``, 30 s there). ``None``: no limit.
        window_batch: windows per forward of the model (memory, not results).

    Raises:
        UserError: an option out of range.
    """

    kind = OutputKind.VECTOR
    placement = Placement.DEVICE

    def __init__(
        self,
        *,
        name: str = "vad_pyannote",
        onset: float = 0.5,
        offset: float = 0.363,
        min_speech_s: float = 0.0,
        min_silence_s: float = 0.0,
        max_speech_s: float | None = 30.0,
        window_batch: int = 32,
    ) -> None:
        super().__init__(name=name, sample_rate=SAMPLE_RATE)
        if not 0.0 < onset < 1.0:
            raise UserError(f"extractor.onset must be in (0, 1), got {onset}")
        if not 0.0 < offset <= onset:
            raise UserError(f"extractor.offset must be in (0, onset={onset}], got {offset}")
        for key, value in (("min_speech_s", min_speech_s), ("min_silence_s", min_silence_s)):
            if value < 0:
                raise UserError(f"extractor.{key} must be >= 0, got {value}")
        if max_speech_s is not None and max_speech_s <= 0:
            raise UserError(f"extractor.max_speech_s must be > 0 or null, got {max_speech_s}")
        if min_silence_s > 0 and max_speech_s is not None:
            raise UserError(
                "extractor.min_silence_s > 0 needs extractor.max_speech_s=null (whisperX's "
                "binarizer cannot bridge gaps and split segments at once)"
            )
        if window_batch < 1:
            raise UserError(f"extractor.window_batch must be >= 1, got {window_batch}")
        self.onset = onset
        self.offset = offset
        self.min_speech_s = min_speech_s
        self.min_silence_s = min_silence_s
        self.max_speech_s = math.inf if max_speech_s is None else max_speech_s
        self.window_batch = window_batch
        self._model: Any = None
        self._path: Path | None = None
        self._sha256: str | None = None

    @property
    def feature_names(self) -> list[str]:
        return list(FEATURES)

    @property
    def side_tables(self) -> dict[str, pa.Schema]:
        return {"segments": SEGMENT_SCHEMA}

    @property
    def path(self) -> Path:
        """The checkpoint file (whisperX's bundled one)."""
        if self._path is None:
            self._path = pyannote_model_path()
        return self._path

    def provenance(self) -> dict[str, str]:
        if self._sha256 is None:
            self._sha256 = sha256_file(self.path)
        return {
            "vad.model": "whisperx/assets/" + self.path.name,
            "vad.model_sha256": self._sha256,
            "whisperx.version": importlib.metadata.version("whisperx"),
            "pyannote.audio.version": importlib.metadata.version("pyannote.audio"),
        }

    # -- the model ------------------------------------------------------------------------
    def load(self) -> None:
        """Build PyanNet from the checkpoint's hyper-parameters and task specifications (what
        ``Model.from_pretrained`` builds) and load its weights (strict), without unpickling
        anything but data (:func:`read_pyannote_checkpoint`).

        Raises:
            UserError: the checkpoint is not the single-task, multi-label, frame-level PyanNet
                at 16 kHz this code knows.
        """
        if self._model is not None:
            return
        from pyannote.audio.core.task import Problem, Resolution, Specifications
        from pyannote.audio.models.segmentation import PyanNet

        checkpoint = read_pyannote_checkpoint(self.path)
        about = checkpoint["pyannote.audio"]
        specs = about["specifications"]
        fields = specs.state if isinstance(specs, _Inert) else None
        hyper = dict(checkpoint["hyper_parameters"])
        known = (
            about["architecture"] == _PYANNET
            and isinstance(fields, dict)
            and fields["problem"].args == (_MULTI_LABEL,)
            and fields["resolution"].args == (_FRAME,)
            and fields.get("powerset_max_classes") is None
            and hyper.get("sample_rate") == SAMPLE_RATE
        )
        if not known:
            raise UserError(f"{self.path} is not the pyannote segmentation model this code knows")
        model = PyanNet(**hyper)
        model.specifications = Specifications(
            problem=Problem(_MULTI_LABEL),
            resolution=Resolution(_FRAME),
            duration=float(fields["duration"]),
            min_duration=fields.get("min_duration"),
            warm_up=tuple(fields["warm_up"]),
            classes=list(fields["classes"]),
            permutation_invariant=bool(fields["permutation_invariant"]),
        )
        model.build()  # the task's classifier and activation (what setup() adds)
        model.load_state_dict(checkpoint["state_dict"], strict=True)
        model.eval()
        # pyannote.audio.Inference's sliding window for this model.
        self.duration = float(fields["duration"])
        self.warm_up = tuple(float(w) for w in fields["warm_up"])
        self.step = 0.1 * self.duration if self.warm_up[0] == 0.0 else self.warm_up[0]
        self.window = round(self.duration * SAMPLE_RATE)
        self.hop = round(self.step * SAMPLE_RATE)
        self.frames = model.receptive_field
        if self._sha256 is None:
            self._sha256 = sha256_file(self.path)
        self._model = model

    def torch_module(self) -> torch.nn.Module:
        self.load()
        return self._model

    def on_device(self, device: torch.device) -> None:
        self.load()

    def _layout(self, n: int) -> tuple[int, bool]:
        """Whole windows of a signal of ``n`` samples, and whether a zero-padded last window
        follows (``pyannote.audio.Inference.slide``'s rule)."""
        whole = (n - self.window) // self.hop + 1 if n >= self.window else 0
        return whole, n < self.window or (n - self.window) % self.hop > 0

    def padded_samples(self, lengths: torch.Tensor, device: torch.device) -> int:
        self.load()
        zeros = 0
        for n in lengths.tolist():
            whole, last = self._layout(int(n))
            zeros += self.window - (int(n) - whole * self.hop) if last else 0
        return zeros

    def window_scores(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> list[np.ndarray]:
        """Per row, the speech score (largest speaker activity) of each frame of each window:
        ``(n_windows, n_frames, 1)`` float32. The windows of all rows go through the model
        ``window_batch`` at a time."""
        import torch
        import torch.nn.functional as F

        self.load()
        windows: list[torch.Tensor] = []
        counts = []
        for row, n in enumerate(lengths.tolist()):
            signal = waveforms[row, : int(n)]
            whole, last = self._layout(int(n))
            if whole:
                windows.extend(signal.unfold(0, self.window, self.hop))
            if last:
                rest = signal[whole * self.hop :]
                windows.append(F.pad(rest, (0, self.window - rest.shape[0])))
            counts.append(whole + int(last))
        scores = []
        with torch.inference_mode(), _no_tf32(waveforms.device):
            for first in range(0, len(windows), self.window_batch):
                chunk = torch.stack(windows[first : first + self.window_batch])[:, None]
                out = self._model(chunk.to(torch.float32))
                scores.append(out.amax(dim=-1, keepdim=True).float().cpu().numpy())
        every = np.concatenate(scores) if scores else np.zeros((0, 0, 1), np.float32)
        bounds = np.cumsum([0, *counts])
        return [every[bounds[k] : bounds[k + 1]] for k in range(len(counts))]

    def frame_scores(self, windows: np.ndarray, n_samples: int) -> tuple[np.ndarray, np.ndarray]:
        """The overlap-added speech score of each frame of a signal of ``n_samples`` (what
        ``VoiceActivityDetection`` gives whisperX) and each frame's centre in seconds."""
        from pyannote.audio.core.inference import Inference
        from pyannote.core import Segment, SlidingWindow, SlidingWindowFeature

        self.load()
        chunks = SlidingWindow(start=0.0, duration=self.duration, step=self.step)
        aggregated = Inference.aggregate(
            SlidingWindowFeature(windows, chunks),
            self.frames,
            warm_up=self.warm_up,
            hamming=True,
            missing=0.0,
        )
        if self._layout(n_samples)[1]:  # the padded last window's frames past the end go
            aggregated.data = aggregated.crop(Segment(0.0, n_samples / SAMPLE_RATE), mode="loose")
        frames = aggregated.sliding_window
        # pyannote.core's SlidingWindow[i].middle, the same float operations.
        starts = frames.start + np.arange(aggregated.data.shape[0]) * frames.step
        return aggregated.data[:, 0], 0.5 * (starts + (starts + frames.duration))

    def spans(self, scores: np.ndarray, times: np.ndarray) -> list[ScoredSpan]:
        """Segments from frame scores: whisperX's ``Binarize`` (``whisperx/vads/pyannote.py``)
        with this extractor's options, step for step, on frame indices.

        Speech starts at a frame above ``onset`` and ends at the first frame below
        ``offset``; a segment that outgrows ``max_speech_s`` is cut at the frame with the
        lowest score in the second half of the frames since its start (or since the last
        cut). Then gaps under ``min_silence_s`` are bridged and segments under
        ``min_speech_s`` dropped.
        """
        if scores.size == 0:
            return []
        above = scores > self.onset
        below = scores < self.offset
        t = times.tolist()
        found: list[tuple[int, int]] = []
        start = 0
        active = bool(above[0])
        since = [0]  # Binarize's curr_scores/curr_timestamps, as frame indices
        at = 0
        for at in range(1, scores.size):
            if active:
                if t[at] - t[start] > self.max_speech_s:
                    lowest = len(since) // 2 + int(np.argmin(scores[since[len(since) // 2 :]]))
                    found.append((start, since[lowest]))
                    start = since[lowest]
                    since = since[lowest + 1 :]
                elif below[at]:
                    found.append((start, at))
                    start = at
                    active = False
                    since = []
                since.append(at)
            elif above[at]:
                start = at
                active = True
        if active:
            found.append((start, at))
        # pyannote.core's Annotation keeps no empty segment.
        kept = [(a, b) for a, b in found if t[b] - t[a] > _SEGMENT_PRECISION]
        if self.min_silence_s > 0.0 and kept:
            # Annotation.support(collar=min_silence_s): neighbours closer than that merge.
            merged = [kept[0]]
            for a, b in kept[1:]:
                gap = t[a] - t[merged[-1][1]]
                if not gap > _SEGMENT_PRECISION or gap < self.min_silence_s:
                    merged[-1] = (merged[-1][0], b)
                else:
                    merged.append((a, b))
            kept = merged
        if self.min_speech_s > 0.0:
            kept = [(a, b) for a, b in kept if not t[b] - t[a] < self.min_speech_s]
        return [ScoredSpan(a, b) for a, b in kept]

    def segments(self, signal: np.ndarray) -> list[tuple[float, float, float]]:
        """``(start, end, confidence)`` of each speech segment of a 16 kHz mono signal, in
        seconds from its start (the model on the CPU unless :meth:`torch_module` was moved)."""
        import torch

        self.load()
        x = torch.from_numpy(np.ascontiguousarray(signal, dtype=np.float32).reshape(1, -1))
        device = next(self._model.parameters()).device
        return self._segments(
            self.window_scores(x.to(device), torch.tensor([x.shape[1]]))[0], x.shape[1]
        )

    def _segments(self, windows: np.ndarray, n_samples: int) -> list[tuple[float, float, float]]:
        scores, times = self.frame_scores(windows, n_samples)
        return [
            (float(times[s.first]), float(times[s.last]), float(scores[s.first : s.last].mean()))
            for s in self.spans(scores, times)
        ]

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> list[Output]:  # type: ignore[override]
        import torch

        outputs = []
        for windows, n in zip(
            self.window_scores(waveforms, lengths), lengths.tolist(), strict=True
        ):
            found = self._segments(windows, int(n))
            duration = int(n) / SAMPLE_RATE
            speech = sum(end - start for start, end, _ in found)
            values = [speech / duration if duration else 0.0, float(len(found)), speech]
            rows = {
                "segment": list(range(len(found))),
                "start": [start for start, _, _ in found],
                "end": [end for _, end, _ in found],
                "confidence": [confidence for _, _, confidence in found],
            }
            values_t = torch.tensor(values, dtype=torch.float64)
            outputs.append(Output(values=values_t, extra={"segments": rows}))
        return outputs


@contextmanager
def _no_tf32(device: torch.device) -> Iterator[None]:
    """TF32 off on CUDA for the block (as pyannote's ``fix_reproducibility``, which whisperX's
    pipeline calls, turns it off for the process), so the scores match whisperX's on a GPU;
    the previous settings come back afterwards."""
    if device.type != "cuda":
        yield
        return
    import torch

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
