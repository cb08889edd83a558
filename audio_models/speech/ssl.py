"""Self-supervised speech representations (wav2vec 2.0 / XLSR, HuBERT, WavLM) via transformers.

One implementation for every family: the model's own feature extractor settings decide the
input normalisation, and its config decides how padding is handled. Layer-norm feature
encoders (XLSR, the large models) take padded batches with an attention mask; group-norm ones
(wav2vec2-base, HuBERT-base, WavLM-base) change their output when padded, so their rows run in
groups of equal length. Either way a batch gives the numbers each file gives alone.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from audio_models.extractor import Extractor, OutputKind
from audio_models.utils.errors import UserError
from audio_models.utils.provenance import sha256_file

POOLINGS = ("none", "mean", "mean_std")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _load(model: str, revision: str | None) -> tuple[Any, Any, Path]:
    """Config, model and the folder the files came from; a clear error when unavailable."""
    from transformers import AutoFeatureExtractor, AutoModel
    from transformers.utils import cached_file

    local = Path(model).expanduser()
    source = str(local) if local.is_dir() else model
    try:
        extractor = AutoFeatureExtractor.from_pretrained(source, revision=revision)
        network = AutoModel.from_pretrained(source, revision=revision)
        folder = (
            local
            if local.is_dir()
            else Path(cached_file(source, "config.json", revision=revision)).parent
        )
    except (OSError, ValueError) as exc:
        where = f"revision {revision}" if revision else "its default revision"
        raise UserError(
            f"cannot load model {model!r} ({where}): {str(exc).splitlines()[0]}. Without network "
            f"access, download it first (huggingface-cli download {model}"
            f"{' --revision ' + revision if revision else ''}) or pass a local directory as "
            "extractor.model"
        ) from None
    return extractor, network, folder


def weights_sha256(folder: Path) -> str:
    """SHA-256 of the weights file the model was loaded from ('unknown' if none is found)."""
    for name in _WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            return sha256_file(path)
    return "unknown"


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

    uses_forward = True

    def __init__(
        self,
        *,
        name: str,
        model: str,
        revision: str | None = None,
        layers: list[int] | str = (-1,),
        pooling: str = "mean",
        sample_rate: int = 16000,
    ) -> None:
        super().__init__(name=name, sample_rate=sample_rate)
        if pooling not in POOLINGS:
            raise UserError(f"extractor.pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        self.model_id = model
        self.revision = revision
        feature_extractor, self.network, folder = _load(model, revision)
        self.network.eval()
        if getattr(feature_extractor, "sampling_rate", sample_rate) != sample_rate:
            raise UserError(
                f"{model} expects {feature_extractor.sampling_rate} Hz; set extractor.sample_rate"
            )
        self.normalize = bool(getattr(feature_extractor, "do_normalize", False))
        config = self.network.config
        # Group-norm feature encoders see the padding: such models never get padded input.
        self.use_mask = config.feat_extract_norm == "layer"
        n_states = config.num_hidden_layers + 1
        chosen = list(range(n_states)) if layers == "all" else [int(x) for x in layers]
        bad = [x for x in chosen if not -n_states <= x < n_states]
        if bad or not chosen:
            raise UserError(
                f"extractor.layers {bad or chosen} outside the model's 0..{n_states - 1}"
            )
        self.layers = [x % n_states for x in chosen]
        self.dim = config.hidden_size
        self._frame_shift = float(torch.prod(torch.tensor(config.conv_stride))) / sample_rate
        self._provenance = {
            "ssl.model": model,
            "ssl.revision": revision or "local"
            if Path(model).expanduser().is_dir()
            else str(revision),
            "ssl.resolved_commit": str(getattr(config, "_commit_hash", None) or "local"),
            "ssl.weights_sha256": weights_sha256(folder),
            "ssl.padding": "attention-mask" if self.use_mask else "equal-length groups",
        }

    @property
    def kind(self) -> OutputKind:  # type: ignore[override]
        return OutputKind.FRAMES if self.pooling == "none" else OutputKind.VECTOR

    @property
    def min_samples(self) -> int:
        # The conv stack needs at least its receptive field for one frame.
        config = self.network.config
        field, jump = 1, 1
        for kernel, stride in zip(config.conv_kernel, config.conv_stride, strict=True):
            field += (kernel - 1) * jump
            jump *= stride
        return field

    @property
    def frame_shift_s(self) -> float:
        return self._frame_shift

    @property
    def feature_groups(self) -> list[tuple[str, int]]:
        """One list column per layer (and statistic)."""
        stats = {"none": [""], "mean": ["_mean"], "mean_std": ["_mean", "_std"]}[self.pooling]
        return [(f"layer_{layer}{stat}", self.dim) for layer in self.layers for stat in stats]

    @property
    def feature_names(self) -> list[str]:
        return [f"{group}_{j}" for group, size in self.feature_groups for j in range(size)]

    def torch_module(self) -> torch.nn.Module:
        return self.network

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        if self.use_mask:
            return self._forward_padded(waveforms, lengths)
        # Equal-length groups: each group runs unpadded, so padding never reaches the model.
        groups: dict[int, list[int]] = defaultdict(list)
        for row, n in enumerate(lengths.tolist()):
            groups[n].append(row)
        outputs: list[torch.Tensor | None] = [None] * len(lengths)
        for n, rows in groups.items():
            index = torch.tensor(rows, device=waveforms.device)
            results = self._forward_padded(waveforms[index, :n], lengths[index])
            for row, result in zip(rows, results, strict=True):
                outputs[row] = result
        return outputs  # type: ignore[return-value]

    def _forward_padded(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        x = waveforms.float()
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
        if self.normalize:
            # Wav2Vec2FeatureExtractor's zero-mean unit-variance over each item's own samples.
            n = lengths[:, None].to(x.dtype)
            mean = (x * valid).sum(1, keepdim=True) / n
            var = (((x - mean) * valid) ** 2).sum(1, keepdim=True) / n
            x = torch.where(valid, (x - mean) / torch.sqrt(var + 1e-7), torch.zeros_like(x))
        mask = valid.long() if self.use_mask else None
        out = self.network(x, attention_mask=mask, output_hidden_states=True)
        frames = self.network._get_feat_extract_output_lengths(lengths).tolist()
        states = [out.hidden_states[layer] for layer in self.layers]
        results = []
        for row, count in enumerate(frames):
            per_layer = [s[row, :count].float() for s in states]
            if self.pooling == "none":
                results.append(torch.cat(per_layer, dim=-1))
                continue
            pooled = []
            for h in per_layer:
                pooled.append(h.mean(0))
                if self.pooling == "mean_std":
                    pooled.append(h.std(0, unbiased=False))
            results.append(torch.cat(pooled))
        return results

    def provenance(self) -> dict[str, str]:
        return dict(self._provenance)
