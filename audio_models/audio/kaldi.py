"""Kaldi-compatible filterbanks and MFCCs, computed for a whole padded batch at once.

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

from audio_models.extractor import Extractor, OutputKind, Placement

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
        sample_rate: int = 16000,
        num_mel_bins: int = 23,
        frame_length_ms: float = 25.0,
        frame_shift_ms: float = 10.0,
        low_freq: float = 20.0,
        high_freq: float = 0.0,
        preemphasis_coefficient: float = 0.97,
        window_type: WindowType = "povey",
        remove_dc_offset: bool = True,
        raw_energy: bool = True,
        energy_floor: float = 1.0,
        use_energy: bool = False,
        num_ceps: int | None = None,
        cepstral_lifter: float = 22.0,
    ) -> None:
        super().__init__()
        self.window_size = int(sample_rate * frame_length_ms * 0.001)
        self.window_shift = int(sample_rate * frame_shift_ms * 0.001)
        if self.window_size < 2 or self.window_shift < 1:
            raise ValueError("frame_length_ms/frame_shift_ms give an empty window or hop")
        if not 0.0 <= preemphasis_coefficient <= 1.0:
            raise ValueError("preemphasis_coefficient must lie in [0, 1]")
        if num_ceps is not None and not 1 <= num_ceps <= num_mel_bins:
            raise ValueError("num_ceps must lie in [1, num_mel_bins]")
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


class KaldiExtractor(Extractor):
    """``fbank``/``mfcc``: Kaldi-compatible frame features, batched on the device.

    Args:
        name: registered extractor name.
        sample_rate: every input is resampled to this rate.
        waveform_scale: multiply [-1, 1] float audio by this first; 32768 gives the int16
            scale that Kaldi's own binaries see for PCM16 input.
        **options: :class:`KaldiFeatures` options (``num_ceps`` selects MFCC).
    """

    placement = Placement.DEVICE
    kind = OutputKind.FRAMES

    def __init__(
        self,
        *,
        name: str,
        sample_rate: int = 16000,
        waveform_scale: float = 32768.0,
        num_mel_bins: int = 23,
        frame_length_ms: float = 25.0,
        frame_shift_ms: float = 10.0,
        low_freq: float = 20.0,
        high_freq: float = 0.0,
        preemphasis_coefficient: float = 0.97,
        window_type: WindowType = "povey",
        remove_dc_offset: bool = True,
        raw_energy: bool = True,
        energy_floor: float = 1.0,
        use_energy: bool = False,
        num_ceps: int | None = None,
        cepstral_lifter: float = 22.0,
    ) -> None:
        super().__init__(name=name, sample_rate=sample_rate)
        self.waveform_scale = waveform_scale
        self.module = KaldiFeatures(
            sample_rate=sample_rate,
            num_mel_bins=num_mel_bins,
            frame_length_ms=frame_length_ms,
            frame_shift_ms=frame_shift_ms,
            low_freq=low_freq,
            high_freq=high_freq,
            preemphasis_coefficient=preemphasis_coefficient,
            window_type=window_type,
            remove_dc_offset=remove_dc_offset,
            raw_energy=raw_energy,
            energy_floor=energy_floor,
            use_energy=use_energy,
            num_ceps=num_ceps,
            cepstral_lifter=cepstral_lifter,
        )
        self._frame_shift_s = self.module.window_shift / sample_rate
        prefix = "mfcc" if num_ceps is not None else "fbank"
        names = [f"{prefix}_{i}" for i in range(self.module.output_dim)]
        if use_energy and num_ceps is None:
            names = ["log_energy"] + [f"{prefix}_{i}" for i in range(self.module.output_dim - 1)]
        self._names = names

    @property
    def min_samples(self) -> int:
        return self.module.window_size

    @property
    def feature_names(self) -> list[str]:
        return self._names

    @property
    def frame_shift_s(self) -> float:
        return self._frame_shift_s

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        return self.module(waveforms * self.waveform_scale, lengths)

    def torch_module(self) -> torch.nn.Module:
        return self.module
