"""Dimensional speech emotion (arousal, dominance, valence) with audEERING's published model.

``audeering/wav2vec2-large-robust-12-ft-emotion-msp-dim`` (licence CC BY-NC-SA 4.0) is a
wav2vec 2.0 large-robust model pruned to 12 layers and fine-tuned on MSP-Podcast. Its model card
defines the architecture in Python (``EmotionModel``): the last hidden state mean-pooled over
time, then ``dense`` → tanh → ``out_proj`` with three outputs. The same modules are written in
:mod:`audio_models.speech.ser_dim_model` (keys ``wav2vec2.*`` and ``classifier.*``), so the
checkpoint loads without ``trust_remote_code``. Everything up to the pooled hidden state — input
normalisation, padding rules, chunks of long recordings — is :class:`SelfSupervisedExtractor`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from audio_models.extractor import Extractor, OutputKind
from audio_models.registry import register_extractor
from audio_models.speech.hub import hub_provenance
from audio_models.speech.ssl import SelfSupervisedExtractor
from audio_models.utils.errors import UserError

if TYPE_CHECKING:
    import torch

#: The head's outputs, in the order of ``out_proj``'s rows (the model card's order).
DIMENSIONS = ("arousal", "dominance", "valence")


@dataclass
class SerDimConfig:
    _target_: str = "audio_models.speech.ser_dim.DimensionalEmotionExtractor"
    name: str = "ser_dim"
    model: str = "audeering/wav2vec2-large-robust-12-ft-emotion-msp-dim"  # CC BY-NC-SA 4.0
    revision: str | None = None
    keep_embedding: bool = False  # also write the pooled hidden state (embedding_<j>)
    sample_rate: int = 16000
    max_chunk_s: float | None = 30.0  # longer recordings: frames of overlapping chunks
    overlap_s: float = 2.0
    chunk_batch: int = 4
    storage_dtype: str = "float32"


@register_extractor("ser_dim", config=SerDimConfig)
class DimensionalEmotionExtractor(SelfSupervisedExtractor):
    """Arousal, dominance and valence (about 0..1) of each recording.

    Args:
        name: registered extractor name.
        model: hub id or local directory of a checkpoint with ``wav2vec2.*`` and
            ``classifier.dense``/``classifier.out_proj`` weights.
        revision: pinned hub commit (ignored for a local directory).
        keep_embedding: also write the pooled last hidden state (``embedding_<j>``).
        sample_rate, max_chunk_s, overlap_s, chunk_batch, storage_dtype: as
            :class:`SelfSupervisedExtractor`.

    Raises:
        UserError: the checkpoint lacks weights (the head above all), or its head does not
            give the three dimensions.
    """

    def __init__(
        self,
        *,
        name: str,
        model: str,
        revision: str | None = None,
        keep_embedding: bool = False,
        sample_rate: int = 16000,
        max_chunk_s: float | None = 30.0,
        overlap_s: float = 2.0,
        chunk_batch: int = 4,
        storage_dtype: str = "float32",
    ) -> None:
        Extractor.__init__(self, name=name, sample_rate=sample_rate, storage_dtype=storage_dtype)
        self.model_id, self.revision = model, revision
        self.keep_embedding = keep_embedding
        # The model card's pooling (mean over the valid frames) of the last hidden state.
        self._describe([-1], "mean", max_chunk_s, overlap_s, chunk_batch)

    def _read_weights(self, layers: list[int] | str) -> None:
        model, revision = self.model_id, self.revision
        from audio_models.speech.ser_dim_model import load_model

        feature_extractor, self.model, folder = load_model(model, revision)
        config = self.model.config
        named = [str(config.id2label.get(i, "")).lower() for i in range(config.num_labels)]
        generic = all(label.startswith("label_") for label in named)
        if config.num_labels != len(DIMENSIONS) or not (generic or tuple(named) == DIMENSIONS):
            raise UserError(
                f"{model}: the head gives {named}, not the three dimensions {list(DIMENSIONS)}"
            )
        self._setup(self.model.wav2vec2, feature_extractor, layers, self.sample_rate or 16000)
        self._provenance.update(hub_provenance("ser_dim", model, revision, self.model, folder))

    @property
    def kind(self) -> OutputKind:  # type: ignore[override]
        return OutputKind.VECTOR

    @property
    def feature_groups(self) -> None:  # type: ignore[override]
        return None  # plain columns: one per dimension (and embedding value)

    @property
    def feature_names(self) -> list[str]:
        names = list(DIMENSIONS)
        if self.keep_embedding:
            self.load()
            names += [f"embedding_{j}" for j in range(self.dim)]
        return names

    def torch_module(self) -> torch.nn.Module:
        self.load()
        return self.model  # the encoder and the head, so both move to the device

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        import torch

        pooled = torch.stack(super().forward(waveforms, lengths))
        head = self.model.classifier
        scores = head(pooled.to(head.dense.weight.dtype)).float()
        if self.keep_embedding:
            return list(torch.cat([scores, pooled.float()], dim=1))
        return list(scores)
