"""Corpora in other toolkits' layouts: Kaldi data directories and audformat databases.

Both list :class:`~audio_models.data.items.Item` like every other dataset, so failures, resume
and labels work as for a folder or a manifest. Item ids come from the corpus itself (Kaldi
utterance ids; audformat's file paths relative to the database root), so they are the same on
every run and a rerun resumes.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from audio_models.data.datasets import AudioDataset, _check_labels, _plain
from audio_models.data.items import Item, segment_id
from audio_models.utils.errors import UserError

if TYPE_CHECKING:
    import audformat

# -- Kaldi --------------------------------------------------------------------------------

#: Label column of the ``text`` file. Not ``text``: transcription runs write their hypothesis
#: under that name, and a label named alike would clash with it in the outputs.
TRANSCRIPT = "transcript"
#: Label column of ``utt2spk`` (``runners.compare`` groups folds by ``speaker`` by default).
SPEAKER = "speaker"
# An rxfilename that reads from an archive offset (``foo.ark:1234``, ``foo.ark:1234[0:99]``).
_ARK_OFFSET = re.compile(r":\d+(\[[^\]]*\])?$")


@dataclass(frozen=True)
class _Line:
    """One non-blank line of a Kaldi table file: its 1-based number and its fields."""

    number: int
    key: str
    rest: str  # everything after the key and the whitespace that follows it, as written

    @property
    def fields(self) -> list[str]:
        return self.rest.split()


def _table_lines(path: Path) -> Iterator[_Line]:
    """The lines of a Kaldi table (``<key> <value...>``), blank lines skipped.

    Raises:
        UserError: a key appears twice (names both lines).
    """
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            # The key, then the rest after the whitespace that separates them, as written.
            key, *_ = line.split()
            rest = line.lstrip()[len(key) :].lstrip()
            if key in seen:
                raise UserError(
                    f"{path} line {number}: {key!r} is listed twice (first on line {seen[key]})"
                )
            seen[key] = number
            yield _Line(number, key, rest)


def _plain_path(path: Path, line: _Line) -> str:
    """The audio path of a ``wav.scp`` line, refusing every entry that is not a plain path.

    Kaldi's extended filenames run shell commands (``sox a.sph -t wav - |``), read stdin
    (``-``) or seek into archives (``a.ark:123``); a dataset listing must never execute
    anything, so those are refused here, before any work.

    Raises:
        UserError: a command, stdin, an archive offset or a wrong field count (names the file
            and the line).
    """
    fields = line.fields
    where = f"{path} line {line.number}"
    if line.rest.rstrip().endswith("|") or line.rest.lstrip().startswith("|"):
        raise UserError(
            f"{where}: {line.key!r} is a piped command ({line.rest.strip()!r}); it is refused, "
            "not run (it would execute a shell command): write the audio to files and list "
            "their paths"
        )
    if len(fields) != 1:
        raise UserError(
            f"{where}: expected '<recording-id> <path>', got {len(fields) + 1} fields (an "
            "extended filename such as a command is refused, never run: list plain paths)"
        )
    value = fields[0]
    if value == "-":
        raise UserError(f"{where}: {line.key!r} reads standard input ('-'); list a file path")
    if _ARK_OFFSET.search(value):
        raise UserError(
            f"{where}: {line.key!r} points into an archive ({value!r}); list a plain audio file"
        )
    return value


def _seconds(text: str, where: str, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{where}: {column} {text!r} is not a number of seconds") from None
    if not math.isfinite(value):
        raise UserError(f"{where}: {column} {text!r} is not a finite number of seconds")
    return value


class KaldiDataset(AudioDataset):
    """A Kaldi data directory: ``wav.scp``, optional ``segments``, ``utt2spk`` and ``text``.

    One item per ``segments`` line when the file exists (its recording's path from
    ``wav.scp``, start and end in seconds; an end of ``-1`` is the end of the recording, as in
    Kaldi), else one per ``wav.scp`` line. Item ids are the utterance ids. ``utt2spk`` gives
    the ``speaker`` label column and ``text`` the ``transcript`` column, the text after the
    utterance id exactly as written (an utterance without words: a missing label); set
    ``text_column="transcript"`` for transcription runs to log WER against it.

    Args:
        name: dataset name.
        root: the data directory.
        audio_root: folder that relative ``wav.scp`` paths resolve against (Kaldi resolves
            them against the directory a recipe runs in); default: ``root``.
        label_column: the primary label.
        text_column: the reference transcript column.

    Raises (on listing):
        UserError: a missing ``wav.scp``; a ``wav.scp`` entry that is not a plain path (a
            piped command is refused, never executed); a line with the wrong number of
            fields, an unknown recording or utterance, a bad or empty time span, a repeated
            id. Every message names the file and the line.
    """

    def __init__(
        self,
        *,
        name: str = "kaldi",
        root: str,
        audio_root: str | None = None,
        label_column: str | None = None,
        text_column: str | None = None,
    ) -> None:
        super().__init__(name=name, label_column=label_column, text_column=text_column)
        self.root = Path(root).expanduser()
        self.audio_root = Path(audio_root).expanduser() if audio_root else self.root

    def describe(self) -> str:
        return f"kaldi data directory {self.root}"

    def check(self) -> None:
        if not (self.root / "wav.scp").is_file():
            what = "does not exist" if not self.root.exists() else "has no wav.scp"
            raise UserError(f"kaldi data directory {str(self.root)!r} {what}")

    def _recordings(self) -> dict[str, str]:
        """Recording id → absolute audio path, from ``wav.scp``."""
        path = self.root / "wav.scp"
        self.check()
        recordings = {}
        for line in _table_lines(path):
            audio = Path(_plain_path(path, line))
            audio = audio if audio.is_absolute() else self.audio_root / audio
            # No resolve(): a missing or broken file is that item's failure row, later.
            recordings[line.key] = os.path.abspath(audio)
        return recordings

    def _segments(self, recordings: dict[str, str]) -> list[Item]:
        path = self.root / "segments"
        items = []
        for line in _table_lines(path):
            where = f"{path} line {line.number}"
            fields = line.fields
            if len(fields) != 3:
                raise UserError(
                    f"{where}: expected '<utterance-id> <recording-id> <start> <end>', got "
                    f"{len(fields) + 1} fields"
                )
            recording, start_text, end_text = fields
            if recording not in recordings:
                raise UserError(f"{where}: recording {recording!r} is not in wav.scp")
            start = _seconds(start_text, where, "start")
            end = _seconds(end_text, where, "end")
            if start < 0:
                raise UserError(f"{where}: start {start_text} is negative")
            if end == -1:  # Kaldi's "to the end of the recording"
                stop = None
            elif end <= start:
                raise UserError(f"{where}: end {end_text} is not after start {start_text}")
            else:
                stop = end
            items.append(Item(id=line.key, path=recordings[recording], start=start, end=stop))
        return items

    def _labels(self, filename: str, column: str, ids: set[str]) -> dict[str, Any]:
        """Utterance id → label from ``utt2spk`` or ``text``; absent file: no column."""
        path = self.root / filename
        if not path.is_file():
            return {}
        labels: dict[str, Any] = {}
        for line in _table_lines(path):
            where = f"{path} line {line.number}"
            if line.key not in ids:
                raise UserError(f"{where}: utterance {line.key!r} is not among the items")
            if column == SPEAKER:
                if len(line.fields) != 1:
                    raise UserError(
                        f"{where}: expected '<utterance-id> <speaker-id>', got "
                        f"{len(line.fields) + 1} fields"
                    )
                labels[line.key] = line.fields[0]
            else:
                # The transcript as written; an utterance without words has no reference.
                labels[line.key] = line.rest or None
        return labels

    def _load(self) -> list[Item]:
        recordings = self._recordings()
        if (self.root / "segments").is_file():
            items = self._segments(recordings)
        else:
            items = [Item(id=key, path=path) for key, path in recordings.items()]
        ids = {item.id for item in items}
        columns = {
            column: self._labels(filename, column, ids)
            for filename, column in (("utt2spk", SPEAKER), ("text", TRANSCRIPT))
            if (self.root / filename).is_file()
        }
        return [
            Item(
                id=item.id,
                path=item.path,
                start=item.start,
                end=item.end,
                labels={column: values.get(item.id) for column, values in columns.items()},
            )
            for item in items
        ]


# -- audformat ----------------------------------------------------------------------------

INDEX_TYPES = ("filewise", "segmented")


class AudformatDataset(AudioDataset):
    """An audformat database on disk (``db.yaml`` and its tables; what ``audb.load`` leaves
    in its cache is one), read with ``audformat.Database.load``.

    Items are the rows of the database's index: ``(file, start, end)`` as the database has
    them, files relative to ``root`` made absolute, segment bounds in seconds, a ``NaT`` end
    the end of the file. Item ids: the file as written in the database (filewise), or
    ``<file>@<start>-<end>`` (segmented).

    Labels: every column of the chosen tables, values as the database declares them: text
    stays the text written, ``int``/``float``/``bool`` schemes stay numbers, categorical
    schemes give their labels (not category codes), missing values are ``None``. A filewise
    table chosen beside segmented ones labels each segment of its files.

    Args:
        name: dataset name.
        root: the database folder.
        index_type: ``filewise`` or ``segmented``: which tables give the items. Default: the
            type the chosen tables have, ``segmented`` when they have both.
        tables: tables whose index and columns to use; default: every table of
            ``index_type``.
        columns: label columns to keep; default: every column of those tables.
        split: only the tables of this split (``db.splits``; a table's ``split_id``) give
            items; tables without a split still give labels.
        label_column: the primary label.
        text_column: the reference transcript column.
    """

    def __init__(
        self,
        *,
        name: str = "audformat",
        root: str,
        index_type: str | None = None,
        tables: Sequence[str] | None = None,
        columns: Sequence[str] | None = None,
        split: str | None = None,
        label_column: str | None = None,
        text_column: str | None = None,
    ) -> None:
        super().__init__(name=name, label_column=label_column, text_column=text_column)
        if index_type is not None and index_type not in INDEX_TYPES:
            raise UserError(f"dataset.index_type={index_type!r}: use one of {INDEX_TYPES}")
        self.root = Path(root).expanduser()
        self.index_type = index_type
        self.tables = list(tables) if tables is not None else None
        self.columns = list(columns) if columns is not None else None
        self.split = split
        self._db: audformat.Database | None = None
        #: item id → the (file, start, end) of the database's index (``pd.Timedelta`` bounds)
        self.index: dict[str, tuple[Any, Any, Any]] = {}
        #: label column → its pandas dtype in the database (categoricals, nullable integers)
        self.dtypes: dict[str, Any] = {}

    @classmethod
    def from_database(cls, db: audformat.Database, **options: Any) -> AudformatDataset:
        """The dataset of a database already in memory (``audio_models.extract(db)``);
        relative files resolve against ``db.root`` (the working directory if it has none)."""
        dataset = cls(root=db.root or os.curdir, name=db.name or "audformat", **options)
        dataset._db = db
        return dataset

    def describe(self) -> str:
        return f"audformat database {self.root}"

    def check(self) -> None:
        if self._db is None and not (self.root / "db.yaml").is_file():
            what = "does not exist" if not self.root.exists() else "has no db.yaml"
            raise UserError(f"audformat database {str(self.root)!r} {what}")

    def _database(self) -> audformat.Database:
        if self._db is None:
            import audformat  # only where a database is read: its import takes a while

            self.check()
            try:
                self._db = audformat.Database.load(str(self.root))
            except Exception as exc:  # audformat raises many kinds; the message is what helps
                raise UserError(
                    f"cannot load audformat database {str(self.root)!r}: {exc}"
                ) from None
        return self._db

    def _choose(self, db: audformat.Database) -> tuple[str, list[str], list[str]]:
        """The index type, the tables that give items and the tables that give labels."""
        if self.tables is not None:
            unknown = [t for t in self.tables if t not in db.tables]
            if unknown:
                raise UserError(
                    f"dataset.tables: {unknown} not in the database; its tables are "
                    f"{list(db.tables)}"
                )
            chosen = list(self.tables)
        else:
            chosen = list(db.tables)
        if not chosen:
            raise UserError(f"audformat database {str(self.root)!r} has no tables")
        types = {db[t].type for t in chosen}
        index_type = self.index_type or ("segmented" if "segmented" in types else "filewise")
        if self.tables is None:
            chosen = [t for t in chosen if db[t].type == index_type]
        elif index_type == "filewise":
            segmented = [t for t in chosen if db[t].type == "segmented"]
            if segmented:
                raise UserError(
                    f"dataset.tables {segmented} are segmented: a segment's labels cannot label "
                    "a whole file (set dataset.index_type=segmented)"
                )
        if self.split is not None:
            if self.split not in db.splits:
                raise UserError(
                    f"dataset.split={self.split!r} is not a split of the database; its splits "
                    f"are {list(db.splits)}"
                )
            # Tables of another split are left out altogether; tables of no split label items.
            chosen = [t for t in chosen if db[t].split_id in (self.split, None)]
            givers = [t for t in chosen if db[t].split_id == self.split]
        else:
            givers = chosen
        givers = [t for t in givers if db[t].type == index_type]
        if not givers:
            where = f" of split {self.split!r}" if self.split is not None else ""
            raise UserError(
                f"audformat database {str(self.root)!r} has no {index_type} table{where}"
            )
        return index_type, givers, chosen

    def _frame(self) -> pd.DataFrame:
        """The chosen labels on the union of the item tables' indexes."""
        import audformat

        db = self._database()
        index_type, givers, chosen = self._choose(db)
        index = audformat.utils.union([db[t].index for t in givers])
        parts = []
        for name in chosen:
            table = db[name]
            if not table.columns:
                continue
            if table.type == index_type:
                parts.append(table.get())
            else:  # a filewise table labelling segments: its values on each segment of a file
                files = index.get_level_values("file").isin(table.index)
                parts.append(table.get(index=index[files]))
        try:
            labels = audformat.utils.concat(parts) if parts else pd.DataFrame(index=index)
        except ValueError as exc:
            # Two tables disagree on a value of one column (or its type): say which, do not pick.
            raise UserError(f"audformat database {str(self.root)!r}: {exc}") from None
        labels = labels.reindex(index)
        if self.columns is not None:
            missing = [c for c in self.columns if c not in labels.columns]
            if missing:
                raise UserError(
                    f"dataset.columns: {missing} not in the chosen tables; their columns are "
                    f"{list(labels.columns)}"
                )
            labels = labels[self.columns]
        return labels

    def _file(self, file: str) -> tuple[str, str]:
        """The absolute path of an index file and its id (relative to the root when under
        it, so ids do not depend on where the database lives)."""
        root = os.path.abspath(self.root)
        path = file if os.path.isabs(file) else os.path.join(root, file)
        path = os.path.abspath(path)
        if os.path.isabs(file) and path.startswith(root + os.sep):
            return path, Path(os.path.relpath(path, root)).as_posix()
        return path, file

    def _load(self) -> list[Item]:
        frame = self._frame()
        self.dtypes = dict(frame.dtypes.items())
        segmented = frame.index.nlevels == 3
        rows = frame.astype(object).to_dict(orient="records")
        items, index = [], {}
        for key, values in zip(frame.index, rows, strict=True):
            file, begin, stop = key if segmented else (key, None, None)
            path, rel = self._file(str(file))
            start = None if begin is None else pd.Timedelta(begin).total_seconds()
            end = None if stop is None or pd.isna(stop) else pd.Timedelta(stop).total_seconds()
            item_id = rel if not segmented else segment_id(rel, start, end)
            labels = {column: _plain(value) for column, value in values.items()}
            labels = {k: (None if v is pd.NA or v is pd.NaT else v) for k, v in labels.items()}
            items.append(
                Item(
                    id=item_id,
                    path=path,
                    start=start,
                    end=end,
                    labels=_check_labels(labels, f"{self.root} {item_id}"),
                )
            )
            index[item_id] = (file, begin, stop)
        self.index = index
        return items


# -- lhotse -------------------------------------------------------------------------------


def _agreed(values: list[Any]) -> Any:
    """One label from a cut's supervisions: the value when they agree, else the distinct
    values in time order joined by ``,`` (a cut spanning two speakers says so)."""
    present = [v for v in values if v is not None]
    distinct = list(dict.fromkeys(present))
    if not distinct:
        return None
    return distinct[0] if len(distinct) == 1 else ",".join(str(v) for v in distinct)


class LhotseDataset(AudioDataset):
    """A lhotse CutSet manifest (``cuts.jsonl`` / ``.jsonl.gz``), read with lhotse.

    One item per cut: its recording's file, ``[cut.start, cut.start + cut.duration)``, the cut
    id as item id. Supervision fields become label columns: ``speaker``, ``transcript`` (the
    supervisions' text in time order; not ``text``, the column transcription runs write),
    ``language``, ``gender`` and every ``custom`` key; where a cut's supervisions disagree, the
    distinct values joined by ``,``.

    Args:
        name: dataset name.
        cuts: the CutSet manifest.
        audio_root: folder relative recording paths resolve against (default: the working
            directory, as lhotse resolves them).
        label_column: the primary label.
        text_column: the reference transcript column (``transcript``).

    Raises (on listing):
        UserError: an unreadable manifest; a cut that is not a single-recording cut (mixed,
            padding), whose recording has transforms (speed, volume: not a slice of a file),
            whose audio is not a plain file (a ``command`` source would run a shell and is
            refused, never run; a ``url`` or in-memory source is not read), or that selects
            some channels of a multi-channel recording.
    """

    def __init__(
        self,
        *,
        name: str = "lhotse",
        cuts: str,
        audio_root: str | None = None,
        label_column: str | None = None,
        text_column: str | None = None,
    ) -> None:
        super().__init__(name=name, label_column=label_column, text_column=text_column)
        self.cuts = Path(cuts).expanduser()
        # lhotse resolves relative recording paths against the working directory (its recipes
        # write data/LibriSpeech/... into data/manifests/...): so do we, unless told otherwise.
        self.audio_root = Path(audio_root).expanduser() if audio_root else Path.cwd()
        self._given: Any = None  # a CutSet object (from_cuts) instead of a manifest

    @classmethod
    def from_cuts(cls, cuts: Any, **options: Any) -> LhotseDataset:
        """The items of a ``CutSet`` in memory (``am.extract(cuts, ...)``)."""
        dataset = cls(cuts="<CutSet>", **options)
        dataset._given = cuts
        return dataset

    def check(self) -> None:
        if self._given is None and not self.cuts.is_file():
            raise UserError(f"lhotse manifest {str(self.cuts)!r} does not exist")

    def describe(self) -> str:
        return (
            "lhotse CutSet in memory" if self._given is not None else f"lhotse CutSet {self.cuts}"
        )

    def _file(self, cut: Any, where: str) -> str:
        recording = cut.recording
        if recording is None:
            raise UserError(f"{where}: no recording")
        if recording.transforms:
            kinds = [
                t.get("name", "?") if isinstance(t, dict) else type(t).__name__
                for t in recording.transforms
            ]
            raise UserError(
                f"{where}: its recording has transforms {kinds}, so its audio is not a slice "
                "of a file; store the transformed audio as files first"
            )
        wanted = cut.channel if isinstance(cut.channel, list) else [cut.channel]
        if recording.num_channels > 1 and sorted(wanted) != list(range(recording.num_channels)):
            raise UserError(
                f"{where}: selects channel(s) {wanted} of a {recording.num_channels}-channel "
                "recording; loader.channel_policy applies to every item, so split the channels "
                "into files of their own first"
            )
        sources = [s for s in recording.sources if set(s.channels) & set(wanted)]
        if len(sources) != 1:
            raise UserError(f"{where}: its channels come from {len(sources)} audio sources")
        (source,) = sources
        if source.type != "file":
            # "command" sources are shell commands: refused, never executed.
            raise UserError(
                f"{where}: audio source of type {source.type!r} is refused; only plain files "
                "are read (a command would run a shell)"
            )
        path = Path(str(source.source)).expanduser()
        return str(path if path.is_absolute() else self.audio_root / path)

    def _load(self) -> list[Item]:
        from lhotse import CutSet  # here: lhotse imports torch, which checking configs avoids
        from lhotse.cut import MonoCut

        if self._given is not None:
            cuts = list(self._given)
        else:
            self.check()
            try:
                cuts = list(CutSet.from_file(self.cuts))
            except Exception as exc:  # lhotse raises what its parsers raise
                raise UserError(f"cannot read lhotse manifest {str(self.cuts)!r}: {exc}") from None
        rows: list[tuple[Any, str, dict[str, Any]]] = []
        for number, cut in enumerate(cuts, start=1):
            where = f"{self.cuts} cut {number} ({cut.id!r})"
            if not isinstance(cut, MonoCut):
                raise UserError(
                    f"{where}: a {type(cut).__name__}; only single-recording cuts are read"
                )
            path = self._file(cut, where)
            supervisions = sorted(cut.supervisions, key=lambda s: s.start)
            labels: dict[str, Any] = {
                SPEAKER: _agreed([s.speaker for s in supervisions]),
                TRANSCRIPT: (
                    " ".join(s.text for s in supervisions if s.text)
                    if any(s.text for s in supervisions)
                    else None
                ),
                "language": _agreed([s.language for s in supervisions]),
                "gender": _agreed([s.gender for s in supervisions]),
            }
            for key in dict.fromkeys(k for s in supervisions for k in (s.custom or {})):
                labels[key] = _agreed([(s.custom or {}).get(key) for s in supervisions])
            rows.append((cut, path, _check_labels(labels, where)))
        # Every item carries every column (a cut without a field: a missing label); columns
        # that no cut fills are left out.
        filled = [
            k
            for k in dict.fromkeys(k for _, _, lab in rows for k in lab)
            if any(lab.get(k) is not None for _, _, lab in rows)
        ]
        return [
            Item(
                id=cut.id,
                path=path,
                start=float(cut.start),
                end=float(cut.start) + float(cut.duration),
                labels={key: _plain(labels.get(key)) for key in filled},
            )
            for cut, path, labels in rows
        ]
