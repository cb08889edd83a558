"""The upstream emotion recogniser's librosa feature vector.

Follows ``utils.extract_feature`` of x4nth055/emotion-recognition-using-speech: the float32
signal at its own rate; each part the mean over frames with librosa's defaults otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from audio_models.extractor import Extractor, OutputKind, Placement
from audio_models.registry import register_extractor
from audio_models.utils.errors import ExtractionError

# (part, number of values) in the upstream order.
_PARTS: tuple[tuple[str, int], ...] = (
    ("mfcc", 40),
    ("chroma", 12),
    ("mel", 128),
    ("contrast", 7),
    ("tonnetz", 6),
)


@dataclass
class LibrosaConfig:
    _target_: str = "audio_models.audio.librosa_features.LibrosaExtractor"
    name: str = "librosa"
    mfcc: bool = True
    chroma: bool = True
    mel: bool = True
    contrast: bool = True
    tonnetz: bool = True
    sample_rate: int | None = None  # None (upstream behaviour): each file's own rate


@register_extractor("librosa", config=LibrosaConfig)
class LibrosaExtractor(Extractor):
    """MFCC(40) + chroma(12) + mel(128) + spectral contrast(7) + tonnetz(6), frame means.

    Args:
        name: registered extractor name.
        mfcc, chroma, mel, contrast, tonnetz: switch each part on or off (order is fixed).
        sample_rate: ``None`` (upstream behaviour) keeps each file's own rate.
    """

    placement = Placement.WORKER
    kind = OutputKind.VECTOR

    def __init__(
        self,
        *,
        name: str,
        mfcc: bool = True,
        chroma: bool = True,
        mel: bool = True,
        contrast: bool = True,
        tonnetz: bool = True,
        sample_rate: int | None = None,
    ) -> None:
        super().__init__(name=name, sample_rate=sample_rate)
        switches = {
            "mfcc": mfcc,
            "chroma": chroma,
            "mel": mel,
            "contrast": contrast,
            "tonnetz": tonnetz,
        }
        self.parts = [part for part, _ in _PARTS if switches[part]]
        if not self.parts:
            raise ValueError("librosa extractor: switch on at least one of " + ", ".join(switches))
        sizes = dict(_PARTS)
        self._names = [f"{part}_{i}" for part in self.parts for i in range(sizes[part])]

    @property
    def min_samples(self) -> int:
        # librosa's centred STFT reflects n_fft // 2 samples at each end.
        return 1025

    @property
    def feature_names(self) -> list[str]:
        return self._names

    def transform(self, signal: np.ndarray, sample_rate: int) -> np.ndarray:
        import librosa

        x = np.asarray(signal, dtype=np.float32)
        if x.shape[0] < self.min_samples:
            raise ExtractionError(
                "preflight", f"clip of {x.shape[0]} samples is shorter than one STFT"
            )
        stft = np.abs(librosa.stft(x)) if {"chroma", "contrast"} & set(self.parts) else None
        values: list[np.ndarray] = []
        for part in self.parts:
            if part == "mfcc":
                frames = librosa.feature.mfcc(y=x, sr=sample_rate, n_mfcc=40)
            elif part == "chroma":
                frames = librosa.feature.chroma_stft(S=stft, sr=sample_rate)
            elif part == "mel":
                frames = librosa.feature.melspectrogram(y=x, sr=sample_rate)
            elif part == "contrast":
                frames = librosa.feature.spectral_contrast(S=stft, sr=sample_rate)
            else:
                frames = librosa.feature.tonnetz(y=librosa.effects.harmonic(x), sr=sample_rate)
            values.append(np.mean(frames.T, axis=0))
        # Upstream stacks onto np.array([]) (float64), so its vector is float64.
        return np.hstack([np.array([]), *values])

    def provenance(self) -> dict[str, str]:
        import librosa

        return {"librosa.version": librosa.__version__, "librosa.parts": ",".join(self.parts)}
