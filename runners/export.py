"""``python -m runners.export``: a transcription run's transcripts as subtitle or text files.

Examples:
    python -m runners.export output_dir=outputs/2026-12-03/10-32-15              # SRT
    python -m runners.export output_dir=outputs/2026-12-03/10-32-15 format=vtt dest=subs/

One file per item, from the run's ``segments.parquet`` and ``words.parquet``, in the layout
whisperX's own writers produce (``srt``, ``vtt``, ``txt``, ``tsv``, ``json``): a speaker, where
diarization assigned one, prefixes the segment's text as ``[SPEAKER_00]: ...``. Files are named
after the item id, percent-encoded where it holds a ``/`` (``a%2Fb.wav.srt``; a name past 200
bytes is cut and ends in a hash of the id), so every item has a file of its own; they go to
``dest`` (default ``<output_dir>/exports/<format>``).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from audio_models.utils.errors import UserError


@dataclass
class ExportConfig:
    output_dir: str = MISSING  # a finished transcription run (s2t, whisperx)
    format: str = "srt"  # srt | vtt | txt | tsv | json
    dest: str | None = None  # default: <output_dir>/exports/<format>


def _timestamp(seconds: float, *, hours: bool, marker: str) -> str:
    """``[HH:]MM:SS<marker>mmm`` from whole milliseconds (as whisperX rounds them)."""
    ms = round(max(seconds, 0.0) * 1000.0)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1_000)
    lead = f"{h:02d}:" if hours or h > 0 else ""
    return f"{lead}{m:02d}:{s:02d}{marker}{ms:03d}"


# Scripts written without spaces between words (whisperX joins their words with nothing).
_NO_SPACES = {"ja", "zh"}


def _cues(result: dict[str, Any], *, hours: bool, marker: str) -> Iterator[tuple[str, str, str]]:
    """One cue per segment. An aligned result's cue is made of its words, as whisperX's
    writers do: timed from the first word's start to the last word's end (the segment's own
    times when none of its words could be aligned), words joined by a space (by nothing for
    Japanese and Chinese); a segment without words gives no cue. An unaligned result's cue is
    the segment's text and times."""

    def stamp(seconds: float) -> str:
        return _timestamp(seconds, hours=hours, marker=marker)

    segments = result["segments"]
    if segments and "words" in segments[0]:
        joiner = "" if result.get("language") in _NO_SPACES else " "
        for segment in segments:
            words = segment["words"]
            if not words:
                continue
            starts = [w["start"] for w in words if "start" in w]
            ends = [w["end"] for w in words if "end" in w]
            timed = bool(starts and ends)
            start = min(starts) if timed else segment["start"]
            end = max(ends) if timed else segment["end"]
            text = joiner.join([words[0]["word"].strip(), *(w["word"] for w in words[1:])])
            prefix = f"[{segment['speaker']}]: " if segment.get("speaker") is not None else ""
            yield stamp(start), stamp(end), prefix + text
        return
    for segment in segments:
        text = segment["text"].strip().replace("-->", "->")
        if "speaker" in segment:
            text = f"[{segment['speaker']}]: {text}"
        yield stamp(segment["start"]), stamp(segment["end"]), text


def _srt(result: dict[str, Any]) -> str:
    cues = _cues(result, hours=True, marker=",")
    return "".join(f"{i}\n{a} --> {b}\n{t}\n\n" for i, (a, b, t) in enumerate(cues, start=1))


def _vtt(result: dict[str, Any]) -> str:
    cues = _cues(result, hours=False, marker=".")
    return "WEBVTT\n\n" + "".join(f"{a} --> {b}\n{t}\n\n" for a, b, t in cues)


def _txt(result: dict[str, Any]) -> str:
    lines = []
    for segment in result["segments"]:
        text = segment["text"].strip()
        lines.append(f"[{segment['speaker']}]: {text}" if "speaker" in segment else text)
    return "".join(line + "\n" for line in lines)


def _tsv(result: dict[str, Any]) -> str:
    rows = ["start\tend\ttext\n"]
    for segment in result["segments"]:
        text = segment["text"].strip().replace("\t", " ")
        rows.append(f"{round(1000 * segment['start'])}\t{round(1000 * segment['end'])}\t{text}\n")
    return "".join(rows)


def _json(result: dict[str, Any]) -> str:
    return json.dumps(result, ensure_ascii=False)


WRITERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "srt": _srt,
    "vtt": _vtt,
    "txt": _txt,
    "tsv": _tsv,
    "json": _json,
}


WORD_KEYS = ("word", "start", "end", "score", "speaker")


def _present(row: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    # whisperX leaves out what it does not have (an unaligned word has no start); so do we.
    out = {}
    for key in keys:
        value = row.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        out[key] = value
    return out


def results(output_dir: Path) -> dict[str, dict[str, Any]]:
    """Each item's transcript in whisperX's result layout: ``segments`` (with their ``words``),
    ``word_segments`` and ``language``, keyed by item id in the transcripts table's order."""
    import pyarrow.parquet as pq

    transcripts = output_dir / "transcripts.parquet"
    if not transcripts.is_file():
        raise UserError(
            f"{output_dir} has no transcripts.parquet: export takes the output_dir of a finished "
            "transcription run (extractor=whisperx or s2t)"
        )
    items = pq.read_table(transcripts).to_pylist()
    segments: dict[str, list[dict[str, Any]]] = defaultdict(list)
    if (output_dir / "segments.parquet").is_file():
        for row in pq.read_table(output_dir / "segments.parquet").to_pylist():
            segments[row["id"]].append(row)
    words: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    if (output_dir / "words.parquet").is_file():
        for row in pq.read_table(output_dir / "words.parquet").to_pylist():
            words[(row["id"], row["segment"])].append(row)
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        built, flat = [], []
        # An aligned item's segments carry their words (maybe none); an unaligned one's carry
        # no "words" key at all, as in whisperX's results.
        aligned = any(key[0] == item["id"] for key in words)
        for segment in sorted(segments[item["id"]], key=lambda r: r["segment"]):
            entry = _present(segment, ("start", "end", "text", "speaker"))
            entry.setdefault("text", "")
            if aligned:
                its = sorted(words[(item["id"], segment["segment"])], key=lambda r: r["word_index"])
                entry["words"] = [_present(w, WORD_KEYS) for w in its]
                flat.extend(entry["words"])
            built.append(entry)
        result: dict[str, Any] = {"segments": built, "word_segments": flat}
        if item.get("language"):
            result["language"] = item["language"]
        out[item["id"]] = result
    return out


def file_stem(item_id: str) -> str:
    """The item id percent-encoded (``/`` and ``%`` too: distinct ids, no path escape); past
    200 bytes (file names stop at 255) cut, with a hash of the whole id to stay distinct."""
    stem = quote(item_id, safe=" @=+,-._")
    if len(stem.encode()) <= 200:
        return stem
    digest = hashlib.sha256(item_id.encode()).hexdigest()[:16]
    return f"{stem[:180]}~{digest}"


def export(output_dir: str | Path, fmt: str = "srt", dest: str | Path | None = None) -> list[Path]:
    """Write one ``fmt`` file per item of a transcription run; returns the files.

    Raises:
        UserError: an unknown format, or ``output_dir`` is not a finished transcription run.
    """
    if fmt not in WRITERS:
        raise UserError(f"format must be one of {sorted(WRITERS)}, got {fmt!r}")
    source = Path(output_dir)
    target = Path(dest) if dest is not None else source / "exports" / fmt
    per_item = results(source)
    target.mkdir(parents=True, exist_ok=True)
    files = []
    for item_id, result in per_item.items():
        path = target / f"{file_stem(item_id)}.{fmt}"
        path.write_text(WRITERS[fmt](result), encoding="utf-8")
        files.append(path)
    return files


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a in {"-h", "--help"} for a in args):
        print(__doc__)
        return 0
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(ExportConfig), OmegaConf.from_dotlist(args))
        files = export(cfg.output_dir, cfg.format, cfg.dest)
    except OmegaConfBaseException as exc:
        print(
            f"error: {str(exc).splitlines()[0]} (keys: output_dir, format, dest)", file=sys.stderr
        )
        return 2
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    where = files[0].parent if files else cfg.dest
    print(f"{len(files)} {cfg.format} files in {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
