"""The torch arithmetic behind :mod:`audio_models.audio.kaldi`, for a whole padded batch.

``torchaudio.compliance.kaldi.fbank``/``mfcc`` take one waveform at a time. Every step after
framing is per frame, so this module frames each row of a padded batch, runs the same
per-frame arithmetic on all frames of the batch together, and cuts each item's frames back
out. The result equals torchaudio's per-item functions (tested), batched or not.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torchaudio.compliance.kaldi import get_mel_banks
from torchaudio.functional import create_dct

WindowType = Literal["povey", "hanning", "hamming", "rectangular"]
_EPS = torch.finfo(torch.float32).eps


def _next_power_of_2(x: int) -> int:
    return 1 if x == 0 else 2 ** (x - 1).bit_length()


def _window(window_type: str, size: int) -> torch.Tensor:
    if window_type == "povey":
        return torch.hann_window(size, periodic=False).pow(0.85)
    if window_type == "hanning":
        return torch.hann_window(size, periodic=False)
    if window_type == "hamming":
        return torch.hamming_window(size, periodic=False, alpha=0.54, beta=0.46)
    if window_type == "rectangular":
        return torch.ones(size)
    raise ValueError(f"window_type must be povey, hanning, hamming or rectangular: {window_type!r}")


class KaldiFeatures(torch.nn.Module):
    """Batched Kaldi ``compute-fbank-feats``/``compute-mfcc-feats`` (snip_edges, no dither).

    The options and their defaults are :class:`audio_models.audio.kaldi.KaldiConfig`'s, which
    also checks them.

    Args:
        sample_rate: input rate in Hz.
        num_mel_bins: triangular mel filters.
        frame_length_ms: analysis window.
        frame_shift_ms: hop between frames.
        low_freq: lowest filter edge in Hz.
        high_freq: highest edge; ``<= 0`` means Nyquist plus this offset (Kaldi's convention).
        preemphasis_coefficient: applied per frame after DC removal.
        window_type: Kaldi window name.
        remove_dc_offset: subtract each frame's mean.
        raw_energy: take the log energy before pre-emphasis and windowing.
        energy_floor: floor of the log energy (``0`` disables it).
        use_energy: prepend the log energy (fbank) or replace C0 with it (MFCC).
        num_ceps: ``None`` for filterbanks, else the number of cepstra (MFCC).
        cepstral_lifter: MFCC liftering coefficient.
    """

    def __init__(
        self,
        *,
        sample_rate: int,
        num_mel_bins: int,
        frame_length_ms: float,
        frame_shift_ms: float,
        low_freq: float,
        high_freq: float,
        preemphasis_coefficient: float,
        window_type: WindowType,
        remove_dc_offset: bool,
        raw_energy: bool,
        energy_floor: float,
        use_energy: bool,
        num_ceps: int | None,
        cepstral_lifter: float,
    ) -> None:
        super().__init__()
        self.window_size = int(sample_rate * frame_length_ms * 0.001)
        self.window_shift = int(sample_rate * frame_shift_ms * 0.001)
        self.padded_size = _next_power_of_2(self.window_size)
        self.frames_per_block = 32768  # frames of the whole batch processed together
        self.preemphasis = preemphasis_coefficient
        self.remove_dc_offset = remove_dc_offset
        self.raw_energy = raw_energy
        self.log_energy_floor = math.log(energy_floor) if energy_floor > 0 else None
        self.use_energy = use_energy
        self.num_ceps = num_ceps
        self.register_buffer("window", _window(window_type, self.window_size), persistent=False)
        banks, _ = get_mel_banks(
            num_mel_bins,
            self.padded_size,
            float(sample_rate),
            low_freq,
            high_freq,
            100.0,
            -500.0,
            1.0,
        )
        # Kaldi's banks cover padded_size/2 bins; the rfft has one more (Nyquist), weighted 0.
        banks = torch.nn.functional.pad(banks, (0, 1))
        self.register_buffer("mel_banks", banks.T.contiguous(), persistent=False)
        if num_ceps is not None:
            dct = create_dct(num_mel_bins, num_mel_bins, "ortho")
            dct[:, 0] = math.sqrt(1.0 / num_mel_bins)  # Kaldi's C0 scaling
            lifter = 1.0 + 0.5 * cepstral_lifter * torch.sin(
                math.pi * torch.arange(num_ceps) / cepstral_lifter
            )
            if cepstral_lifter == 0.0:
                lifter = torch.ones(num_ceps)
            self.register_buffer("dct", dct[:, :num_ceps] * lifter, persistent=False)

    def num_frames(self, lengths: torch.Tensor) -> torch.Tensor:
        """Frames per item (snip_edges): ``1 + (n - window) // shift``, 0 when too short."""
        n = 1 + torch.div(lengths - self.window_size, self.window_shift, rounding_mode="floor")
        return torch.where(lengths >= self.window_size, n, torch.zeros_like(n))

    def _log_energy(self, frames: torch.Tensor) -> torch.Tensor:
        energy = frames.pow(2).sum(-1).clamp_min(_EPS).log()
        if self.log_energy_floor is not None:
            energy = energy.clamp_min(self.log_energy_floor)
        return energy

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        """Features of each row of a zero-padded ``(batch, samples)`` tensor.

        Returns one ``(n_frames, dim)`` float32 tensor per row.
        """
        counts = self.num_frames(lengths).tolist()
        n_max = max(counts, default=0)
        if n_max == 0:
            return [waveforms.new_zeros((0, self.output_dim)) for _ in counts]
        all_frames = waveforms.float().unfold(1, self.window_size, self.window_shift)[:, :n_max]
        # Frames are independent: process them in blocks so that a 30-minute recording needs
        # memory for one block of intermediates, not for all of its frames at once.
        block = max(1, self.frames_per_block // max(1, waveforms.shape[0]))
        feats = torch.cat(
            [self._frame_features(all_frames[:, i : i + block]) for i in range(0, n_max, block)],
            dim=1,
        )
        return [feats[i, :n] for i, n in enumerate(counts)]

    def _frame_features(self, frames: torch.Tensor) -> torch.Tensor:
        # Exact arithmetic matters more than speed here: no autocast inside.
        with torch.autocast(device_type=frames.device.type, enabled=False):
            if self.remove_dc_offset:
                frames = frames - frames.mean(-1, keepdim=True)
            if self.raw_energy:
                energy = self._log_energy(frames)
            if self.preemphasis != 0.0:
                previous = torch.cat((frames[..., :1], frames[..., :-1]), dim=-1)
                frames = frames - self.preemphasis * previous
            frames = frames * self.window
            frames = torch.nn.functional.pad(frames, (0, self.padded_size - self.window_size))
            if not self.raw_energy:
                energy = self._log_energy(frames)
            power = torch.fft.rfft(frames).abs().pow(2.0)
            feats = torch.matmul(power, self.mel_banks).clamp_min(_EPS).log()
            if self.num_ceps is not None:
                feats = torch.matmul(feats, self.dct)
                if self.use_energy:
                    feats[..., 0] = energy
            elif self.use_energy:
                feats = torch.cat((energy.unsqueeze(-1), feats), dim=-1)
        return feats

    @property
    def output_dim(self) -> int:
        if self.num_ceps is not None:
            return self.num_ceps
        return self.mel_banks.shape[1] + int(self.use_energy)
