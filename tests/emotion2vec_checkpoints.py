"""Tiny random emotion2vec checkpoints in FunASR's layout (``config.yaml`` + ``model.pt``,
maybe ``tokens.txt``), rebuilt bit for bit from a seed with numpy's PCG64 generator, so the
reference outputs in ``tests/data/emotion2vec`` (computed once with FunASR) apply to them.

Two variants cover the code paths: ``plus`` is the released models' architecture (the
``template.yaml`` settings: post-norm blocks, layer-norm feature encoder, per-head ALiBi
scale, a 9-label head, the pretraining decoder's keys present and unused) at toy sizes;
``variant`` takes every other branch (pre-norm blocks, pre-LN and an even kernel in the
positional encoder, per-layer ALiBi scale on half the heads, group-norm feature encoder, no
input normalisation, a ``tokens.txt`` with an ``unuse`` label, weights wrapped in ``model``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from audio_models.speech.emotion2vec import build_network, read_settings

#: The released models' labels (emotion2vec_plus_*'s token list).
PLUS_LABELS = [
    "生气/angry",
    "厌恶/disgusted",
    "恐惧/fearful",
    "开心/happy",
    "中立/neutral",
    "其他/other",
    "难过/sad",
    "吃惊/surprised",
    "<unk>",
]

_AUDIO = {
    "type": "AUDIO",
    "prenet_depth": 1,
    "prenet_layerdrop": 0.05,
    "prenet_dropout": 0.1,
    "start_drop_path_rate": 0.0,
    "end_drop_path_rate": 0.0,
    "num_extra_tokens": 10,
    "init_extra_token_zero": True,
    "mask_noise_std": 0.01,
    "mask_prob_min": None,
    "mask_prob": 0.5,
    "inverse_mask": False,
    "mask_prob_adjust": 0.05,
    "keep_masked_pct": 0.0,
    "mask_length": 5,
    "add_masks": False,
    "remove_masks": False,
    "mask_dropout": 0.0,
    "encoder_zero_mask": True,
    "mask_channel_prob": 0.0,
    "mask_channel_length": 64,
    "ema_local_encoder": False,
    "local_grad_mult": 1.0,
    "use_alibi_encoder": True,
    "alibi_scale": 1.0,
    "learned_alibi": False,
    "alibi_max_pos": None,
    "learned_alibi_scale": True,
    "learned_alibi_scale_per_head": True,
    "learned_alibi_scale_per_layer": False,
    "num_alibi_heads": 4,
    "model_depth": 2,
    "decoder": {
        "decoder_dim": 8,
        "decoder_groups": 4,
        "decoder_kernel": 7,
        "decoder_layers": 2,
        "input_dropout": 0.1,
        "add_positions_masked": False,
        "add_positions_all": False,
        "decoder_residual": True,
        "projection_layers": 1,
        "projection_ratio": 2.0,
    },
    "extractor_mode": "layer_norm",
    "feature_encoder_spec": "[(16, 10, 5)] + [(16, 3, 2)] * 4 + [(16,2,2)] + [(16,2,2)]",
    "conv_pos_width": 95,
    "conv_pos_groups": 4,
    "conv_pos_depth": 5,
    "conv_pos_pre_ln": False,
}

_MODEL = {
    "loss_beta": 0.0,
    "loss_scale": None,
    "depth": 2,
    "start_drop_path_rate": 0.0,
    "end_drop_path_rate": 0.0,
    "num_heads": 4,
    "norm_eps": 1e-05,
    "norm_affine": True,
    "encoder_dropout": 0.1,
    "post_mlp_drop": 0.1,
    "attention_dropout": 0.1,
    "activation_dropout": 0.0,
    "dropout_input": 0.0,
    "layerdrop": 0.05,
    "embed_dim": 16,
    "mlp_ratio": 2.0,
    "layer_norm_first": False,
    "average_top_k_layers": 2,
    "end_of_block_targets": False,
    "clone_batch": 8,
    "extractor_mode": "layer_norm",
    "supported_modality": "AUDIO",
    "normalize": True,
    "modalities": {"audio": _AUDIO},
}

VARIANTS = ("plus", "variant")


def config_of(variant: str) -> dict[str, Any]:
    """The ``config.yaml`` content of ``variant``."""
    model = copy.deepcopy(_MODEL)
    audio = model["modalities"]["audio"]
    config: dict[str, Any] = {"model": "Emotion2vec", "model_conf": model}
    if variant == "plus":
        config["tokenizer"] = "CharTokenizer"
        config["tokenizer_conf"] = {"unk_symbol": "<unk>", "token_list": list(PLUS_LABELS)}
    elif variant == "variant":
        model.update(layer_norm_first=True, normalize=False)
        audio.update(
            conv_pos_pre_ln=True,
            conv_pos_width=96,
            conv_pos_depth=4,  # kernel 24: even, SamePad drops the last frame
            learned_alibi_scale_per_layer=True,
            learned_alibi_scale_per_head=False,
            num_alibi_heads=2,
            num_extra_tokens=3,
            extractor_mode="default",
            decoder=None,
        )
        config["tokenizer"] = "CharTokenizer"
        config["tokenizer_conf"] = {"unk_symbol": "<unk>"}  # labels in tokens.txt
    else:
        raise ValueError(variant)
    return config


VARIANT_TOKENS = ["开心/happy", "unuse_0", "难过/sad", "中立/neutral", "<unk>"]


def _decoder_keys(audio: dict[str, Any], dim: int) -> dict[str, tuple[int, ...]]:
    dec = audio["decoder"]
    shapes: dict[str, tuple[int, ...]] = {}
    in_dim = dim
    for i in range(dec["decoder_layers"]):
        prefix = f"modality_encoders.AUDIO.decoder.blocks.{i}.0."
        shapes[prefix + "weight"] = (
            dec["decoder_dim"],
            in_dim // dec["decoder_groups"],
            dec["decoder_kernel"],
        )
        shapes[prefix + "bias"] = (dec["decoder_dim"],)
        in_dim = dec["decoder_dim"]
    shapes["modality_encoders.AUDIO.decoder.proj.weight"] = (dim, dec["decoder_dim"])
    shapes["modality_encoders.AUDIO.decoder.proj.bias"] = (dim,)
    return shapes


def make_checkpoint(folder: Path, variant: str = "plus", seed: int = 0) -> Path:
    """Write ``variant``'s config.yaml, model.pt (and tokens.txt) to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    config = config_of(variant)
    settings = read_settings(config["model_conf"])
    labels = PLUS_LABELS if variant == "plus" else VARIANT_TOKENS
    shapes = {
        k: tuple(v.shape) for k, v in build_network(settings, len(labels)).state_dict().items()
    }
    audio = config["model_conf"]["modalities"]["audio"]
    if audio["decoder"] is not None:
        shapes.update(_decoder_keys(audio, settings.embed_dim))
    rng = np.random.default_rng(seed)
    state: dict[str, torch.Tensor] = {}
    for key in sorted(shapes):
        shape = shapes[key]
        if key.endswith("alibi_scale"):
            values = rng.uniform(-0.3, 2.0, size=shape)  # some negative: clamped to 0
        elif key.endswith("extra_tokens"):
            values = rng.normal(0.0, 1.0, size=shape)
        elif len(shape) == 1 and key.endswith(".weight"):  # a norm's gain
            values = 1.0 + 0.1 * rng.normal(size=shape)
        elif len(shape) == 1:
            values = 0.1 * rng.normal(size=shape)
        else:
            fan_in = int(np.prod(shape[1:]))
            values = rng.normal(0.0, 1.0 / np.sqrt(fan_in), size=shape)
        state[key] = torch.from_numpy(values.astype(np.float32))
    payload: Any = state if variant == "plus" else {"model": state}
    torch.save(payload, folder / "model.pt")
    (folder / "config.yaml").write_text(
        yaml.safe_dump(config, allow_unicode=True, sort_keys=False), encoding="utf-8"
    )
    if variant == "variant":
        (folder / "tokens.txt").write_text("\n".join(VARIANT_TOKENS) + "\n", encoding="utf-8")
    return folder


#: Lengths (samples at 16 kHz) of the test signals.
SIGNAL_LENGTHS = (16000, 9600, 5937)


def signals(seed: int = 1) -> list[np.ndarray]:
    """Deterministic test signals: a chirp-like tone plus noise, of :data:`SIGNAL_LENGTHS`."""
    rng = np.random.default_rng(seed)
    out = []
    for n in SIGNAL_LENGTHS:
        t = np.arange(n) / 16000
        tone = 0.3 * np.sin(2 * np.pi * (150 + 200 * t) * t)
        out.append((tone + 0.05 * rng.normal(size=n)).astype(np.float32))
    return out
