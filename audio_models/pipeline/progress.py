"""Progress in items and audio seconds: a bar on a terminal, a periodic log line elsewhere."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
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


log = logging.getLogger("runners.extract")
# Lightning's own start-up notes: "GPU available: …", "💡 Tip: …", "attempting graceful
# shutdown" — the run's device and its interruption are reported by the runner already.
_CHATTY = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's informational notes off (its warnings stay, but one: that the loader's own
    length-bucketing batch sampler is custom — it is, on purpose, and returns every item),
    levels and filters restored after."""
    loggers = [logging.getLogger(name) for name in _CHATTY]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="You are using a custom batch sampler", category=UserWarning
            )
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


class ProgressLog(L.Callback):
    """One log line every ``every_s`` seconds (and none for a short run): items, audio
    seconds and the rate so far, for logs where a progress bar would be noise."""

    def __init__(self, every_s: float = 30.0, total: int | None = None) -> None:
        self.every_s = max(float(every_s), 1.0)
        self._total = total  # items this session will process, when known
        self._items = 0
        self._audio_s = 0.0
        self._started = self._last = 0.0

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._items, self._audio_s = 0, 0.0
        self._started = self._last = time.perf_counter()

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        records = outputs or []
        self._items += len(records)
        self._audio_s += sum(r.duration_s for r in records if r.failure is None)
        now = time.perf_counter()
        if now - self._last < self.every_s:
            return
        self._last = now
        of = f"/{self._total}" if self._total is not None else ""
        elapsed = now - self._started
        log.info(
            "progress: %d%s items, %.1f s of audio in %.0f s (%.1f audio s/s)",
            self._items,
            of,
            self._audio_s,
            elapsed,
            self._audio_s / elapsed,
        )
