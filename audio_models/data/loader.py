"""The loader: decode → channel policy → resample → preflight → ``transform``, in workers."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from audio_models.audio.io import ChannelPolicy, decode
from audio_models.data.items import Item
from audio_models.extractor import Extractor, Output
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
    meta: dict[str, Any] = field(default_factory=dict)
    features: np.ndarray | None = None
    extra: dict[str, str] = field(default_factory=dict)
    signal: np.ndarray | None = None
    failure: Failure | None = None

    @property
    def duration_s(self) -> float:
        return float(self.meta.get("duration_s", 0.0))


def fail(record: Record, stage: str, exc: BaseException) -> Record:
    """Mark ``record`` failed at ``stage`` (or at the stage the error names)."""
    stage = exc.stage if isinstance(exc, ExtractionError) else stage
    record.failure = Failure(stage=stage, error_type=type(exc).__name__, message=str(exc)[:2000])
    record.signal = None
    record.features = None
    return record


class ItemDataset(Dataset[Record]):
    """Maps an index to a decoded (and, for CPU extractors, transformed) :class:`Record`.

    Never raises for bad input: the error becomes the record's :class:`Failure`.
    """

    def __init__(
        self, items: list[Item], extractor: Extractor, channel_policy: ChannelPolicy
    ) -> None:
        self.items = items
        self.extractor = extractor
        self.channel_policy = channel_policy

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Record:
        item = self.items[index]
        record = Record(item=item)
        try:
            decoded = decode(
                item.path,
                start=item.start,
                end=item.end,
                channel_policy=self.channel_policy,
                target_sample_rate=self.extractor.sample_rate,
            )
        except Exception as exc:
            return fail(record, "decode", exc)
        record.meta = {
            "start": decoded.start,
            "end": decoded.end,
            "duration_s": decoded.duration_s,
            "sample_rate": decoded.sample_rate,
            "source_sample_rate": decoded.source_sample_rate,
            "n_channels": decoded.n_channels,
            "channel_policy": self.channel_policy,
        }
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
        if not self.extractor.uses_transform:
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


def _worker_init(_: int) -> None:
    # Each worker is one process doing one item at a time: oversubscribing the cores with
    # intra-op threads only slows the pool down.
    torch.set_num_threads(1)


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
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.dataset = ItemDataset(items, extractor, channel_policy)
        self.batch_size = batch_size
        self.num_workers = (os.cpu_count() or 1) if num_workers is None else num_workers
        self.pin_memory = pin_memory

    def transfer_batch_to_device(
        self, batch: Batch, device: torch.device, dataloader_idx: int
    ) -> Batch:
        # Only the padded tensors travel; records (numpy, strings) stay on the host.
        if batch.waveforms is not None:
            batch.waveforms = batch.waveforms.to(device, non_blocking=True)
            batch.lengths = batch.lengths.to(device, non_blocking=True)
        return batch

    def predict_dataloader(self) -> DataLoader[Record]:
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate,
            worker_init_fn=_worker_init if self.num_workers > 0 else None,
            pin_memory=self.pin_memory,
        )
