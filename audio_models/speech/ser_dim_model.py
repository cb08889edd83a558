"""The modules of audEERING's dimensional emotion model (its model card's ``EmotionModel``),
imported by :mod:`audio_models.speech.ser_dim` when it loads weights."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Wav2Vec2Config, Wav2Vec2Model, Wav2Vec2PreTrainedModel

from audio_models.speech.classifier import refuse_missing_weights
from audio_models.speech.hub import load_pretrained


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


def load_model(model: str, revision: str | None) -> tuple[Any, DimensionalEmotionModel, Any]:
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
