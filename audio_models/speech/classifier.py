"""Any transformers audio-classification checkpoint (``AutoModelForAudioClassification``).

Raw-waveform heads (wav2vec 2.0, HuBERT, WavLM, …: ``*ForSequenceClassification``) follow the
SSL extractors' padding rule, inherited from :class:`SelfSupervisedExtractor`: a layer-norm
feature encoder takes padded rows with an attention mask (on an accelerator), a group-norm one
runs rows in groups of equal length, so a batch gives the numbers each file gives alone. Whisper
heads (``WhisperForAudioClassification``) pool over the model's whole 30 s window, padding
included, exactly as the model was trained: every row is padded to the window by the model's own
feature extractor, so any rows share a batch; a longer recording is refused (as a failure row),
not silently truncated.

A checkpoint whose head (or any weight) is missing would run with transformers' random
initialisation and only a warning: it is refused before any work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from omegaconf import MISSING

from audio_models.extractor import Extractor, Output, OutputKind
from audio_models.registry import register_extractor
from audio_models.speech.hub import hub_provenance, load_pretrained
from audio_models.speech.ssl import SelfSupervisedExtractor
from audio_models.utils.errors import UserError

if TYPE_CHECKING:
    import torch

#: The text column holding the most probable class.
PREDICTION = "prediction"


def refuse_missing_weights(model: str, info: dict[str, Any], prefixes: tuple[str, ...]) -> None:
    """Stop when ``from_pretrained`` left weights (those under ``prefixes``; all when empty)
    at their random start: transformers only warns that they are "newly initialized".

    Raises:
        UserError: naming the model and a few of the missing weights.
    """
    missing = [k for k in info.get("missing_keys", []) if not prefixes or k.startswith(prefixes)]
    if missing:
        shown = ", ".join(sorted(missing)[:4]) + (", ..." if len(missing) > 4 else "")
        raise UserError(
            f"{model} lacks {len(missing)} weights the extractor needs ({shown}): "
            "refusing to run them at their random initialisation"
        )


def _load(model: str, revision: str | None) -> tuple[Any, Any, Any]:
    from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

    def with_head(source: str, *, revision: str | None) -> Any:
        return AutoModelForAudioClassification.from_pretrained(
            source, revision=revision, output_loading_info=True
        )

    (feature_extractor, (network, info)), folder = load_pretrained(
        model, revision, [AutoFeatureExtractor.from_pretrained, with_head]
    )
    refuse_missing_weights(model, info, ())
    return feature_extractor, network.eval(), folder


@dataclass
class AudioClassifierConfig:
    _target_: str = "audio_models.speech.classifier.AudioClassifierExtractor"
    name: str = "audio_classifier"
    model: str = MISSING  # hub id or local directory of an audio-classification checkpoint
    revision: str | None = None
    sample_rate: int = 16000
    storage_dtype: str = "float32"


@register_extractor("audio_classifier", config=AudioClassifierConfig)
class AudioClassifierExtractor(SelfSupervisedExtractor):
    """Class probabilities (``p_<label>`` per class of ``id2label``) and the most probable
    label (text column ``prediction``) of each recording.

    Args:
        name: registered extractor name.
        model: hub id or local directory of an audio-classification checkpoint.
        revision: pinned hub commit (ignored for a local directory).
        sample_rate: the model's input rate.
        storage_dtype: ``float32`` or ``float16`` (stored values; computation unaffected).

    Raises:
        UserError: weights missing from the checkpoint, an architecture that does not take
            raw audio or Whisper features, or labels that collide as column names.
    """

    def __init__(
        self,
        *,
        name: str,
        model: str,
        revision: str | None = None,
        sample_rate: int = 16000,
        storage_dtype: str = "float32",
    ) -> None:
        Extractor.__init__(self, name=name, sample_rate=sample_rate, storage_dtype=storage_dtype)
        self.model_id, self.revision = model, revision
        self.pooling = "mean"
        self._loaded = False

    def load(self) -> None:
        if not self._loaded:
            self._read_weights()
            self._loaded = True

    def _read_weights(self, layers: list[int] | str = ()) -> None:
        model, revision, sample_rate = self.model_id, self.revision, self.sample_rate or 16000
        self.feature_extractor, self.network, folder = _load(model, revision)
        config = self.network.config
        if getattr(self.feature_extractor, "sampling_rate", sample_rate) != sample_rate:
            raise UserError(
                f"{model} expects {self.feature_extractor.sampling_rate} Hz; "
                "set extractor.sample_rate"
            )
        self.whisper = config.model_type == "whisper"
        if not self.whisper and getattr(config, "feat_extract_norm", None) is None:
            raise UserError(
                f"{model} is a {config.model_type} classifier; extractor=audio_classifier runs "
                "raw-waveform heads (wav2vec2, HuBERT, WavLM, …) and Whisper encoder heads"
            )
        self.labels = [str(config.id2label[i]) for i in range(config.num_labels)]
        if len(set(self.labels)) != len(self.labels):
            raise UserError(f"{model}: id2label repeats labels {self.labels}")
        self.normalize = bool(getattr(self.feature_extractor, "do_normalize", False))
        # The SSL rule: only layer-norm feature encoders may see padding (under a mask).
        # Whisper rows are padded to the window whatever the batch, so they always share one.
        self.use_mask = self.whisper or config.feat_extract_norm == "layer"
        self.chunk = self.overlap = None  # whole recordings: a head pools over all of it
        self._provenance = {
            "classifier.padding": (
                "whisper window"
                if self.whisper
                else "attention-mask"
                if self.use_mask
                else "equal-length groups"
            ),
            "classifier.labels": ",".join(self.labels),
        }
        self._provenance.update(hub_provenance("classifier", model, revision, self.network, folder))

    @property
    def kind(self) -> OutputKind:  # type: ignore[override]
        return OutputKind.VECTOR

    def _receptive_field(self) -> int:
        return 1 if self.whisper else super()._receptive_field()

    @property
    def frame_shift_s(self) -> None:  # type: ignore[override]
        return None

    @property
    def feature_groups(self) -> None:  # type: ignore[override]
        return None

    @property
    def feature_names(self) -> list[str]:
        self.load()
        return [f"p_{label}" for label in self.labels]

    @property
    def extra_columns(self) -> list[str]:
        return [PREDICTION]

    def _pads(self, device: torch.device) -> bool:
        return self.whisper or super()._pads(device)

    def padded_samples(self, lengths: torch.Tensor, device: torch.device) -> int:
        self.load()
        return 0 if self.whisper else super().padded_samples(lengths, device)

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> list[Output]:  # type: ignore[override]
        probabilities = super().forward(waveforms, lengths)
        return [
            Output(values=p, extra={PREDICTION: self.labels[int(p.argmax())]})  # type: ignore[arg-type]
            for p in probabilities
        ]

    def _forward_padded(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        """Class probabilities of rows that share one forward (see :meth:`forward`'s rule)."""
        import torch

        if self.whisper:
            logits = self._whisper_logits(waveforms, lengths)
        else:
            x = self._normalised(waveforms, lengths)
            mask = None
            if self.use_mask:
                valid = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
                mask = valid.long()
            logits = self.network(x, attention_mask=mask).logits
        return list(torch.softmax(logits.float(), dim=-1))

    def _whisper_logits(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        window = int(self.feature_extractor.n_samples)
        if int(lengths.max()) > window:
            raise UserError(
                f"{self.model_id} classifies at most {window / self.sample_rate:g} s (its input "
                "window); cut longer recordings into segments (dataset start/end)"
            )
        rows = [waveforms[row, :n].float().cpu().numpy() for row, n in enumerate(lengths.tolist())]
        features = self.feature_extractor(
            rows, sampling_rate=self.sample_rate, return_tensors="pt", device=str(waveforms.device)
        ).input_features.to(waveforms.device)
        return self.network(features).logits
