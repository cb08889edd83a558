"""The loader: decode → channel policy → resample → preflight → ``transform``, in workers."""

from __future__ import annotations

import hashlib
import io
import multiprocessing as mp
import os
import re
import signal
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import soundfile as sf
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from audio_models.audio.io import ChannelPolicy, check_regular_file, decode
from audio_models.data.items import Item
from audio_models.extractor import Extractor, Output, Placement, Transcript
from audio_models.utils.errors import ExtractionError


@dataclass
class Failure:
    """Why one item produced no features."""

    stage: str  # decode | segment | preflight | transform | forward | write
    error_type: str
    message: str


@dataclass
class Record:
    """One item on its way through the pipeline."""

    item: Item
    index: int = -1  # position in the dataset (what the loader reorders by)
    meta: dict[str, Any] = field(default_factory=dict)
    features: np.ndarray | None = None
    transcript: Transcript | None = None  # what a TRANSCRIPT extractor produced
    extra: dict[str, str] = field(default_factory=dict)
    signal: np.ndarray | None = None
    failure: Failure | None = None
    key: str | None = None  # what decides the item's output (see item_key)
    skipped: bool = False  # a previous run already committed this key

    @property
    def duration_s(self) -> float:
        return float(self.meta.get("duration_s", 0.0))


def fail(record: Record, stage: str, exc: BaseException) -> Record:
    """Mark ``record`` failed at ``stage`` (or at the stage the error names)."""
    stage = exc.stage if isinstance(exc, ExtractionError) else stage
    record.failure = Failure(stage=stage, error_type=type(exc).__name__, message=str(exc)[:2000])
    record.signal = None
    record.features = None
    record.transcript = None
    return record


@dataclass(frozen=True)
class Preflight:
    """Cheap per-item checks and the policies that skip items on purpose.

    Args:
        min_duration_s: shorter items are skipped (a failure row, stage ``preflight``).
        max_duration_s: longer items are skipped (``None``: no limit).
        max_silence_ratio: items with more silent 25 ms frames than this are skipped.
        max_clipping_ratio: items with more clipped samples than this are skipped.
        silence_db: a frame whose RMS is below this (dBFS) counts as silent.
    """

    min_duration_s: float = 0.0
    max_duration_s: float | None = None
    max_silence_ratio: float | None = None
    max_clipping_ratio: float | None = None
    silence_db: float = -60.0

    def measure(self, signal: np.ndarray, sample_rate: int) -> tuple[float, float]:
        """Silence ratio (of 25 ms frames) and clipping ratio (of samples ≥ 0.999 FS)."""
        if signal.size == 0:
            return 1.0, 0.0
        clipping = np.count_nonzero((signal >= 0.999) | (signal <= -0.999)) / signal.size
        hop = max(1, int(0.025 * sample_rate))
        n = signal.size // hop
        if n == 0:
            return 1.0, float(clipping)
        frames = signal[: n * hop].reshape(n, hop)
        # Mean power per frame against the threshold in linear units: no log per frame.
        power = np.einsum("ij,ij->i", frames, frames, dtype=np.float64) / hop
        silent = np.count_nonzero(power < 10.0 ** (self.silence_db / 10.0))
        return silent / n, float(clipping)

    def violation(self, duration_s: float, silence: float, clipping: float) -> str | None:
        if duration_s < self.min_duration_s:
            return f"duration {duration_s:.3f} s < min_duration_s={self.min_duration_s}"
        if self.max_duration_s is not None and duration_s > self.max_duration_s:
            return f"duration {duration_s:.3f} s > max_duration_s={self.max_duration_s}"
        if self.max_silence_ratio is not None and silence > self.max_silence_ratio:
            return f"silence ratio {silence:.3f} > max_silence_ratio={self.max_silence_ratio}"
        if self.max_clipping_ratio is not None and clipping > self.max_clipping_ratio:
            return f"clipping ratio {clipping:.4f} > max_clipping_ratio={self.max_clipping_ratio}"
        return None


def item_key(item: Item, content_sha256: str, config_hash: str) -> str:
    """What decides an item's output: its id and segment, its audio bytes and the settings."""
    text = f"{item.id}\0{item.start}\0{item.end}\0{content_sha256}\0{config_hash}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class ItemTimeout(ExtractionError):
    """An item ran past ``loader.item_timeout_s``."""


@contextmanager
def _deadline(seconds: float | None, item_id: str) -> Iterator[None]:
    """Raise :class:`ItemTimeout` in this thread after ``seconds`` (SIGALRM; a loader worker
    runs items in its main thread, so does an in-process loader). Pure-Python work is
    interrupted at once; a native call returns first."""
    if (
        not seconds
        or threading.current_thread() is not threading.main_thread()
        or signal.getitimer(signal.ITIMER_REAL)[0] > 0  # someone else's alarm: leave it be
    ):
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise ItemTimeout("timeout", f"{item_id}: took longer than loader.item_timeout_s={seconds}")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class ItemDataset(Dataset[Record]):
    """Maps an index to a decoded (and, for CPU extractors, transformed) :class:`Record`.

    Never raises for bad input: the error becomes the record's :class:`Failure`. Items whose
    key is in ``done_keys`` come back as skipped records without being decoded.
    """

    def __init__(
        self,
        items: list[Item],
        extractor: Extractor,
        channel_policy: ChannelPolicy,
        *,
        config_hash: str = "",
        done_keys: set[str] | frozenset[str] = frozenset(),
        preflight: Preflight | None = None,
        item_timeout_s: float | None = None,
    ) -> None:
        self.items = items
        #: Seconds one item may take to decode and transform before it becomes a failure row
        #: (``None``: no limit).
        self.item_timeout_s = item_timeout_s
        self.extractor = extractor
        self.channel_policy = channel_policy
        self.config_hash = config_hash
        self.done_keys = done_keys
        self.preflight = preflight or Preflight()
        self._hashes: dict[tuple[str, int, int], str] = {}
        # Shared with the loader workers (set by ExtractionDataModule): each worker's pid and
        # the item it is on, so that a worker that dies can be reported with its item.
        self.worker_pids: Any = None
        self.worker_items: Any = None

    def __len__(self) -> int:
        return len(self.items)

    def _content_hash(self, path: str) -> str:
        stat = check_regular_file(path)  # never hash /dev/zero or wait on a FIFO
        cache_key = (path, stat.st_size, stat.st_mtime_ns)
        if cache_key not in self._hashes:  # segments of one file hash it once per worker
            if len(self._hashes) > 1024:
                self._hashes.clear()
            with open(path, "rb") as handle:
                self._hashes[cache_key] = hashlib.file_digest(handle, "sha256").hexdigest()
        return self._hashes[cache_key]

    def key_of(self, index: int) -> str:
        """The item key of ``items[index]`` (reads the file to hash it)."""
        item = self.items[index]
        try:
            if item.blob is not None:
                content = hashlib.sha256(item.blob.read()).hexdigest()
            else:
                content = self._content_hash(item.path)
            return item_key(item, content, self.config_hash)
        except (OSError, ExtractionError):
            return item_key(item, "unreadable", self.config_hash)

    def __getitem__(self, index: int) -> Record:
        item = self.items[index]
        record = Record(item=item, index=index)
        worker = get_worker_info()
        if worker is not None and self.worker_items is not None:
            self.worker_items[worker.id] = index
        try:
            with _deadline(self.item_timeout_s, item.id):
                return self._load(record)
        except ItemTimeout as exc:
            if record.key is None:  # stuck while reading the file for its hash
                record.key = item_key(item, "unreadable", self.config_hash)
            return fail(record, exc.stage, exc)

    def _load(self, record: Record) -> Record:
        """Hash, decode, measure and transform one item."""
        item = record.item
        unreadable: Exception | None = None
        data: bytes | None = None  # the audio's bytes where it is not a file (item.blob)
        try:
            if item.blob is not None:
                data = item.blob.read()
                content = hashlib.sha256(data).hexdigest()
            else:
                content = self._content_hash(item.path)
        except (OSError, ExtractionError) as exc:  # missing, a link loop, not a regular file
            content, unreadable = "unreadable", exc
        except Exception as exc:  # a blob's table could not be read
            content = "unreadable"
            unreadable = ExtractionError("decode", f"cannot read the audio: {exc}")
        record.key = item_key(item, content, self.config_hash)
        if record.key in self.done_keys:
            record.skipped = True
            return record
        if isinstance(unreadable, ExtractionError):
            return fail(record, "decode", unreadable)
        if unreadable is not None:
            return fail(
                record, "decode", ExtractionError("decode", f"cannot read file: {unreadable}")
            )
        try:
            decoded = decode(
                item.path,
                start=item.start,
                end=item.end,
                channel_policy=self.channel_policy,
                target_sample_rate=self.extractor.sample_rate,
                data=data,
            )
        except Exception as exc:
            return fail(record, "decode", exc)
        silence, clipping = self.preflight.measure(decoded.signal, decoded.sample_rate)
        record.meta = {
            "start": decoded.start,
            "end": decoded.end,
            "duration_s": decoded.duration_s,
            "sample_rate": decoded.sample_rate,
            "source_sample_rate": decoded.source_sample_rate,
            "n_channels": decoded.n_channels,
            "channel_policy": self.channel_policy,
            "silence_ratio": silence,
            "clipping_ratio": clipping,
        }
        policy = self.preflight.violation(decoded.duration_s, silence, clipping)
        if policy is not None:
            record.failure = Failure("preflight", "PolicySkip", policy)
            return record
        if decoded.signal.shape[0] < self.extractor.min_samples:
            return fail(
                record,
                "preflight",
                ExtractionError(
                    "preflight",
                    f"{decoded.signal.shape[0]} samples at {decoded.sample_rate} Hz; "
                    f"{self.extractor.name} needs at least {self.extractor.min_samples}",
                ),
            )
        if self.extractor.placement != Placement.WORKER:
            record.signal = decoded.signal
            return record
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                features = self.extractor.transform(decoded.signal, decoded.sample_rate)
            too_short = [w for w in caught if "too short" in str(w.message).lower()]
            if too_short:
                raise ExtractionError(
                    "preflight", f"clip too short for {self.extractor.name}: {too_short[0].message}"
                )
            if isinstance(features, Output):
                record.extra = features.extra
                features = features.values
            record.features = np.asarray(features)
        except ItemTimeout:
            raise
        except Exception as exc:
            return fail(record, "transform", exc)
        return record


@dataclass
class Batch:
    """A list of records plus, for device extractors, their signals zero-padded together."""

    records: list[Record]
    waveforms: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    rows: list[int] = field(default_factory=list)  # record index of each waveform row

    def pin_memory(self) -> Batch:
        """The same batch with its tensors in page-locked host memory.

        The DataLoader (``pin_memory=True``) calls this on custom batch types; without it a
        ``Batch`` stayed pageable and every ``non_blocking`` copy to the GPU was synchronous
        (staged through a pinned bounce buffer). Records stay as they are (numpy, strings).
        """
        return Batch(
            records=self.records,
            waveforms=self.waveforms.pin_memory() if self.waveforms is not None else None,
            lengths=self.lengths.pin_memory() if self.lengths is not None else None,
            rows=self.rows,
        )


def collate(records: list[Record]) -> Batch:
    rows = [i for i, r in enumerate(records) if r.signal is not None]
    if not rows:
        return Batch(records=records)
    lengths = torch.tensor([records[i].signal.shape[0] for i in rows], dtype=torch.long)
    waveforms = torch.zeros((len(rows), int(lengths.max())), dtype=torch.float32)
    for row, i in enumerate(rows):
        waveforms[row, : lengths[row]] = torch.from_numpy(records[i].signal)
        records[i].signal = None  # the padded tensor now carries it
    return Batch(records=records, waveforms=waveforms, lengths=lengths, rows=rows)


class SamplerOrderLoader(DataLoader[Record]):
    """A DataLoader whose workers take work as they free up, whose batches come out in the
    sampler's order all the same.

    PyTorch's default (``in_order=True``) deals indexes to the workers in turn and hands
    batches back strictly in order, so a worker that finished its share sits idle while
    another is still on a long file. With ``in_order=False`` the next index goes to a worker
    with room; this class holds early arrivals back and yields them in the sampler's order,
    so outputs and commits are deterministic. Memory stays bounded: when ``max_ahead``
    batches are held back waiting for one slow item (a long recording among short ones), the
    earliest of them goes out ahead of it.

    Args:
        max_ahead: batches held back at most; default: twice the batches in flight, and at
            least 64 items' worth for one-item batches (small per-item outputs).
    """

    def __init__(self, *args: Any, max_ahead: int | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("in_order", False)  # Lightning re-creates loaders with their attrs
        super().__init__(*args, **kwargs)
        in_flight = (self.prefetch_factor or 0) * self.num_workers
        self.max_ahead = max_ahead or max(2 * in_flight, 64 // (self.batch_size or 64), 1)
        # The order, taken now: Lightning wraps batch samplers in an object whose iterator is
        # shared state (a second iteration would steal the loader's batches).
        self._order = [tuple(b) for b in self.batch_sampler]  # type: ignore[union-attr]

    def __iter__(self) -> Iterator[Batch]:  # type: ignore[override]
        if self.num_workers == 0:
            yield from super().__iter__()
            return
        order = self._order
        arrived: dict[tuple[int, ...], Batch] = {}
        released: set[tuple[int, ...]] = set()  # went out ahead of their turn
        batches = super().__iter__()
        for i, key in enumerate(order):
            if key in released:
                released.discard(key)
                continue
            while key not in arrived:
                if len(arrived) >= self.max_ahead:
                    # The earliest held batch: a short scan, past batches still in flight.
                    j = i + 1
                    while order[j] not in arrived:
                        j += 1
                    early = order[j]
                    released.add(early)
                    yield arrived.pop(early)
                    continue
                batch = next(batches)
                arrived[tuple(r.index for r in batch.records)] = batch
            yield arrived.pop(key)


def _worker_init(worker_id: int) -> None:
    # Each worker is one process doing one item at a time: oversubscribing the cores with
    # intra-op threads only slows the pool down.
    torch.set_num_threads(1)
    worker = get_worker_info()
    if worker is not None and worker.dataset.worker_pids is not None:
        worker.dataset.worker_pids[worker_id] = os.getpid()


class LengthBucketSampler(Sampler[list[int]]):
    """Batches of similar length: items sorted by duration, cut where a batch's padded audio
    (longest item × count) would exceed ``batch_audio_s`` or it would hold ``max_items``.

    Args:
        durations: seconds per item (0 for unreadable ones: they fail fast, together).
        batch_audio_s: padded seconds per batch.
        max_items: cap on items per batch.
        indices: the dataset indexes the durations belong to (default ``0..n-1``; a rank of
            a distributed run passes its shard).
    """

    def __init__(
        self,
        durations: list[float],
        batch_audio_s: float,
        max_items: int,
        indices: list[int] | None = None,
    ) -> None:
        if batch_audio_s <= 0:
            raise ValueError("batch_audio_s must be positive")
        order = sorted(range(len(durations)), key=lambda i: (durations[i], i))
        self.batches: list[list[int]] = []
        current: list[int] = []
        for index in order:
            # Sorted ascending: the newcomer is the longest of the batch.
            padded = durations[index] * (len(current) + 1)
            if current and (padded > batch_audio_s or len(current) >= max_items):
                self.batches.append(current)
                current = []
            current.append(index)
        if current:
            self.batches.append(current)
        if indices is not None:
            self.batches = [[indices[j] for j in batch] for batch in self.batches]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _header(item: Item) -> Any:
    """``soundfile.info`` of an item's audio: its file, or its blob's bytes."""
    if item.blob is not None:
        return sf.info(io.BytesIO(item.blob.read()))
    check_regular_file(item.path)  # sf.info would block on a FIFO
    return sf.info(item.path)


def item_durations(items: list[Item]) -> list[float]:
    """Seconds per item from the file headers (segment bounds where given); 0 if unreadable."""
    durations = []
    for item in items:
        try:
            total = _header(item).duration
        except Exception:
            durations.append(0.0)
            continue
        start = item.start or 0.0
        end = total if item.end is None else min(item.end, total)
        durations.append(max(0.0, end - start))
    return durations


def source_sample_rates(items: list[Item]) -> dict[int, int]:
    """Files per sample rate, from the headers (a file that cannot be read is left out: it
    becomes a failure row when its turn comes)."""
    counts: dict[int, int] = {}
    # Each file (or blob) once, not per segment.
    sources = {(item.path if item.blob is None else id(item.blob)): item for item in items}
    for item in sources.values():
        try:
            rate = int(_header(item).samplerate)
        except Exception:
            continue
        counts[rate] = counts.get(rate, 0) + 1
    return dict(sorted(counts.items()))


def sample_rate_tags(
    items: list[Item], extractor: Extractor, *, warn: bool = True
) -> dict[str, str]:
    """For an extractor that takes each file at its own rate (openSMILE, librosa without
    ``sample_rate``): the run tag ``source_sample_rates`` (the rates found, ascending), and
    (with ``warn``) a warning when there are several, since such features are not comparable
    across rates. Empty for an extractor with a fixed rate: every file is resampled to it.
    """
    if extractor.sample_rate is not None:
        return {}
    rates = source_sample_rates(items)
    if warn and len(rates) > 1:
        found = ", ".join(
            f"{rate} Hz ({n} file{'s' if n > 1 else ''})" for rate, n in rates.items()
        )
        warnings.warn(
            f"the corpus mixes sample rates: {found}. {extractor.name} computes each file at "
            "its own rate, so its features are not comparable across rates; set "
            "extractor.sample_rate (e.g. extractor.sample_rate=16000) to resample every file "
            "to one rate",
            UserWarning,
            stacklevel=3,
        )
    return {"source_sample_rates": ",".join(map(str, rates))} if rates else {}


class ExtractionDataModule(L.LightningDataModule):
    """Serves the dataset's items in order to ``Trainer.predict``.

    Args:
        items: what to process.
        extractor: decides the sample rate and the CPU transform.
        batch_size: items per batch.
        num_workers: loader processes; ``None`` means the CPU count, 0 runs in-process.
        channel_policy: ``mean`` or ``first``.
        pin_memory: pin host memory (useful with CUDA).
    """

    def __init__(
        self,
        *,
        items: list[Item],
        extractor: Extractor,
        batch_size: int = 8,
        num_workers: int | None = None,
        channel_policy: ChannelPolicy = "mean",
        pin_memory: bool = False,
        config_hash: str = "",
        done_keys: set[str] | frozenset[str] = frozenset(),
        preflight: Preflight | None = None,
        batch_audio_s: float | None = None,
        item_timeout_s: float | None = None,
    ) -> None:
        super().__init__()
        self.batch_audio_s = batch_audio_s
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.dataset = ItemDataset(
            items,
            extractor,
            channel_policy,
            config_hash=config_hash,
            done_keys=done_keys,
            preflight=preflight,
            item_timeout_s=item_timeout_s,
        )
        # Surveyed once, here in the main process, before any work: the warning comes first and
        # the runner logs the tags with the run's others. A resumed run (committed items) said
        # it when it started: the same outputs, so no second warning.
        self.sample_rate_tags = sample_rate_tags(items, extractor, warn=not done_keys)
        self.batch_size = batch_size
        self.num_workers = (os.cpu_count() or 1) if num_workers is None else num_workers
        self.pin_memory = pin_memory
        if self.num_workers > 0:
            # Plain shared memory, inherited by the forked workers; -1 means "nothing yet".
            self.dataset.worker_pids = mp.Array("q", [-1] * self.num_workers, lock=False)
            self.dataset.worker_items = mp.Array("q", [-1] * self.num_workers, lock=False)

    def items_of_dead_workers(self, message: str) -> list[int]:
        """Indexes of the items that the workers named in a DataLoader error were on."""
        if self.dataset.worker_pids is None or "pid" not in message:
            return []
        # "DataLoader worker (pid 123) is killed…" or "(pid(s) 123, 456) exited unexpectedly"
        match = re.search(r"pid(?:\(s\))?\s*([\d,\s]+)", message)
        named = {int(p) for p in re.findall(r"\d+", match.group(1))} if match else set()
        pids = list(self.dataset.worker_pids)
        items = list(self.dataset.worker_items)
        return [items[w] for w, pid in enumerate(pids) if pid in named and items[w] >= 0]

    def transfer_batch_to_device(
        self, batch: Batch, device: torch.device, dataloader_idx: int
    ) -> Batch:
        # Only the padded tensors travel; records (numpy, strings) stay on the host, and so
        # does everything for an extractor that moves its own work to the device.
        if batch.waveforms is not None and self.dataset.extractor.placement != Placement.HOST:
            batch.waveforms = batch.waveforms.to(device, non_blocking=True)
            batch.lengths = batch.lengths.to(device, non_blocking=True)
        return batch

    def predict_dataloader(self) -> DataLoader[Record]:
        # Per-item CPU work is handed out item by item: whole batches per worker leave one
        # worker idle while the other finishes the last batch. The writer still commits in
        # groups of batch_size. Device extractors need real batches for their forward.
        common: dict[str, Any] = {
            "num_workers": self.num_workers,
            "collate_fn": collate,
            "worker_init_fn": _worker_init if self.num_workers > 0 else None,
            "pin_memory": self.pin_memory,
        }
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        batched = self.dataset.extractor.placement != Placement.WORKER
        durations = (
            item_durations(self.dataset.items)
            if world > 1 or (self.batch_audio_s is not None and batched)
            else None
        )
        mine = shard(len(self.dataset.items), rank, world, durations)
        if not batched:
            return SamplerOrderLoader(self.dataset, batch_size=1, sampler=mine, **common)
        if self.batch_audio_s is not None:
            assert durations is not None
            # Similar lengths together: less padding for the device to chew on.
            sampler = LengthBucketSampler(
                [durations[i] for i in mine], self.batch_audio_s, self.batch_size, indices=mine
            )
            return SamplerOrderLoader(self.dataset, batch_sampler=sampler, **common)
        return SamplerOrderLoader(self.dataset, batch_size=self.batch_size, sampler=mine, **common)


def shard(n_items: int, rank: int, world: int, durations: list[float] | None) -> list[int]:
    """The item indexes rank ``rank`` of ``world`` processes, in dataset order.

    Items are dealt round-robin in order of duration, so every rank gets a similar amount of
    audio; the same on every rank for the same items (deterministic), each item exactly once
    (no padding with repeated items, unlike ``DistributedSampler``).
    """
    if world == 1:
        return list(range(n_items))
    assert durations is not None
    by_length = sorted(range(n_items), key=lambda i: (durations[i], i))
    return sorted(by_length[rank::world])
