"""openSMILE feature sets (eGeMAPSv02, ComParE_2016) through the official Python wrapper."""

from __future__ import annotations

from typing import Any

import numpy as np
import opensmile

from audio_models.extractor import Extractor, OutputKind
from audio_models.utils.errors import ExtractionError

# openSMILE's frame step for the low-level descriptors of eGeMAPS and ComParE.
_LLD_FRAME_SHIFT_S = 0.01


class OpenSmileExtractor(Extractor):
    """openSMILE via ``opensmile.Smile``, per item in the loader workers.

    Given the signal at the file's own rate (``sample_rate=None``) the result equals
    ``opensmile.Smile(feature_set, feature_level).process_file(path)``.

    Args:
        name: the extractor's registered name.
        feature_set: an ``opensmile.FeatureSet`` member name, e.g. ``"eGeMAPSv02"``.
        feature_level: ``"Functionals"`` (one vector) or ``"LowLevelDescriptors"`` (frames).
        sample_rate: resample to this rate first; ``None`` keeps each file's own rate.
    """

    uses_transform = True

    def __init__(
        self,
        *,
        name: str,
        feature_set: str = "eGeMAPSv02",
        feature_level: str = "Functionals",
        sample_rate: int | None = None,
    ) -> None:
        super().__init__(name=name, sample_rate=sample_rate)
        try:
            self._feature_set = opensmile.FeatureSet[feature_set]
            self._feature_level = opensmile.FeatureLevel[feature_level]
        except KeyError as exc:
            raise ValueError(f"unknown openSMILE feature set or level: {exc}") from None
        self._smile: opensmile.Smile | None = None
        self._names = list(self.smile.feature_names)

    @property
    def kind(self) -> OutputKind:  # type: ignore[override]
        if self._feature_level == opensmile.FeatureLevel.Functionals:
            return OutputKind.VECTOR
        return OutputKind.FRAMES

    @property
    def smile(self) -> opensmile.Smile:
        """The wrapper, built lazily so that each worker process owns its own."""
        if self._smile is None:
            self._smile = opensmile.Smile(
                feature_set=self._feature_set, feature_level=self._feature_level
            )
        return self._smile

    @property
    def feature_names(self) -> list[str]:
        return self._names

    @property
    def frame_shift_s(self) -> float | None:
        return _LLD_FRAME_SHIFT_S if self.kind == OutputKind.FRAMES else None

    def transform(self, signal: np.ndarray, sample_rate: int) -> np.ndarray:
        # Calling the Smile object returns the raw (channels, features, frames) array: the
        # same numbers as process_signal/process_file without building a pandas frame.
        values = self.smile(signal, sample_rate)[0]
        if values.shape[-1] == 0:
            raise ExtractionError("transform", "openSMILE produced no frames (clip too short)")
        return values[:, 0] if self.kind == OutputKind.VECTOR else values.T

    def provenance(self) -> dict[str, str]:
        return {
            "opensmile.feature_set": self._feature_set.name,
            "opensmile.feature_level": self._feature_level.name,
            "opensmile.version": opensmile.__version__,
        }

    def __getstate__(self) -> dict[str, Any]:
        # The SMILE API handle is not picklable; workers rebuild it on first use.
        state = self.__dict__.copy()
        state["_smile"] = None
        return state
