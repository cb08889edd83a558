"""The output directory of a run: committed parts, resume state, final files.

No Lightning here: :class:`OutputStore` is what a run commits through, tested on its own;
:mod:`audio_models.pipeline.writer` turns finished batches into its tables.

While a run is in progress, each batch is committed to ``output_dir/.progress`` as its own
small Parquet files, each written under a temporary name and renamed (atomic): ``part-N``
(feature rows, or per-item frame metadata) and ``fail-N`` (failure rows); frame matrices go to
``frames/shard-N.parquet`` before the part that indexes them. A kill at any moment leaves only
complete files. A rerun with the same settings skips every item key already committed, and the
end of a run consolidates the parts into the final files:

- ``features.parquet``: one row per item — metadata, label columns, extra text columns, then the
  features (one column per named feature, else a fixed-size list column ``features``). For
  frame-level extractors the row holds ``n_frames``, ``frame_shift_s``, ``shard``, ``offset``.
- ``frames/shard-N.parquet`` + ``frames/index.parquet`` (frame-level extractors): one row per
  frame (``id``, ``frame``, features); the index maps id → shard, offset, frame count, shift.
- ``failures.parquet``: ``id``, ``path``, ``stage``, ``error_type``, ``message``, ``item_key``.
- Transcription extractors write ``transcripts.parquet`` in place of ``features.parquet``
  (metadata, labels, ``text``, ``language``, one column per model score) and two side tables,
  ``segments.parquet`` (``id``, ``segment``, ``start``, ``end``, ``text``, ``speaker``,
  ``avg_logprob``) and ``words.parquet`` (``id``, ``segment``, ``word_index``, ``word``,
  ``start``, ``end``, ``score``, ``speaker``), times in seconds from the start of the recording.
  Per batch they are committed as ``.progress/segments-N`` / ``words-N`` before the part.
- Other extractors may declare side tables of their own (``Extractor.side_tables``; the VAD's
  ``segments.parquet``: ``id``, ``segment``, ``start``, ``end``, ``confidence``), committed and
  consolidated the same way; every declared table exists (empty) when every item failed.

Every final file carries the settings hash in its Parquet metadata; outputs of other settings
are never mixed in.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import socket
import threading
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from audio_models.utils.errors import UserError

log = logging.getLogger(__name__)

META_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("path", pa.string()),
        ("start", pa.float64()),
        ("end", pa.float64()),
        ("duration_s", pa.float64()),
        ("sample_rate", pa.int32()),
        ("source_sample_rate", pa.int32()),
        ("n_channels", pa.int16()),
        ("channel_policy", pa.string()),
        ("silence_ratio", pa.float32()),
        ("clipping_ratio", pa.float32()),
        ("item_key", pa.string()),
    ]
)
FRAME_META_SCHEMA = pa.schema(
    [
        ("n_frames", pa.int64()),
        ("frame_shift_s", pa.float64()),
        ("shard", pa.string()),
        ("offset", pa.int64()),
    ]
)
FAILURE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("path", pa.string()),
        ("stage", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
        ("item_key", pa.string()),
    ]
)
SEGMENT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("segment", pa.int32()),
        ("start", pa.float64()),
        ("end", pa.float64()),
        ("text", pa.string()),
        ("speaker", pa.string()),
        ("avg_logprob", pa.float64()),
    ]
)
WORD_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("segment", pa.int32()),
        ("word_index", pa.int32()),
        ("word", pa.string()),
        ("start", pa.float64()),
        ("end", pa.float64()),
        ("score", pa.float64()),
        ("speaker", pa.string()),
    ]
)
#: Side tables of transcription outputs: name → schema.
TRANSCRIPT_TABLES = {"segments": SEGMENT_SCHEMA, "words": WORD_SCHEMA}
TRANSCRIPT_COLUMNS = ("text", "language")
INDEX_COLUMNS = ["id", "shard", "offset", "n_frames", "frame_shift_s"]
PROGRESS = ".progress"
DAMAGED = ".damaged"  # parts that could not be read back, kept for a look
LOCK = ".lock"  # held (flock) by the run using the directory; says who that is
HASH_KEY = b"audio_models.config_hash"
RUN_KEY = b"audio_models.run_id"
#: JSON list of the feature columns (of features.parquet, or of the frame shards).
FEATURES_KEY = b"audio_models.feature_columns"
#: What a side table may be called: its per-batch files are ``<name>-<seq>.parquet``.
TABLE_NAME = re.compile(r"[a-z][a-z0-9_]*")
_SEQ = re.compile(r"^([a-z][a-z0-9_]*)-(\d+)\.parquet$")


def _tmp_name(path: Path) -> Path:
    # Per process: two writers (a second run, a rank) never write through the same name.
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def _atomic_write(table: pa.Table, path: Path) -> None:
    tmp = _tmp_name(path)
    pq.write_table(table, tmp)
    tmp.replace(path)


def _seq_files(folder: Path, kind: str) -> dict[int, Path]:
    found = {}
    if folder.is_dir():
        for path in folder.iterdir():
            match = _SEQ.match(path.name)
            if match and match.group(1) == kind:
                found[int(match.group(2))] = path
    return dict(sorted(found.items()))


# Output directories this process holds (POSIX locks never refuse their own process).
_HELD: set[str] = set()
_HELD_GUARD = threading.Lock()


def _read_state(path: Path) -> dict[str, Any] | None:
    """``.progress/state.json``, or ``None`` when it is missing or unreadable (the committed
    parts carry the settings hash themselves, so nothing depends on this file alone)."""
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s (%s); the parts are checked one by one", path, exc)
        return None
    return saved if isinstance(saved, dict) else None


class OutputStore:
    """The output directory of one configuration: what is committed, what comes next.

    Args:
        output_dir: where the outputs live.
        config_hash: hash of everything that changes an item's output.
        resume: keep what a previous run with the same settings committed; ``False`` deletes
            the previous outputs first.
        main_name: file name of the one-row-per-item table.
        tables: side tables (name → schema) with any number of rows per item, committed per
            batch beside the part and consolidated to ``<name>.parquet``.
    """

    def __init__(
        self,
        output_dir: str | Path,
        config_hash: str,
        *,
        resume: bool = True,
        main_name: str = "features.parquet",
        tables: dict[str, pa.Schema] | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.main_name = main_name
        self.tables = dict(tables or {})
        if {"part", "fail", "shard"} & set(self.tables):
            raise ValueError("side table names part, fail and shard are taken")
        unnamed = sorted(name for name in self.tables if not TABLE_NAME.fullmatch(name))
        if unnamed:
            # Their per-batch files would never be found again: refused, not lost.
            raise ValueError(f"side table names must be lowercase snake_case, got {unnamed}")
        self.config_hash = config_hash
        self.resume = resume
        self.progress = self.output_dir / PROGRESS
        self.frames = self.output_dir / "frames"
        self.done_keys: set[str] = set()
        self.previous_run_id: str | None = None
        self.resumed = False
        self._next = 0
        self._stride = 1  # ranks of a distributed run interleave their sequence numbers
        self._lock_handle: IO[str] | None = None
        self._lock_key = ""
        self._state_vouches = False

    @property
    def final_files(self) -> list[Path]:
        """The one-row-per-item table and the failures."""
        return [self.output_dir / self.main_name, self.output_dir / "failures.parquet"]

    @property
    def table_files(self) -> dict[str, Path]:
        return {name: self.output_dir / f"{name}.parquet" for name in self.tables}

    def open(self) -> None:
        """Check the directory against the settings, clean leftovers, collect done keys.

        Raises:
            UserError: the directory holds outputs of different settings.
        """
        self._lock()
        try:
            self._open_locked()
        except BaseException:
            self.release()  # a refused or failed open leaves the directory free
            raise

    def _open_locked(self) -> None:
        for finished in self.output_dir.glob(PROGRESS + ".done*"):
            shutil.rmtree(finished)  # a finalize that a kill interrupted after its commit
        if not self.resume:
            shutil.rmtree(self.progress, ignore_errors=True)
            shutil.rmtree(self.frames, ignore_errors=True)
            for path in [*self.final_files, *self.table_files.values()]:
                path.unlink(missing_ok=True)
        state = self.progress / "state.json"
        features, failures = self.final_files
        saved = _read_state(state)
        if saved is not None:
            self._check_hash(saved.get("config_hash"), str(self.progress))
            # Parts of a run interrupted before parts carried the hash: state.json vouches.
            self._state_vouches = True
            self.previous_run_id = saved.get("run_id")
        elif features.exists() or failures.exists():
            # A finished run: reopen it, so new items of a grown corpus join its outputs.
            finished = features if features.exists() else failures
            metadata = pq.read_schema(finished).metadata or {}
            self._check_hash(metadata.get(HASH_KEY, b"").decode() or None, str(finished))
            self.previous_run_id = metadata.get(RUN_KEY, b"").decode() or None
            self.progress.mkdir(exist_ok=True)
            self.save_state(self.previous_run_id)  # before the moves: a kill keeps the guard
            if features.exists():
                features.replace(self.progress / "part-000000.parquet")
            if failures.exists():
                failures.replace(self.progress / "fail-000000.parquet")
            for name, path in self.table_files.items():
                if path.exists():
                    path.replace(self.progress / f"{name}-000000.parquet")
            (self.frames / "index.parquet").unlink(missing_ok=True)
        self.progress.mkdir(exist_ok=True)
        for folder in (self.output_dir, self.progress, self.frames):
            if folder.is_dir():
                for tmp in folder.glob("*.tmp"):
                    tmp.unlink()  # a write that a kill interrupted
        self._collect(prune=True)

    def _lock(self) -> None:
        """Hold ``output_dir/.lock`` for the rest of the run (until :meth:`release` or the
        process ends).

        A POSIX record lock (``lockf``), not ``flock``: it belongs to this process alone, so
        a forked loader worker that outlives a killed run (stuck in a native decode, say)
        does not keep the directory locked, and the kernel drops it when the run dies. Such
        locks do not exclude the holder itself, so a second store of this process is refused
        through :data:`_HELD`.

        Raises:
            UserError: another run holds the directory (names its PID and host), or the
                directory cannot be written.
        """
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            key = str(self.output_dir.resolve())
        except OSError as exc:
            raise UserError(
                f"output_dir {str(self.output_dir)!r} cannot be written ({exc.strerror or exc}); "
                "fix its permissions or choose another output_dir"
            ) from None
        with _HELD_GUARD:
            if key in _HELD:
                raise UserError(
                    f"output_dir {str(self.output_dir)!r} is in use by PID {os.getpid()} on "
                    f"{socket.gethostname()} (this process); wait for that run to end or "
                    "choose another output_dir"
                )
            try:
                handle = open(self.output_dir / LOCK, "a+")  # noqa: SIM115  (held for the run)
            except OSError as exc:
                raise UserError(
                    f"output_dir {str(self.output_dir)!r} cannot be written "
                    f"({exc.strerror or exc}); fix its permissions or choose another output_dir"
                ) from None
            try:
                fcntl.lockf(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise UserError(
                    f"output_dir {str(self.output_dir)!r} is in use by {holder}; wait for that "
                    "run to end or choose another output_dir"
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"PID {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
            _HELD.add(key)
            self._lock_handle, self._lock_key = handle, key

    def release(self) -> None:
        """Let another run use the directory (idempotent)."""
        handle, self._lock_handle = self._lock_handle, None
        if handle is not None:
            with _HELD_GUARD:
                handle.close()  # closing the descriptor drops the lock
                _HELD.discard(self._lock_key)

    def join(self) -> None:
        """Open a store that rank 0 has already opened (no cleaning): only what is committed
        and where numbering continues."""
        self._collect(prune=False)

    def interleave(self, rank: int, world_size: int) -> None:
        """Rank ``rank`` of ``world_size`` writers numbers its files ``base + k·world + rank``,
        so the ranks never collide and the order of commits stays defined."""
        self._next += rank
        self._stride = world_size

    def _set_aside(self, path: Path, exc: Exception) -> None:
        """Move a damaged file to ``output_dir/.damaged/``: its items are redone, the file kept
        for a look (never deleted by the tool)."""
        target = self.output_dir / DAMAGED
        target.mkdir(exist_ok=True)
        path.replace(target / path.name)
        log.warning("set aside damaged %s (%s); its items will be redone", path.name, exc)

    def _readable(self, paths: dict[int, Path], *, prune: bool) -> dict[int, Path]:
        """The committed files whose footer and ``item_key`` column read back and whose
        settings hash matches (checked per file: a lost ``state.json`` never lets a run with
        other settings adopt them)."""
        good = {}
        for seq, path in paths.items():
            try:
                schema = pq.read_schema(path)
                pq.read_table(path, columns=["item_key"])
            except (OSError, pa.ArrowException) as exc:
                if not prune:
                    raise
                self._set_aside(path, exc)
                continue
            found = (schema.metadata or {}).get(HASH_KEY)
            if found is not None or not self._state_vouches:
                self._check_hash(found.decode() if found else None, str(path))
            good[seq] = path
        return good

    def _collect(self, *, prune: bool) -> None:
        parts = self._readable(_seq_files(self.progress, "part"), prune=prune)
        fails = self._readable(_seq_files(self.progress, "fail"), prune=prune)
        shards = _seq_files(self.frames, "shard")
        sides = {name: _seq_files(self.progress, name) for name in self.tables}
        if prune:
            for files in sides.values():
                for seq, path in files.items():
                    if seq not in parts:
                        path.unlink()  # written, but its part never committed
            referenced: set[str] = set()
            for path in parts.values():
                if "shard" in pq.read_schema(path).names:
                    column = pq.read_table(path, columns=["shard"]).column(0)
                    referenced.update(column.to_pylist())
            for shard in shards.values():
                if f"frames/{shard.name}" not in referenced:
                    shard.unlink()  # written, but the part that indexes it never committed
        for path in [*parts.values(), *fails.values()]:
            self.done_keys.update(pq.read_table(path, columns=["item_key"]).column(0).to_pylist())
        self.resumed = bool(self.done_keys)
        # New batches never reuse a number that a part, failure file or shard already has.
        side_seqs = [seq for files in sides.values() for seq in files]
        self._next = max([*parts, *fails, *shards, *side_seqs, -1]) + 1

    def _check_hash(self, found: str | None, where: str) -> None:
        if found != self.config_hash:
            raise UserError(
                f"{where} holds results of different settings (hash {found}, now "
                f"{self.config_hash}); use another output_dir, or resume=false to replace them"
            )

    def save_state(self, run_id: str | None) -> None:
        state = {"config_hash": self.config_hash, "run_id": run_id}
        tmp = _tmp_name(self.progress / "state.json")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.progress / "state.json")

    def next_seq(self) -> int:
        seq, self._next = self._next, self._next + self._stride
        return seq

    def commit(
        self,
        seq: int,
        part: pa.Table | None,
        failures: pa.Table | None,
        frames: pa.Table | None,
        tables: dict[str, pa.Table] | None = None,
    ) -> None:
        """Write one batch: frames and side tables first, then failures, then the part that
        indexes them (the part's rename is the commit)."""
        for name, table in (tables or {}).items():
            _atomic_write(table, self.progress / f"{name}-{seq:06d}.parquet")
        if frames is not None:
            self.frames.mkdir(exist_ok=True)
            _atomic_write(frames, self.frames / f"shard-{seq:06d}.parquet")
        stamp = {HASH_KEY: self.config_hash.encode()}
        if failures is not None:
            failures = failures.replace_schema_metadata(
                {**(failures.schema.metadata or {}), **stamp}
            )
            _atomic_write(failures, self.progress / f"fail-{seq:06d}.parquet")
        if part is not None:
            part = part.replace_schema_metadata({**(part.schema.metadata or {}), **stamp})
            _atomic_write(part, self.progress / f"part-{seq:06d}.parquet")

    def finalize(
        self,
        *,
        row_group_rows: int,
        run_id: str | None,
        feature_columns: list[str] | None = None,
        empty_main: pa.Schema | None = None,
    ) -> None:
        """Consolidate the parts into the final files and drop the progress folder.
        ``empty_main`` is written as the main table when no item succeeded, so a run whose
        every item failed still has its table (no rows) for readers to open.
        ``feature_columns`` are recorded in the files' metadata, so readers never mistake a
        numeric label column for a feature."""
        # The failure and side tables carry the hash and run id; only the main table lists the
        # feature columns (ComParE's 6,373 names made an empty failures file 540 KB).
        side = {HASH_KEY: self.config_hash.encode(), RUN_KEY: (run_id or "").encode()}
        metadata = dict(side)
        if feature_columns is not None:
            metadata[FEATURES_KEY] = json.dumps(feature_columns).encode()
        features, failures = self.final_files
        parts = _seq_files(self.progress, "part")
        fails = _seq_files(self.progress, "fail")
        keep = _latest_rows(
            {**{(s, 1): p for s, p in parts.items()}, **{(s, 0): p for s, p in fails.items()}}
        )
        if parts:
            _concat(
                list(parts.values()),
                features,
                metadata,
                row_group_rows,
                [keep[(s, 1)] for s in parts],
            )
            if "shard" in pq.read_schema(features).names:  # frame-level: write the index
                index = pq.read_table(features, columns=INDEX_COLUMNS)
                _atomic_write(index, self.frames / "index.parquet")
        elif empty_main is not None:
            # No feature columns without a row to take their shape from: it names none.
            empty = {**metadata, FEATURES_KEY: b"[]"} if feature_columns is not None else metadata
            _atomic_write(empty_main.empty_table().replace_schema_metadata(empty), features)
        if fails:
            _concat(
                list(fails.values()),
                failures,
                side,
                row_group_rows,
                [keep[(s, 0)] for s in fails],
            )
        else:
            _atomic_write(FAILURE_SCHEMA.empty_table().replace_schema_metadata(side), failures)
        for name, target in self.table_files.items():
            sides = _seq_files(self.progress, name)
            if not sides:
                empty = self.tables[name].empty_table().replace_schema_metadata(side)
                _atomic_write(empty, target)
                continue
            # A side row stands when its item's row in the part of the same batch does.
            masks = []
            for seq, path in sides.items():
                kept: set[str] = set()
                if seq in parts:
                    ids = pq.read_table(parts[seq], columns=["id"]).column(0).to_pylist()
                    kept = {i for i, k in zip(ids, keep[(seq, 1)], strict=True) if k}
                ids = pq.read_table(path, columns=["id"]).column(0).to_pylist()
                masks.append(np.array([i in kept for i in ids], dtype=bool))
            _concat(list(sides.values()), target, side, row_group_rows, masks)
        # The rename is the commit: before it a rerun redoes the consolidation from the parts,
        # after it the final files stand. Only then is the folder deleted.
        done = self.output_dir / f"{PROGRESS}.done-{os.getpid()}"
        self.progress.replace(done)
        shutil.rmtree(done)

    def output_files(self) -> list[Path]:
        files = [f for f in [*self.final_files, *self.table_files.values()] if f.exists()]
        if self.frames.is_dir():
            files += sorted(self.frames.glob("*.parquet"))
        return files


def _latest_rows(sources: dict[tuple[int, int], Path]) -> dict[tuple[int, int], np.ndarray]:
    """Per committed file, which rows to keep: one per item id, the most recently committed.

    An item is committed again when its audio changed (a new item key) after an earlier run:
    its newest row replaces the older one, so the final files hold every id exactly once.
    """
    seen: set[str] = set()
    keep: dict[tuple[int, int], np.ndarray] = {}
    for position in sorted(sources, reverse=True):
        ids = pq.read_table(sources[position], columns=["id"]).column(0).to_pylist()
        mask = np.zeros(len(ids), dtype=bool)
        for row in range(len(ids) - 1, -1, -1):
            if ids[row] not in seen:
                seen.add(ids[row])
                mask[row] = True
        keep[position] = mask
    return keep


def _concat(
    sources: list[Path],
    target: Path,
    metadata: dict[bytes, bytes],
    row_group_rows: int,
    masks: list[np.ndarray],
) -> None:
    """Stream the kept rows of ``sources`` into ``target`` in row groups of ~``row_group_rows``."""
    schema = pq.read_schema(sources[0]).remove_metadata().with_metadata(metadata)
    tmp = _tmp_name(target)
    pending: list[pa.Table] = []
    rows = 0
    with pq.ParquetWriter(tmp, schema) as writer:
        for source, mask in zip(sources, masks, strict=True):
            table = pq.read_table(source).replace_schema_metadata(None)
            table = table.filter(pa.array(mask)).cast(schema.remove_metadata())
            pending.append(table)
            rows += table.num_rows
            if rows >= row_group_rows:
                writer.write_table(pa.concat_tables(pending).replace_schema_metadata(metadata))
                pending, rows = [], 0
        if pending:
            writer.write_table(pa.concat_tables(pending).replace_schema_metadata(metadata))
    tmp.replace(target)
