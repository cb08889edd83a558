"""Speech emotion recognition with the upstream project's own (or a retrained) classifier.

The model is the x4nth055/emotion-recognition-using-speech ``grid/best_classifiers.pickle``
from the ``emotion_recognition`` checkout, or a file given by ``model_path`` (a legacy pickle
of that format, or a ``.skops`` file written by ``runners.train_ser``). It is verified before it
is loaded: a file from a checkout must have the blob git recorded at the pinned commit; any
other file must match ``sha256``. Features are the upstream librosa vector of 16 kHz mono audio.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from audio_models.audio.librosa_features import LibrosaExtractor
from audio_models.extractor import Extractor, Output, OutputKind, Placement
from audio_models.registry import register_extractor
from audio_models.utils.errors import UserError
from audio_models.utils.repos import blob_at, resolve

UPSTREAM_KEY = "emotion_recognition"
UPSTREAM_MODEL = "grid/best_classifiers.pickle"
# Classes a skops model file may contain without further review.
_SKOPS_TRUSTED_PREFIXES = ("sklearn.", "numpy.", "scipy.")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def git_blob_sha1(data: bytes) -> str:
    """The object id git gives a file with this content (``git hash-object``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def read_verified(
    path: Path, *, sha256: str | None, trust_unverified: bool, pinned_blob: str | None = None
) -> tuple[bytes, str]:
    """Read ``path`` once and verify those bytes; returns them and how they were verified.

    Raises:
        UserError: a missing file, or an unverified file without ``trust_unverified``.
    """
    if not path.is_file():
        raise UserError(f"emotion classifier {path} does not exist")
    data = path.read_bytes()
    actual = sha256_bytes(data)
    if pinned_blob is not None and git_blob_sha1(data) == pinned_blob:
        return data, "git-blob-at-pin"
    if sha256 is not None and actual == sha256.lower():
        return data, "sha256"
    if trust_unverified:
        return data, "unverified"
    expected = sha256 or "none given (set extractor.sha256)"
    raise UserError(
        f"refusing to unpickle {path}: sha256 {actual} does not match the expected {expected}; "
        "set extractor.sha256 to the file's known hash, or extractor.trust_unverified=true"
    )


def _load_skops(data: bytes, path: Path) -> Any:
    import skops.io as sio

    untrusted = sio.get_untrusted_types(data=data)
    foreign = [t for t in untrusted if not t.startswith(_SKOPS_TRUSTED_PREFIXES)]
    if foreign:
        raise UserError(f"{path} contains types outside scikit-learn/numpy/scipy: {foreign}")
    return sio.loads(data, trusted=untrusted)


def load_classifier(
    model_path: str | None,
    *,
    sha256: str | None = None,
    trust_unverified: bool = False,
    estimator: str | None = None,
) -> tuple[Any, dict[str, str]]:
    """Load and verify the classifier; returns it and provenance entries.

    Args:
        model_path: a legacy upstream pickle or a ``.skops`` file; ``None`` takes the upstream
            checkout's ``grid/best_classifiers.pickle``.
        sha256: expected SHA-256 of ``model_path`` (or of an edited checkout's file).
        trust_unverified: load a file that cannot be verified.
        estimator: class name to pick from a legacy list; ``None`` takes the best CV score.
    """
    pinned_blob = None
    provenance: dict[str, str] = {}
    if model_path is None:
        state = resolve(UPSTREAM_KEY)
        path = state.path / UPSTREAM_MODEL
        pinned_blob = blob_at(state.path, state.pinned, UPSTREAM_MODEL)
        provenance["ser.upstream_commit"] = state.commit or "unknown"
    else:
        path = Path(model_path).expanduser()
    data, how = read_verified(
        path, sha256=sha256, trust_unverified=trust_unverified, pinned_blob=pinned_blob
    )
    provenance.update(
        {
            "ser.model_path": str(path),
            "ser.model_sha256": sha256_bytes(data),
            "ser.verified_by": how,
        }
    )
    if path.suffix == ".skops":
        model = _load_skops(data, path)
        provenance["ser.estimator"] = type(model).__name__
        return model, provenance
    from audio_models.speech.ser_legacy import load_legacy_classifiers

    entries = load_legacy_classifiers(data)
    if estimator is not None:
        chosen = [e for e in entries if type(e.estimator).__name__ == estimator]
        if not chosen:
            names = [type(e.estimator).__name__ for e in entries]
            raise UserError(f"no {estimator} in {path}; it has {names}")
        entry = chosen[0]
    else:
        entry = max(entries, key=lambda e: e.cv_score)  # the first best, as upstream picks
    provenance.update(
        {
            "ser.estimator": type(entry.estimator).__name__,
            "ser.cv_score": f"{entry.cv_score:.6g}",
            "ser.params": repr(entry.params)[:500],
        }
    )
    return entry.estimator, provenance


@dataclass
class SerConfig:
    _target_: str = "audio_models.speech.ser.EmotionClassifierExtractor"
    name: str = "ser"
    model_path: str | None = None
    sha256: str | None = None
    trust_unverified: bool = False
    estimator: str | None = None
    features: list[str] = field(default_factory=lambda: ["mfcc", "chroma", "mel"])
    emotions: list[str] | None = None
    output_column: str = "emotion"
    keep_features: bool = False
    sample_rate: int = 16000


@register_extractor("ser", config=SerConfig)
class EmotionClassifierExtractor(Extractor):
    """Predicted emotion and per-class probabilities from a verified upstream-format classifier.

    Args:
        name: registered extractor name.
        model_path: see :func:`load_classifier` (``None``: the upstream checkout's file).
        sha256: expected SHA-256 of the model file.
        trust_unverified: accept an unverifiable file.
        estimator: pick this class from the upstream list (default: best CV score).
        features: librosa parts the classifier was trained on, in upstream order.
        emotions: expected classes (default: whatever the classifier has).
        output_column: name of the predicted-label column.
        keep_features: also write the feature vector.
        sample_rate: upstream converts its data to 16 kHz mono before extracting features.
    """

    placement = Placement.WORKER
    kind = OutputKind.VECTOR

    def __init__(
        self,
        *,
        name: str,
        model_path: str | None = None,
        sha256: str | None = None,
        trust_unverified: bool = False,
        estimator: str | None = None,
        features: list[str] | None = None,
        emotions: list[str] | None = None,
        output_column: str = "emotion",
        keep_features: bool = False,
        sample_rate: int = 16000,
    ) -> None:
        super().__init__(name=name, sample_rate=sample_rate)
        # Only the default model is read from the upstream checkout.
        self.upstreams = (UPSTREAM_KEY,) if model_path is None else ()
        parts = list(features or ["mfcc", "chroma", "mel"])
        unknown = set(parts) - {"mfcc", "chroma", "mel", "contrast", "tonnetz"}
        if unknown:
            raise UserError(f"extractor.features has unknown parts {sorted(unknown)}")
        self.features = LibrosaExtractor(
            name=f"{name}-features",
            sample_rate=sample_rate,
            **{p: p in parts for p in ("mfcc", "chroma", "mel", "contrast", "tonnetz")},
        )
        self.model_path, self.sha256, self.estimator = model_path, sha256, estimator
        self.trust_unverified = trust_unverified
        self.parts, self.emotions = parts, emotions
        self.output_column = output_column
        self.keep_features = keep_features
        self.model: Any = None

    def load(self) -> None:
        if self.model is not None:
            return
        model, self._provenance = load_classifier(
            self.model_path,
            sha256=self.sha256,
            trust_unverified=self.trust_unverified,
            estimator=self.estimator,
        )
        self._check(model)
        self.model = model

    def _check(self, model: Any) -> None:
        parts, emotions = self.parts, self.emotions
        if not hasattr(model, "predict_proba"):
            raise UserError(f"{type(model).__name__} gives no probabilities (predict_proba)")
        width = len(self.features.feature_names)
        expected = getattr(model, "n_features_in_", width)
        if expected != width:
            raise UserError(
                f"the classifier expects {expected} features but extractor.features={parts} gives "
                f"{width}; set extractor.features to the parts it was trained on"
            )
        self.classes = [str(c) for c in model.classes_]
        if emotions is not None and sorted(emotions) != sorted(self.classes):
            raise UserError(
                f"extractor.emotions={sorted(emotions)} but the classifier predicts "
                f"{sorted(self.classes)}"
            )

    @property
    def min_samples(self) -> int:
        return self.features.min_samples

    @property
    def feature_names(self) -> list[str]:
        self.load()
        names = [f"p_{c}" for c in self.classes]
        return names + self.features.feature_names if self.keep_features else names

    @property
    def extra_columns(self) -> list[str]:
        return [self.output_column]

    def transform(self, signal: np.ndarray, sample_rate: int) -> Output:
        self.load()
        vector = np.asarray(self.features.transform(signal, sample_rate))
        row = vector.reshape(1, -1)
        probabilities = self.model.predict_proba(row)[0]
        # The classifier's own decision, as upstream's EmotionRecognizer.predict reports it
        # (for SVC it can differ from the most probable class).
        label = str(self.model.predict(row)[0])
        values = np.concatenate([probabilities, vector]) if self.keep_features else probabilities
        return Output(values=values, extra={self.output_column: label})

    def provenance(self) -> dict[str, str]:
        self.load()
        return {**self._provenance, **self.features.provenance()}
