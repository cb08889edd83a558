"""The extractor contract every feature extractor implements.

An extractor says which sample rate it wants and what it emits. CPU work per item goes in
:meth:`Extractor.transform` (runs in DataLoader worker processes); batched torch work goes in
:meth:`Extractor.forward` (runs in ``predict_step`` on the device). An extractor never opens
files, never talks to MLflow and never picks batch sizes.

Constructing an extractor is cheap: it checks its options and describes itself (rate, output
kind, names where they need no model). :meth:`Extractor.load` reads weights; the runner calls
it only after the whole configuration and the dataset have been checked. This module, like
every extractor module, imports no torch at import time for the same reason.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from audio_models.utils.errors import UserError

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

STORAGE_DTYPES = ("float32", "float16")


class OutputKind(StrEnum):
    """What an extractor emits per item."""

    VECTOR = "vector"  # one fixed-size vector
    FRAMES = "frames"  # an (n_frames, dim) matrix with a fixed frame shift
    TRANSCRIPT = "transcript"  # text with timed segments and words (a :class:`Transcript`)


class Placement(StrEnum):
    """Where an extractor's work runs."""

    WORKER = "worker"  # transform(): per item, on the CPU, in the loader's worker processes
    DEVICE = "device"  # forward(): batched, the padded batch moved to the run's device
    # forward(): batched, the batch left on the host for a model that takes numpy audio and
    # moves its own work to the device (whisperX's CTranslate2, say)
    HOST = "host"


@dataclass
class Output:
    """A transform result with more than numbers.

    Args:
        values: the vector (or frames) as :meth:`Extractor.transform` would return it.
        extra: by column name, the text of each of :attr:`Extractor.extra_columns` (a
            predicted label, say); by table name, this item's rows of each of
            :attr:`Extractor.side_tables`, as column → list of values (every column of the
            table's schema but ``id``, which the writer adds). The rows travel here because
            ``extra`` is what the loader hands from its workers to the writer beside the
            values.
    """

    values: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Word:
    """One word with its time span (seconds from the start of the signal given to the
    extractor; ``None`` where the aligner could not place it) and alignment score."""

    word: str
    start: float | None = None
    end: float | None = None
    score: float | None = None
    speaker: str | None = None


@dataclass
class Segment:
    """A stretch of speech with its text, time span (seconds) and words."""

    text: str
    start: float
    end: float
    speaker: str | None = None
    avg_logprob: float | None = None
    words: list[Word] = field(default_factory=list)


@dataclass
class Transcript:
    """What a speech recogniser produced for one item. A recording without speech is an empty
    transcript (``text == ""``, no segments), not a failure.

    Args:
        text: the whole transcript.
        language: language code used or detected.
        scores: model scores (e.g. ``avg_logprob``, ``language_probability``).
        segments: timed segments, in order.
    """

    text: str
    language: str | None = None
    scores: dict[str, float] = field(default_factory=dict)
    segments: list[Segment] = field(default_factory=list)


class Extractor:
    """Base class of all extractors.

    Subclasses set :attr:`kind`, override :meth:`transform` and/or :meth:`forward`, and report
    :attr:`feature_names` where the columns have names.
    """

    kind: ClassVar[OutputKind] = OutputKind.VECTOR
    #: Where the work runs: :meth:`transform` in loader workers, or :meth:`forward` on
    #: batches moved to the device or left on the host.
    placement: ClassVar[Placement] = Placement.WORKER
    #: Padded seconds per batch this model batches well at, used when the loader's
    #: ``batch_audio_s`` is unset (a config value of the extractor, not a decision).
    batch_audio_s: float | None = None
    #: Keys of ``requirements.csv`` whose checkouts the extractor reads; a dirty one gets its
    #: diff logged with the run so the numbers stay reproducible.
    upstreams: tuple[str, ...] = ()

    def __init__(
        self, *, name: str, sample_rate: int | None = None, storage_dtype: str | None = None
    ) -> None:
        self.name = name
        self._sample_rate = sample_rate
        if storage_dtype is not None and storage_dtype not in STORAGE_DTYPES:
            raise UserError(
                f"extractor.storage_dtype must be one of {STORAGE_DTYPES}, got {storage_dtype!r}"
            )
        #: Precision the values are stored at (``None``: as computed; computation unaffected).
        self.storage_dtype = storage_dtype

    def load(self) -> None:
        """Read weights and build what :meth:`transform`/:meth:`forward` need; a no-op for
        extractors without weights and on every call after the first. Methods that need the
        model call it, so an extractor used directly works without an explicit call."""

    @property
    def sample_rate(self) -> int | None:
        """Rate the extractor wants its input at; ``None`` keeps each file's own rate."""
        return self._sample_rate

    @property
    def min_samples(self) -> int:
        """Shortest input (in samples at :attr:`sample_rate`) the extractor can process."""
        return 1

    @property
    def feature_names(self) -> list[str] | None:
        """Column names of the output, or ``None`` for an unnamed vector."""
        return None

    @property
    def frame_shift_s(self) -> float | None:
        """Seconds between frames, for :attr:`OutputKind.FRAMES` extractors."""
        return None

    @property
    def feature_groups(self) -> list[tuple[str, int]] | None:
        """For vectors: consecutive ``(column, size)`` slices written as fixed-size list columns
        (one per model layer, say) instead of one column per value."""
        return None

    @property
    def extra_columns(self) -> list[str]:
        """Text columns an :class:`Output` carries, written before the features."""
        return []

    @property
    def side_tables(self) -> dict[str, pa.Schema]:
        """Tables with any number of rows per item (speech segments, say), name → schema
        with ``id`` first, written as ``<name>.parquet`` beside the main table; each item's
        rows come in its :class:`Output`'s ``extra`` under the table's name. Columns named
        ``start`` and ``end`` are seconds from the start of the signal given to
        :meth:`transform`; the writer moves them to the recording's start (a manifest
        segment's offset). Transcription extractors have their tables from their kind."""
        return {}

    def transform(self, signal: np.ndarray, sample_rate: int) -> np.ndarray | Output:
        """Compute features of one mono float32 signal on the CPU.

        Returns a 1-D vector (``VECTOR``) or a 2-D ``(n_frames, dim)`` matrix (``FRAMES``),
        or an :class:`Output` when :attr:`extra_columns` are declared.
        """
        raise NotImplementedError(f"{type(self).__name__} has no per-item transform")

    def forward(
        self, waveforms: torch.Tensor, lengths: torch.Tensor
    ) -> list[torch.Tensor] | list[Output] | list[Transcript]:
        """Compute features of a zero-padded ``(batch, samples)`` batch on its device.

        Args:
            waveforms: float32 signals, zero-padded at the end.
            lengths: number of valid samples of each row.

        Returns:
            One result per row: a vector or an ``(n_frames, dim)`` matrix (an :class:`Output`
            with a tensor as ``values`` when :attr:`extra_columns` are declared), or a
            :class:`Transcript` for ``TRANSCRIPT`` extractors.
        """
        raise NotImplementedError(f"{type(self).__name__} has no batched forward")

    def padded_samples(self, lengths: torch.Tensor, device: torch.device) -> int:
        """Zeros the model really processes for a batch of ``lengths`` on ``device`` (an
        extractor that regroups rows to avoid padding reports less than the batch holds)."""
        return int(lengths.numel() * lengths.max() - lengths.sum()) if lengths.numel() else 0

    def on_device(self, device: torch.device) -> None:
        """Called once the run's device is known, before the first batch: for models that
        are not a :meth:`torch_module` Lightning could move (CTranslate2, say)."""

    def torch_module(self) -> torch.nn.Module | None:
        """The module whose parameters/buffers must live on the device, if any."""
        return None

    def provenance(self) -> dict[str, str]:
        """What decides the numbers beyond the config: model ids, revisions, hashes."""
        return {}

    def process_signal(
        self, signal: np.ndarray, sample_rate: int
    ) -> np.ndarray | Output | Transcript:
        """Features of one signal, as the pipeline computes them for one item.

        Args:
            signal: samples, ``(samples,)`` or ``(channels, samples)`` (channels averaged,
                the pipeline's default ``mean`` policy).
            sample_rate: the signal's rate; resampled to :attr:`sample_rate` when that is set.

        Returns:
            What :meth:`transform` or :meth:`forward` returns for one item: a vector, an
            ``(n_frames, dim)`` matrix (as float32 numpy), an :class:`Output`, or a
            :class:`Transcript`.
        """
        from audio_models.audio.io import resample

        x = np.asarray(signal, dtype=np.float32)
        if x.ndim == 2:
            x = x.mean(axis=0)
        if x.ndim != 1 or x.size == 0:
            raise ValueError("expected a non-empty (samples,) or (channels, samples) signal")
        if self.sample_rate is not None and sample_rate != self.sample_rate:
            x = resample(np.ascontiguousarray(x), sample_rate, self.sample_rate)
            sample_rate = self.sample_rate
        self.load()
        if self.placement == Placement.WORKER:
            return self.transform(np.ascontiguousarray(x), sample_rate)
        import torch

        module = self.torch_module()
        # Parameters or, for modules with buffers only (Kaldi's filterbanks), buffers.
        tensors = (
            itertools.chain(module.parameters(), module.buffers())
            if module is not None
            else iter(())
        )
        first = next(tensors, None)
        device = first.device if first is not None else torch.device("cpu")
        if getattr(self, "_signal_device", None) != device:
            self.on_device(device)
            self._signal_device = device
        with torch.inference_mode():
            waveforms = torch.from_numpy(np.ascontiguousarray(x))[None].to(device)
            lengths = torch.tensor([x.shape[0]], device=device)
            out = self.forward(waveforms, lengths)[0]
        if isinstance(out, Transcript):
            return out
        if isinstance(out, Output):
            return Output(values=out.values.detach().float().cpu().numpy(), extra=out.extra)
        return out.detach().float().cpu().numpy()

    def process_file(
        self,
        path: str,
        *,
        start: float | None = None,
        end: float | None = None,
        channel_policy: str = "mean",
    ) -> np.ndarray | Output | Transcript:
        """Features of ``[start, end)`` seconds of one file (decoded as the loader does)."""
        from audio_models.audio.io import decode

        decoded = decode(
            path,
            start=start,
            end=end,
            channel_policy=channel_policy,  # type: ignore[arg-type]
            target_sample_rate=self.sample_rate,
        )
        return self.process_signal(decoded.signal, decoded.sample_rate)
