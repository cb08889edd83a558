"""Speech2Text (fairseq S2T, e.g. ``facebook/s2t-small-librispeech-asr``) through transformers.

The processor's features are Kaldi filterbanks of the 16-bit-scaled signal with utterance
mean/variance normalisation. They are computed here on the device, row by row with the same
``torchaudio.compliance.kaldi.fbank`` call the processor makes, so a batch needs no host round
trip; rows are zero-padded after normalisation with an attention mask, as the processor pads.
Then one batched ``generate``. The model gives no time stamps: each transcript is one segment
spanning the item, its words without times.

Batched equals one by one: the model's convolutional subsampler does not mask padding, so in a
padded row the second convolution would see the first one's response to the padding (its bias
through the GLU) where a row alone sees zeros, and the last frames would differ. A forward hook
zeroes each convolution's output past the row's valid length (GLU(0) = 0), which is exactly
what the row alone gets from the convolution's own zero padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from audio_models.extractor import Extractor, OutputKind, Placement, Segment, Transcript, Word
from audio_models.registry import register_extractor
from audio_models.speech.hub import hub_provenance, load_pretrained
from audio_models.utils.errors import UserError

if TYPE_CHECKING:
    import torch


@dataclass
class S2tConfig:
    _target_: str = "audio_models.speech.s2t.Speech2TextExtractor"
    name: str = "s2t"
    model: str = "facebook/s2t-small-librispeech-asr"
    revision: str | None = None
    num_beams: int | None = None  # None: the model's generation config
    max_new_tokens: int | None = None
    batch_audio_s: float | None = 240.0  # used when loader.batch_audio_s is unset
    sample_rate: int = 16000


@register_extractor("s2t", config=S2tConfig)
class Speech2TextExtractor(Extractor):
    """Batched Speech2Text transcription.

    Args:
        name: extractor name.
        model: hub id or local directory of a ``Speech2TextForConditionalGeneration`` with its
            processor (sentencepiece tokenizer and feature extractor).
        revision: pinned hub commit (ignored for a local directory).
        num_beams: beam width (``None``: the model's generation config).
        max_new_tokens: cap on generated tokens (``None``: the model's generation config).
        batch_audio_s: preferred padded seconds per batch when ``loader.batch_audio_s`` is
            unset (items of similar length batch together).
        sample_rate: input rate; must be the processor's.

    Raises:
        UserError: the model is not available, or ``sample_rate`` is not the model's.
    """

    kind = OutputKind.TRANSCRIPT
    placement = Placement.DEVICE

    def __init__(
        self,
        *,
        name: str = "s2t",
        model: str = "facebook/s2t-small-librispeech-asr",
        revision: str | None = None,
        num_beams: int | None = None,
        max_new_tokens: int | None = None,
        batch_audio_s: float | None = 240.0,
        sample_rate: int = 16000,
    ) -> None:
        super().__init__(name=name, sample_rate=sample_rate)
        self.model_id, self.revision = model, revision
        self.batch_audio_s = batch_audio_s
        self.generate_kwargs: dict[str, Any] = {}
        if num_beams is not None:
            self.generate_kwargs["num_beams"] = num_beams
        if max_new_tokens is not None:
            self.generate_kwargs["max_new_tokens"] = max_new_tokens
        self.network: torch.nn.Module | None = None

    def load(self) -> None:
        if self.network is not None:
            return
        from transformers import Speech2TextForConditionalGeneration, Speech2TextProcessor

        model, revision, sample_rate = self.model_id, self.revision, self.sample_rate

        (processor, network), folder = load_pretrained(
            model,
            revision,
            [
                Speech2TextProcessor.from_pretrained,
                Speech2TextForConditionalGeneration.from_pretrained,
            ],
        )
        features = processor.feature_extractor
        if features.sampling_rate != sample_rate:
            raise UserError(
                f"extractor.sample_rate={sample_rate} but {model} expects {features.sampling_rate}"
            )
        self.processor = processor
        self._provenance = hub_provenance("s2t", model, revision, network, folder)
        self._conv = network.model.encoder.conv
        #: Valid output length of each subsampler convolution for the batch in flight.
        self._conv_lengths: list[torch.Tensor] | None = None
        for index, layer in enumerate(self._conv.conv_layers):
            layer.register_forward_hook(partial(self._mask_padding, index))
        self.network = network.eval()  # last: a load that failed half-way runs again

    def _mask_padding(
        self, index: int, module: torch.nn.Module, args: Any, output: torch.Tensor
    ) -> torch.Tensor:
        import torch

        if self._conv_lengths is None:
            return output
        valid = self._conv_lengths[index]
        keep = torch.arange(output.shape[-1], device=output.device)[None] < valid[:, None]
        return output * keep[:, None, :].to(output.dtype)

    def _plan_conv_lengths(self, frames: torch.Tensor) -> list[torch.Tensor]:
        import torch

        lengths, out = frames, []
        for layer in self._conv.conv_layers:
            (k,), (s,), (p,) = layer.kernel_size, layer.stride, layer.padding
            lengths = torch.div(lengths + 2 * p - k, s, rounding_mode="floor") + 1
            out.append(lengths)
        return out

    @property
    def feature_names(self) -> list[str]:
        """The model score columns of ``transcripts.parquet``."""
        return ["avg_logprob"]

    @property
    def min_samples(self) -> int:
        return int(0.025 * self.sample_rate)  # one 25 ms filterbank frame

    def torch_module(self) -> torch.nn.Module:
        self.load()
        return self.network

    def provenance(self) -> dict[str, str]:
        self.load()
        return dict(self._provenance)

    def input_features(
        self, waveforms: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The processor's normalised filterbanks of each row, zero-padded, and their mask."""
        import torch
        import torchaudio.compliance.kaldi as ta_kaldi

        self.load()
        fe = self.processor.feature_extractor
        rows = []
        for row, n in enumerate(lengths.tolist()):
            x = ta_kaldi.fbank(
                waveforms[row : row + 1, :n] * 32768.0,
                dither=fe.dither,
                num_mel_bins=fe.num_mel_bins,
                sample_frequency=fe.sampling_rate,
            )
            # Statistics in float64: near-constant mel bins divide float32 rounding of the
            # mean by a small deviation (the processor's float32 numpy sums differ from torch's
            # float32 sums by ~1e-3 there; float64 sits within ~1e-4 of both).
            x = x.double()
            if fe.do_ceptral_normalize and fe.normalize_means:
                x = x - x.mean(dim=0)
            if fe.do_ceptral_normalize and fe.normalize_vars:
                x = x / x.std(dim=0, unbiased=False)
            rows.append(x.float())
        n_frames = torch.tensor([r.shape[0] for r in rows], device=waveforms.device)
        features = waveforms.new_full(
            (len(rows), int(n_frames.max()), fe.num_mel_bins), float(fe.padding_value)
        )
        for row, x in enumerate(rows):
            features[row, : x.shape[0]] = x
        mask = torch.arange(features.shape[1], device=waveforms.device)[None] < n_frames[:, None]
        return features, mask.long()

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> list[Transcript]:
        import torch

        self.load()
        features, mask = self.input_features(waveforms.float(), lengths)
        dtype = next(self.network.parameters()).dtype
        frames = mask.sum(dim=1)
        if bool((frames < mask.shape[1]).any()):
            self._conv_lengths = self._plan_conv_lengths(frames)
        try:
            out = self.network.generate(
                input_features=features.to(dtype),
                attention_mask=mask,
                return_dict_in_generate=True,
                output_scores=True,
                **self.generate_kwargs,
            )
        finally:
            self._conv_lengths = None
        texts = self.processor.batch_decode(out.sequences, skip_special_tokens=True)
        token_logprobs = self.network.compute_transition_scores(
            out.sequences, out.scores, getattr(out, "beam_indices", None), normalize_logits=True
        )
        # Generated tokens are the sequence minus the decoder start; padding after EOS counts
        # neither in the text nor in the score.
        generated = out.sequences[:, 1:]
        pad = self.network.generation_config.pad_token_id
        valid = generated != pad if pad is not None else torch.ones_like(generated, dtype=bool)
        valid = valid[:, : token_logprobs.shape[1]] & torch.isfinite(token_logprobs)
        results = []
        for row, text in enumerate(texts):
            scores = token_logprobs[row][valid[row]]
            avg = float(scores.mean()) if scores.numel() else float("nan")
            text = text.strip()
            duration = float(lengths[row]) / self.sample_rate
            segments = []
            if text:
                words = [Word(word=w) for w in text.split()]
                segments.append(
                    Segment(text=text, start=0.0, end=duration, avg_logprob=avg, words=words)
                )
            results.append(
                Transcript(text=text, language=None, scores={"avg_logprob": avg}, segments=segments)
            )
        return results
