"""Sliding windows: each item cut into ``[start, end)`` windows, one output row per window.

The windows are ordinary segment items (same path, labels copied, absolute times), so the loader
decodes each one exactly as it would a manifest segment and every row equals running the
extractor on that cut of the signal.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from audio_models.data.items import Item, segment_id
from audio_models.utils.errors import UserError

log = logging.getLogger(__name__)

LAST_WINDOW = ("partial", "drop")


def probe_duration(item: Item) -> float | None:
    """Seconds of audio ``item`` covers, from its bounds or its file's header; None when the
    header cannot be read (the loader then records the item's failure)."""
    if item.end is not None:
        return max(item.end - (item.start or 0.0), 0.0)
    import soundfile as sf  # only the windowing step needs it before the loader runs

    try:
        info = sf.info(item.path)
    except (RuntimeError, OSError, TypeError):
        return None
    return max(info.frames / info.samplerate - (item.start or 0.0), 0.0)


def window_items(
    items: list[Item],
    size_s: float,
    hop_s: float | None = None,
    last: str = "partial",
    duration_of: Callable[[Item], float | None] = probe_duration,
) -> list[Item]:
    """Cut every item into windows of ``size_s`` seconds every ``hop_s`` (default ``size_s``).

    Args:
        items: the dataset's items (files or segments).
        size_s: window length in seconds.
        hop_s: step between window starts (``< size_s``: overlapping windows).
        last: ``partial`` keeps a shorter last window over the remainder (and one short window
            for an item shorter than ``size_s``); ``drop`` keeps only full windows.
        duration_of: seconds of audio of an item (None: unknown).

    Returns:
        Window items with ids ``<item id>@<start>-<end>`` (absolute seconds in the file).
        An item whose length cannot be read (or is zero) is kept whole, so the loader records
        its failure.

    Raises:
        UserError: a non-positive size or hop, or an unknown ``last``.
    """
    hop = size_s if hop_s is None else hop_s
    if not (size_s > 0 and hop > 0 and math.isfinite(size_s) and math.isfinite(hop)):
        raise UserError(f"windows.size_s and windows.hop_s must be > 0, got {size_s}, {hop_s}")
    if last not in LAST_WINDOW:
        raise UserError(f"windows.last must be one of {LAST_WINDOW}, got {last!r}")
    out: list[Item] = []
    unknown: list[str] = []
    short: list[str] = []
    for item in items:
        duration = duration_of(item)
        if duration is None or duration <= 0:
            # Unreadable or empty: kept whole, so the loader records why (never dropped).
            unknown.append(item.id)
            out.append(item)
            continue
        base = item.start or 0.0
        before, k = len(out), 0
        while True:
            offset = k * hop
            # Past the end (a microsecond of slack for float sums), or the previous window
            # already reached it (overlapping windows).
            if duration - offset < 1e-6 or (k > 0 and offset - hop + size_s >= duration):
                break
            length = min(size_s, duration - offset)
            if length < size_s - 1e-6 and last == "drop":
                break
            # Rounded to the microsecond: ids stay short and equal across runs.
            start, end = round(base + offset, 6), round(base + offset + length, 6)
            out.append(Item(segment_id(item.id, start, end), item.path, start, end, item.labels))
            k += 1
        if len(out) == before:
            short.append(item.id)
    if short:
        log.warning(
            "%d item(s) shorter than windows.size_s=%g have no window (windows.last=drop): %s",
            len(short),
            size_s,
            ", ".join(short[:5]) + (" ..." if len(short) > 5 else ""),
        )
    if unknown:
        log.warning(
            "%d item(s) kept whole, their length unreadable or zero before decoding: %s",
            len(unknown),
            ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else ""),
        )
    return out
