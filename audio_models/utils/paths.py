"""Where the project's files live, in a checkout and in an installed wheel.

A checkout keeps the Hydra configs in ``conf/`` and the upstream pins in ``requirements.csv``
at its top level (the layout the project was specified with); the wheel carries copies of both
inside the package (``audio_models/_conf``, ``audio_models/_data``), so an installed
``audio_models`` works from any directory without the checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
#: The checkout's top level when running from one (else the directory holding the package).
PROJECT_ROOT = PACKAGE_DIR.parent


def in_checkout() -> bool:
    """Whether the package runs from a source checkout (not an installed wheel)."""
    return (PROJECT_ROOT / "pyproject.toml").is_file() and (PROJECT_ROOT / "conf").is_dir()


def conf_dir() -> Path:
    """The Hydra config directory: the wheel's packaged copy, else the checkout's ``conf/``."""
    packaged = PACKAGE_DIR / "_conf"
    return packaged if (packaged / "extract.yaml").is_file() else PROJECT_ROOT / "conf"


def default_cache_dir() -> Path:
    """Where generated data lives: ``$AUDIO_MODELS_CACHE`` or ``~/.cache/audio_models``."""
    return Path(os.environ.get("AUDIO_MODELS_CACHE", Path.home() / ".cache" / "audio_models"))


def default_requirements_path() -> Path:
    """``requirements.csv``: the checkout's, else the copy the wheel carries."""
    packaged = PACKAGE_DIR / "_data" / "requirements.csv"
    return packaged if packaged.is_file() else PROJECT_ROOT / "requirements.csv"


def default_external_dir() -> Path:
    """Where upstream checkouts are made: ``<checkout>/external/audio``, or (installed from a
    wheel, where there is no checkout to write into) ``<cache>/external``."""
    if in_checkout():
        return PROJECT_ROOT / "external" / "audio"
    return default_cache_dir() / "external"
