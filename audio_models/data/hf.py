"""Hugging Face ``datasets`` corpora as datasets: a ``save_to_disk`` folder, or a local folder
``datasets.load_dataset`` reads (``audiofolder``, Parquet, Arrow...), with an ``Audio`` column.

Audio is never decoded by ``datasets`` (its decoder is torchcodec, not the project's): the
column is read undecoded (``Audio(decode=False)``). A row whose audio is a file (``path``, no
bytes: ``audiofolder``) is an ordinary file item; a row whose audio is embedded bytes
(``save_to_disk`` embeds local files; Parquet exports) is decoded from memory by the loader
with the same decoder, so both give the numbers the same file gives through
``dataset=folder``. Resume keys hash the embedded bytes as they hash a file.

``datasets`` is imported inside methods only: its import is heavy, and a configuration error
(a wrong path, split or column) is reported before torch is imported.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from audio_models.data.datasets import RESERVED_COLUMNS, AudioDataset, _check_labels, _plain
from audio_models.data.items import Item
from audio_models.utils.errors import ExtractionError, UserError
from audio_models.utils.provenance import fingerprint_files

#: A label column named ``text`` is written as this (transcription runs write their
#: hypothesis as ``text``; the Kaldi and lhotse datasets name the reference alike).
TRANSCRIPT = "transcript"
_TEXT = "text"
# Feature types whose values are scalars (written as label columns); others are left out.
_SCALAR_TYPES = ("bool", "int", "uint", "float", "double", "string", "large_string")
# dataset.split: a name and an optional slice in datasets' own syntax (test[:100],
# train[10%:20%], train[:10%](pct1_dropremainder)); the slice is read by datasets itself.
_SPLIT = re.compile(r"(?P<name>[^\[\]+()]+?)\s*(?P<rows>\[[^\]]*\](?:\([^)]*\))?)?")


@dataclass
class HuggingFaceDatasetConfig:
    _target_: str = "audio_models.data.hf.HuggingFaceDataset"
    name: str = "huggingface"
    path: str = MISSING  # a save_to_disk folder, a local data folder, or a builder (audiofolder)
    split: str | None = None  # None: the only split there is; test[:100], train[10%:20%]: rows
    audio_column: str = "audio"
    id_column: str | None = None  # None: the audio file's path where unique, else the row number
    label_columns: list[str] | None = None  # None: every scalar column but audio and id
    label_column: str | None = None
    text_column: str | None = None  # reference transcripts: transcription runs log WER
    config_name: str | None = None  # load_dataset(name=...)
    data_dir: str | None = None  # load_dataset(data_dir=...), e.g. with path=audiofolder
    data_files: Any = None  # load_dataset(data_files=...): a file, a list, {split: files}
    cache_dir: str | None = None  # where load_dataset prepares its Arrow files (None: HF's)


class _Table:
    """The audio column of one split, undecoded: ``{"bytes": ..., "path": ...}`` per row."""

    def __init__(self, dataset: Any, column: str) -> None:
        self.dataset = dataset
        self.column = column

    def bytes_at(self, row: int) -> bytes:
        value = self.dataset[row][self.column]
        data = value.get("bytes") if isinstance(value, dict) else None
        if not data:
            raise ExtractionError("decode", f"row {row} has no audio (neither bytes nor a file)")
        return bytes(data)


@dataclass(frozen=True, eq=False)
class _Row:
    """The embedded audio of one row (a :class:`~audio_models.data.items.Blob`): read from
    the split's Arrow table, memory-mapped where it is on disk, when the loader gets to it."""

    table: _Table
    row: int
    token: str  # what the dataset fingerprint records of it

    def read(self) -> bytes:
        return self.table.bytes_at(self.row)


def _is_saved(path: Path) -> bool:
    """A ``save_to_disk`` folder: a ``DatasetDict``'s or a ``Dataset``'s."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def _scalar(feature: Any) -> bool:
    from datasets import ClassLabel, Value

    return isinstance(feature, ClassLabel) or (
        isinstance(feature, Value) and feature.dtype.startswith(_SCALAR_TYPES)
    )


def _output_name(column: str) -> str:
    return TRANSCRIPT if column == _TEXT else column


def _slice_of(split: str, name: str, rows: str, n_rows: int | None) -> range:
    """The rows ``rows`` (``[:100]``, ``[10%:20%]``) names in a split of ``n_rows``, read by
    ``datasets.ReadInstruction``; with ``n_rows=None`` only its syntax is checked.

    Raises:
        UserError: what ``datasets`` says of it, naming ``split``.
    """
    from datasets import ReadInstruction

    try:  # "rows" stands for the split's name, which datasets' grammar may not take
        instruction = ReadInstruction.from_spec(f"rows{rows}")
        if n_rows is None:
            return range(0)
        (part,) = instruction.to_absolute({"rows": n_rows})
    except (ValueError, AssertionError) as exc:
        said = str(exc).replace("rows[", f"{name}[")
        raise UserError(f"dataset.split={split!r}: {said}") from None
    return range(part.from_, part.to)


class HuggingFaceDataset(AudioDataset):
    """One split of a Hugging Face dataset on this machine.

    ``path`` is a ``save_to_disk`` folder (read with ``datasets.load_from_disk``), a local
    data folder or a packaged builder name such as ``audiofolder`` with ``data_dir`` (read
    with ``datasets.load_dataset``; its Arrow files are prepared once, in ``cache_dir``). Hub
    ids are not downloaded: load the dataset where there is a network and ``save_to_disk`` it.

    One item per row. Audio: the ``audio_column`` (an ``Audio`` feature, or text paths);
    embedded bytes when the row has them, else the file it names (a relative path resolves
    against ``data_dir``, else ``path``). Ids: ``id_column``; else the audio path (relative
    to ``data_dir`` or ``path`` when under it, so an ``audiofolder`` row has the id
    ``dataset=folder`` gives its file) when every row has one and they are unique; else the
    row number. Labels: ``label_columns`` (default: every scalar column but the audio and id
    columns and those named like output columns, e.g. ``path``), ``ClassLabel`` values as
    their names, missing values ``None``; a column named ``text`` is written as
    ``transcript`` (``text`` is what transcription runs write; ``text_column=text`` and
    ``text_column=transcript`` both name it).

    Raises (on checking or listing):
        UserError: no such folder or builder, a split or column that is not there (naming
            the ones that are), a dataset that cannot be loaded, a label column that is not
            a scalar.
    """

    def __init__(
        self,
        *,
        name: str = "huggingface",
        path: str,
        split: str | None = None,
        audio_column: str = "audio",
        id_column: str | None = None,
        label_columns: Sequence[str] | None = None,
        label_column: str | None = None,
        text_column: str | None = None,
        config_name: str | None = None,
        data_dir: str | None = None,
        data_files: Any = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(
            name=name,
            label_column=None if label_column is None else _output_name(label_column),
            text_column=None if text_column is None else _output_name(text_column),
        )
        self.path = path
        self.split = None if split is None else str(split).strip()
        self._split_name, self._slice = self._parse_split(self.split)
        self._rows: range | None = None  # the slice's rows of the opened split (None: all)
        # Row number of the given rows' first row in their split: a Dataset loaded as
        # "train[200:]" numbers its rows from 200, as the same slice of the whole split does.
        self._row_offset = 0
        self.audio_column = audio_column
        self.id_column = id_column
        self.wanted_labels = list(label_columns) if label_columns is not None else None
        self.config_name = config_name
        self.data_dir = data_dir
        self.data_files = data_files
        self.cache_dir = cache_dir
        self._given: Any = None  # a Dataset / DatasetDict object (from_dataset)
        self._split: Any = None  # the chosen split, once opened

    @classmethod
    def from_dataset(cls, dataset: Any, **options: Any) -> HuggingFaceDataset:
        """The items of a ``datasets.Dataset`` (or a one-split ``DatasetDict``) in memory
        (``am.extract(ds, ...)``)."""
        made = cls(path="<datasets.Dataset>", **options)
        made._given = dataset
        return made

    def describe(self) -> str:
        if self._given is not None:
            return "Hugging Face dataset in memory"
        split = f", split {self.split}" if self.split is not None else ""
        data = f", data_dir {self.data_dir}" if self.data_dir else ""
        return f"Hugging Face dataset {self.path}{data}{split}"

    # -- opening --------------------------------------------------------------------------

    def _local(self) -> Path | None:
        """The folder ``path`` names, or ``None`` for a packaged builder name.

        Raises:
            UserError: neither (a Hub id, a typo), or a ``data_dir`` that is not a folder.
        """
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

        if self.data_dir is not None and not Path(self.data_dir).expanduser().is_dir():
            raise UserError(f"dataset.data_dir {self.data_dir!r} does not exist or is not a folder")
        folder = Path(self.path).expanduser()
        if folder.is_dir():
            return folder
        if self.path in _PACKAGED_DATASETS_MODULES and not folder.exists():
            if self.data_dir is None and self.data_files is None:
                raise UserError(
                    f"dataset.path={self.path!r} is a builder: set dataset.data_dir (or "
                    "dataset.data_files) to the folder it reads"
                )
            return None
        raise UserError(
            f"dataset.path {self.path!r} is not a folder (a save_to_disk folder or a local "
            "dataset folder) nor a builder such as 'audiofolder'; Hub datasets are not "
            "downloaded here: load_dataset(...).save_to_disk(folder) where there is a network"
        )

    @staticmethod
    def _parse_split(split: str | None) -> tuple[str | None, str | None]:
        """``dataset.split`` as its split name and the slice after it (``None``: all rows).

        Raises:
            UserError: several splits joined (``train+test``) or not a name with a slice.
        """
        if split is None:
            return None, None
        if "+" in re.sub(r"\[[^\]]*\]", "", split):  # not a sign inside a slice
            raise UserError(
                f"dataset.split={split!r}: one split per run (row ids would collide across "
                "joined splits); a sweep over dataset.split runs each"
            )
        match = _SPLIT.fullmatch(split)
        if match is None:
            raise UserError(
                f"dataset.split={split!r} is not a split name with an optional slice such as "
                "test[:100] or train[10%:20%]"
            )
        name = match["name"].strip()
        if match["rows"] is not None:  # its syntax, rounding and percentages, before any work
            _slice_of(split, name, match["rows"], None)
        return name, match["rows"]

    def _slice_rows(self, n_rows: int) -> range | None:
        """The rows of an ``n_rows`` split that ``dataset.split``'s slice names, counted by
        ``datasets`` itself (``None``: no slice)."""
        if self._slice is None:
            return None
        assert self.split is not None and self._split_name is not None
        part = _slice_of(self.split, self._split_name, self._slice, n_rows)
        if part.stop <= part.start:
            raise UserError(f"dataset.split={self.split!r} selects none of the {n_rows} rows")
        return part

    def _choose(self, splits: list[str], where: str) -> str | None:
        name = self._split_name
        if name is not None:
            if name not in splits:
                raise UserError(f"dataset.split={name!r} is not a split of {where}: {splits}")
            return name
        if len(splits) > 1:
            how = (
                "pass one of them (dataset['test']), or HuggingFaceDataset.from_dataset(dataset, "
                "split='test')"
                if self._given is not None
                else "choose one with dataset.split=<name>"
            )
            raise UserError(f"{where} has splits {splits}: {how}")
        return splits[0] if splits else None

    def _pick(self, loaded: Any, where: str) -> Any:
        """The whole chosen split of a ``Dataset`` or ``DatasetDict``; the rows a slice
        names are kept in ``_rows`` (ids are decided on the whole split)."""
        from datasets import Dataset, DatasetDict

        if isinstance(loaded, DatasetDict):
            split = loaded[self._choose(list(loaded), where)]
            self._rows = self._slice_rows(len(split))
            return split
        if isinstance(loaded, Dataset):
            own = None if loaded.split is None else str(loaded.split)
            # A whole split is named by its name (a slice of it taken here); a dataset loaded
            # as a slice (split="train[:10]") only by that same string.
            if (
                self.split is not None
                and own is not None
                and own not in (self.split, self._split_name)
            ):
                raise UserError(f"dataset.split={self.split!r}: {where} holds split {own!r}")
            self._rows = None if own == self.split else self._slice_rows(len(loaded))
            start = re.fullmatch(r"[^\[]*\[\s*(\d+)\s*:.*", own or "")
            self._row_offset = int(start[1]) if start else 0  # unknown for 10%: or -5:
            return loaded
        raise UserError(
            f"{where} is a {type(loaded).__name__}; a Dataset or DatasetDict is read (not a "
            "streaming IterableDataset)"
        )

    def _check_audio(self, features: Any, where: str) -> None:
        from datasets import Audio, Value

        if self.audio_column not in features:
            raise UserError(
                f"dataset.audio_column={self.audio_column!r} is not a column of {where}; its "
                f"columns are {list(features)}"
            )
        feature = features[self.audio_column]
        if not isinstance(feature, Audio) and not (
            isinstance(feature, Value) and feature.dtype in ("string", "large_string")
        ):
            raise UserError(
                f"dataset.audio_column={self.audio_column!r} of {where} is a "
                f"{type(feature).__name__}, not an Audio column (nor file paths)"
            )

    def _open(self) -> Any:
        """The chosen split (loaded once), its audio column checked."""
        if self._split is not None:
            return self._split
        import datasets

        if self._given is not None:
            split = self._pick(self._given, "the dataset given")
            self._check_audio(split.features, "the dataset given")
            self._split = split
            return split
        folder = self._local()
        where = repr(self.path)
        if folder is not None and _is_saved(folder):
            try:
                loaded = datasets.load_from_disk(str(folder))
            except Exception as exc:  # datasets raises what its readers raise
                raise UserError(f"cannot load the saved dataset {where}: {exc}") from None
        else:
            try:
                loaded = datasets.load_dataset(**self._load_args(folder))
            except Exception as exc:
                raise UserError(f"cannot load the dataset {where}: {exc}") from None
        split = self._pick(loaded, where)
        self._check_audio(split.features, where)
        self._split = split
        return split

    def _load_args(self, folder: Path | None) -> dict[str, Any]:
        """What ``load_dataset`` (listing) and ``load_dataset_builder`` (checking) both take."""
        return {
            "path": str(folder) if folder is not None else self.path,
            "name": self.config_name,
            "data_dir": self.data_dir,
            "data_files": self.data_files,
            "cache_dir": self.cache_dir,
        }

    def check(self) -> None:
        """A saved dataset is opened (memory-mapped: cheap) and its split and audio column
        checked; for a folder ``load_dataset`` would read, the folder and split are checked
        without preparing anything (its columns are known once it is prepared, on listing)."""
        if self._given is not None or self._split is not None:
            return
        folder = self._local()
        if folder is not None and _is_saved(folder):
            self._open()
            return
        import datasets

        try:
            builder = datasets.load_dataset_builder(**self._load_args(folder))
        except Exception as exc:
            raise UserError(f"cannot read the dataset {self.path!r}: {exc}") from None
        files = builder.config.data_files
        if files:
            self._choose([str(s) for s in files], repr(self.path))
        if builder.info.features is not None:
            self._check_audio(builder.info.features, repr(self.path))

    # -- listing --------------------------------------------------------------------------

    def _root(self) -> str | None:
        """What relative audio paths resolve against and ids are made relative to."""
        if self.data_dir is not None:
            return os.path.abspath(Path(self.data_dir).expanduser())
        folder = Path(self.path).expanduser()
        return os.path.abspath(folder) if self._given is None and folder.is_dir() else None

    def _label_columns(self, features: Any) -> list[str]:
        taken = {self.audio_column, self.id_column}
        if self.wanted_labels is None:
            columns = [
                c
                for c, f in features.items()
                if c not in taken and _output_name(c) not in RESERVED_COLUMNS and _scalar(f)
            ]
        else:
            missing = [c for c in self.wanted_labels if c not in features]
            if missing:
                raise UserError(
                    f"dataset.label_columns: {missing} are not columns; the columns are "
                    f"{list(features)}"
                )
            odd = [c for c in self.wanted_labels if not _scalar(features[c])]
            if odd:
                raise UserError(
                    f"dataset.label_columns: {odd} are not scalar columns (lists, audio, "
                    "nested values are not written as labels)"
                )
            columns = list(self.wanted_labels)
        # The primary label and the reference transcript are label columns whatever else is.
        for option in (self.label_column, self.text_column):
            if option is None:
                continue
            source = _TEXT if option == TRANSCRIPT and _TEXT in features else option
            if source in features and source not in columns and _scalar(features[source]):
                columns.append(source)
        names = [_output_name(c) for c in columns]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise UserError(
                f"dataset columns {twice}: 'text' is written as 'transcript', and the dataset "
                "has both; choose one with dataset.label_columns"
            )
        return columns

    def _load(self) -> list[Item]:
        import pyarrow.compute as pc
        from datasets import Audio, ClassLabel

        split = self._open()
        features = split.features
        if self.id_column is not None and self.id_column not in features:
            raise UserError(
                f"dataset.id_column={self.id_column!r} is not a column; the columns are "
                f"{list(features)}"
            )
        labels = self._label_columns(features)
        audio_feature = features[self.audio_column]
        embedded = isinstance(audio_feature, Audio)
        audio = split.select_columns([self.audio_column])
        if embedded:
            audio = audio.cast_column(self.audio_column, Audio(decode=False))
        column = audio.with_format("arrow")[:].column(self.audio_column)
        if embedded:
            paths = pc.struct_field(column, "path").to_pylist()
            has_bytes = pc.is_valid(pc.struct_field(column, "bytes")).to_pylist()
            present = pc.is_valid(column).to_pylist()
            has_bytes = [b and p for b, p in zip(has_bytes, present, strict=True)]
        else:
            paths = column.to_pylist()
            has_bytes = [False] * len(paths)
        table = _Table(audio, self.audio_column)
        token = str(getattr(split, "_fingerprint", "") or "")
        root = self._root()
        files = [self._file(p, root) for p in paths]  # (absolute path, id) of each row
        by_path = [rel for _, rel in files]
        unique = all(p is not None for p in by_path) and len(set(by_path)) == len(by_path)
        if self.id_column is not None:
            given = split.select_columns([self.id_column]).with_format("arrow")[:]
            raw = given.column(self.id_column).to_pylist()
            if any(raw[row] is None for row in self._rows or range(len(raw))):
                raise UserError(f"dataset.id_column={self.id_column!r} has empty values")
            ids = [str(v) for v in raw]  # (an empty one outside the slice stays unused)
        else:
            # Decided on the whole split, so a slice's rows get the ids they have in it.
            first = self._row_offset
            ids = by_path if unique else [str(first + n) for n in range(len(paths))]  # type: ignore[misc]
        values = split.select_columns(labels).with_format("arrow")[:].to_pydict() if labels else {}
        for c in labels:
            if isinstance(features[c], ClassLabel):
                names = features[c].names
                values[c] = [None if v is None or v < 0 else names[v] for v in values[c]]
        items = []
        for row in self._rows if self._rows is not None else range(len(paths)):
            where = f"{self.path} row {self._row_offset + row}"
            row_labels = _check_labels(
                {_output_name(c): _plain(values[c][row]) for c in labels}, where
            )
            path, rel = files[row]
            if has_bytes[row] or path is None:
                # Embedded audio (or none at all: the loader records the row's failure). The
                # path names it in the outputs: the file it came from, else the id.
                items.append(
                    Item(
                        id=ids[row],
                        path=rel if rel is not None else ids[row],
                        labels=row_labels,
                        blob=_Row(table, row, f"{token}:{row}"),
                    )
                )
            else:
                items.append(Item(id=ids[row], path=path, labels=row_labels))
        return items

    @staticmethod
    def _file(stored: str | None, root: str | None) -> tuple[str | None, str | None]:
        """The absolute path of a row's audio file and its id (relative to ``root`` when
        under it); ``(None, None)`` for a row without a path."""
        if not stored:
            return None, None
        if os.path.isabs(stored):
            path = os.path.abspath(stored)
        elif root is not None:
            path = os.path.abspath(os.path.join(root, stored))
        else:
            return os.path.abspath(stored), stored
        if root is not None and path.startswith(root.rstrip(os.sep) + os.sep):
            return path, Path(os.path.relpath(path, root)).as_posix()
        return path, stored

    def fingerprint(self) -> str:
        """The items' fingerprint, and the split's Arrow files (paths, sizes, mtimes) when
        it has them: embedded audio changes with them."""
        base = super().fingerprint()
        split = self._open()
        cache = [Path(f["filename"]) for f in getattr(split, "cache_files", [])]
        if not cache:
            return base
        root = Path(os.path.commonpath([str(p.parent) for p in cache]))
        files = fingerprint_files(cache, root=root)
        return hashlib.sha256((base + files).encode()).hexdigest()[:16]
