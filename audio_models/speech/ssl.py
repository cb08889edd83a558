"""Self-supervised speech representations (wav2vec 2.0 / XLSR, HuBERT, WavLM) via transformers.

One implementation for every family: the model's own feature extractor settings decide the
input normalisation, and its config decides how padding is handled. Layer-norm feature
encoders (XLSR, the large models) take padded batches with an attention mask; group-norm ones
(wav2vec2-base, HuBERT-base, WavLM-base) change their output when padded, so their rows run in
groups of equal length. Either way a batch gives the numbers each file gives alone.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import MISSING

from audio_models.extractor import Extractor, OutputKind, Placement
from audio_models.registry import register_extractor
from audio_models.speech.hub import hub_provenance, load_pretrained
from audio_models.utils.errors import UserError
from audio_models.utils.provenance import sha256_file

if TYPE_CHECKING:
    import torch

POOLINGS = ("none", "mean", "mean_std")


def _load(model: str, revision: str | None) -> tuple[Any, Any, Path]:
    """Feature extractor, model and the folder the files came from."""
    from transformers import AutoFeatureExtractor, AutoModel

    (extractor, network), folder = load_pretrained(
        model, revision, [AutoFeatureExtractor.from_pretrained, AutoModel.from_pretrained]
    )
    return extractor, network, folder


def checked_layers(layers: list[int] | str, n_states: int) -> list[int]:
    """Hidden-state indices (negative from the end, or ``"all"``) as ``0..n_states-1``."""
    chosen = list(range(n_states)) if layers == "all" else [int(x) for x in layers]
    bad = [x for x in chosen if not -n_states <= x < n_states]
    if bad or not chosen:
        raise UserError(f"extractor.layers {bad or chosen} outside the model's 0..{n_states - 1}")
    return [x % n_states for x in chosen]


# Encoders whose hidden states stay those of the full model when the layers above the deepest
# requested one are removed (each collects its input to every layer; the stable-layer-norm ones
# then normalise the last layer's output). Others, SEW's pooling encoder say, run whole.
_TRUNCATABLE = {
    f"{family}{kind}"
    for family in ("Wav2Vec2", "Hubert", "WavLM", "Data2VecAudio")
    for kind in ("Encoder", "EncoderStableLayerNorm")
}


def _drop_layers_above(network: Any, deepest: int) -> None:
    """Remove the transformer layers above hidden state ``deepest`` from ``network``: nobody
    reads them (``layers=[6]`` of XLSR's 24: 1.5 s per 10-s file instead of 2.8 s on a 2-core
    CPU; the convolutional feature encoder is the part that stays).

    A stable-layer-norm encoder (the large models, XLSR) normalises its last layer's output,
    which is then its last hidden state; the full model gives hidden state ``deepest`` raw,
    so once that layer is the last the norm goes too.
    """
    import torch

    encoder = getattr(network, "encoder", None)
    layers = getattr(encoder, "layers", None)
    total = network.config.num_hidden_layers
    if (
        deepest >= total
        or type(encoder).__name__ not in _TRUNCATABLE
        or not isinstance(layers, torch.nn.ModuleList)
        or len(layers) != total
    ):
        return
    encoder.layers = layers[:deepest]
    if type(encoder).__name__.endswith("StableLayerNorm"):
        encoder.layer_norm = torch.nn.Identity()


def _checked_pooling(pooling: str) -> str:
    if pooling not in POOLINGS:
        raise UserError(f"extractor.pooling must be one of {POOLINGS}, got {pooling!r}")
    return pooling


@dataclass
class SslOutputConfig:
    """What every wav2vec2-family extractor takes beside where its model comes from."""

    # [indices] (0 = the feature projection, k = transformer layer k, -1 = last) or "all"
    layers: Any = field(default_factory=lambda: [-1])
    pooling: str = "mean"  # none (frames) | mean | mean_std
    sample_rate: int = 16000
    # Longer recordings run in overlapping chunks stitched on the frame grid (null: whole
    # files, exact but memory grows with length).
    max_chunk_s: float | None = 30.0
    overlap_s: float = 2.0
    chunk_batch: int = 4  # chunks of one recording per forward
    storage_dtype: str = "float32"  # float32 | float16 (stored values; compute unaffected)


@dataclass
class SslConfig(SslOutputConfig):
    _target_: str = "audio_models.speech.ssl.SelfSupervisedExtractor"
    # Set by each conf/extractor YAML (xlsr, wav2vec2, hubert, wavlm): the one place they live.
    name: str = MISSING
    model: str = MISSING  # hub id or local directory
    revision: str | None = None


@register_extractor("xlsr", "wav2vec2", "hubert", "wavlm", config=SslConfig)
class SelfSupervisedExtractor(Extractor):
    """Hidden states of a wav2vec2-family model, pooled per item or frame by frame.

    Args:
        name: registered extractor name.
        model: hub id or local directory (the same code path).
        revision: pinned hub commit (ignored for a local directory).
        layers: hidden-state indices (0 = the feature projection, k = transformer layer k;
            negative from the end) or ``"all"``.
        pooling: ``none`` (frames), ``mean`` or ``mean_std`` over the valid frames.
        sample_rate: the model's input rate.
    """

    placement = Placement.DEVICE
    #: Pad layer-norm batches on the CPU too (tests use it to exercise the masked path there).
    pad_on_cpu = False

    def __init__(
        self,
        *,
        name: str,
        model: str,
        revision: str | None = None,
        layers: list[int] | str = (-1,),
        pooling: str = "mean",
        sample_rate: int = 16000,
        max_chunk_s: float | None = 30.0,
        overlap_s: float = 2.0,
        chunk_batch: int = 4,
        storage_dtype: str = "float32",
    ) -> None:
        super().__init__(name=name, sample_rate=sample_rate, storage_dtype=storage_dtype)
        self.model_id, self.revision = model, revision
        self._describe(layers, pooling, max_chunk_s, overlap_s, chunk_batch)

    def _describe(
        self,
        layers: list[int] | str,
        pooling: str,
        max_chunk_s: float | None,
        overlap_s: float,
        chunk_batch: int,
    ) -> None:
        """Check the options that need no model; :meth:`load` applies them to the model."""
        self.pooling = _checked_pooling(pooling)
        if layers != "all" and (
            isinstance(layers, str) or not all(isinstance(x, int) for x in layers)
        ):
            raise UserError(f"extractor.layers must be a list of indices or 'all', got {layers!r}")
        if max_chunk_s is not None and (max_chunk_s <= 0 or not 0 <= overlap_s < max_chunk_s):
            raise UserError(
                f"extractor.max_chunk_s={max_chunk_s} / overlap_s={overlap_s}: need "
                "0 <= overlap_s < max_chunk_s"
            )
        self._requested = (layers, max_chunk_s, overlap_s, chunk_batch)
        self._loaded = False

    def load(self) -> None:
        if self._loaded:
            return
        self._read_weights(self._requested[0])
        self._plan_chunks(*self._requested[1:])
        self._loaded = True

    def _read_weights(self, layers: list[int] | str) -> None:
        """Load the network and call :meth:`_setup` (each model family its own way)."""
        feature_extractor, network, folder = _load(self.model_id, self.revision)
        self._setup(network, feature_extractor, layers, self.sample_rate or 16000)
        self._provenance.update(
            hub_provenance("ssl", self.model_id, self.revision, network, folder)
        )

    def _setup(
        self, network: Any, feature_extractor: Any, layers: list[int] | str, sample_rate: int
    ) -> None:
        """Read padding behaviour, layers and frame geometry from a loaded model."""
        import torch

        self.network = network.eval()
        if getattr(feature_extractor, "sampling_rate", sample_rate) != sample_rate:
            raise UserError(
                f"{self.model_id} expects {feature_extractor.sampling_rate} Hz; "
                "set extractor.sample_rate"
            )
        self.normalize = bool(getattr(feature_extractor, "do_normalize", False))
        config = self.network.config
        # Group-norm feature encoders see the padding: such models never get padded input.
        self.use_mask = config.feat_extract_norm == "layer"
        self.layers = checked_layers(layers, config.num_hidden_layers + 1)
        _drop_layers_above(self.network, max(self.layers))
        self.dim = config.hidden_size
        self.stride = int(torch.prod(torch.tensor(config.conv_stride)))
        self._frame_shift = self.stride / sample_rate
        self._provenance = {
            "ssl.padding": "attention-mask" if self.use_mask else "equal-length groups"
        }

    def _plan_chunks(self, max_chunk_s: float | None, overlap_s: float, chunk_batch: int) -> None:
        """Chunk geometry in samples, on the frame grid so chunk frames are the file's frames."""
        self.chunk_batch = max(1, int(chunk_batch))
        if max_chunk_s is None:
            self.chunk = self.overlap = None
            return
        rate = self.sample_rate or 16000
        self.chunk = max(1, round(max_chunk_s * rate / self.stride)) * self.stride
        self.overlap = round(overlap_s * rate / self.stride) * self.stride
        field = self._receptive_field()
        if self.chunk < field or not 0 <= self.overlap < self.chunk:
            raise UserError(
                f"extractor.max_chunk_s={max_chunk_s} / overlap_s={overlap_s}: need "
                f"0 <= overlap < chunk and a chunk of at least {field} samples"
            )

    @property
    def kind(self) -> OutputKind:  # type: ignore[override]
        return OutputKind.FRAMES if self.pooling == "none" else OutputKind.VECTOR

    @property
    def min_samples(self) -> int:
        self.load()
        return self._receptive_field()

    def _receptive_field(self) -> int:
        """Samples the conv stack needs for one frame."""
        config = self.network.config
        field, jump = 1, 1
        for kernel, stride in zip(config.conv_kernel, config.conv_stride, strict=True):
            field += (kernel - 1) * jump
            jump *= stride
        return field

    @property
    def frame_shift_s(self) -> float:
        self.load()
        return self._frame_shift

    @property
    def feature_groups(self) -> list[tuple[str, int]]:
        """One list column per layer (and statistic)."""
        self.load()
        stats = {"none": [""], "mean": ["_mean"], "mean_std": ["_mean", "_std"]}[self.pooling]
        return [(f"layer_{layer}{stat}", self.dim) for layer in self.layers for stat in stats]

    @property
    def feature_names(self) -> list[str]:
        return [f"{group}_{j}" for group, size in self.feature_groups for j in range(size)]

    def torch_module(self) -> torch.nn.Module:
        self.load()
        return self.network

    def _pads(self, device: torch.device) -> bool:
        """Whether rows of different lengths share a padded forward. Only for layer-norm
        encoders, and only on accelerators: on a CPU a padded batch is no faster than its rows
        one by one (the matmuls are already large), so the padding would be pure waste."""
        return self.use_mask and (device.type != "cpu" or self.pad_on_cpu)

    def padded_samples(self, lengths: torch.Tensor, device: torch.device) -> int:
        self.load()
        if not self._pads(device):
            return 0
        short = lengths[lengths <= self.chunk] if self.chunk is not None else lengths
        return super().padded_samples(short, device)

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        import torch

        self.load()
        outputs: list[torch.Tensor | None] = [None] * len(lengths)
        # Rows longer than a chunk run alone, chunk by chunk; the rest run batched: padded
        # with a mask where that pays (see _pads), else in groups of equal length, unpadded.
        pads = self._pads(waveforms.device)
        groups: dict[int, list[int]] = defaultdict(list)
        padded: list[int] = []
        for row, n in enumerate(lengths.tolist()):
            if self.chunk is not None and n > self.chunk:
                outputs[row] = self._forward_long(waveforms[row, :n])
            elif pads:
                padded.append(row)
            else:
                groups[n].append(row)
        if padded:
            groups[int(lengths[padded].max())] = padded
        for n, rows in groups.items():
            index = torch.tensor(rows, device=waveforms.device)
            results = self._forward_padded(waveforms[index, :n], lengths[index])
            for row, result in zip(rows, results, strict=True):
                outputs[row] = result
        return outputs  # type: ignore[return-value]

    def _normalised(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Wav2Vec2FeatureExtractor's zero-mean unit-variance over each item's own samples."""
        import torch

        x = x.float()
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
        if not self.normalize:
            return torch.where(valid, x, torch.zeros_like(x))
        n = lengths[:, None].to(x.dtype)
        mean = (x * valid).sum(1, keepdim=True) / n
        var = (((x - mean) * valid) ** 2).sum(1, keepdim=True) / n
        return torch.where(valid, (x - mean) / torch.sqrt(var + 1e-7), torch.zeros_like(x))

    def _frame_counts(self, samples: torch.Tensor) -> torch.Tensor:
        """Frames the model gives for inputs of ``samples`` samples."""
        return self.network._get_feat_extract_output_lengths(samples)

    def _hidden(self, x: torch.Tensor, lengths: torch.Tensor) -> list[list[torch.Tensor]]:
        """Per row, the selected layers' valid frames of an already normalised batch."""
        import torch

        mask = None
        if self.use_mask:
            mask = (torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]).long()
        out = self.network(x, attention_mask=mask, output_hidden_states=True)
        frames = self._frame_counts(lengths).tolist()
        states = [out.hidden_states[layer] for layer in self.layers]
        return [[s[row, :count].float() for s in states] for row, count in enumerate(frames)]

    def _forward_padded(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        x = self._normalised(waveforms, lengths)
        return [self._pool(per_layer) for per_layer in self._hidden(x, lengths)]

    def _pool(self, per_layer: list[torch.Tensor]) -> torch.Tensor:
        import torch

        if self.pooling == "none":
            return torch.cat(per_layer, dim=-1)
        pooled = []
        for h in per_layer:
            pooled.append(h.mean(0))
            if self.pooling == "mean_std":
                pooled.append(h.std(0, unbiased=False))
        return torch.cat(pooled)

    def chunk_starts(self, n: int) -> list[int]:
        """Start samples of the chunks covering ``n`` samples: every ``chunk - overlap``, and a
        last chunk ending at the end of the file; all on the frame grid."""
        assert self.chunk is not None and self.overlap is not None
        hop = self.chunk - self.overlap
        starts = list(range(0, max(n - self.chunk, 0), hop)) or [0]
        last = max(0, (n - self.chunk) // self.stride * self.stride)
        if last <= starts[-1]:
            starts[-1] = last  # the last chunk covers the previous one's span and more
        else:
            starts.append(last)
        return starts

    def _forward_long(self, signal: torch.Tensor) -> torch.Tensor:
        """One long recording in overlapping chunks; each frame is taken from the chunk where
        it is furthest from an edge, so the stitched frames are the file's frame grid. Pools
        accumulate on the fly, so memory is bounded by the chunk batch, not the file."""
        import torch

        n = signal.shape[0]
        total = torch.tensor([n], device=signal.device)
        # Normalise over the whole file, as the model's feature extractor does.
        x = self._normalised(signal[None], total)[0]
        starts = self.chunk_starts(n)
        ends = [s + self.chunk for s in starts[:-1]] + [n]
        counts = self._frame_counts(
            torch.tensor([e - s for s, e in zip(starts, ends, strict=True)])
        ).tolist()
        firsts = [s // self.stride for s in starts]
        n_frames = int(self._frame_counts(total.cpu()))
        # Keep [cut_k, cut_{k+1}): cut at the middle of each pair's overlapping frames.
        cuts = [0]
        for k in range(len(starts) - 1):
            cuts.append((firsts[k + 1] + firsts[k] + counts[k]) // 2)
        cuts.append(n_frames)
        kept: list[list[torch.Tensor]] = []  # frames (pooling none)
        sums: list[torch.Tensor] | None = None  # pooled: per layer sum and sum of squares
        for first in range(0, len(starts), self.chunk_batch):
            group = range(first, min(first + self.chunk_batch, len(starts)))
            lengths = torch.tensor([ends[k] - starts[k] for k in group], device=x.device)
            batch = torch.zeros(len(group), int(lengths.max()), device=x.device)
            for row, k in enumerate(group):
                batch[row, : ends[k] - starts[k]] = x[starts[k] : ends[k]]
            if self.use_mask or len(set(lengths.tolist())) == 1:
                results = self._hidden(batch, lengths)
            else:  # group-norm: the unequal last chunk runs on its own
                results = [
                    self._hidden(batch[row : row + 1, : int(m)], lengths[row : row + 1])[0]
                    for row, m in enumerate(lengths.tolist())
                ]
            for k, per_layer in zip(group, results, strict=True):
                a, b = cuts[k] - firsts[k], cuts[k + 1] - firsts[k]
                piece = [h[a:b] for h in per_layer]
                if self.pooling == "none":
                    kept.append(piece)
                    continue
                stats = [t for h in piece for t in (h.double().sum(0), (h.double() ** 2).sum(0))]
                sums = stats if sums is None else [s + t for s, t in zip(sums, stats, strict=True)]
        if self.pooling == "none":
            return torch.cat([torch.cat(piece, dim=-1) for piece in kept])
        assert sums is not None
        pooled = []
        for layer in range(len(self.layers)):
            mean = sums[2 * layer] / n_frames
            pooled.append(mean)
            if self.pooling == "mean_std":
                var = (sums[2 * layer + 1] / n_frames - mean**2).clamp_min(0)
                pooled.append(var.sqrt())
        return torch.cat(pooled).float()

    def provenance(self) -> dict[str, str]:
        self.load()
        return dict(self._provenance)


@dataclass
class FairseqSslConfig(SslOutputConfig):
    _target_: str = "audio_models.speech.ssl.FairseqCheckpointExtractor"
    name: str = "hubert_fairseq"
    checkpoint: str = MISSING  # path of a fairseq HuBERT / wav2vec 2.0 .pt file
    sha256: str | None = None


@register_extractor("hubert_fairseq", config=FairseqSslConfig)
class FairseqCheckpointExtractor(SelfSupervisedExtractor):
    """A fairseq HuBERT / wav2vec 2.0 ``.pt`` checkpoint, converted to the transformers model
    of the same architecture (see :mod:`audio_models.speech.fairseq_checkpoint`); everything
    after loading — padding rules, layers, pooling, chunking — is the transformers path's.

    Args:
        checkpoint: path of the ``.pt`` file.
        sha256: expected SHA-256 of the file; a mismatch stops the run before any work.
        Others as :class:`SelfSupervisedExtractor`.
    """

    def __init__(
        self,
        *,
        name: str,
        checkpoint: str,
        sha256: str | None = None,
        layers: list[int] | str = (-1,),
        pooling: str = "mean",
        sample_rate: int = 16000,
        max_chunk_s: float | None = 30.0,
        overlap_s: float = 2.0,
        chunk_batch: int = 4,
        storage_dtype: str = "float32",
    ) -> None:
        Extractor.__init__(self, name=name, sample_rate=sample_rate, storage_dtype=storage_dtype)
        path = Path(checkpoint).expanduser()
        self.model_id, self.revision = str(path), None
        self.sha256 = sha256
        self._describe(layers, pooling, max_chunk_s, overlap_s, chunk_batch)

    def _read_weights(self, layers: list[int] | str) -> None:
        from types import SimpleNamespace

        from audio_models.speech.fairseq_checkpoint import load_fairseq_model

        path = Path(self.model_id)
        digest = sha256_file(path) if path.is_file() else None
        if self.sha256 is not None and digest != self.sha256.lower():
            raise UserError(
                f"{path}: sha256 {digest} does not match extractor.sha256={self.sha256}; "
                "refusing an unverified checkpoint"
            )
        network, described = load_fairseq_model(path)
        # The input normalisation is the pretraining task's (``task.normalize``).
        settings = SimpleNamespace(
            sampling_rate=described.sample_rate, do_normalize=described.normalize
        )
        self._setup(network, settings, layers, self.sample_rate or 16000)
        self._provenance.update(
            {
                "ssl.checkpoint": str(path),
                "ssl.weights_sha256": str(digest),
                "ssl.fairseq_family": described.family,
                "ssl.normalize": str(described.normalize),
            }
        )
