"""audio-models: speech feature extraction with Hydra, Lightning and MLflow provenance.

>>> import audio_models as am
>>> {"egemaps", "xlsr", "vad"} <= set(am.extractors())
True
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Run", "extract", "extractors", "load", "load_extractor"]

if TYPE_CHECKING:
    from audio_models.api import Run, extract, extractors, load, load_extractor


def __getattr__(name: str) -> Any:
    # The API pulls in pandas and, when it runs, torch and Lightning: import it on first use
    # so that ``import audio_models`` (and every CLI's import of a submodule) stays cheap.
    if name in __all__:
        from audio_models import api

        return getattr(api, name)
    raise AttributeError(f"module 'audio_models' has no attribute {name!r}")
