"""fp32 ``nn.Linear`` on the CPU through oneDNN's prepacked kernels (see :class:`OneDnnLinear`)."""

from __future__ import annotations

import torch


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
