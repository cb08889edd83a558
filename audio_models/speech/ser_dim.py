"""Dimensional speech emotion (arousal, dominance, valence) with audEERING's published model.

``audeering/wav2vec2-large-robust-12-ft-emotion-msp-dim`` (licence CC BY-NC-SA 4.0) is a
wav2vec 2.0 large-robust model pruned to 12 layers and fine-tuned on MSP-Podcast. Its model card
defines the architecture in Python (``EmotionModel``): the last hidden state mean-pooled over
time, then ``dense`` → tanh → ``out_proj`` with three outputs. The same modules are written here
(:class:`DimensionalEmotionModel`, keys ``wav2vec2.*`` and ``classifier.*``), so the checkpoint
loads without ``trust_remote_code``. Everything up to the pooled hidden state — input
normalisation, padding rules, chunks of long recordings — is :class:`SelfSupervisedExtractor`'s.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Wav2Vec2Config, Wav2Vec2Model, Wav2Vec2PreTrainedModel

from audio_models.extractor import Extractor, OutputKind
from audio_models.speech.classifier import refuse_missing_weights
from audio_models.speech.hub import hub_provenance, load_pretrained
from audio_models.speech.ssl import SelfSupervisedExtractor
from audio_models.utils.errors import UserError

#: The head's outputs, in the order of ``out_proj``'s rows (the model card's order).
DIMENSIONS = ("arousal", "dominance", "valence")


class RegressionHead(torch.nn.Module):
    """The model card's ``RegressionHead``: dropout, dense, tanh, dropout, out_proj."""

    def __init__(self, config: Wav2Vec2Config) -> None:
        super().__init__()
        self.dense = torch.nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = torch.nn.Dropout(config.final_dropout)
        self.out_proj = torch.nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.dense(self.dropout(pooled)))
        return self.out_proj(self.dropout(x))


class DimensionalEmotionModel(Wav2Vec2PreTrainedModel):
    """The model card's ``EmotionModel``: ``wav2vec2`` and a ``classifier`` regression head."""

    def __init__(self, config: Wav2Vec2Config) -> None:
        super().__init__(config)
        self.wav2vec2 = Wav2Vec2Model(config)
        self.classifier = RegressionHead(config)
        self.post_init()

    def forward(self, input_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One unpadded recording (or equal-length rows): pooled hidden state and scores."""
        pooled = self.wav2vec2(input_values).last_hidden_state.mean(dim=1)
        return pooled, self.classifier(pooled)


def _load(model: str, revision: str | None) -> tuple[Any, DimensionalEmotionModel, Any]:
    from transformers import AutoFeatureExtractor

    def with_head(source: str, *, revision: str | None) -> Any:
        return DimensionalEmotionModel.from_pretrained(
            source, revision=revision, output_loading_info=True
        )

    (feature_extractor, (network, info)), folder = load_pretrained(
        model, revision, [AutoFeatureExtractor.from_pretrained, with_head]
    )
    # A wav2vec2 checkpoint without the head loads "fine" with a random one: refuse it.
    refuse_missing_weights(model, info, ())
    return feature_extractor, network.eval(), folder


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
        self.pooling = "mean"  # the model card's pooling, over the valid frames
        self.model_id, self.revision = model, revision
        self.keep_embedding = keep_embedding
        feature_extractor, self.model, folder = _load(model, revision)
        config = self.model.config
        named = [str(config.id2label.get(i, "")).lower() for i in range(config.num_labels)]
        generic = all(label.startswith("label_") for label in named)
        if config.num_labels != len(DIMENSIONS) or not (generic or tuple(named) == DIMENSIONS):
            raise UserError(
                f"{model}: the head gives {named}, not the three dimensions {list(DIMENSIONS)}"
            )
        self._setup(self.model.wav2vec2, feature_extractor, [-1], sample_rate)
        self._plan_chunks(max_chunk_s, overlap_s, chunk_batch)
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
            names += [f"embedding_{j}" for j in range(self.dim)]
        return names

    def torch_module(self) -> torch.nn.Module:
        return self.model  # the encoder and the head, so both move to the device

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        pooled = torch.stack(super().forward(waveforms, lengths))
        head = self.model.classifier
        scores = head(pooled.to(head.dense.weight.dtype)).float()
        if self.keep_embedding:
            return list(torch.cat([scores, pooled.float()], dim=1))
        return list(scores)
