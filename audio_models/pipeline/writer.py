"""Turns finished batches into rows and commits them through the run's
:class:`~audio_models.pipeline.store.OutputStore` (see there for the files a run writes).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pyarrow as pa
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from audio_models.data.items import Item
from audio_models.data.loader import Failure, Record, fail
from audio_models.extractor import OutputKind
from audio_models.pipeline.store import (
    FAILURE_SCHEMA,
    FRAME_META_SCHEMA,
    META_SCHEMA,
    SEGMENT_SCHEMA,
    TRANSCRIPT_COLUMNS,
    WORD_SCHEMA,
    OutputStore,
)
from audio_models.utils.errors import UserError

log = logging.getLogger(__name__)


def label_schema(items: list[Item], columns: list[str]) -> pa.Schema:
    """Arrow types of the label columns, inferred over all items (strings where mixed)."""
    fields = []
    for column in columns:
        values = [item.labels.get(column) for item in items]
        try:
            arrow_type = pa.array(values).type
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arrow_type = pa.string()
        if pa.types.is_null(arrow_type):
            arrow_type = pa.string()
        fields.append(pa.field(column, arrow_type))
    return pa.schema(fields)


def _labels_array(values: list[Any], arrow_type: pa.DataType) -> pa.Array:
    if pa.types.is_string(arrow_type):
        values = [None if v is None else str(v) for v in values]
    return pa.array(values, type=arrow_type)


# Pending features past this are committed whatever commit_every_s says: frame-level outputs
# of long recordings must not pile up in memory between commits.
_PENDING_BYTES = 64 * 2**20


class ParquetFeatureWriter(BasePredictionWriter):
    """Commits each finished batch through an :class:`OutputStore`; keeps the run's counts.

    Args:
        store: the opened output store.
        kind: vector or frames.
        feature_names: column names, or ``None`` for an unnamed vector.
        frame_shift_s: seconds between frames (frame-level extractors).
        items: the dataset's items (label types are inferred from all of them).
        label_columns: label column names in output order.
        extra_columns: text columns the extractor adds (a predicted label, say).
        row_group_rows: rows per row group of the consolidated ``features.parquet``.
        commit_rows: records gathered at least per committed part (the loader's batch size).
        commit_every_s: and at least this many seconds since the last commit (0: every
            ``commit_rows``). Every part is a file the final consolidation reads (~5 ms each):
            per-batch parts of a short-clip corpus made that the tail of the run. A kill loses
            about this much finished work, which a rerun computes again; pending records past
            ``_PENDING_BYTES`` of features are committed at once.
    """

    def __init__(
        self,
        store: OutputStore,
        *,
        kind: OutputKind,
        feature_names: list[str] | None,
        frame_shift_s: float | None,
        items: list[Item],
        label_columns: list[str],
        extra_columns: list[str] | None = None,
        row_group_rows: int = 512,
        commit_rows: int = 1,
        commit_every_s: float = 0.0,
        feature_groups: list[tuple[str, int]] | None = None,
        storage_dtype: str | None = None,
    ) -> None:
        """See the class docstring; ``feature_groups`` splits vectors into list columns,
        ``storage_dtype`` (``float32``/``float16``; ``None`` keeps the computed precision) is
        the precision values are stored at."""
        super().__init__(write_interval="batch")
        self.storage_dtype = np.dtype(storage_dtype) if storage_dtype else None
        self.store = store
        self.commit_rows = commit_rows
        self.commit_every_s = commit_every_s
        self._last_commit = time.monotonic()
        self._pending_bytes = 0
        self.feature_groups = feature_groups
        self._pending: list[Record] = []
        # The timer thread commits what is pending when no batch comes (a slow or stuck
        # item): the two never commit at once.
        self._commit_lock = threading.RLock()
        self._timer: threading.Thread | None = None
        self._timer_stop = threading.Event()
        self._timer_error: Exception | None = None
        self.kind = kind
        self.feature_names = feature_names
        self.frame_shift_s = frame_shift_s
        self.labels = label_schema(items, label_columns)
        self.extra_columns = list(extra_columns or [])
        self.row_group_rows = row_group_rows
        self.run_id: str | None = None
        taken = set(META_SCHEMA.names) | set(FRAME_META_SCHEMA.names) | {"features", "frame"}
        if kind == OutputKind.TRANSCRIPT:
            taken |= set(TRANSCRIPT_COLUMNS)
        #: The extractor's own side tables (as the store was opened with them), built from
        #: each record's ``extra``; a transcription run's tables come from its transcripts.
        self.side_tables = {} if kind == OutputKind.TRANSCRIPT else dict(store.tables)
        if set(self.side_tables) & set(self.extra_columns):
            raise UserError(
                f"side tables {sorted(set(self.side_tables) & set(self.extra_columns))} are "
                "named like text columns of the same extractor"
            )
        columns = (
            [n for n, _ in feature_groups] if feature_groups and kind == OutputKind.VECTOR else None
        )
        names = Counter(
            [*self.labels.names, *self.extra_columns, *(columns or feature_names or ())]
        )
        clash = (taken & set(names)) | {n for n, count in names.items() if count > 1}
        if clash:
            raise UserError(
                f"column names used twice in the outputs: {sorted(clash)} (a label column "
                "named like an output column: rename it, or the extractor's output column)"
            )
        self.rank_stats: list[dict[str, float]] = []  # per rank, in a distributed run
        self._started = time.perf_counter()  # reset in setup: this rank's predict time
        self.n_processed = 0  # items this invocation processed (written or failed)
        self.n_skipped = 0  # items a previous run had committed
        self.n_failed_now = 0
        self.audio_seconds_now = 0.0  # audio this invocation wrote features for

    # -- Lightning hooks -------------------------------------------------------------------
    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: list[Record],
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.consume(prediction)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._started = time.perf_counter()
        if trainer.world_size == 1:
            return
        # Rank 0 opened (and cleaned) the store before the other ranks started; they only
        # read what is committed, after this barrier, and number their files interleaved.
        trainer.strategy.barrier("audio_models.store_open")
        if trainer.global_rank > 0:
            self.store.join()
            datamodule = trainer.datamodule
            if datamodule is not None and hasattr(datamodule, "dataset"):
                datamodule.dataset.done_keys = frozenset(self.store.done_keys)
        self.store.interleave(trainer.global_rank, trainer.world_size)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.stop_timer()
        self._raise_timer_error()
        self.flush()
        if trainer.world_size > 1:
            wall = time.perf_counter() - self._started
            mine = torch.tensor(
                [self.n_processed, self.n_failed_now, self.n_skipped, self.audio_seconds_now, wall],
                dtype=torch.float64,
            )
            gathered = trainer.strategy.all_gather(mine.to(pl_module.device)).cpu()
            self.rank_stats = [
                dict(
                    zip(
                        ("items", "failed", "skipped", "audio_seconds", "wall_s"),
                        row.tolist(),
                        strict=True,
                    )
                )
                for row in gathered.reshape(trainer.world_size, -1)
            ]
            trainer.strategy.barrier("audio_models.finalize")  # every rank has committed
            if trainer.global_rank > 0:
                return
        self.store.finalize(
            row_group_rows=self.row_group_rows,
            run_id=self.run_id,
            feature_columns=self.feature_columns,
            empty_main=self._empty_main(),
        )

    def _empty_main(self) -> pa.Schema:
        """The main table's columns that do not depend on an output's shape: metadata,
        labels, text columns (transcripts: text, language, scores)."""
        fields = [*META_SCHEMA, *self.labels]
        fields += [pa.field(name, pa.string()) for name in self.extra_columns]
        if self.kind == OutputKind.TRANSCRIPT:
            fields += [pa.field(name, pa.string()) for name in TRANSCRIPT_COLUMNS]
            fields += [pa.field(name, pa.float64()) for name in self.feature_names or []]
        return pa.schema(fields)

    @property
    def feature_columns(self) -> list[str] | None:
        """Names of the feature columns of ``features.parquet`` (vectors: one list column per
        group, named columns, or ``features``); ``None`` for frame-level outputs, whose
        shards hold nothing but ``id``, ``frame`` and features."""
        if self.kind != OutputKind.VECTOR:
            return None
        if self.feature_groups is not None:
            return [name for name, _ in self.feature_groups]
        return list(self.feature_names) if self.feature_names is not None else ["features"]

    # -- writing ---------------------------------------------------------------------------
    def consume(self, records: list[Record]) -> None:
        """Take a batch's records; commit once ``commit_rows`` of them are pending and
        ``commit_every_s`` has passed (or they hold ``_PENDING_BYTES`` of features)."""
        with self._commit_lock:
            self._raise_timer_error()
            self._pending.extend(records)
            self._pending_bytes += sum(r.features.nbytes for r in records if r.features is not None)
            if self._timer is None:
                self._start_timer()
            if len(self._pending) < self.commit_rows:
                return
            due = time.monotonic() - self._last_commit >= self.commit_every_s
            if due or self._pending_bytes >= _PENDING_BYTES:
                self.flush()

    def _start_timer(self) -> None:
        # Started with the first batch, when the loader workers have been forked already (a
        # fork while this thread holds a lock would hand the child a lock nobody releases).
        interval = max(self.commit_every_s, 0.5)

        def tick() -> None:
            while not self._timer_stop.wait(interval / 2):
                with self._commit_lock:
                    if self._pending and time.monotonic() - self._last_commit >= interval:
                        try:
                            self.flush()
                        except Exception as exc:  # raised by the next batch or the end
                            self._timer_error = exc
                            return

        self._timer = threading.Thread(target=tick, name="audio_models-commit", daemon=True)
        self._timer.start()

    def stop_timer(self) -> None:
        """Stop the timed commits (the run is ending: what is pending is flushed next)."""
        self._timer_stop.set()
        if self._timer is not None:
            self._timer.join()

    def _raise_timer_error(self) -> None:
        # A commit the timer could not make (disk full, say) fails the run where the main
        # thread can report it; the records it held are still pending.
        error, self._timer_error = self._timer_error, None
        if error is not None:
            raise error

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # A run that fails (a worker died, Ctrl-C) keeps the items it finished: the rerun
        # skips them. The error may be this writer's own (disk full): it stands, not this.
        self.stop_timer()
        with contextlib.suppress(Exception):
            self.flush()

    def flush(self) -> None:
        """Commit the pending records now: successes to a part (and shard), failures to a fail
        file."""
        with self._commit_lock:
            self._flush()

    def _flush(self) -> None:
        records = self._pending
        done, failures = [], []
        for record in records:
            if record.skipped:
                continue
            if record.failure is None and record.features is not None:
                self._check_shape(record)
            if record.failure is None and self.side_tables:
                self._check_rows(record)
            if record.failure is None and record.features is None and record.transcript is None:
                record.failure = Failure("transform", "NoOutput", "extractor returned nothing")
            if record.failure is not None:
                failures.append(record)
            else:
                done.append(record)
        if done or failures:
            seq = self.store.next_seq()
            part = frames = None
            tables: dict[str, pa.Table] = {}
            if done and self.kind == OutputKind.TRANSCRIPT:
                part, tables = self._transcript_tables(done)
            elif done:
                part, frames = self._tables(done, seq)
                tables = self._side_rows(done)
            self.store.commit(
                seq, part, self._failure_table(failures) if failures else None, frames, tables
            )
        # Committed: only now do the records leave the pending list and count (a commit that
        # raised leaves them pending for the next try, or for the error to be reported).
        self._pending, self._pending_bytes = [], 0
        self._last_commit = time.monotonic()
        self.n_skipped += len(records) - len(done) - len(failures)
        self.n_processed += len(done) + len(failures)
        self.audio_seconds_now += sum(record.duration_s for record in done)
        self._report(failures)

    def _report(self, failures: list[Record]) -> None:
        """Count and announce committed failures: a warning in the main thread; a log line
        from the timer thread (``warnings`` is process-wide state: a warning from there would
        land in whatever ``catch_warnings`` the main thread is in, an item's transform say)."""
        self.n_failed_now += len(failures)
        timer = threading.current_thread() is self._timer
        for record in failures:
            failure = record.failure
            assert failure is not None  # _flush and record_crashes set one on every failure
            text = (
                f"{record.item.id}: {failure.stage} failed: {failure.error_type}: {failure.message}"
            )
            if timer:
                log.warning(text)
            else:
                warnings.warn(text, stacklevel=3)

    def record_crashes(self, crashed: list[tuple[Item, str]], message: str) -> None:
        """Commit failure rows for items whose worker process died, so a rerun skips them."""
        records = []
        for item, key in crashed:
            record = Record(item=item, key=key)
            record.failure = Failure("worker", "WorkerDied", message[:2000])
            records.append(record)
        self.store.commit(self.store.next_seq(), None, self._failure_table(records), None)
        self._report(records)

    def _check_shape(self, record: Record) -> None:
        features = record.features
        assert features is not None
        ndim = 1 if self.kind == OutputKind.VECTOR else 2
        width = len(self.feature_names) if self.feature_names is not None else None
        if features.ndim != ndim or (width is not None and features.shape[-1] != width):
            fail(record, "write", ValueError(f"unexpected feature shape {features.shape}"))
        elif features.size and np.isnan(features).all():
            fail(record, "transform", ValueError("extractor returned only NaN"))

    def _check_rows(self, record: Record) -> None:
        """An item's side rows: every column of each table (but ``id``), equally long."""
        for name, schema in self.side_tables.items():
            rows = record.extra.get(name)
            columns = set(schema.names) - {"id"}
            if not isinstance(rows, dict) or set(rows) != columns:
                found = sorted(rows) if isinstance(rows, dict) else type(rows).__name__
                fail(record, "write", ValueError(f"{name} rows: columns {found}, not {columns}"))
                return
            if len({len(values) for values in rows.values()}) > 1:
                fail(record, "write", ValueError(f"{name} rows: columns of different lengths"))
                return

    def _side_rows(self, records: list[Record]) -> dict[str, pa.Table]:
        """The extractor's side tables of a batch; ``start``/``end`` move from the decoded
        signal's start to the recording's (a manifest segment starts at its ``start``)."""
        tables = {}
        for name, schema in self.side_tables.items():
            columns: dict[str, list[Any]] = {column: [] for column in schema.names}
            for record in records:
                rows = record.extra[name]
                n = len(next(iter(rows.values()), []))
                offset = float(record.meta.get("start") or 0.0)
                columns["id"] += [record.item.id] * n
                for column, values in rows.items():
                    if column in ("start", "end"):
                        values = [None if v is None else float(v) + offset for v in values]
                    columns[column] += list(values)
            tables[name] = pa.table(columns, schema=schema)
        return tables

    def _failure_table(self, records: list[Record]) -> pa.Table:
        rows: dict[str, list[Any]] = {name: [] for name in FAILURE_SCHEMA.names}
        for record in records:
            failure = record.failure
            assert failure is not None  # _flush and record_crashes set one on every failure
            values = (
                record.item.id,
                record.item.path,
                failure.stage,
                failure.error_type,
                failure.message,
                record.key,
            )
            for key, value in zip(FAILURE_SCHEMA.names, values, strict=True):
                rows[key].append(value)
        return pa.table(rows, schema=FAILURE_SCHEMA)

    def _meta_columns(self, records: list[Record]) -> dict[str, pa.Array]:
        columns: dict[str, pa.Array] = {}
        for field in META_SCHEMA:
            if field.name == "id":
                values = [r.item.id for r in records]
            elif field.name == "path":
                values = [r.item.path for r in records]
            elif field.name == "item_key":
                values = [r.key for r in records]
            else:
                values = [r.meta[field.name] for r in records]
            columns[field.name] = pa.array(values, field.type)
        for field in self.labels:
            columns[field.name] = _labels_array(
                [r.item.labels.get(field.name) for r in records], field.type
            )
        for name in self.extra_columns:
            columns[name] = pa.array([r.extra.get(name) for r in records], pa.string())
        return columns

    def _stored(self, matrix: np.ndarray) -> np.ndarray:
        return matrix if self.storage_dtype is None else matrix.astype(self.storage_dtype)

    def _tables(self, records: list[Record], seq: int) -> tuple[pa.Table, pa.Table | None]:
        columns = self._meta_columns(records)
        if self.kind == OutputKind.VECTOR:
            matrix = self._stored(np.stack([r.features for r in records]))
            if self.feature_groups is not None:
                start = 0
                for name, size in self.feature_groups:
                    block = np.ascontiguousarray(matrix[:, start : start + size])
                    columns[name] = pa.FixedSizeListArray.from_arrays(
                        pa.array(block.reshape(-1)), size
                    )
                    start += size
            elif self.feature_names is not None:
                for j, name in enumerate(self.feature_names):
                    columns[name] = pa.array(matrix[:, j])
            else:
                flat = pa.array(matrix.reshape(-1))
                columns["features"] = pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1])
            return pa.table(columns), None
        counts = [int(r.features.shape[0]) for r in records]
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        matrix = self._stored(np.concatenate([r.features for r in records], axis=0))
        ids = np.repeat(np.array([r.item.id for r in records], dtype=object), counts)
        frame_cols: dict[str, pa.Array] = {
            "id": pa.array(ids, pa.string()),
            "frame": pa.array(np.concatenate([np.arange(n, dtype=np.int32) for n in counts])),
        }
        names = self.feature_names or [f"f{j}" for j in range(matrix.shape[1])]
        for j, name in enumerate(names):
            frame_cols[name] = pa.array(np.ascontiguousarray(matrix[:, j]))
        columns["n_frames"] = pa.array(counts, pa.int64())
        columns["frame_shift_s"] = pa.array([self.frame_shift_s] * len(records), pa.float64())
        columns["shard"] = pa.array([f"frames/shard-{seq:06d}.parquet"] * len(records), pa.string())
        columns["offset"] = pa.array(offsets, pa.int64())
        return pa.table(columns), pa.table(frame_cols)

    def _transcript_tables(self, records: list[Record]) -> tuple[pa.Table, dict[str, pa.Table]]:
        """The transcripts part plus its segments and words; times move from the decoded
        signal's start to the recording's (a manifest segment starts at its ``start``)."""
        columns = self._meta_columns(records)
        transcripts = [r.transcript for r in records]
        columns["text"] = pa.array([t.text for t in transcripts], pa.string())
        columns["language"] = pa.array([t.language for t in transcripts], pa.string())
        for name in self.feature_names or []:
            columns[name] = pa.array([t.scores.get(name) for t in transcripts], pa.float64())
        segments: dict[str, list[Any]] = {name: [] for name in SEGMENT_SCHEMA.names}
        words: dict[str, list[Any]] = {name: [] for name in WORD_SCHEMA.names}

        def shifted(value: float | None, offset: float) -> float | None:
            return None if value is None else float(value) + offset

        for record, transcript in zip(records, transcripts, strict=True):
            offset = float(record.meta.get("start") or 0.0)
            for s_index, segment in enumerate(transcript.segments):
                row = (
                    record.item.id,
                    s_index,
                    shifted(segment.start, offset),
                    shifted(segment.end, offset),
                    segment.text,
                    segment.speaker,
                    segment.avg_logprob,
                )
                for name, value in zip(SEGMENT_SCHEMA.names, row, strict=True):
                    segments[name].append(value)
                for w_index, word in enumerate(segment.words):
                    row = (
                        record.item.id,
                        s_index,
                        w_index,
                        word.word,
                        shifted(word.start, offset),
                        shifted(word.end, offset),
                        word.score,
                        word.speaker,
                    )
                    for name, value in zip(WORD_SCHEMA.names, row, strict=True):
                        words[name].append(value)
        tables = {
            "segments": pa.table(segments, schema=SEGMENT_SCHEMA),
            "words": pa.table(words, schema=WORD_SCHEMA),
        }
        return pa.table(columns), tables

    def output_files(self) -> list[Path]:
        """The finished output files."""
        return self.store.output_files()
