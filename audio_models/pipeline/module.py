"""The LightningModule around an extractor."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from audio_models.data.loader import Batch, Record, fail
from audio_models.extractor import Extractor, Output, Transcript


class ExtractionModule(L.LightningModule):
    """Runs ``extractor.forward`` on each batch's padded signals; CPU features pass through.

    A batch whose forward raises is retried item by item, so one bad item becomes one failure
    row instead of losing the batch.
    """

    def __init__(self, extractor: Extractor) -> None:
        super().__init__()
        self.extractor = extractor
        module = extractor.torch_module()
        # Registered as a child so that Lightning moves its parameters/buffers to the device.
        self.model = module.eval() if module is not None else None
        self.padded_samples = 0  # zeros the device processed only because of batching
        self.batch_samples = 0

    @property
    def padding_fraction(self) -> float:
        """Share of the samples the model processed that were padding."""
        return self.padded_samples / self.batch_samples if self.batch_samples else 0.0

    def on_predict_start(self) -> None:
        self.extractor.on_device(self.device)

    @torch.inference_mode()
    def predict_step(self, batch: Batch, batch_idx: int) -> list[Record]:
        if batch.waveforms is None:
            return batch.records
        records = [batch.records[i] for i in batch.rows]
        padded = self.extractor.padded_samples(batch.lengths, batch.waveforms.device)
        self.batch_samples += int(batch.lengths.sum()) + padded
        self.padded_samples += padded
        self._run(records, batch.waveforms, batch.lengths)
        return batch.records

    def _run(self, records: list[Record], waveforms: torch.Tensor, lengths: torch.Tensor) -> None:
        """Forward ``records``; on out-of-memory split the batch in halves, on any other error
        retry item by item, so that only the items that really fail are lost."""
        try:
            outputs = self.extractor.forward(waveforms, lengths)
        except torch.OutOfMemoryError as exc:
            if len(records) == 1:
                fail(records[0], "forward", exc)
                return
            if waveforms.is_cuda:
                torch.cuda.empty_cache()
            half = len(records) // 2
            for part in (slice(0, half), slice(half, None)):
                longest = int(lengths[part].max())  # trim the padding the half does not need
                self._run(records[part], waveforms[part, :longest], lengths[part])
            return
        except Exception:
            outputs = None  # some item breaks the batch: find it below
        if outputs is not None and len(outputs) == len(records):
            self._store(records, outputs)
            return
        for row, record in enumerate(records):
            n = int(lengths[row])
            try:
                self._store(
                    [record],
                    self.extractor.forward(waveforms[row : row + 1, :n], lengths[row : row + 1]),
                )
            except Exception as exc:
                fail(record, "forward", exc)

    @staticmethod
    def _store(records: list[Record], outputs: list[Any]) -> None:
        if len(outputs) != len(records):
            raise RuntimeError(
                f"extractor returned {len(outputs)} outputs for {len(records)} items"
            )
        for record, out in zip(records, outputs, strict=True):
            if isinstance(out, Transcript):
                record.transcript = out
                continue
            if isinstance(out, Output):  # text columns beside the numbers (a predicted label)
                record.extra = out.extra
                out = out.values
            record.features = out.detach().float().cpu().numpy()
