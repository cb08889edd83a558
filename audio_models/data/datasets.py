"""Datasets: the list of items to process, their label columns and a fingerprint."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from audio_models.data.demo import ensure_demo_corpus
from audio_models.data.items import Item, segment_id
from audio_models.utils.errors import UserError
from audio_models.utils.paths import default_cache_dir
from audio_models.utils.provenance import fingerprint_files

if TYPE_CHECKING:
    import pandas as pd

AUDIO_PATTERNS: tuple[str, ...] = ("**/*.wav", "**/*.flac", "**/*.ogg", "**/*.mp3")
# Declarable label types (dataset.label_types); undeclared labels are text.
_LABEL_TYPES: dict[str, Callable[[str], Any]] = {"str": str, "int": int, "float": float}
# A segment bound written as one of these is the file's own start or end, as an empty cell is
# (pandas read them as missing before bounds were read as text).
_EMPTY_BOUNDS = frozenset({"", "na", "n/a", "nan", "null", "none"})
# Columns of features.parquet that a label column must not shadow.
RESERVED_COLUMNS = frozenset(
    {"id", "path", "start", "end", "duration_s", "sample_rate", "source_sample_rate", "n_channels"}
)


class AudioDataset:
    """Base class: a named, fingerprinted list of :class:`Item`."""

    def __init__(
        self, *, name: str, label_column: str | None = None, text_column: str | None = None
    ) -> None:
        self.name = name
        #: The primary label (what a probe or classifier predicts), if the dataset names one.
        self.label_column = label_column
        #: The reference transcript column (transcription runs log WER against it).
        self.text_column = text_column
        self._items: list[Item] | None = None

    def _load(self) -> list[Item]:
        raise NotImplementedError

    def check(self) -> None:
        """Cheap checks before listing (a missing root or manifest): the runner calls this
        before it reaches the tracking server, and listing repeats it."""

    @property
    def items(self) -> list[Item]:
        """The items, listed once (this is where a missing root or bad manifest is reported)."""
        if self._items is None:
            self.check()
            items = self._load()
            if not items:
                raise UserError(f"dataset {self.name!r} has no audio items ({self.describe()})")
            counts = Counter(item.id for item in items)
            dupes = sorted(i for i, n in counts.items() if n > 1)[:5]
            if dupes:
                raise UserError(f"dataset {self.name!r} has duplicate item ids, e.g. {dupes}")
            names = {k for item in items for k in item.labels}
            for option in ("label_column", "text_column"):
                column = getattr(self, option)
                if column is not None and column not in names:
                    raise UserError(
                        f"dataset.{option}={column!r} is not among its label columns "
                        f"{sorted(names)}"
                    )
            self._items = items
        return self._items

    @property
    def label_columns(self) -> list[str]:
        """Label column names in first-seen order."""
        seen: dict[str, None] = {}
        for item in self.items:
            seen.update(dict.fromkeys(item.labels))
        return list(seen)

    def describe(self) -> str:
        return self.name

    def fingerprint(self) -> str:
        """Hash of the items' files (relative paths, sizes, mtimes) and segment bounds; items
        whose audio is a blob (embedded in a table) add the blob's ``token`` where it has one."""
        paths = sorted({Path(item.path) for item in self.items if item.blob is None})
        files = ""
        if paths:
            root = Path(os.path.commonpath([str(p.parent) for p in paths]))
            files = fingerprint_files(paths, root=root)
        segments = json.dumps([(i.id, i.start, i.end) for i in self.items]).encode()
        blobs = [str(getattr(i.blob, "token", "")) for i in self.items if i.blob is not None]
        embedded = json.dumps(blobs).encode() if blobs else b""
        return hashlib.sha256(files.encode() + segments + embedded).hexdigest()[:16]


def _check_labels(labels: dict[str, Any], where: str) -> dict[str, Any]:
    clash = RESERVED_COLUMNS & set(labels)
    if clash:
        raise UserError(f"{where}: label columns {sorted(clash)} clash with output columns")
    return labels


class ItemsDataset(AudioDataset):
    """Items made in Python (``audio_models.extract`` on a list of files or a DataFrame).

    Args:
        items: the items, ids unique; labels are kept exactly as given.
        name: dataset name.
    """

    def __init__(self, *, items: Sequence[Item], name: str = "items") -> None:
        super().__init__(name=name)
        self._given = list(items)
        for item in self._given:
            _check_labels(item.labels, item.id)

    def describe(self) -> str:
        return f"{len(self._given)} items given in Python"

    def _load(self) -> list[Item]:
        return self._given


class FolderDataset(AudioDataset):
    """Every audio file under ``root`` that matches one of ``pattern`` (recursive globs).

    Args:
        name: dataset name (a tag on the run).
        root: the folder.
        pattern: glob patterns relative to ``root``; ``**`` recurses.
        label_regex: optional regex searched in each relative path; its named groups become
            label columns (a path that does not match gets empty labels).
    """

    def __init__(
        self,
        *,
        name: str = "folder",
        root: str,
        pattern: Sequence[str] = AUDIO_PATTERNS,
        label_regex: str | None = None,
        label_column: str | None = None,
        text_column: str | None = None,
    ) -> None:
        super().__init__(name=name, label_column=label_column, text_column=text_column)
        self.root = Path(root).expanduser()
        self.pattern = list(pattern)
        try:
            self.label_regex = re.compile(label_regex) if label_regex else None
        except re.error as exc:
            raise UserError(f"dataset.label_regex is not a valid regex: {exc}") from None
        if self.label_regex is not None and not self.label_regex.groupindex:
            raise UserError("dataset.label_regex needs named groups, e.g. (?P<speaker>\\d+)")

    def describe(self) -> str:
        return f"root={self.root}, pattern={self.pattern}"

    def check(self) -> None:
        if not self.root.is_dir():
            raise UserError(f"dataset root {str(self.root)!r} does not exist or is not a folder")

    def _load(self) -> list[Item]:
        found: set[Path] = set()
        for pattern in self.pattern:
            # Links (even broken ones), FIFOs and devices count: they become failure rows,
            # not silent omissions. Only folders that happen to match are left out.
            found.update(p for p in self.root.glob(pattern) if p.is_symlink() or not p.is_dir())
        items = []
        for path in sorted(found):
            rel = path.relative_to(self.root).as_posix()
            labels: dict[str, Any] = {}
            if self.label_regex is not None:
                names = list(self.label_regex.groupindex)
                match = self.label_regex.search(rel)
                # The matched text as is ("09" stays "09"); an empty match is no label, as an
                # empty manifest cell is.
                labels = {k: ((match.group(k) or None) if match else None) for k in names}
            labels = _check_labels(labels, rel)
            items.append(Item(id=rel, path=os.path.abspath(path), labels=labels))
        return items


class ManifestDataset(AudioDataset):
    """Items listed in a CSV, TSV or JSONL file.

    Args:
        name: dataset name.
        path: the manifest; relative audio paths resolve against its folder.
        path_column: column holding the audio path.
        id_column: column holding item ids; default: the path, plus ``@start-end`` for segments.
        start_column, end_column: optional segment bounds in seconds (empty: whole file).
        label_columns: columns to carry into the outputs; default: every other column.
        label_column: the primary label (what a probe predicts).
        text_column: the reference transcript (a transcription run logs WER against it).
        label_types: column → ``"int"``, ``"float"`` or ``"str"`` for label columns that are
            numbers; every other label is kept as the text written in the file.

    Labels are data: a cell's characters are kept exactly (``09``, ``007``, ``1e3`` and ``NA``
    stay those strings; JSONL numbers keep the digits as written), and an empty cell (or a JSON
    ``null`` or missing key) is a missing label, ``None``, never the string ``"nan"``.
    """

    def __init__(
        self,
        *,
        name: str = "manifest",
        path: str,
        path_column: str = "path",
        id_column: str | None = None,
        start_column: str = "start",
        end_column: str = "end",
        label_columns: Sequence[str] | None = None,
        label_column: str | None = None,
        text_column: str | None = None,
        label_types: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(name=name, label_column=label_column, text_column=text_column)
        self.path = Path(path).expanduser()
        self.path_column = path_column
        self.id_column = id_column
        self.start_column = start_column
        self.end_column = end_column
        self.wanted_labels = list(label_columns) if label_columns is not None else None
        self.label_types = dict(label_types or {})
        unknown = {k: v for k, v in self.label_types.items() if v not in _LABEL_TYPES}
        if unknown:
            raise UserError(
                f"dataset.label_types {unknown}: a label type is one of {sorted(_LABEL_TYPES)}"
            )

    def describe(self) -> str:
        return f"manifest={self.path}"

    def check(self) -> None:
        if not self.path.is_file():
            raise UserError(f"manifest {str(self.path)!r} does not exist")

    def _read(self) -> pd.DataFrame:
        import pandas as pd  # here: importing the module (configs, the runner's checks) stays cheap

        self.check()
        suffix = self.path.suffix.lower()
        if suffix in {".jsonl", ".ndjson"}:
            return self._read_jsonl()
        sep = "\t" if suffix in {".tsv", ".tab"} else ","
        try:
            # Every cell as the text in the file: pandas' type inference turned a speaker "09"
            # into the integer 9 and "NA" into NaN. Empty cells stay "" here (missing later).
            return pd.read_csv(self.path, sep=sep, dtype=str, keep_default_na=False)
        except (ValueError, pd.errors.ParserError) as exc:
            raise UserError(f"cannot parse manifest {str(self.path)!r}: {exc}") from None

    def _read_jsonl(self) -> pd.DataFrame:
        rows = []
        with self.path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    # Numbers as the digits written (1e3 stays "1e3", 007 is not JSON anyway);
                    # a declared label type converts them later.
                    row = json.loads(line, parse_int=str, parse_float=str, parse_constant=str)
                except ValueError as exc:
                    raise UserError(
                        f"cannot parse manifest {str(self.path)!r} line {number}: {exc}"
                    ) from None
                if not isinstance(row, dict):
                    raise UserError(
                        f"manifest {str(self.path)!r} line {number} is not a JSON object"
                    )
                rows.append({k: _json_text(v) for k, v in row.items()})
        import pandas as pd

        # object dtype: no column is coerced; a key absent from a row reads as None.
        frame = pd.DataFrame(rows, dtype=object)
        return frame.astype(object).where(frame.notna(), None)

    def _load(self) -> list[Item]:
        frame = self._read()
        if self.path_column not in frame.columns:
            raise UserError(
                f"manifest {str(self.path)!r} has no path column {self.path_column!r}; "
                f"its columns are {list(frame.columns)} (set dataset.path_column)"
            )
        if self.id_column is not None and self.id_column not in frame.columns:
            raise UserError(f"manifest has no id column {self.id_column!r}")
        structural = {self.path_column, self.id_column, self.start_column, self.end_column}
        if self.wanted_labels is not None:
            missing = [c for c in self.wanted_labels if c not in frame.columns]
            if missing:
                raise UserError(f"manifest lacks label columns {missing}")
            label_cols = self.wanted_labels
        else:
            label_cols = [c for c in frame.columns if c not in structural]
        base = self.path.parent
        items = []
        # Row numbers as a user sees them in the file: 1-based, after a CSV/TSV header line.
        first_row = 1 if self.path.suffix.lower() in {".jsonl", ".ndjson"} else 2
        for number, row in enumerate(frame.to_dict(orient="records"), start=first_row):
            raw = row[self.path_column]
            if not isinstance(raw, str) or not raw:
                raise UserError(f"manifest {str(self.path)!r} row {number}: empty path")
            audio = Path(raw).expanduser()
            audio = audio if audio.is_absolute() else base / audio
            where = f"manifest {str(self.path)!r} row {number}"
            start = _seconds(row.get(self.start_column), f"{where}, column {self.start_column!r}")
            end = _seconds(row.get(self.end_column), f"{where}, column {self.end_column!r}")
            if self.id_column is not None:
                item_id = str(row[self.id_column])
            elif start is None and end is None:
                item_id = raw
            else:
                item_id = segment_id(raw, start, end)
            labels = {
                c: _label(row.get(c), self.label_types.get(c), f"{where}, column {c!r}")
                for c in label_cols
            }
            items.append(
                Item(
                    id=item_id,
                    # No resolve(): a broken or looping link is the item's failure, later.
                    path=os.path.abspath(audio),
                    start=start,
                    end=end,
                    labels=_check_labels(labels, str(self.path)),
                )
            )
        return items


def _seconds(value: Any, where: str) -> float | None:
    """A segment bound in seconds (empty: ``None``).

    Raises:
        UserError: not a finite, non-negative number (names the row and column).
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str) and value.strip().lower() in _EMPTY_BOUNDS:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: {value!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise UserError(f"{where}: {value} is not a non-negative number of seconds")
    return seconds


def _json_text(value: Any) -> Any:
    """A JSON scalar as text (``true`` as written, not Python's ``True``); null stays None."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def _label(value: Any, declared: str | None, where: str) -> Any:
    """A label as written, or converted to its declared type; empty → ``None``.

    Raises:
        UserError: the text is not a value of the declared type (names the row and column).
    """
    value = _plain(value)
    if value is None or value == "":
        return None
    if declared is None or declared == "str" or not isinstance(value, str):
        return value
    try:
        return _LABEL_TYPES[declared](value)
    except ValueError:
        raise UserError(f"{where}: {value!r} is not {declared} (dataset.label_types)") from None


def _plain(value: Any) -> Any:
    """numpy scalars and NaN → plain Python values (Parquet-friendly, JSON-friendly)."""
    if value is None:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


class DemoDataset(ManifestDataset):
    """The bundled synthetic corpus (see :mod:`audio_models.data.demo`), generated on first use.

    Args:
        name: dataset name.
        root: where to write it; default ``<cache>/demo``.
        n_clips: number of clips.
        seed: generator seed.
    """

    def __init__(
        self,
        *,
        name: str = "demo",
        root: str | None = None,
        n_clips: int = 24,
        seed: int = 0,
        label_column: str | None = "label",
    ) -> None:
        self.root = Path(root).expanduser() if root else default_cache_dir() / "demo"
        self.n_clips = n_clips
        self.seed = seed
        super().__init__(
            name=name,
            path=str(self.root / "labels.csv"),
            label_column=label_column,
            label_types={"f0_hz": "float"},  # a measurement, not a code
        )

    def check(self) -> None:
        pass  # labels.csv is written by the first listing

    def _load(self) -> list[Item]:
        ensure_demo_corpus(self.root, n_clips=self.n_clips, seed=self.seed)
        return super()._load()
