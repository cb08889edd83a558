"""Extractor registry: a name maps to one class and one structured config, registered once.

Each extractor module holds its class and its config dataclass and registers both with
:func:`register_extractor`. Importing the module must stay cheap (no torch, no model library
at import time: the runner composes and checks the whole configuration before paying for
them), so those imports live in the methods that use them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore

#: The modules whose import registers the built-in extractors.
EXTRACTOR_MODULES = (
    "audio_models.audio.smile",
    "audio_models.audio.librosa_features",
    "audio_models.audio.kaldi",
    "audio_models.audio.crepe",
    "audio_models.speech.ser",
    "audio_models.speech.ssl",
    "audio_models.speech.ecapa",
    "audio_models.speech.whisper_encoder",
    "audio_models.speech.ser_dim",
    "audio_models.speech.classifier",
    "audio_models.speech.s2t",
    "audio_models.speech.whisper",
    "audio_models.speech.vad",
    "audio_models.speech.emotion2vec",
)


@dataclass(frozen=True)
class Registered:
    """What one extractor name stands for."""

    name: str
    cls: type[Any]
    config: type[Any]


_EXTRACTORS: dict[str, Registered] = {}
_T = TypeVar("_T", bound=type)


def target_of(cls: type[Any]) -> str:
    """The dotted path Hydra's ``_target_`` names ``cls`` by."""
    return f"{cls.__module__}.{cls.__qualname__}"


def register_extractor(*names: str, config: type[Any]) -> Callable[[_T], _T]:
    """Class decorator: register the class and ``config`` under each of ``names``.

    The config dataclass lands in Hydra's ConfigStore as ``schema/extractor/<name>``, which
    ``conf/extractor/<name>.yaml`` extends; a misspelt key then fails against the dataclass.
    Its ``_target_`` default must name the decorated class (Hydra builds from it, and
    ``runners.reproduce`` allows exactly the registered targets).

    Raises:
        ValueError: when a name is already registered (an overwrite would silently change
            which code produces a run's numbers), or the config's ``_target_`` names another
            class.
    """
    if not names:
        raise ValueError("register_extractor needs at least one name")

    def register(cls: _T) -> _T:
        target = {f.name: f.default for f in fields(config)}.get("_target_", MISSING)
        if target != target_of(cls):
            raise ValueError(
                f"{config.__qualname__}._target_ is {target!r}, not {target_of(cls)!r}"
            )
        for name in names:
            if name in _EXTRACTORS:
                raise ValueError(
                    f"extractor {name!r} is already registered by "
                    f"{_EXTRACTORS[name].cls.__qualname__}"
                )
        for name in names:
            _EXTRACTORS[name] = Registered(name, cls, config)
            ConfigStore.instance().store(group="schema/extractor", name=name, node=config)
        return cls

    return register


def load_builtin_extractors() -> None:
    """Import the modules of :data:`EXTRACTOR_MODULES` (each registers itself once)."""
    for module in EXTRACTOR_MODULES:
        importlib.import_module(module)


def registered_extractors() -> dict[str, Registered]:
    """A copy of the name → :class:`Registered` table, built-ins loaded."""
    load_builtin_extractors()
    return dict(_EXTRACTORS)
