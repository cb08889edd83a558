"""Where the batched work runs.

Nothing here imports torch at module level: the runner checks the device part of a
configuration (and a ``device=cuda`` on a machine without a GPU driver) before paying for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from audio_models.utils.errors import UserError

_NO_CUDA = "device=cuda but no CUDA device is visible; use device=cpu or device=auto"
# Device nodes and the procfs entry a loaded GPU kernel driver provides: NVIDIA's (containers
# get /dev/nvidiactl and /dev/nvidia0), WSL2's GPU paravirtualisation (/dev/dxg: no NVIDIA
# nodes there), and ROCm's kfd (PyTorch's ROCm build also reports as "cuda"). Any one present:
# torch decides.
_DRIVER_PATHS = (
    "/proc/driver/nvidia/version",
    "/dev/nvidiactl",
    "/dev/nvidia0",
    "/dev/dxg",
    "/dev/kfd",
)


def gpu_driver_absent() -> str | None:
    """Why CUDA certainly cannot work here, judged without importing torch; None when it may.

    A hidden device list (``CUDA_VISIBLE_DEVICES`` empty or ``-1``) or no GPU kernel driver at
    all is certain; anything else is left to ``torch.cuda.is_available()``.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in {"", "-1"}:
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every device"
    if not any(Path(p).exists() for p in _DRIVER_PATHS):
        return "no GPU driver is loaded (" + ", ".join(_DRIVER_PATHS) + " are absent)"
    return None


# No "bf16-true"/"16-true": Lightning would cast the batch's waveforms to half precision (an
# 8-bit mantissa for bf16) before any extractor's fp32 front end saw them, and the models'
# weights with them; the mixed precisions keep both in fp32 and autocast the matmuls.
PRECISIONS = ("32", "32-true", "bf16-mixed", "16-mixed")


@dataclass(frozen=True)
class DeviceSpec:
    """Trainer placement: ``accelerator`` is ``cpu``, ``cuda`` or ``auto`` (cuda when present).

    Args:
        accelerator: where ``predict_step`` runs.
        devices: device count (or ``"auto"``).
        precision: Lightning precision string.
        onednn_linear: on the CPU, run fp32 ``nn.Linear`` layers through oneDNN instead of
            MKL (see :class:`OneDnnLinear`).
        strategy: Lightning strategy; ``ddp`` runs one process per device (and node), each
            on its own shard of the items.
        num_nodes: machines taking part (``ddp`` on a cluster).
    """

    accelerator: str = "auto"
    devices: int | str = 1
    precision: str = "32"
    onednn_linear: bool = True
    strategy: str = "auto"
    num_nodes: int = 1

    def __post_init__(self) -> None:
        if self.accelerator not in {"cpu", "cuda", "auto"}:
            raise ValueError(
                f"device.accelerator must be cpu, cuda or auto, got {self.accelerator!r}"
            )
        if str(self.precision) not in PRECISIONS:
            raise ValueError(
                f"device.precision must be one of {PRECISIONS}, got {self.precision!r}"
                + (" (use bf16-mixed or 16-mixed)" if str(self.precision).endswith("-true") else "")
            )

    @property
    def resolved_accelerator(self) -> str:
        if self.accelerator == "auto":
            if gpu_driver_absent() is not None:
                return "cpu"
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.accelerator

    def check_available(self) -> None:
        """Raise a one-line error when CUDA is asked for but absent (before any work).

        Where the driver is missing this answers without importing torch; otherwise torch
        decides (its import is the first thing a CUDA run pays for anyway).
        """
        if self.accelerator != "cuda":
            return
        reason = gpu_driver_absent()
        if reason is not None:
            raise UserError(f"{_NO_CUDA} ({reason})")
        import torch

        if not torch.cuda.is_available():
            raise UserError(_NO_CUDA)

    @property
    def distributed(self) -> bool:
        return self.strategy.startswith("ddp") or self.num_nodes > 1

    def trainer_kwargs(self) -> dict[str, object]:
        return {
            "accelerator": self.resolved_accelerator,
            "devices": self.devices,
            "precision": str(self.precision),
            "strategy": self.strategy,
            "num_nodes": self.num_nodes,
            # Items are sharded by the data module (deterministic, length-balanced, no
            # repeated items); Lightning's DistributedSampler would pad with duplicates.
            "use_distributed_sampler": False,
        }


def is_launch_rank_zero() -> bool:
    """Whether this process will be global rank 0, judged from what the launcher set before
    any Trainer exists: ``RANK``; else SLURM's task id in a multi-task step; else local and
    node rank (Lightning's launcher starts ranks > 0 with ``LOCAL_RANK``/``NODE_RANK``; the
    launching process has neither). Set-up only rank 0 may do — MLflow, cleaning the output
    directory — is skipped elsewhere."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"]) == 0
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]) == 0
    return int(env.get("LOCAL_RANK", "0")) == 0 and int(env.get("NODE_RANK", "0")) == 0
