"""Tiny random models for tests and benchmarks, built with the libraries' own config classes
and saved to a directory (nothing reaches a model hub). Shipped in the package so that users
can try a model extractor offline, too.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
from transformers import (
    AutoModel,
    HubertConfig,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Model,
    WavLMConfig,
)

if TYPE_CHECKING:
    from audio_models.extractor import Extractor

_E = TypeVar("_E", bound="Extractor")


def loaded(extractor: _E) -> _E:
    """``extractor`` with its weights read (:meth:`Extractor.load`): a constructor only checks
    options, so a test of what loading reports calls this inside its ``pytest.raises``."""
    extractor.load()
    return extractor


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


# -- issue #17: Whisper encoder, dimensional SER, audio classifiers ------------------------

#: Two-layer variant of :data:`TINY` for the model extractors of issue #17.
TINY_2 = {**TINY, "num_hidden_layers": 2}
#: A Whisper small enough for tests: 16 mel bins and a 1 s window (50 encoder positions), so
#: recordings over a second exercise the chunking that 30 s windows need for long files.
TINY_WHISPER = {
    "vocab_size": 64,
    "num_mel_bins": 16,
    "d_model": 32,
    "encoder_layers": 2,
    "decoder_layers": 1,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 40,
    "decoder_ffn_dim": 40,
    "max_source_positions": 50,
    "max_target_positions": 16,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 3,
}
TINY_LABELS = {0: "neutral", 1: "happy", 2: "sad"}


def _save_whisper_feature_extractor(folder: Path) -> None:
    from transformers import WhisperFeatureExtractor

    # chunk_length=1: a 1 s window of 100 log-mel frames, what max_source_positions=50 takes.
    WhisperFeatureExtractor(
        feature_size=TINY_WHISPER["num_mel_bins"], sampling_rate=16000, chunk_length=1
    ).save_pretrained(folder)


def make_tiny_whisper(folder: Path) -> Path:
    """A random Whisper (encoder and decoder) with a 1 s window, loadable as
    ``extractor=whisper_encoder extractor.model=<folder>``."""
    from transformers import WhisperConfig, WhisperModel

    torch.manual_seed(0)
    WhisperModel(WhisperConfig(**TINY_WHISPER)).save_pretrained(folder)
    _save_whisper_feature_extractor(folder)
    return folder


def make_tiny_ser_dim(folder: Path, *, head: bool = True) -> Path:
    """A random model in the layout of ``audeering/wav2vec2-large-robust-12-ft-emotion-msp-dim``
    (layer-norm encoder, ``wav2vec2.*`` and ``classifier.*``); ``head=False`` saves the encoder
    only, which the ``ser_dim`` extractor must refuse."""
    from audio_models.speech.ser_dim import DIMENSIONS
    from audio_models.speech.ser_dim_model import DimensionalEmotionModel

    torch.manual_seed(0)
    config = Wav2Vec2Config(
        **TINY_2,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        num_labels=3,
        id2label=dict(enumerate(DIMENSIONS)),
    )
    model = DimensionalEmotionModel(config)
    (model if head else model.wav2vec2).save_pretrained(folder)
    _save_feature_extractor(folder, attention_mask=True)
    return folder


def make_tiny_classifier(folder: Path, family: str = "wav2vec2-layer") -> Path:
    """A random audio-classification model with :data:`TINY_LABELS`: ``family`` one of
    :data:`FAMILIES` (a ``*ForSequenceClassification`` head) or ``whisper``."""
    from transformers import AutoModelForAudioClassification, WhisperConfig

    torch.manual_seed(0)
    heads = {"num_labels": 3, "id2label": TINY_LABELS, "classifier_proj_size": 16}
    if family == "whisper":
        config = WhisperConfig(**TINY_WHISPER, **heads)
        AutoModelForAudioClassification.from_config(config).save_pretrained(folder)
        _save_whisper_feature_extractor(folder)
        return folder
    cls, norm = FAMILIES[family]
    config = cls(**TINY_2, **heads, feat_extract_norm=norm, do_stable_layer_norm=norm == "layer")
    AutoModelForAudioClassification.from_config(config).save_pretrained(folder)
    _save_feature_extractor(folder, attention_mask=norm == "layer")
    return folder


#: whisper-base's encoder (the decoder cut to one small layer: the extractor never runs it).
WHISPER_BASE = {
    **TINY_WHISPER,
    "num_mel_bins": 80,
    "d_model": 512,
    "encoder_layers": 6,
    "encoder_attention_heads": 8,
    "encoder_ffn_dim": 2048,
    "max_source_positions": 1500,
}


def save_random_whisper_base(folder: Path) -> Path:
    """Random weights of whisper-base's encoder with its 30 s, 80-mel feature extractor."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    torch.manual_seed(0)
    WhisperModel(WhisperConfig(**WHISPER_BASE)).save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=80, sampling_rate=16000).save_pretrained(folder)
    return folder
