"""Where the batched work runs."""

from __future__ import annotations

import os
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


class OneDnnLinear(torch.nn.Linear):
    """``nn.Linear`` whose fp32 CPU matmuls go through oneDNN with a prepacked weight.

    PyTorch sends fp32 ``F.linear`` on the CPU to MKL's sgemm, which on AMD processors runs a
    generic code path: on this project's EPYC (AVX-512) machines it reaches ~190 GFLOP/s where
    oneDNN's packed kernels reach ~470 for the shapes of a speech transformer. Same fp32 math,
    another summation order (differences around 1e-6 relative). Anything else — CUDA tensors,
    autocast, other dtypes, gradients — takes the stock path.
    """

    _packed: tuple[int, int, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.device.type != "cpu"
            or x.dtype != torch.float32
            or self.weight.dtype != torch.float32
            or torch.is_autocast_enabled("cpu")
            or torch.is_grad_enabled()
        ):
            return super().forward(x)
        key = (self.weight.data_ptr(), self.weight._version)
        if self._packed is None or self._packed[:2] != key:
            packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 1024)
            self._packed = (*key, packed)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed[2], self.bias, "none", [], "")


def onednn_available() -> bool:
    """Whether this torch build has the oneDNN linear kernels (and they run here)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        x, w = torch.ones(2, 4), torch.ones(3, 4)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 2)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return bool(torch.equal(out, torch.full((2, 3), 4.0)))
    except (RuntimeError, AttributeError):
        return False


def use_onednn_linears(module: torch.nn.Module) -> int:
    """Turn every plain ``nn.Linear`` inside ``module`` into a :class:`OneDnnLinear` (in place,
    keeping the parameters); returns how many. No-op where oneDNN is unavailable."""
    if not onednn_available():
        return 0
    count = 0
    for child in module.modules():
        if type(child) is torch.nn.Linear:
            child.__class__ = OneDnnLinear
            count += 1
    return count
