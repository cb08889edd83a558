"""A progress bar that counts items and audio seconds, not just batches."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class ThroughputProgressBar(TQDMProgressBar):
    """Lightning's bar with items/s and audio-seconds/s in its postfix."""

    def __init__(self, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self._items = 0
        self._audio_s = 0.0
        self._started = 0.0

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_predict_start(trainer, pl_module)
        self._items, self._audio_s, self._started = 0, 0.0, time.perf_counter()

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        records = outputs or []
        self._items += len(records)
        self._audio_s += sum(r.duration_s for r in records if r.failure is None)
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        bar = self.predict_progress_bar
        if bar is not None and not bar.disable:
            bar.set_postfix(
                items=self._items,
                items_per_s=f"{self._items / elapsed:.1f}",
                audio_s_per_s=f"{self._audio_s / elapsed:.1f}",
            )
