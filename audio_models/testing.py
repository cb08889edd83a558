"""Tiny random models for tests and benchmarks, built with the libraries' own config classes
and saved to a directory (nothing reaches a model hub). Shipped in the package so that users
can try a model extractor offline, too.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModel,
    HubertConfig,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    WavLMConfig,
)

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "intermediate_size": 40,
    "conv_dim": (8, 8, 8),
    "conv_kernel": (10, 8, 8),
    "conv_stride": (5, 4, 4),
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 2,
}
FAMILIES = {
    # (config class, feature-encoder norm): XLSR-like layer norm, base-like group norm
    "wav2vec2-layer": (Wav2Vec2Config, "layer"),
    "hubert-group": (HubertConfig, "group"),
    "wavlm-group": (WavLMConfig, "group"),
    "wav2vec2-group": (Wav2Vec2Config, "group"),
}


def make_tiny(folder: Path, family: str = "wav2vec2-group") -> Path:
    """Save a random wav2vec2-family model of ``family`` (see :data:`FAMILIES`) and its
    feature extractor to ``folder``, loadable as ``extractor.model=<folder>``."""
    cls, norm = FAMILIES[family]
    torch.manual_seed(0)
    config = cls(**TINY, feat_extract_norm=norm, do_stable_layer_norm=norm == "layer")
    AutoModel.from_config(config).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=16000,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=norm == "layer",
    ).save_pretrained(folder)
    return folder
