"""SpeechBrain ECAPA-TDNN speaker embeddings (``speechbrain/spkrec-ecapa-voxceleb`` by default).

The model is built by SpeechBrain's own ``EncoderClassifier.from_hparams`` and run through the
same steps as its ``encode_batch`` (Fbank → sentence mean normalisation → ECAPA-TDNN), batched
on the device. ECAPA's convolutions pad by reflection at each row's end, so zero padding in a
batch would change the embeddings near it: rows run in groups of equal length, as the
group-norm wav2vec2 models do, and a batch equals one file at a time.

A hyperparams file is code (HyperPyYAML builds whatever objects it names), so before SpeechBrain
reads it the tags it uses are checked against an allow list of SpeechBrain model, feature and
loading classes; anything else (``!apply:os.system``…) is refused.
"""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from pathlib import Path

import torch

from audio_models.data.datasets import default_cache_dir
from audio_models.extractor import Extractor, OutputKind
from audio_models.speech.hub import hub_offline
from audio_models.utils.errors import UserError, model_unavailable
from audio_models.utils.provenance import sha256_file

# What a speaker-embedding hyperparams file may build or call.
_ALLOWED = re.compile(
    r"^(speechbrain\.(lobes|processing|nnet|dataio\.encoder|utils\.parameter_transfer)\.|"
    r"torch\.nn\.|torch\.manual_seed$)"
)


def check_hyperparams(text: str, where: str) -> None:
    """Refuse a hyperparams file that would build or call anything outside the allow list."""
    refused = []
    for line in text.splitlines():
        code = line.split("#", 1)[0]
        for kind, target in re.findall(r"!(new|name|apply|module):([\w.]+)", code):
            if not _ALLOWED.match(target):
                refused.append(f"!{kind}:{target}")
        if re.search(r"!include:", code):
            refused.append("!include")
    if refused:
        raise UserError(
            f"{where}: refusing a hyperparams file that builds or calls {sorted(set(refused))}; "
            "only SpeechBrain model, feature and loading classes are allowed"
        )


def _hyperparams(model: str, revision: str | None) -> tuple[Path, bool]:
    """Path of the model's hyperparams.yaml (fetched from the hub cache for an id) and whether
    the model is a local directory."""
    local = Path(model).expanduser()
    if local.is_dir():
        path = local / "hyperparams.yaml"
        if not path.is_file():
            raise UserError(f"{local} has no hyperparams.yaml (a SpeechBrain model directory)")
        return path, True
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(model, "hyperparams.yaml", revision=revision)), False
    except Exception as exc:
        raise model_unavailable(model, revision, exc) from None


class EcapaExtractor(Extractor):
    """One speaker embedding per item from a SpeechBrain ``EncoderClassifier``.

    Args:
        name: registered extractor name.
        model: hub id or local directory holding ``hyperparams.yaml`` and the checkpoints.
        revision: pinned hub commit (ignored for a local directory).
        normalize: apply the model's embedding normalisation (``mean_var_norm_emb``), as
            ``encode_batch(normalize=True)`` does.
        sample_rate: the model's input rate.
    """

    uses_forward = True
    kind = OutputKind.VECTOR

    def __init__(
        self,
        *,
        name: str,
        model: str = "speechbrain/spkrec-ecapa-voxceleb",
        revision: str | None = None,
        normalize: bool = False,
        sample_rate: int = 16000,
        max_chunk_s: float | None = 60.0,
        storage_dtype: str = "float32",
    ) -> None:
        super().__init__(name=name, sample_rate=sample_rate, storage_dtype=storage_dtype)
        if max_chunk_s is not None and max_chunk_s * sample_rate < self.min_samples:
            raise UserError(f"extractor.max_chunk_s={max_chunk_s} is shorter than one frame")
        # ECAPA's activations grow with the input (about 1 GB per minute of audio at full
        # size): longer recordings are embedded in near-equal chunks, averaged by length.
        self.max_chunk = None if max_chunk_s is None else int(max_chunk_s * sample_rate)
        from speechbrain.inference.speaker import EncoderClassifier
        from speechbrain.utils.fetching import FetchConfig

        hyperparams, is_local = _hyperparams(model, revision)
        text = hyperparams.read_text(encoding="utf-8")
        check_hyperparams(text, str(hyperparams))
        source = str(Path(model).expanduser()) if is_local else model
        # The published files name their own hub id as ``pretrained_path``: a local copy must
        # point it at itself, or SpeechBrain would go to the network for the weights.
        overrides = (
            {"pretrained_path": source} if re.search(r"^pretrained_path:", text, re.M) else {}
        )
        savedir = (
            default_cache_dir() / "speechbrain" / re.sub(r"[^\w.-]+", "_", f"{source}@{revision}")
        )
        try:
            classifier = EncoderClassifier.from_hparams(
                source=source,
                savedir=str(savedir),
                overrides=overrides,
                run_opts={"device": "cpu"},
                fetch_config=FetchConfig(revision=revision, allow_network=not hub_offline()),
            )
        except UserError:
            raise
        except Exception as exc:
            raise UserError(
                f"cannot load SpeechBrain model {model!r}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}. Without network access, "
                f"download it first (huggingface-cli download {model}) or pass a local directory"
            ) from None
        self.classifier = classifier
        self.mods = classifier.mods.eval()
        self.normalize = normalize
        self.norm_emb = classifier.hparams.mean_var_norm_emb if normalize else None
        self.dim = int(self.mods.embedding_model.fc.conv.out_channels)  # lin_neurons
        weights = savedir / "embedding_model.ckpt"
        self._provenance = {
            "ecapa.model": model,
            "ecapa.revision": "local" if is_local else str(revision),
            "ecapa.hyperparams_sha256": sha256_file(hyperparams),
            "ecapa.weights_sha256": sha256_file(weights.resolve())
            if weights.exists()
            else "unknown",
            "ecapa.padding": "equal-length groups",
        }

    @property
    def min_samples(self) -> int:
        # The reflection padding of the widest dilated convolution needs a few frames.
        return (self.sample_rate or 16000) // 10

    @property
    def feature_groups(self) -> list[tuple[str, int]]:
        return [("embedding", self.dim)]

    @property
    def feature_names(self) -> list[str]:
        return [f"embedding_{j}" for j in range(self.dim)]

    def torch_module(self) -> torch.nn.Module:
        modules = torch.nn.ModuleDict(dict(self.mods.items()))
        if self.norm_emb is not None:
            modules["mean_var_norm_emb"] = self.norm_emb
        return modules

    def padded_samples(self, lengths: torch.Tensor, device: torch.device) -> int:
        return 0  # rows run in groups of equal length

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        groups: dict[int, list[int]] = defaultdict(list)
        outputs: list[torch.Tensor | None] = [None] * len(lengths)
        for row, n in enumerate(lengths.tolist()):
            if self.max_chunk is not None and n > self.max_chunk:
                outputs[row] = self._encode_long(waveforms[row, :n])
            else:
                groups[n].append(row)
        for n, rows in groups.items():
            index = torch.tensor(rows, device=waveforms.device)
            for row, embedding in zip(rows, self._encode(waveforms[index, :n]), strict=True):
                outputs[row] = embedding
        return outputs  # type: ignore[return-value]

    def _encode_long(self, signal: torch.Tensor) -> torch.Tensor:
        """Length-weighted mean of the embeddings of near-equal chunks, one at a time."""
        assert self.max_chunk is not None
        n = signal.shape[0]
        count = -(-n // self.max_chunk)
        bounds = [round(k * n / count) for k in range(count + 1)]
        total = torch.zeros(self.dim, dtype=torch.float64, device=signal.device)
        for a, b in itertools.pairwise(bounds):
            total += self._encode(signal[None, a:b])[0].double() * (b - a)
        return (total / n).float()

    def _encode(self, wavs: torch.Tensor) -> torch.Tensor:
        """``EncoderClassifier.encode_batch`` on equal-length rows (relative lengths all 1)."""
        full = torch.ones(wavs.shape[0], device=wavs.device)
        feats = self.mods.compute_features(wavs.float())
        feats = self.mods.mean_var_norm(feats, full)
        embeddings = self.mods.embedding_model(feats, full)
        if self.norm_emb is not None:
            # Its statistics are plain attributes that Module.to() does not move.
            self.norm_emb.to(wavs.device)
            embeddings = self.norm_emb(embeddings, full)
        return embeddings[:, 0].float()

    def provenance(self) -> dict[str, str]:
        return dict(self._provenance)
