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
    Wav2Vec2Model,
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
    _save_feature_extractor(folder, attention_mask=norm == "layer")
    return folder


def _save_feature_extractor(folder: Path, *, attention_mask: bool) -> None:
    # wav2vec2's input contract: 16 kHz, normalised; layer-norm models take an attention
    # mask, group-norm ones must not (they see padding as signal).
    Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=16000,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=attention_mask,
    ).save_pretrained(folder)


SIZES = {
    "base": {"feat_extract_norm": "group", "do_stable_layer_norm": False},
    "large": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "feat_extract_norm": "layer",
        "do_stable_layer_norm": True,
        "conv_bias": True,
    },
}


# spkrec-ecapa-voxceleb's hyperparams layout (same classes, keys and loadables); sizes filled in.
HYPERPARAMS_TEMPLATE = """\
pretrained_path: speechbrain/spkrec-ecapa-voxceleb
n_mels: {n_mels}
compute_features: !new:speechbrain.lobes.features.Fbank
    n_mels: !ref <n_mels>
mean_var_norm: !new:speechbrain.processing.features.InputNormalization
    norm_type: sentence
    std_norm: False
embedding_model: !new:speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN
    input_size: !ref <n_mels>
    channels: [{channels}, {channels}, {channels}, {channels}, {last}]
    kernel_sizes: [5, 3, 3, 3, 1]
    dilations: [1, 2, 3, 4, 1]
    attention_channels: {attention}
    lin_neurons: {lin}
classifier: !new:speechbrain.lobes.models.ECAPA_TDNN.Classifier
    input_size: {lin}
    out_neurons: 3
mean_var_norm_emb: !new:speechbrain.processing.features.InputNormalization
    norm_type: global
    std_norm: False
modules:
    compute_features: !ref <compute_features>
    mean_var_norm: !ref <mean_var_norm>
    embedding_model: !ref <embedding_model>
    mean_var_norm_emb: !ref <mean_var_norm_emb>
    classifier: !ref <classifier>
label_encoder: !new:speechbrain.dataio.encoder.CategoricalEncoder
pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        embedding_model: !ref <embedding_model>
        mean_var_norm_emb: !ref <mean_var_norm_emb>
        classifier: !ref <classifier>
        label_encoder: !ref <label_encoder>
    paths:
        embedding_model: !ref <pretrained_path>/embedding_model.ckpt
        mean_var_norm_emb: !ref <pretrained_path>/mean_var_norm_emb.ckpt
        classifier: !ref <pretrained_path>/classifier.ckpt
        label_encoder: !ref <pretrained_path>/label_encoder.txt
"""
FULL_ECAPA = {"n_mels": 80, "channels": 1024, "last": 3072, "attention": 128, "lin": 192}
TINY_ECAPA = {"n_mels": 24, "channels": 16, "last": 48, "attention": 8, "lin": 12}


def save_random_ecapa(folder: Path, **sizes: int) -> Path:
    """A SpeechBrain ECAPA model directory with random weights (sizes as in FULL_ECAPA)."""
    from hyperpyyaml import load_hyperpyyaml

    text = HYPERPARAMS_TEMPLATE.format(**sizes)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hyperparams.yaml").write_text(text)
    torch.manual_seed(0)
    hparams = load_hyperpyyaml(text)
    model = hparams["embedding_model"].eval()
    with torch.no_grad():  # non-trivial batch-norm statistics, as a trained model has
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
    torch.save(model.state_dict(), folder / "embedding_model.ckpt")
    torch.save(hparams["classifier"].state_dict(), folder / "classifier.ckpt")
    norm = hparams["mean_var_norm_emb"]
    norm.glob_mean = torch.randn(1, sizes["lin"]) * 0.1
    norm.glob_std = torch.ones(1, sizes["lin"])
    norm.count = 10
    norm._save(folder / "mean_var_norm_emb.ckpt")
    (folder / "label_encoder.txt").write_text(
        "'a' => 0\n'b' => 1\n'c' => 2\n================\n'starting_index' => 0\n"
    )
    return folder


def save_random_model(folder: Path, size: str) -> Path:
    torch.manual_seed(0)
    Wav2Vec2Model(Wav2Vec2Config(**SIZES[size])).save_pretrained(folder)
    _save_feature_extractor(folder, attention_mask=size == "large")
    return folder


def make_tiny_ecapa(folder: Path) -> Path:
    """A tiny random SpeechBrain ECAPA model directory, loadable as ``extractor.model``."""
    return save_random_ecapa(folder, **TINY_ECAPA)
