"""Fairseq checkpoints of tiny random models, in fairseq's own layouts, for the tests.

Not a test module: test_fairseq and test_config build their checkpoints here.
"""

from __future__ import annotations

import argparse
import re
import sys
import types
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, HubertConfig, Wav2Vec2Config

from audio_models.testing import TINY as HF_TINY

SETTINGS = {  # fairseq's names for a tiny model
    "encoder_embed_dim": 32,
    "encoder_layers": 3,
    "encoder_attention_heads": 2,
    "encoder_ffn_embed_dim": 40,
    "conv_feature_layers": "[(8, 10, 5)] + [(8, 8, 4)] * 2",
    "conv_pos": 16,
    "conv_pos_groups": 2,
    "activation_fn": "gelu",
}

# transformers name → fairseq name (the inverse of the converter, written out independently)
_TO_FAIRSEQ = [
    (r"feature_extractor\.conv_layers\.(\d+)\.conv\.", r"feature_extractor.conv_layers.\1.0."),
    (r"feature_projection\.projection\.", "post_extract_proj."),
    (r"feature_projection\.layer_norm\.", "layer_norm."),
    (r"^masked_spec_embed$", "mask_emb"),
    (
        r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original0",
        "encoder.pos_conv.0.weight_g",
    ),
    (
        r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original1",
        "encoder.pos_conv.0.weight_v",
    ),
    (r"encoder\.pos_conv_embed\.conv\.bias", "encoder.pos_conv.0.bias"),
    (r"\.attention\.", ".self_attn."),
    (r"(layers\.\d+)\.layer_norm\.", r"\1.self_attn_layer_norm."),
    (r"feed_forward\.intermediate_dense\.", "fc1."),
    (r"feed_forward\.output_dense\.", "fc2."),
]


def fairseq_state(model: torch.nn.Module, layer_norm_encoder: bool, prefix: str = "") -> dict:
    state = {}
    for key, tensor in model.state_dict().items():
        name = key
        match = re.match(r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.(.*)", key)
        if match:  # group norm: Sequential index 2; layer norm: 2.1 (after a TransposeLast)
            sub = "2.1" if layer_norm_encoder else "2"
            name = f"feature_extractor.conv_layers.{match[1]}.{sub}.{match[2]}"
        for pattern, replacement in _TO_FAIRSEQ:
            name = re.sub(pattern, replacement, name)
        state[prefix + name] = tensor.clone()
    return state


class _FakeDictionary:
    pass


def _save_with_fairseq_classes(obj: dict, path: Path) -> None:
    """torch.save with a ``fairseq.data.dictionary.Dictionary`` class present, as fairseq does."""
    module = types.ModuleType("fairseq.data.dictionary")
    _FakeDictionary.__module__ = "fairseq.data.dictionary"
    _FakeDictionary.__qualname__ = "Dictionary"
    module.Dictionary = _FakeDictionary  # type: ignore[attr-defined]
    saved = {k: sys.modules.get(k) for k in ("fairseq", "fairseq.data", "fairseq.data.dictionary")}
    sys.modules.update(
        {
            "fairseq": types.ModuleType("fairseq"),
            "fairseq.data": types.ModuleType("fairseq.data"),
            "fairseq.data.dictionary": module,
        }
    )
    try:
        torch.save(obj, path)
    finally:
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value


def _dictionary() -> _FakeDictionary:
    d = _FakeDictionary()
    d.__dict__.update({"symbols": ["<s>", "<pad>", "0", "1"], "count": [1, 1, 5, 7], "indices": {}})
    return d


def hydra_hubert(folder: Path, **extra: torch.Tensor) -> tuple[Path, torch.nn.Module]:
    """A pretrained HuBERT base-style checkpoint (group-norm encoder, ``cfg`` layout)."""
    torch.manual_seed(1)
    reference = AutoModel.from_config(HubertConfig(**HF_TINY, feat_extract_norm="group")).eval()
    state = fairseq_state(reference, layer_norm_encoder=False) | extra
    state["label_embs_concat"] = torch.zeros(4, 8)
    state["final_proj.weight"] = torch.zeros(8, 32)
    checkpoint = {
        "args": None,
        "cfg": {
            "model": {"_name": "hubert", "extractor_mode": "default", **SETTINGS},
            "task": {"_name": "hubert_pretraining", "normalize": False, "sample_rate": 16000},
        },
        "model": state,
        "task_state": {"dictionaries": [_dictionary()]},
        "extra_state": {"best_loss": np.float64(3.5)},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "hubert_tiny.pt"
    _save_with_fairseq_classes(checkpoint, path)
    return path, reference


def argparse_finetuned_wav2vec2(folder: Path) -> tuple[Path, torch.nn.Module]:
    """A fine-tuned wav2vec 2.0 large-style checkpoint (layer-norm encoder, ``args`` layout)."""
    torch.manual_seed(2)
    config = Wav2Vec2Config(
        **HF_TINY, feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True
    )
    reference = AutoModel.from_config(config).eval()
    state = fairseq_state(reference, layer_norm_encoder=True, prefix="w2v_encoder.w2v_model.")
    state["w2v_encoder.proj.weight"] = torch.zeros(5, 32)
    state["w2v_encoder.proj.bias"] = torch.zeros(5)
    pretrain = argparse.Namespace(
        arch="wav2vec2",
        extractor_mode="layer_norm",
        layer_norm_first=True,
        conv_bias=True,
        normalize=True,
        sample_rate=16000,
        **SETTINGS,
    )
    args = argparse.Namespace(arch="wav2vec_ctc", w2v_args=pretrain, normalize=True)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "w2v_ctc_tiny.pt"
    _save_with_fairseq_classes({"args": args, "model": state, "task_state": {}}, path)
    return path, reference
