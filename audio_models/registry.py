"""Extractor registry: one name, one structured config, registered once."""

from __future__ import annotations

from typing import Any

from hydra.core.config_store import ConfigStore

_EXTRACTORS: dict[str, type[Any]] = {}


def register_extractor(name: str, config_cls: type[Any]) -> None:
    """Register ``config_cls`` as the schema of extractor ``name``.

    The schema lands in Hydra's ConfigStore as ``schema/extractor/<name>``, which
    ``conf/extractor/<name>.yaml`` extends; a misspelt key then fails against the dataclass.

    Raises:
        ValueError: when ``name`` is already registered (an overwrite would silently change
            which code produces a run's numbers).
    """
    if name in _EXTRACTORS:
        raise ValueError(
            f"extractor {name!r} is already registered by {_EXTRACTORS[name].__qualname__}"
        )
    _EXTRACTORS[name] = config_cls
    ConfigStore.instance().store(group="schema/extractor", name=name, node=config_cls)


def registered_extractors() -> dict[str, type[Any]]:
    """A copy of the name → config-schema table."""
    return dict(_EXTRACTORS)
