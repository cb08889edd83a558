"""The unit of work: one audio file or one segment of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


class Blob(Protocol):
    """Audio that is not a file of its own: encoded bytes held in a table (a Hugging Face
    dataset's embedded audio) or in memory, read when the loader needs them."""

    def read(self) -> bytes:
        """The encoded audio (a WAV/FLAC/OGG/MP3 file's bytes).

        Raises:
            ExtractionError: stage ``"decode"``, the row has no audio.
        """
        ...


@dataclass(frozen=True)
class Item:
    """One file, or the ``[start, end)`` seconds of it, with the dataset's labels.

    Args:
        id: unique within the dataset; the key of every output row.
        path: absolute path of the audio file.
        start: offset in seconds, ``None`` for the file's beginning.
        end: end in seconds, ``None`` for the file's end.
        labels: label columns copied verbatim into the outputs.
        blob: where the audio is not a file: the loader decodes ``blob.read()`` (the same
            decoder, so the same samples as the file would give) and ``path`` only names the
            audio in the outputs. ``None``: the file at ``path``.
    """

    id: str
    path: str
    start: float | None = None
    end: float | None = None
    labels: dict[str, Any] = field(default_factory=dict)
    blob: Blob | None = field(default=None, compare=False, repr=False)


def _seconds_text(value: float) -> str:
    # ``:g`` keeps the ids earlier versions wrote (and resumes) where it is exact; beyond its
    # six significant digits (segments past 10,000 s, sub-millisecond bounds) ``repr`` is.
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def segment_id(path: str, start: float | None, end: float | None) -> str:
    """The default id of a segment: ``<path>@<start>-<end>`` (seconds; empty end: the file's
    end), exact for every distinct pair of bounds."""
    return f"{path}@{_seconds_text(start or 0.0)}-{'' if end is None else _seconds_text(end)}"
