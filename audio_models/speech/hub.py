"""Loading transformers models by hub id or local directory, through one code path.

A hub id (with an optional pinned revision) and a local directory go through the same
``from_pretrained`` calls; a model that cannot be had (offline, not cached, no such
repository) is one clear error that says how to supply it. ``HF_HUB_OFFLINE=1`` is honoured by
huggingface-hub itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from audio_models.utils.errors import model_unavailable
from audio_models.utils.provenance import sha256_file

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids downloads, read now (huggingface-hub reads it once at
    import) with huggingface-hub's own truthy values; for loaders that do not ask the hub
    library (faster-whisper's ``local_files_only``, torchaudio bundles, SpeechBrain)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in {"1", "true", "yes", "on"}


def load_pretrained(
    model: str, revision: str | None, loaders: Sequence[Callable[..., Any]]
) -> tuple[list[Any], Path]:
    """Call each ``loader(source, revision=revision)`` (``from_pretrained`` methods) and find
    the folder the files came from.

    Raises:
        UserError: the model is not available (names it and how to supply it).
    """
    from transformers.utils import cached_file

    local = Path(model).expanduser()
    source = str(local) if local.is_dir() else model
    try:
        loaded = [load(source, revision=revision) for load in loaders]
        folder = (
            local
            if local.is_dir()
            else Path(cached_file(source, "config.json", revision=revision)).parent
        )
    except (OSError, ValueError) as exc:
        raise model_unavailable(model, revision, exc) from None
    return loaded, folder


def weights_sha256(folder: Path) -> str:
    """SHA-256 of the weights file the model was loaded from ('unknown' if none is found)."""
    for name in _WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            return sha256_file(path)
    return "unknown"


def hub_provenance(
    prefix: str, model: str, revision: str | None, network: Any, folder: Path
) -> dict[str, str]:
    """Model id, requested revision, resolved commit and weights hash, as provenance tags."""
    local = Path(model).expanduser().is_dir()
    return {
        f"{prefix}.model": model,
        f"{prefix}.revision": "local" if local else str(revision),
        f"{prefix}.resolved_commit": str(getattr(network.config, "_commit_hash", None) or "local"),
        f"{prefix}.weights_sha256": weights_sha256(folder),
    }
