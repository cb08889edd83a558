"""fairseq HuBERT / wav2vec 2.0 ``.pt`` checkpoints, loaded safely and mapped to transformers.

fairseq 0.12 does not install beside this stack, and its checkpoints are pickles, so they are
read with ``torch.load(weights_only=True)``: only tensors, containers and the few non-tensor
objects such checkpoints really hold are allowed, each through a data-only stand-in registered
under the original's name (``argparse.Namespace`` in ``args`` and fine-tuned
``cfg.model.w2v_args``, fairseq's ``Dictionary`` in ``task_state``, numpy scalars in training
state). Anything else — a pickle that would run code — is refused before it is built.

The model config comes from the checkpoint's ``cfg`` (hydra-era) or ``args`` (argparse-era);
the weights are renamed onto transformers' ``HubertModel`` / ``Wav2Vec2Model``, which compute
the same function as fairseq's (transformers' own conversion scripts check that).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from audio_models.utils.errors import UserError


class _DataOnly:
    """Base of the stand-ins: keeps whatever state the pickle sets, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state


class NamespaceStandIn(_DataOnly):
    """Stands in for ``argparse.Namespace`` (fairseq's ``args``)."""


class DictionaryStandIn(_DataOnly):
    """Stands in for ``fairseq.data.dictionary.Dictionary`` (symbols, counts, indices)."""


def _numpy_scalar(dtype: Any, data: bytes | None = None) -> Any:
    """numpy's scalar reconstructor, for values such as ``best_loss`` in training state."""
    import numpy as np

    return np.frombuffer(data or b"", dtype=dtype)[0] if data else dtype.type()


def _safe_globals() -> list[Any]:
    import numpy as np

    dtypes = [type(np.dtype(name)) for name in ("float16", "float32", "float64", "int32", "int64")]
    return [
        (NamespaceStandIn, "argparse.Namespace"),
        (DictionaryStandIn, "fairseq.data.dictionary.Dictionary"),
        (_numpy_scalar, "numpy.core.multiarray.scalar"),
        (_numpy_scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
        *dtypes,
    ]


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint as plain containers and tensors; a clear error for anything unsafe."""
    if not path.is_file():
        raise UserError(f"fairseq checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the weights-only unpickler's refusals are plain exceptions
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"refusing to load {path}: {first}. Only tensors and the objects fairseq "
            "checkpoints hold (args namespace, dictionaries) are allowed; nothing was executed"
        ) from None
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"{path} is not a fairseq checkpoint (no 'model' state dict)")
    return state


def _as_dict(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    return {k: v for k, v in vars(value).items() if not k.startswith("_")}


@dataclass
class FairseqModel:
    """What a checkpoint describes: the architecture's settings and where its weights sit."""

    family: str  # "hubert" or "wav2vec2"
    settings: dict[str, Any]
    normalize: bool
    prefix: str  # prefix of the encoder's keys in the state dict
    sample_rate: int


def describe(state: dict[str, Any]) -> FairseqModel:
    """Read the model settings from ``cfg`` (hydra) or ``args`` (argparse), pretrained or
    fine-tuned (``w2v_args``: the pretrained model's settings inside the fine-tuned one's)."""
    cfg = state.get("cfg")
    if cfg:
        model, task = _as_dict(cfg.get("model")), _as_dict(cfg.get("task"))
    else:
        args = _as_dict(state.get("args"))
        model, task = args, args
    name = str(model.get("_name") or model.get("arch") or "")
    prefix = ""
    inner = model.get("w2v_args")
    if inner is not None or name.endswith(("_ctc", "_seq2seq")):
        if inner is None:
            raise UserError(
                "fine-tuned checkpoint without w2v_args (it points to the pretrained file "
                f"{model.get('w2v_path')!r}); pass that pretrained checkpoint instead"
            )
        inner = _as_dict(inner)
        if "model" in inner:  # hydra-era: a whole cfg
            model, task = _as_dict(inner["model"]), _as_dict(inner.get("task"))
        else:  # argparse-era: a flat namespace
            model, task = inner, inner
        name = str(model.get("_name") or model.get("arch") or name)
        prefix = "w2v_encoder.w2v_model."
    if "hubert" in name:
        family = "hubert"
    elif "wav2vec" in name:
        family = "wav2vec2"
    else:
        raise UserError(f"unsupported fairseq model {name!r}: expected HuBERT or wav2vec 2.0")
    if (
        model.get("layer_type", "transformer") != "transformer"
        or model.get("pos_conv_depth", 1) != 1
    ):
        raise UserError(
            f"unsupported fairseq {name} variant (layer_type={model.get('layer_type')!r}, "
            f"pos_conv_depth={model.get('pos_conv_depth')!r})"
        )
    return FairseqModel(
        family=family,
        settings=model,
        normalize=bool(task.get("normalize", False)),
        prefix=prefix,
        sample_rate=int(task.get("sample_rate", 16000)),
    )


def _conv_layers(spec: str) -> list[tuple[int, int, int]]:
    """Evaluate fairseq's ``conv_feature_layers`` (e.g. ``[(512,10,5)] + [(512,3,2)] * 4``)
    with only list/tuple literals, ``+`` and ``*``: never ``eval``."""

    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Tuple | ast.List):
            items = [value(e) for e in node.elts]
            return tuple(items) if isinstance(node, ast.Tuple) else items
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Mult):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise UserError(f"cannot read conv_feature_layers {spec!r}")

    layers = value(ast.parse(spec, mode="eval").body)
    return [tuple(int(v) for v in layer) for layer in layers]  # type: ignore[misc]


def hf_config(model: FairseqModel) -> Any:
    """The transformers config of the same architecture."""
    from transformers import HubertConfig, Wav2Vec2Config

    s = model.settings
    conv = _conv_layers(
        str(s.get("conv_feature_layers", "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] * 2"))
    )
    layer_norm_encoder = s.get("extractor_mode", "default") == "layer_norm"
    common = {
        "hidden_size": int(s.get("encoder_embed_dim", 768)),
        "num_hidden_layers": int(s.get("encoder_layers", 12)),
        "num_attention_heads": int(s.get("encoder_attention_heads", 12)),
        "intermediate_size": int(s.get("encoder_ffn_embed_dim", 3072)),
        "hidden_act": str(s.get("activation_fn", "gelu")),
        "conv_dim": [c[0] for c in conv],
        "conv_kernel": [c[1] for c in conv],
        "conv_stride": [c[2] for c in conv],
        "conv_bias": bool(s.get("conv_bias", False)),
        "num_conv_pos_embeddings": int(s.get("conv_pos", 128)),
        "num_conv_pos_embedding_groups": int(s.get("conv_pos_groups", 16)),
        "feat_extract_norm": "layer" if layer_norm_encoder else "group",
        "do_stable_layer_norm": bool(s.get("layer_norm_first", False)),
        "layer_norm_eps": 1e-5,
    }
    if model.family == "hubert":
        return HubertConfig(**common, feat_proj_layer_norm=True)
    return Wav2Vec2Config(**common)


# fairseq name → transformers name, applied to the key after the encoder prefix.
_RENAMES = [
    (r"^feature_extractor\.conv_layers\.(\d+)\.0\.", r"feature_extractor.conv_layers.\1.conv."),
    (
        r"^feature_extractor\.conv_layers\.(\d+)\.2\.1\.",
        r"feature_extractor.conv_layers.\1.layer_norm.",
    ),
    (
        r"^feature_extractor\.conv_layers\.(\d+)\.2\.",
        r"feature_extractor.conv_layers.\1.layer_norm.",
    ),
    (r"^post_extract_proj\.", "feature_projection.projection."),
    (r"^layer_norm\.", "feature_projection.layer_norm."),
    (r"^mask_emb$", "masked_spec_embed"),
    (
        r"^encoder\.pos_conv\.0\.weight_g$",
        "encoder.pos_conv_embed.conv.parametrizations.weight.original0",
    ),
    (
        r"^encoder\.pos_conv\.0\.weight_v$",
        "encoder.pos_conv_embed.conv.parametrizations.weight.original1",
    ),
    (r"^encoder\.pos_conv\.0\.", "encoder.pos_conv_embed.conv."),
    (r"^encoder\.layer_norm\.", "encoder.layer_norm."),
    (
        r"^encoder\.layers\.(\d+)\.self_attn\.(k|v|q|out)_proj\.",
        r"encoder.layers.\1.attention.\2_proj.",
    ),
    (r"^encoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"encoder.layers.\1.layer_norm."),
    (r"^encoder\.layers\.(\d+)\.fc1\.", r"encoder.layers.\1.feed_forward.intermediate_dense."),
    (r"^encoder\.layers\.(\d+)\.fc2\.", r"encoder.layers.\1.feed_forward.output_dense."),
    (r"^encoder\.layers\.(\d+)\.final_layer_norm\.", r"encoder.layers.\1.final_layer_norm."),
]
# Pretraining heads and fine-tuning heads: not part of the representation.
_IGNORED = re.compile(
    r"^(label_embs_concat|final_proj\.|project_q\.|quantizer\.|target_glu\.|proj\.|"
    r"w2v_encoder\.proj\.|decoder\.)"
)


def hf_state_dict(state: dict[str, Any], model: FairseqModel) -> dict[str, torch.Tensor]:
    """The checkpoint's encoder weights under transformers' names; unknown keys are an error,
    because silently dropping one would change the numbers."""
    mapped: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state["model"].items():
        if not key.startswith(model.prefix):
            if not _IGNORED.match(key):
                unknown.append(key)
            continue
        short = key[len(model.prefix) :]
        if _IGNORED.match(short):
            continue
        for pattern, replacement in _RENAMES:
            new, n = re.subn(pattern, replacement, short)
            if n:
                mapped[new] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise UserError(
            f"fairseq checkpoint has weights this converter does not know: {unknown[:5]}"
        )
    return mapped


def load_fairseq_model(path: Path) -> tuple[torch.nn.Module, FairseqModel]:
    """A transformers model holding the checkpoint's weights, in eval mode."""
    from transformers import HubertModel, Wav2Vec2Model

    state = load_checkpoint(path)
    model = describe(state)
    config = hf_config(model)
    network = (HubertModel if model.family == "hubert" else Wav2Vec2Model)(config)
    weights = hf_state_dict(state, model)
    missing, unexpected = network.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k != "masked_spec_embed"]
    if missing or unexpected:
        raise UserError(
            f"{path}: weights do not fit the {model.family} architecture read from its config "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return network.eval(), model
