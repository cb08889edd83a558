"""emotion2vec (base / plus) checkpoints, ported from FunASR without FunASR.

A FunASR emotion2vec model folder holds ``config.yaml`` (``model: Emotion2vec`` and its
``model_conf``, optionally a ``tokenizer_conf.token_list`` naming the classifier's labels),
``model.pt`` (the state dict) and sometimes ``tokens.txt``/``tokens.json`` (the labels, which
then win over the config's, as FunASR's loader has it). The weights are read with
``torch.load(weights_only=True)``: no pickle that runs code is accepted.

The network is FunASR's ``Emotion2vec`` (``funasr/models/emotion2vec``, itself data2vec 2.0's
audio encoder) in inference mode, rewritten here: the convolutional feature encoder, the
feature projection, the convolutional relative positional encoder, the ALiBi-biased
transformer blocks (prenet and main), the extra tokens (dropped from the output) and, where
the checkpoint has one, the classifier head ``proj`` on the mean frame, softmaxed over the
labels not named ``unuse*``. The module's parameter names are the checkpoint's keys, so the
state dict loads strictly (keys the inference does not use, such as the pretraining decoder,
are left out).

FunASR runs one recording at a time. Here a batch runs padded, with the padding masked out of
the attention and zeroed between the positional convolutions, so every row gives the numbers
it gives alone; a group-norm feature encoder (``extractor_mode: default``), which sees the
padding, runs in groups of equal length. Recordings longer than ``max_chunk_s`` run in
overlapping chunks stitched on the frame grid (memory bounded by the chunk batch); like every
chunked transformer this is an approximation of the whole-file numbers, ``max_chunk_s: null``
gives those exactly.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import MISSING

from audio_models.extractor import Extractor, OutputKind, Placement
from audio_models.registry import register_extractor
from audio_models.utils.errors import UserError

if TYPE_CHECKING:
    import torch

POOLINGS = ("mean", "none")
#: Files a model folder (or a hub repository) provides.
CONFIG_FILE, WEIGHTS_FILE = "config.yaml", "model.pt"
LABEL_FILES = ("tokens.txt", "tokens.json")


@dataclass
class Emotion2vecConfig:
    _target_: str = "audio_models.speech.emotion2vec.Emotion2vecExtractor"
    name: str = "emotion2vec"
    # folder with model.pt + config.yaml (or the path of model.pt), or a hub id
    checkpoint: str = MISSING
    revision: str | None = None  # pinned hub commit (hub ids only)
    sha256: str | None = None  # expected SHA-256 of model.pt
    pooling: str = "mean"  # mean: utterance embedding (+ p_<label>); none: frames
    probabilities: bool = True  # write p_<label> where the checkpoint has a classifier
    sample_rate: int = 16000
    max_chunk_s: float | None = 30.0
    overlap_s: float = 2.0
    chunk_batch: int = 4
    storage_dtype: str = "float32"


# -- reading a model folder -------------------------------------------------------------------


def _literal(node: ast.AST) -> Any:
    """Value of a ``feature_encoder_spec`` expression: list/tuple literals of numbers joined
    by ``+`` and repeated by ``*`` (upstream ``eval``s the string; nothing else is allowed)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return node.value
    if isinstance(node, ast.List | ast.Tuple):
        items = [_literal(e) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Mult):
        left, right = _literal(node.left), _literal(node.right)
        return left + right if isinstance(node.op, ast.Add) else left * right
    raise ValueError(f"unsupported expression {ast.dump(node)}")


def parse_conv_spec(spec: str) -> list[tuple[int, int, int]]:
    """``'[(512, 10, 5)] + [(512, 3, 2)] * 4 + ...'`` as ``[(dim, kernel, stride), ...]``."""
    try:
        layers = _literal(ast.parse(spec, mode="eval").body)
        out = [(int(d), int(k), int(s)) for d, k, s in layers]
    except (SyntaxError, ValueError, TypeError) as exc:
        raise UserError(
            f"emotion2vec feature_encoder_spec {spec!r} not understood: {exc}"
        ) from None
    if not out:
        raise UserError("emotion2vec feature_encoder_spec is empty")
    return out


@dataclass
class Settings:
    """The architecture a ``config.yaml`` describes (the keys inference depends on)."""

    embed_dim: int
    num_heads: int
    mlp_ratio: float
    depth: int
    prenet_depth: int
    norm_eps: float
    norm_affine: bool
    layer_norm_first: bool
    normalize: bool
    conv_layers: list[tuple[int, int, int]]
    extractor_mode: str
    conv_pos_width: int
    conv_pos_depth: int
    conv_pos_groups: int
    conv_pos_pre_ln: bool
    num_extra_tokens: int
    use_alibi: bool
    num_alibi_heads: int
    alibi_scale_shape: tuple[int, ...]

    @property
    def pos_kernel(self) -> int:
        return max(3, self.conv_pos_width // self.conv_pos_depth)

    @property
    def stride(self) -> int:
        return math.prod(s for _, _, s in self.conv_layers)

    @property
    def receptive_field(self) -> int:
        field, jump = 1, 1
        for _, kernel, stride in self.conv_layers:
            field += (kernel - 1) * jump
            jump *= stride
        return field


def read_settings(model_conf: dict[str, Any]) -> Settings:
    """:class:`Settings` from the ``model_conf`` mapping of a ``config.yaml``."""
    try:
        audio = model_conf["modalities"]["audio"]
        if audio.get("learned_alibi"):
            raise UserError("emotion2vec with learned_alibi is not supported")
        mode = str(audio["extractor_mode"])
        if mode not in ("default", "layer_norm"):
            raise UserError(f"emotion2vec extractor_mode {mode!r} is not supported")
        prenet, depth = int(audio["prenet_depth"]), int(model_conf["depth"])
        heads = int(model_conf["num_heads"])
        alibi_heads = int(audio["num_alibi_heads"])
        if alibi_heads > heads:
            raise UserError(f"emotion2vec num_alibi_heads {alibi_heads} > num_heads {heads}")
        shape = (
            prenet + int(audio["model_depth"]) if audio["learned_alibi_scale_per_layer"] else 1,
            1,
            alibi_heads if audio["learned_alibi_scale_per_head"] else 1,
            1,
            1,
        )
        return Settings(
            embed_dim=int(model_conf["embed_dim"]),
            num_heads=heads,
            mlp_ratio=float(model_conf["mlp_ratio"]),
            depth=depth,
            prenet_depth=prenet,
            norm_eps=float(model_conf["norm_eps"]),
            norm_affine=bool(model_conf["norm_affine"]),
            layer_norm_first=bool(model_conf["layer_norm_first"]),
            normalize=bool(model_conf["normalize"]),
            conv_layers=parse_conv_spec(str(audio["feature_encoder_spec"])),
            extractor_mode=mode,
            conv_pos_width=int(audio["conv_pos_width"]),
            conv_pos_depth=int(audio["conv_pos_depth"]),
            conv_pos_groups=int(audio["conv_pos_groups"]),
            conv_pos_pre_ln=bool(audio["conv_pos_pre_ln"]),
            num_extra_tokens=int(audio["num_extra_tokens"]),
            use_alibi=bool(audio["use_alibi_encoder"]),
            num_alibi_heads=alibi_heads,
            alibi_scale_shape=shape,
        )
    except KeyError as exc:
        raise UserError(f"emotion2vec config.yaml: model_conf has no {exc}") from None


def read_labels(folder: Path, config: dict[str, Any]) -> list[str] | None:
    """The classifier's token list as FunASR builds its tokenizer: ``tokens.txt`` or
    ``tokens.json`` beside the config, else ``tokenizer_conf.token_list`` (a list, or a
    ``.txt``/``.json`` file); ``None`` without a tokenizer (then there is no head)."""
    import json

    conf = config.get("tokenizer_conf") or {}
    token_list: Any = None
    for name in LABEL_FILES:
        if (folder / name).is_file():
            token_list = str(folder / name)
    if token_list is None:
        token_list = conf.get("token_list")
    if token_list is None:
        return None
    if isinstance(token_list, str):
        path = Path(token_list)
        path = path if path.is_absolute() else folder / path
        if not path.is_file():
            raise UserError(f"emotion2vec token list {token_list!r} not found beside {folder}")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            return [str(t) for t in json.loads(text)]
        return [line.rstrip() for line in text.splitlines()]
    return [str(t) for t in token_list]


def column_label(token: str) -> str:
    """``'开心/happy'`` → ``'happy'``, ``'<unk>'`` → ``'unk'``: the part after the last ``/``,
    lower case, runs of other characters as ``_``."""
    tail = token.rsplit("/", 1)[-1]
    return re.sub(r"[^0-9a-z]+", "_", tail.lower()).strip("_") or "label"


# -- the network ------------------------------------------------------------------------------


def build_network(s: Settings, n_labels: int | None) -> torch.nn.Module:
    """A module whose ``state_dict`` keys are those of FunASR's ``Emotion2vec`` that inference
    uses; :func:`encode` computes the forward pass with it."""
    import torch
    from torch import nn

    d = s.embed_dim

    def norm(dim: int, affine: bool = True) -> nn.Module:
        return nn.LayerNorm(dim, eps=s.norm_eps, elementwise_affine=affine)

    def block() -> nn.Module:
        hidden = int(d * s.mlp_ratio)
        return nn.ModuleDict(
            {
                "norm1": norm(d, s.norm_affine),
                "attn": nn.ModuleDict({"qkv": nn.Linear(d, 3 * d), "proj": nn.Linear(d, d)}),
                "norm2": norm(d, s.norm_affine),
                "mlp": nn.ModuleDict({"fc1": nn.Linear(d, hidden), "fc2": nn.Linear(hidden, d)}),
            }
        )

    convs = nn.ModuleList()
    in_dim = 1
    for i, (dim, kernel, stride) in enumerate(s.conv_layers):
        layer: dict[str, nn.Module] = {"0": nn.Conv1d(in_dim, dim, kernel, stride, bias=False)}
        if s.extractor_mode == "layer_norm":
            layer["2"] = nn.ModuleDict({"1": nn.LayerNorm(dim)})
        elif i == 0:
            layer["2"] = nn.GroupNorm(dim, dim)
        convs.append(nn.ModuleDict(layer))
        in_dim = dim
    k = s.pos_kernel
    pos_layers = {
        str(j + 1): nn.ModuleDict(
            {"0": nn.Conv1d(d, d, k, padding=k // 2, groups=s.conv_pos_groups)}
        )
        for j in range(s.conv_pos_depth)
    }
    positional: nn.Module = nn.ModuleDict(pos_layers)
    if s.conv_pos_pre_ln:
        positional = nn.ModuleDict({"0": nn.LayerNorm(d), "1": positional})
    context: dict[str, nn.Module] = {
        "blocks": nn.ModuleList(block() for _ in range(s.prenet_depth))
    }
    if not s.layer_norm_first:
        context["norm"] = norm(d, s.norm_affine)
    audio: dict[str, Any] = {
        "local_encoder": nn.ModuleDict({"conv_layers": convs}),
        "project_features": nn.ModuleDict({"1": nn.LayerNorm(in_dim), "2": nn.Linear(in_dim, d)}),
        "relative_positional_encoder": positional,
        "context_encoder": nn.ModuleDict(context),
    }
    encoder = nn.ModuleDict(audio)
    if s.num_extra_tokens > 0:
        encoder.register_parameter(
            "extra_tokens", nn.Parameter(torch.zeros(1, s.num_extra_tokens, d))
        )
    if s.use_alibi:
        encoder.register_parameter("alibi_scale", nn.Parameter(torch.zeros(*s.alibi_scale_shape)))
    top: dict[str, nn.Module] = {
        "modality_encoders": nn.ModuleDict({"AUDIO": encoder}),
        "blocks": nn.ModuleList(block() for _ in range(s.depth)),
    }
    if s.layer_norm_first:
        top["norm"] = norm(d, s.norm_affine)
    if n_labels:
        top["proj"] = nn.Linear(d, n_labels)
    return nn.ModuleDict(top).eval()


def _alibi(frames: int, heads: int, device: torch.device) -> torch.Tensor:
    """data2vec 2.0's symmetric ALiBi bias ``(heads, frames, frames)``: slope × -|i - j|."""
    import torch

    def slopes(n: int) -> list[float]:
        if math.log2(n).is_integer():
            start = 2 ** (-(2 ** -(math.log2(n) - 3)))
            return [start * start**i for i in range(n)]
        closest = 2 ** math.floor(math.log2(n))
        return slopes(closest) + slopes(2 * closest)[0::2][: n - closest]

    pos = torch.arange(frames, device=device)
    distance = -(pos[None, :] - pos[:, None]).abs().float()
    return torch.tensor(slopes(heads), device=device)[:, None, None] * distance[None]


def _block(
    blk: Any,
    x: torch.Tensor,
    key_padding: torch.Tensor | None,
    bias: torch.Tensor | None,
    s: Settings,
) -> torch.Tensor:
    """FunASR's ``AltBlock`` (``AltAttention`` inside) in eval mode."""
    import torch
    import torch.nn.functional as F

    def attention(h: torch.Tensor) -> torch.Tensor:
        b, n, c = h.shape
        qkv = blk["attn"]["qkv"](h).reshape(b, n, 3, s.num_heads, c // s.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = (q * (c // s.num_heads) ** -0.5) @ k.transpose(-2, -1)
        if bias is not None:
            attn = attn.type_as(bias)
            attn[:, : bias.size(1)] += bias
        if key_padding is not None:
            attn = attn.masked_fill(key_padding[:, None, None, :], float("-inf"))
        attn = attn.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        return blk["attn"]["proj"]((attn @ v).transpose(1, 2).reshape(b, n, c))

    def mlp(h: torch.Tensor) -> torch.Tensor:
        return blk["mlp"]["fc2"](F.gelu(blk["mlp"]["fc1"](h)))

    if s.layer_norm_first:
        x = x + attention(blk["norm1"](x))
        r = x = mlp(blk["norm2"](x))
        return r + x
    x = x + attention(x)
    r = x = blk["norm1"](x)
    return blk["norm2"](r + mlp(x))


def frame_counts(s: Settings, samples: torch.Tensor) -> torch.Tensor:
    """Frames the feature encoder gives for inputs of ``samples`` samples."""
    import torch

    n = samples.to(torch.float64)
    for _, kernel, stride in s.conv_layers:
        n = torch.floor((n - kernel) / stride + 1)
    return n.to(torch.long).clamp_min(0)


def encode(
    net: Any, s: Settings, x: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames ``(batch, frames, dim)`` of already normalised, zero-padded signals, extra tokens
    removed, and their counts. Padded frames are kept out of every valid frame's numbers."""
    import torch
    import torch.nn.functional as F

    enc = net["modality_encoders"]["AUDIO"]
    # Feature encoder: conv, then a per-frame layer norm over channels (or, default mode,
    # group norm after the first conv), then GELU.
    h = x[:, None, :]
    for i, layer in enumerate(enc["local_encoder"]["conv_layers"]):
        h = layer["0"](h)
        if s.extractor_mode == "layer_norm":
            ln = layer["2"]["1"]
            h = (
                F.layer_norm(
                    h.transpose(-2, -1).float(),
                    ln.normalized_shape,
                    ln.weight.float(),
                    ln.bias.float(),
                    ln.eps,
                )
                .type_as(h)
                .transpose(-2, -1)
            )
        elif i == 0:
            gn = layer["2"]
            h = F.group_norm(
                h.float(), gn.num_groups, gn.weight.float(), gn.bias.float(), gn.eps
            ).type_as(h)
        h = F.gelu(h)
    counts = frame_counts(s, lengths)
    frames = h.shape[-1]
    valid = torch.arange(frames, device=h.device)[None, :] < counts[:, None]  # (B, T)
    padded = bool((~valid).any())
    h = enc["project_features"]["2"](enc["project_features"]["1"](h.transpose(1, 2)))
    # Relative positional encoder: convolutions over time, each followed by a parameter-free
    # layer norm and GELU; padded frames are zeroed before each, as the zero padding of a
    # recording run alone.
    pos = enc["relative_positional_encoder"]
    p = h
    if s.conv_pos_pre_ln:
        p, pos = pos["0"](p), pos["1"]
    keep = valid[:, :, None].to(p.dtype)
    for j in range(s.conv_pos_depth):
        if padded:
            p = p * keep
        conv = pos[str(j + 1)]["0"]
        p = conv(p.transpose(1, 2))
        if s.pos_kernel % 2 == 0:
            p = p[:, :, :-1]
        p = F.gelu(F.layer_norm(p.transpose(1, 2), (s.embed_dim,), eps=1e-5))
    h = h + p
    # ALiBi bias over the recording's frames (zero for the extra tokens), scaled by the
    # clamped learned scale: once for all layers, or per layer.
    bias = scale = None
    if s.use_alibi:
        bias = _alibi(frames, s.num_alibi_heads, h.device)[None]
        scale = enc.alibi_scale.clamp_min(0)
        if scale.size(0) == 1:
            bias, scale = bias * scale.squeeze(0).type_as(bias), None
    n_extra = s.num_extra_tokens
    if n_extra > 0:
        h = torch.cat([enc.extra_tokens.expand(h.size(0), -1, -1), h], dim=1)
        if bias is not None:
            bias = F.pad(bias, (n_extra, 0, n_extra, 0))
    key_padding = F.pad(~valid, (n_extra, 0)) if padded else None

    def run(blocks: Any, scales: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
        for i, blk in enumerate(blocks):
            ab = bias
            if ab is not None and scales is not None:
                ab = ab * (scales[i] if scales.size(0) > 1 else scales.squeeze(0)).type_as(ab)
            h = _block(blk, h, key_padding, ab, s)
        return h

    context = enc["context_encoder"]
    if "norm" in context:
        h = context["norm"](h)
    h = run(context["blocks"], scale[: s.prenet_depth] if scale is not None else None, h)
    rest = scale[s.prenet_depth :] if scale is not None and scale.size(0) > 1 else scale
    h = run(net["blocks"], rest, h)
    if "norm" in net:
        h = net["norm"](h)
    return h[:, n_extra:], counts


def normalised(x: torch.Tensor, lengths: torch.Tensor, normalize: bool) -> torch.Tensor:
    """FunASR's ``F.layer_norm(source, source.shape)`` over each row's own samples (when the
    config says ``normalize``); padding zeroed."""
    import torch

    x = x.float()
    valid = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
    if not normalize:
        return torch.where(valid, x, torch.zeros_like(x))
    n = lengths[:, None].to(torch.float64)
    xd = x.double()
    mean = (xd * valid).sum(1, keepdim=True) / n
    var = (((xd - mean) * valid) ** 2).sum(1, keepdim=True) / n
    out = ((xd - mean) / torch.sqrt(var + 1e-5)).float()
    return torch.where(valid, out, torch.zeros_like(out))


# -- the extractor ----------------------------------------------------------------------------


@register_extractor("emotion2vec", config=Emotion2vecConfig)
class Emotion2vecExtractor(Extractor):
    """emotion2vec base / plus utterance embeddings or frames, and class probabilities.

    Args:
        name: registered extractor name.
        checkpoint: a FunASR model folder (``config.yaml`` + ``model.pt``, maybe
            ``tokens.txt``), the path of its ``model.pt``, or a Hugging Face hub id (such as
            ``emotion2vec/emotion2vec_plus_base``).
        revision: pinned hub commit (hub ids only).
        sha256: expected SHA-256 of ``model.pt``; a mismatch stops before any work.
        pooling: ``mean`` (the utterance embedding, FunASR's ``granularity="utterance"``,
            columns ``embedding_<j>``, then ``p_<label>`` when the checkpoint has a
            classifier and ``probabilities``) or ``none`` (frames, 50 per second).
        probabilities: write the classifier's ``p_<label>`` (``pooling: mean`` only).
        max_chunk_s, overlap_s, chunk_batch: longer recordings run in overlapping chunks of
            ``max_chunk_s`` (``null``: whole), ``chunk_batch`` at a time.
    """

    placement = Placement.DEVICE

    def __init__(
        self,
        *,
        name: str,
        checkpoint: str,
        revision: str | None = None,
        sha256: str | None = None,
        pooling: str = "mean",
        probabilities: bool = True,
        sample_rate: int = 16000,
        max_chunk_s: float | None = 30.0,
        overlap_s: float = 2.0,
        chunk_batch: int = 4,
        storage_dtype: str = "float32",
    ) -> None:
        super().__init__(name=name, sample_rate=sample_rate, storage_dtype=storage_dtype)
        if pooling not in POOLINGS:
            raise UserError(f"extractor.pooling must be one of {POOLINGS}, got {pooling!r}")
        if sample_rate != 16000:
            raise UserError("emotion2vec takes 16 kHz input; leave extractor.sample_rate=16000")
        if max_chunk_s is not None and not 0 <= overlap_s < max_chunk_s:
            raise UserError(
                f"extractor.max_chunk_s={max_chunk_s} / overlap_s={overlap_s}: "
                "need 0 <= overlap < chunk"
            )
        self.checkpoint = str(checkpoint)
        self.revision = revision
        self.sha256 = sha256.lower() if sha256 else None
        self.pooling = pooling
        self.probabilities = bool(probabilities)
        self.max_chunk_s, self.overlap_s = max_chunk_s, float(overlap_s)
        self.chunk_batch = max(1, int(chunk_batch))
        self.network: Any = None

    # -- loading --------------------------------------------------------------------------

    def _files(self) -> tuple[Path, Path]:
        """The folder holding config.yaml and the model.pt path (downloaded for a hub id)."""
        local = Path(self.checkpoint).expanduser()
        if local.is_file():
            return local.parent, local
        if local.is_dir():
            return local, local / WEIGHTS_FILE
        looks_like_hub = re.fullmatch(r"[\w.-]+/[\w.-]+", self.checkpoint) is not None
        if not looks_like_hub or local.is_absolute() or self.checkpoint.startswith("."):
            raise UserError(f"emotion2vec checkpoint not found: {local}")
        from huggingface_hub import snapshot_download

        from audio_models.speech.hub import hub_offline
        from audio_models.utils.errors import model_unavailable

        hub_offline()
        try:
            folder = Path(
                snapshot_download(
                    self.checkpoint,
                    revision=self.revision,
                    allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, *LABEL_FILES],
                )
            )
        except Exception as exc:  # offline, not cached, no such repository
            error = model_unavailable(self.checkpoint, self.revision, exc)
            raise UserError(str(error).replace("extractor.model", "extractor.checkpoint")) from None
        return folder, folder / WEIGHTS_FILE

    def load(self) -> None:
        if self.network is not None:
            return
        import torch
        from omegaconf import OmegaConf

        from audio_models.utils.provenance import sha256_file

        folder, weights = self._files()
        config_path = folder / CONFIG_FILE
        for path in (config_path, weights):
            if not path.is_file():
                raise UserError(f"emotion2vec checkpoint: {path} not found")
        digest = sha256_file(weights)
        if self.sha256 is not None and digest != self.sha256:
            raise UserError(
                f"{weights}: sha256 {digest} does not match extractor.sha256={self.sha256}; "
                "refusing an unverified checkpoint"
            )
        config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
        if not isinstance(config, dict) or not isinstance(config.get("model_conf"), dict):
            raise UserError(f"{config_path} has no model_conf: not an emotion2vec config")
        if config.get("model", "Emotion2vec") != "Emotion2vec":
            raise UserError(f"{config_path} describes a {config.get('model')!r}, not Emotion2vec")
        settings = read_settings(config["model_conf"])
        labels = read_labels(folder, config)
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:  # the weights-only unpickler's refusals are plain exceptions
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(
                f"refusing to load {weights}: {first}. Only tensors and plain containers are "
                "allowed; nothing was executed"
            ) from None
        for key in ("state_dict", "model_state_dict", "model"):  # FunASR's unwrapping
            if isinstance(state, dict) and key in state:
                state = state[key]
        if not isinstance(state, dict):
            raise UserError(f"{weights} holds no state dict")
        if labels is not None and "proj.weight" not in state:
            raise UserError(f"{config_path} names {len(labels)} labels but {weights} has no head")
        n_labels = len(labels) if labels is not None and "proj.weight" in state else None
        network = build_network(settings, n_labels)
        wanted = network.state_dict()
        missing = [k for k in wanted if k not in state]
        wrong = [
            f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
            for k, v in wanted.items()
            if k in state and tuple(state[k].shape) != tuple(v.shape)
        ]
        if missing or wrong:
            raise UserError(
                f"{weights} does not match {config_path}: "
                + "; ".join(
                    ([f"missing {', '.join(missing[:5])}"] if missing else [])
                    + ([f"shape of {', '.join(wrong[:5])}"] if wrong else [])
                )
            )
        network.load_state_dict({k: state[k] for k in wanted}, strict=True)
        network.requires_grad_(False)
        self.settings = settings
        self.labels = labels if n_labels else None
        self.columns = (
            [column_label(t) for t in labels if not t.startswith("unuse")]
            if self.labels is not None
            else []
        )
        if len(set(self.columns)) != len(self.columns):
            raise UserError(f"emotion2vec labels {labels} give duplicate column names")
        stride = settings.stride
        if self.max_chunk_s is None:
            self.chunk = self.overlap = None
        else:
            self.chunk = max(1, round(self.max_chunk_s * 16000 / stride)) * stride
            self.overlap = round(self.overlap_s * 16000 / stride) * stride
            if self.chunk < settings.receptive_field or not 0 <= self.overlap < self.chunk:
                raise UserError(
                    f"extractor.max_chunk_s={self.max_chunk_s} / overlap_s={self.overlap_s}: "
                    f"need 0 <= overlap < chunk and chunks of at least "
                    f"{settings.receptive_field} samples"
                )
        self._provenance = {
            "emotion2vec.checkpoint": self.checkpoint,
            "emotion2vec.revision": str(self.revision),
            "emotion2vec.weights_sha256": digest,
            "emotion2vec.config_sha256": sha256_file(config_path),
            "emotion2vec.labels": ",".join(self.columns) if self.columns else "none",
        }
        self.network = network

    # -- description ----------------------------------------------------------------------

    @property
    def kind(self) -> OutputKind:  # type: ignore[override]
        return OutputKind.FRAMES if self.pooling == "none" else OutputKind.VECTOR

    @property
    def has_head(self) -> bool:
        self.load()
        return self.labels is not None

    @property
    def writes_probabilities(self) -> bool:
        return self.pooling == "mean" and self.probabilities and self.has_head

    @property
    def min_samples(self) -> int:
        self.load()
        return self.settings.receptive_field

    @property
    def frame_shift_s(self) -> float:
        self.load()
        return self.settings.stride / 16000

    @property
    def feature_names(self) -> list[str]:
        self.load()
        names = [f"embedding_{j}" for j in range(self.settings.embed_dim)]
        if self.writes_probabilities:
            names += [f"p_{c}" for c in self.columns]
        return names

    def torch_module(self) -> torch.nn.Module:
        self.load()
        return self.network

    def provenance(self) -> dict[str, str]:
        self.load()
        return dict(self._provenance)

    # -- computing ------------------------------------------------------------------------

    def padded_samples(self, lengths: torch.Tensor, device: torch.device) -> int:
        self.load()
        if self.settings.extractor_mode != "layer_norm":
            return 0
        short = lengths[lengths <= self.chunk] if self.chunk is not None else lengths
        return super().padded_samples(short, device)

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        self.load()
        outputs: list[torch.Tensor | None] = [None] * len(lengths)
        x = normalised(waveforms, lengths, self.settings.normalize)
        groups: dict[int, list[int]] = {}
        for row, n in enumerate(lengths.tolist()):
            if self.chunk is not None and n > self.chunk:
                outputs[row] = self._finish(self._long(x[row, :n]))
            elif self.settings.extractor_mode == "layer_norm":
                groups.setdefault(-1, []).append(row)  # one padded batch
            else:
                groups.setdefault(n, []).append(row)  # group norm: equal lengths only
        for rows in groups.values():
            index = torch_index(rows, waveforms.device)
            n = int(lengths[index].max())
            frames, counts = encode(self.network, self.settings, x[index, :n], lengths[index])
            for i, row in enumerate(rows):
                outputs[row] = self._finish(frames[i, : int(counts[i])])
        return outputs  # type: ignore[return-value]

    def _finish(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames, or the mean frame (FunASR's utterance embedding) and the probabilities."""
        import torch

        if self.pooling == "none":
            return frames.float()
        mean = frames.float().mean(0)
        if not self.writes_probabilities:
            return mean
        logits = self.network["proj"](mean[None])[0]
        assert self.labels is not None
        unused = torch.tensor([t.startswith("unuse") for t in self.labels], device=mean.device)
        probs = torch.softmax(logits.masked_fill(unused, float("-inf")), dim=-1)
        return torch.cat([mean, probs[~unused]])

    def chunk_starts(self, n: int) -> list[int]:
        """Chunk starts every ``chunk - overlap`` samples, and a last chunk ending at the end
        of the recording, all on the frame grid."""
        assert self.chunk is not None and self.overlap is not None
        stride = self.settings.stride
        starts = list(range(0, max(n - self.chunk, 0), self.chunk - self.overlap)) or [0]
        last = max(0, (n - self.chunk) // stride * stride)
        if last <= starts[-1]:
            starts[-1] = last
        else:
            starts.append(last)
        return starts

    def _long(self, x: torch.Tensor) -> torch.Tensor:
        """Frames of one long normalised recording, chunk by chunk; each frame is taken from
        the chunk where it lies furthest from an edge. Pooled, only the sum is kept."""
        import torch

        assert self.chunk is not None
        s, n = self.settings, x.shape[0]
        starts = self.chunk_starts(n)
        ends = [min(a + self.chunk, n) for a in starts]
        ends[-1] = n
        counts = frame_counts(s, torch.tensor([e - a for a, e in zip(starts, ends, strict=True)]))
        firsts = [a // s.stride for a in starts]
        total = int(frame_counts(s, torch.tensor([n]))[0])
        cuts = [0]
        for k in range(len(starts) - 1):
            cuts.append((firsts[k + 1] + firsts[k] + int(counts[k])) // 2)
        cuts.append(total)
        kept: list[torch.Tensor] = []
        total_sum: torch.Tensor | None = None
        for first in range(0, len(starts), self.chunk_batch):
            group = list(range(first, min(first + self.chunk_batch, len(starts))))
            lengths = torch.tensor([ends[k] - starts[k] for k in group], device=x.device)
            batch = torch.zeros(len(group), int(lengths.max()), device=x.device)
            for row, k in enumerate(group):
                batch[row, : ends[k] - starts[k]] = x[starts[k] : ends[k]]
            if s.extractor_mode == "layer_norm" or len(set(lengths.tolist())) == 1:
                frames, _ = encode(self.network, s, batch, lengths)
                pieces = [frames[row] for row in range(len(group))]
            else:  # group norm: the shorter last chunk runs alone
                pieces = [
                    encode(self.network, s, batch[row : row + 1, : int(m)], lengths[row : row + 1])[
                        0
                    ][0]
                    for row, m in enumerate(lengths.tolist())
                ]
            for k, frames in zip(group, pieces, strict=True):
                piece = frames[cuts[k] - firsts[k] : cuts[k + 1] - firsts[k]].float()
                if self.pooling == "none":
                    kept.append(piece)
                else:
                    part = piece.double().sum(0)
                    total_sum = part if total_sum is None else total_sum + part
        if self.pooling == "none":
            return torch.cat(kept)
        assert total_sum is not None
        # _finish takes the mean of the frames: hand it one row holding the mean.
        return (total_sum / total).float()[None]


def torch_index(rows: list[int], device: torch.device) -> torch.Tensor:
    import torch

    return torch.tensor(rows, device=device)
