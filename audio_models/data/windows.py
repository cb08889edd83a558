"""Sliding windows, or detected speech segments: each item cut into ``[start, end)`` parts, one
output row per part.

The windows are ordinary segment items (same path, labels copied, absolute times), so the loader
decodes each one exactly as it would a manifest segment and every row equals running the
extractor on that cut of the signal.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

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
        if item.blob is not None:  # audio embedded in a table: its bytes' header
            import io

            info = sf.info(io.BytesIO(item.blob.read()))
        else:
            info = sf.info(item.path)
    except Exception:  # unreadable (a bad blob raises what its table raises)
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
            if duration - offset < 1e-6 or (k > 0 and (k - 1) * hop + size_s >= duration - 1e-6):
                break
            length = min(size_s, duration - offset)
            if length < size_s - 1e-6 and last == "drop":
                break
            # Rounded to the microsecond: ids stay short and equal across runs.
            start, end = round(base + offset, 6), round(base + offset + length, 6)
            out.append(replace(item, id=segment_id(item.id, start, end), start=start, end=end))
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


def segments_table(source: str) -> Path:
    """The segments table ``segments_from`` names (a VAD run's folder or a table file).

    Raises:
        UserError: there is none.
    """
    path = Path(source).expanduser()
    table = path / "segments.parquet" if path.is_dir() else path
    if not table.is_file():
        raise UserError(
            f"segments_from={source!r}: no segments table there (the output_dir of an "
            "extractor=vad run, or a .parquet/.csv/.tsv with id, start, end)"
        )
    return table


def segment_items(items: list[Item], source: str) -> list[Item]:
    """One item per detected speech segment: ``source`` is the ``output_dir`` of a ``vad`` run
    over the same dataset (its ``segments.parquet``), or a table of its own (Parquet, CSV or
    TSV with ``id``, ``start``, ``end``: seconds from the file's start, as the VAD writes them).

    Segments are matched to items by item id; an item without segments gives no row (it had no
    speech) and is named in a warning; segments of ids the dataset does not have are an error
    (another corpus's run).

    Raises:
        UserError: no such run or table, missing columns, or ids the dataset does not know.
    """
    import pandas as pd

    table_path = segments_table(source)
    suffix = table_path.suffix.lower()
    if suffix == ".parquet":
        table = pd.read_parquet(table_path)
    else:
        table = pd.read_csv(table_path, sep="\t" if suffix == ".tsv" else ",", dtype={"id": str})
    missing = {"id", "start", "end"} - set(table.columns)
    if missing:
        raise UserError(f"segments_from: {table_path} lacks columns {sorted(missing)}")
    by_id = {item.id: item for item in items}
    unknown = sorted(set(table["id"]) - set(by_id))
    if unknown:
        raise UserError(
            f"segments_from: {table_path} has segments of {len(unknown)} id(s) this dataset does "
            f"not have, e.g. {unknown[:3]} (a run over another corpus?)"
        )
    out: list[Item] = []
    grouped = table.sort_values(["id", "start"]).groupby("id", sort=False)
    for item_id, rows in grouped:
        item = by_id[str(item_id)]
        for start, end in zip(rows["start"], rows["end"], strict=True):
            start, end = round(float(start), 6), round(float(end), 6)
            if not end > start:
                raise UserError(f"segments_from: {table_path}: {item_id!r} [{start}, {end})")
            out.append(replace(item, id=segment_id(item.id, start, end), start=start, end=end))
    present = set(table["id"])
    silent = [i.id for i in items if i.id not in present]
    if silent:
        log.warning(
            "%d item(s) have no speech segment and give no row: %s",
            len(silent),
            ", ".join(silent[:5]) + (" ..." if len(silent) > 5 else ""),
        )
    order = {item.id: n for n, item in enumerate(items)}  # the dataset's order
    return sorted(out, key=lambda w: (order[w.id.rsplit("@", 1)[0]], w.start or 0.0))
