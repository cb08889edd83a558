"""Kaldi-compatible filterbanks and MFCCs, computed for a whole padded batch at once.

``torchaudio.compliance.kaldi.fbank``/``mfcc`` take one waveform at a time. Every step after
framing is per frame, so :mod:`audio_models.audio.kaldi_batch` frames each row of a padded
batch, runs the same per-frame arithmetic on all frames of the batch together, and cuts each
item's frames back out. The result equals torchaudio's per-item functions (tested), batched or
not.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from audio_models.extractor import Extractor, OutputKind, Placement
from audio_models.registry import register_extractor
from audio_models.utils.errors import UserError

if TYPE_CHECKING:
    import torch

WINDOW_TYPES = ("povey", "hanning", "hamming", "rectangular")


@dataclass
class KaldiConfig:
    _target_: str = "audio_models.audio.kaldi.KaldiExtractor"
    name: str = "fbank"
    sample_rate: int = 16000  # every input is resampled to this rate
    # [-1, 1] float audio times this; 32768 gives the int16 scale Kaldi's binaries see for PCM16
    waveform_scale: float = 32768.0
    num_mel_bins: int = 80
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    low_freq: float = 20.0
    high_freq: float = 0.0  # <= 0: Nyquist plus this offset (Kaldi's convention)
    preemphasis_coefficient: float = 0.97
    window_type: str = "povey"  # povey | hanning | hamming | rectangular
    remove_dc_offset: bool = True
    raw_energy: bool = True  # log energy before pre-emphasis and windowing
    energy_floor: float = 1.0  # 0 disables the floor
    use_energy: bool = False  # prepend the log energy (fbank) or replace C0 with it (MFCC)
    num_ceps: int | None = None  # None: filterbanks; else the number of cepstra (MFCC)
    cepstral_lifter: float = 22.0


_OPTIONS = tuple(f.name for f in fields(KaldiConfig) if f.name not in ("_target_", "name"))


@register_extractor("fbank", "mfcc", config=KaldiConfig)
class KaldiExtractor(Extractor):
    """``fbank``/``mfcc``: Kaldi-compatible frame features, batched on the device.

    Takes the options of :class:`KaldiConfig` as keywords (its defaults apply to those left
    out; ``num_ceps`` selects MFCC).
    """

    placement = Placement.DEVICE
    kind = OutputKind.FRAMES

    def __init__(self, *, name: str, **options: Any) -> None:
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise TypeError(f"unknown Kaldi options: {unknown}")
        self.options = asdict(KaldiConfig()) | options
        del self.options["_target_"], self.options["name"]
        sample_rate = int(self.options["sample_rate"])
        super().__init__(name=name, sample_rate=sample_rate)
        self.waveform_scale = float(self.options.pop("waveform_scale"))
        opts = self.options
        self.window_size = int(sample_rate * opts["frame_length_ms"] * 0.001)
        self.window_shift = int(sample_rate * opts["frame_shift_ms"] * 0.001)
        if self.window_size < 2 or self.window_shift < 1:
            raise UserError("extractor.frame_length_ms/frame_shift_ms give an empty window or hop")
        if not 0.0 <= opts["preemphasis_coefficient"] <= 1.0:
            raise UserError("extractor.preemphasis_coefficient must lie in [0, 1]")
        num_ceps, num_mel_bins = opts["num_ceps"], opts["num_mel_bins"]
        if num_ceps is not None and not 1 <= num_ceps <= num_mel_bins:
            raise UserError("extractor.num_ceps must lie in [1, num_mel_bins]")
        # torchaudio's get_mel_banks asserts these when load() builds the banks.
        nyquist = sample_rate / 2
        high = opts["high_freq"] if opts["high_freq"] > 0 else nyquist + opts["high_freq"]
        if num_mel_bins <= 3:
            raise UserError(f"extractor.num_mel_bins must be more than 3, got {num_mel_bins}")
        if not 0.0 <= opts["low_freq"] < high <= nyquist:
            raise UserError(
                f"extractor.low_freq={opts['low_freq']} / high_freq={opts['high_freq']}: need "
                f"0 <= low < high <= {nyquist:g} Hz (high <= 0: Nyquist plus high_freq)"
            )
        if opts["window_type"] not in WINDOW_TYPES:
            raise UserError(
                f"extractor.window_type must be one of {WINDOW_TYPES}: {opts['window_type']!r}"
            )
        self._frame_shift_s = self.window_shift / sample_rate
        prefix = "mfcc" if num_ceps is not None else "fbank"
        dim = num_ceps if num_ceps is not None else num_mel_bins + int(opts["use_energy"])
        names = [f"{prefix}_{i}" for i in range(dim)]
        if opts["use_energy"] and num_ceps is None:
            names = ["log_energy"] + [f"{prefix}_{i}" for i in range(dim - 1)]
        self._names = names
        self.module: torch.nn.Module | None = None

    def load(self) -> None:
        if self.module is None:
            from audio_models.audio.kaldi_batch import KaldiFeatures

            self.module = KaldiFeatures(**self.options)

    @property
    def min_samples(self) -> int:
        return self.window_size

    @property
    def feature_names(self) -> list[str]:
        return self._names

    @property
    def frame_shift_s(self) -> float:
        return self._frame_shift_s

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        self.load()
        return self.module(waveforms * self.waveform_scale, lengths)

    def torch_module(self) -> torch.nn.Module:
        self.load()
        return self.module
