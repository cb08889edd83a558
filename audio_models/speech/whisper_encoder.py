"""Whisper's audio encoder as an embedding extractor (transformers ``WhisperModel.encoder``).

Whisper's encoder takes a fixed window (30 s for the published models) of log-mel frames: the
model's own ``WhisperFeatureExtractor`` pads every recording to that window, and the encoder has
no attention mask, so its output frames past the end of the recording describe padding. Only the
frames that cover the recording are kept (pooled or written): the feature extractor makes
``ceil(n / hop)`` log-mel frames from ``n`` real samples (its attention mask), and the conv stack
(kernel 3, stride 1, then kernel 3, stride 2, both padded by 1) turns ``m`` frames into
``(m - 1) // 2 + 1``: ``ceil(n / 320)`` frames of 20 ms at 16 kHz.

Because every row is padded to the window anyway, rows of any length share a batch at no cost
and with the numbers each gives alone (on accelerators; on a CPU rows run one by one).
Recordings longer than the window run in overlapping chunks, stitched on the frame grid by
:class:`SelfSupervisedExtractor`'s chunking. Only the layers up to the deepest requested one
run, and that one only for the frames that are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from audio_models.extractor import Extractor
from audio_models.registry import register_extractor
from audio_models.speech.classifier import refuse_missing_weights
from audio_models.speech.hub import hub_provenance, load_pretrained
from audio_models.speech.ssl import SelfSupervisedExtractor, checked_layers
from audio_models.utils.errors import UserError

if TYPE_CHECKING:
    import torch


def _load(model: str, revision: str | None) -> tuple[Any, Any, Any]:
    """Feature extractor, encoder and the folder the files came from."""
    from transformers import WhisperFeatureExtractor, WhisperModel

    def encoder_model(source: str, *, revision: str | None) -> Any:
        return WhisperModel.from_pretrained(source, revision=revision, output_loading_info=True)

    (feature_extractor, (network, info)), folder = load_pretrained(
        model, revision, [WhisperFeatureExtractor.from_pretrained, encoder_model]
    )
    refuse_missing_weights(model, info, ("encoder.",))
    # Keep the encoder only: the decoder would sit on the device for nothing.
    return feature_extractor, network.get_encoder().eval(), folder


@dataclass
class WhisperEncoderConfig:
    _target_: str = "audio_models.speech.whisper_encoder.WhisperEncoderExtractor"
    name: str = "whisper_encoder"
    model: str = "openai/whisper-base"  # hub id or local directory
    revision: str | None = None
    layers: Any = field(default_factory=lambda: [-1])  # list of indices, or "all"
    pooling: str = "mean"  # none | mean | mean_std
    sample_rate: int = 16000
    # Recordings longer than the model's input window (30 s) run in chunks of that window
    # overlapping by this much, stitched on the 20 ms frame grid.
    overlap_s: float = 2.0
    chunk_batch: int = 4
    storage_dtype: str = "float32"


@register_extractor("whisper_encoder", config=WhisperEncoderConfig)
class WhisperEncoderExtractor(SelfSupervisedExtractor):
    """Hidden states of Whisper's encoder over the frames that cover each recording.

    Args:
        name: registered extractor name.
        model: hub id (``openai/whisper-base``…) or local directory (the same code path).
        revision: pinned hub commit (ignored for a local directory).
        layers: hidden-state indices (0 = the conv stack's output plus positions, k = encoder
            layer k, the last one after the final layer norm; negative from the end) or ``"all"``.
        pooling: ``none`` (frames), ``mean`` or ``mean_std`` over the kept frames.
        sample_rate: the model's input rate.
        overlap_s: overlap of the window-long chunks of longer recordings.
        chunk_batch: chunks of one recording per forward.
        storage_dtype: ``float32`` or ``float16`` (stored values; computation unaffected).
    """

    def __init__(
        self,
        *,
        name: str,
        model: str,
        revision: str | None = None,
        layers: list[int] | str = (-1,),
        pooling: str = "mean",
        sample_rate: int = 16000,
        overlap_s: float = 2.0,
        chunk_batch: int = 4,
        storage_dtype: str = "float32",
    ) -> None:
        Extractor.__init__(self, name=name, sample_rate=sample_rate, storage_dtype=storage_dtype)
        self.model_id, self.revision = model, revision
        # The chunk length is the model's window, known once loaded (see _read_weights).
        self._describe(layers, pooling, None, overlap_s, chunk_batch)

    def load(self) -> None:
        if not self._loaded:
            self._read_weights(self._requested[0])
            self._loaded = True

    def _read_weights(self, layers: list[int] | str) -> None:
        model, revision, sample_rate = self.model_id, self.revision, self.sample_rate or 16000
        _, _, overlap_s, chunk_batch = self._requested
        self.feature_extractor, self.network, folder = _load(model, revision)
        fe, config = self.feature_extractor, self.network.config
        if fe.sampling_rate != sample_rate:
            raise UserError(f"{model} expects {fe.sampling_rate} Hz; set extractor.sample_rate")
        conv = self.network.conv1.stride[0] * self.network.conv2.stride[0]
        if fe.nb_max_frames != config.max_source_positions * conv:
            raise UserError(
                f"{model}: the feature extractor makes {fe.nb_max_frames} frames but the "
                f"encoder takes {config.max_source_positions * conv}"
            )
        self.normalize = False  # the log-mel features are the feature extractor's business
        self.use_mask = True  # chunks of one recording share a forward (see _pads)
        self.layers = checked_layers(layers, config.encoder_layers + 1)
        self.dim = config.d_model
        self.hop = int(fe.hop_length)
        self.stride = self.hop * conv
        self._frame_shift = self.stride / sample_rate
        self.window = int(fe.n_samples)
        # Chunks plus the sub-frame remainder the last one may carry must fit the window.
        chunk_s = (self.window - self.stride) / sample_rate
        if not 0 <= overlap_s < chunk_s:
            raise UserError(f"extractor.overlap_s={overlap_s}: need 0 <= overlap < {chunk_s} s")
        self._plan_chunks(chunk_s, overlap_s, chunk_batch)
        self._provenance = {"whisper_encoder.window_s": str(self.window / sample_rate)}
        self._provenance.update(
            hub_provenance("whisper_encoder", model, revision, self.network, folder)
        )

    def _receptive_field(self) -> int:
        return 1  # the feature extractor pads any recording to the window

    def _pads(self, device: torch.device) -> bool:
        """Rows share a forward on accelerators: every row is padded to the window anyway, so
        batching adds no work there. On a CPU each row runs alone, as the SSL models' rows do:
        the matmuls of one window are already large, a batch of windows only outgrows the
        cache, and the deepest layer then runs for that row's own frames (see _encode)."""
        return device.type != "cpu" or self.pad_on_cpu

    def padded_samples(self, lengths: torch.Tensor, device: torch.device) -> int:
        return 0  # the window padding is the model's own, the same batched or alone

    def _frame_counts(self, samples: torch.Tensor) -> torch.Tensor:
        """``ceil(n / hop)`` log-mel frames (the feature extractor's attention mask), through
        the encoder's conv stack."""
        import torch

        mel = torch.div(samples + self.hop - 1, self.hop, rounding_mode="floor")
        return self.network._get_feat_extract_output_lengths(mel)

    def _hidden(self, x: torch.Tensor, lengths: torch.Tensor) -> list[list[torch.Tensor]]:
        """Per row, the selected layers' frames that cover the row's samples."""
        import torch

        # The model's own feature extractor (its STFT on the run's device), so the log-mel
        # input is exactly what the model card's code gives; it takes numpy rows.
        rows = [x[row, :n].float().cpu().numpy() for row, n in enumerate(lengths.tolist())]
        if max(len(r) for r in rows) > self.window:  # the feature extractor would truncate
            raise ValueError(f"a row is longer than the {self.window}-sample window")
        # fp32 whatever the run's precision: under bf16 autocast the STFT would come back
        # bf16, which the feature extractor's numpy step cannot take (every item failed).
        with torch.autocast(device_type=x.device.type, enabled=False):
            features = self.feature_extractor(
                rows,
                sampling_rate=self.sample_rate,
                return_tensors="pt",
                device=str(x.device),
            ).input_features.to(x.device)
        frames = self._frame_counts(lengths.cpu()).tolist()
        computed = self._encode(features, max(frames))
        states = [computed[layer] for layer in self.layers]
        return [[s[row, :count].float() for s in states] for row, count in enumerate(frames)]

    def _encode(self, features: torch.Tensor, keep: int) -> dict[int, torch.Tensor]:
        """The requested hidden states as ``WhisperEncoder.forward(output_hidden_states=True)``
        gives them, without the work nobody reads: no layer above the deepest requested one,
        and that one for the first ``keep`` frames only. Its keys and values still cover the
        whole window (the encoder attends to the padding), but its queries, attention output
        and feed-forward skip the padding frames: a 10-s recording saves ~2/3 of a layer."""
        import torch
        from torch.nn import functional

        encoder = self.network
        hidden = functional.gelu(encoder.conv2(functional.gelu(encoder.conv1(features))))
        positions = torch.arange(encoder.embed_positions.num_embeddings, device=hidden.device)
        hidden = hidden.permute(0, 2, 1) + encoder.embed_positions(positions)
        wanted, deepest = set(self.layers), max(self.layers)
        states = {0: hidden} if 0 in wanted else {}
        for index, layer in enumerate(encoder.layers[:deepest], start=1):
            if index < deepest:
                hidden = layer(hidden, None, layer_head_mask=None)[0]
            else:
                hidden = _first_frames(layer, hidden, keep)
            if index == len(encoder.layers):
                hidden = encoder.layer_norm(hidden)
            if index in wanted:
                states[index] = hidden
        return states


def _first_frames(layer: Any, hidden: torch.Tensor, keep: int) -> torch.Tensor:
    """``WhisperEncoderLayer.forward`` (eval mode: its dropouts are identities) for the first
    ``keep`` query frames, attending to all of ``hidden`` as the full layer does."""
    import torch

    normed = layer.self_attn_layer_norm(hidden)
    # key_value_states: keys and values from the whole window, queries from the kept frames
    # (no mask either way: Whisper's encoder has none).
    attended = layer.self_attn(hidden_states=normed[:, :keep], key_value_states=normed)[0]
    hidden = hidden[:, :keep] + attended
    out = hidden + layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(hidden))))
    if out.dtype == torch.float16:  # as the layer clamps half-precision overflow
        limit = torch.finfo(out.dtype).max - 1000
        out = torch.clamp(out, min=-limit, max=limit)
    return out
