"""The LightningModule around an extractor."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from audio_models.data.loader import Batch, Record, fail
from audio_models.extractor import Extractor


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

    @torch.inference_mode()
    def predict_step(self, batch: Batch, batch_idx: int) -> list[Record]:
        if batch.waveforms is None:
            return batch.records
        records = [batch.records[i] for i in batch.rows]
        try:
            outputs = self.extractor.forward(batch.waveforms, batch.lengths)
            self._store(records, outputs)
        except Exception:
            for row, record in enumerate(records):
                n = int(batch.lengths[row])
                try:
                    out = self.extractor.forward(
                        batch.waveforms[row : row + 1, :n], batch.lengths[row : row + 1]
                    )
                    self._store([record], out)
                except Exception as exc:
                    fail(record, "forward", exc)
        return batch.records

    @staticmethod
    def _store(records: list[Record], outputs: list[Any]) -> None:
        if len(outputs) != len(records):
            raise RuntimeError(
                f"extractor returned {len(outputs)} outputs for {len(records)} items"
            )
        for record, out in zip(records, outputs, strict=True):
            record.features = out.detach().float().cpu().numpy()
