"""The unit of work: one audio file or one segment of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Item:
    """One file, or the ``[start, end)`` seconds of it, with the dataset's labels.

    Args:
        id: unique within the dataset; the key of every output row.
        path: absolute path of the audio file.
        start: offset in seconds, ``None`` for the file's beginning.
        end: end in seconds, ``None`` for the file's end.
        labels: label columns copied verbatim into the outputs.
    """

    id: str
    path: str
    start: float | None = None
    end: float | None = None
    labels: dict[str, Any] = field(default_factory=dict)
