"""Where the batched work runs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from audio_models.utils.errors import UserError

PRECISIONS = ("32", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true")


@dataclass(frozen=True)
class DeviceSpec:
    """Trainer placement: ``accelerator`` is ``cpu``, ``cuda`` or ``auto`` (cuda when present).

    Args:
        accelerator: where ``predict_step`` runs.
        devices: device count (or ``"auto"``).
        precision: Lightning precision string.
    """

    accelerator: str = "auto"
    devices: int | str = 1
    precision: str = "32"

    def __post_init__(self) -> None:
        if self.accelerator not in {"cpu", "cuda", "auto"}:
            raise ValueError(
                f"device.accelerator must be cpu, cuda or auto, got {self.accelerator!r}"
            )
        if str(self.precision) not in PRECISIONS:
            raise ValueError(
                f"device.precision must be one of {PRECISIONS}, got {self.precision!r}"
            )

    @property
    def resolved_accelerator(self) -> str:
        if self.accelerator == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.accelerator

    def check_available(self) -> None:
        """Raise a one-line error when CUDA is asked for but absent (before any work)."""
        if self.accelerator == "cuda" and not torch.cuda.is_available():
            raise UserError(
                "device=cuda but no CUDA device is visible; use device=cpu or device=auto"
            )

    def trainer_kwargs(self) -> dict[str, object]:
        return {
            "accelerator": self.resolved_accelerator,
            "devices": self.devices,
            "precision": str(self.precision),
        }
