"""audio-models: speech feature extraction with Hydra, Lightning and MLflow provenance."""

from __future__ import annotations

__version__ = "0.1.0"
