"""Streams results to Parquet as batches finish, so memory does not grow with the corpus.

Outputs in ``output_dir`` (written under a ``.partial`` name and renamed when complete):

- ``features.parquet``: one row per item — metadata, label columns, then the features
  (one column per named feature, else a fixed-size list column ``features``). For frame-level
  extractors the row holds ``n_frames``, ``frame_shift_s``, ``shard`` and ``offset`` instead.
- ``frames/shard-NNNNN.parquet`` + ``frames/index.parquet`` (frame-level extractors): one row
  per frame (``id``, ``frame``, features); the index maps id → shard, offset, frame count, shift.
- ``failures.parquet``: ``id``, ``path``, ``stage``, ``error_type``, ``message``.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from lightning.pytorch.callbacks import BasePredictionWriter

from audio_models.data.items import Item
from audio_models.data.loader import Record, fail
from audio_models.extractor import OutputKind
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
    ]
)
INDEX_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("shard", pa.string()),
        ("offset", pa.int64()),
        ("n_frames", pa.int64()),
        ("frame_shift_s", pa.float64()),
    ]
)
PARTIAL = ".partial"


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


class _RollingParquet:
    """One Parquet file written row group by row group under a ``.partial`` name.

    With ``schema=None`` the first table written decides it (feature dtypes come from the
    extractor's first output).
    """

    def __init__(self, path: Path, schema: pa.Schema | None = None) -> None:
        self.path = path
        self.schema = schema
        self._writer: pq.ParquetWriter | None = None
        self.rows = 0

    @property
    def partial(self) -> Path:
        return self.path.with_name(self.path.name + PARTIAL)

    def write(self, table: pa.Table) -> None:
        if self.schema is None:
            self.schema = table.schema
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.partial, self.schema)
        self._writer.write_table(table.cast(self.schema))
        self.rows += table.num_rows

    def close(self, *, complete: bool) -> None:
        if self._writer is None and self.schema is not None:
            self._writer = pq.ParquetWriter(self.partial, self.schema)  # an empty, typed file
        if self._writer is None:
            return
        self._writer.close()
        if complete:
            self.partial.replace(self.path)


class ParquetFeatureWriter(BasePredictionWriter):
    """Writes each finished batch; keeps counts for the run's metrics.

    Args:
        output_dir: where the files go.
        kind: vector or frames.
        feature_names: column names, or ``None`` for an unnamed vector.
        frame_shift_s: seconds between frames (frame-level extractors).
        items: the dataset's items (label types are inferred from all of them).
        label_columns: label column names in output order.
        row_group_rows: rows buffered per ``features.parquet`` row group (bounds memory and
            keeps Parquet metadata small for wide sets such as ComParE's 6,373 columns).
        frames_per_shard: frame rows per shard before a new shard starts.
    """

    def __init__(
        self,
        output_dir: str | Path,
        *,
        kind: OutputKind,
        feature_names: list[str] | None,
        frame_shift_s: float | None,
        items: list[Item],
        label_columns: list[str],
        extra_columns: list[str] | None = None,
        row_group_rows: int = 512,
        frames_per_shard: int = 1_000_000,
    ) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.kind = kind
        self.feature_names = feature_names
        self.frame_shift_s = frame_shift_s
        self.labels = label_schema(items, label_columns)
        self.extra_columns = list(extra_columns or [])
        self.row_group_rows = row_group_rows
        self.frames_per_shard = frames_per_shard
        taken = set(META_SCHEMA.names) | set(FRAME_META_SCHEMA.names) | {"features", "frame"}
        names = Counter([*self.labels.names, *self.extra_columns, *(feature_names or ())])
        clash = (taken & set(names)) | {n for n, count in names.items() if count > 1}
        if clash:
            raise UserError(
                f"column names used twice in the outputs: {sorted(clash)} (a label column "
                "named like an output column: rename it, or the extractor's output column)"
            )
        self.n_items = 0
        self.n_failed = 0
        self.audio_seconds = 0.0
        self._buffer: list[Record] = []
        self._features: _RollingParquet | None = None
        self._failures: _RollingParquet | None = None
        self._index: _RollingParquet | None = None
        self._shard: _RollingParquet | None = None
        self._shard_no = -1
        self._closed = False

    # -- Lightning hooks -------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._failures = _RollingParquet(self.output_dir / "failures.parquet", FAILURE_SCHEMA)

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

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.close(complete=True)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # Flush what was finished; the files keep their .partial names (incomplete run).
        self.close(complete=False)

    # -- writing ---------------------------------------------------------------------------
    def consume(self, records: list[Record]) -> None:
        """Route each record to the features or the failures file."""
        failures = []
        for record in records:
            self.n_items += 1
            if record.failure is None and record.features is not None:
                self._check_shape(record)
            if record.failure is not None or record.features is None:
                failures.append(record)
                continue
            self.audio_seconds += record.duration_s
            self._buffer.append(record)
        if failures:
            self._write_failures(failures)
        # Frames go out every batch (their shards are the bulk); vectors in row groups.
        frames_pending = self.kind == OutputKind.FRAMES and self._buffer
        if frames_pending or len(self._buffer) >= self.row_group_rows:
            self._flush()

    def _check_shape(self, record: Record) -> None:
        features = record.features
        assert features is not None
        ndim = 1 if self.kind == OutputKind.VECTOR else 2
        width = len(self.feature_names) if self.feature_names is not None else None
        if features.ndim != ndim or (width is not None and features.shape[-1] != width):
            fail(record, "write", ValueError(f"unexpected feature shape {features.shape}"))
        elif features.size and np.isnan(features).all():
            fail(record, "transform", ValueError("extractor returned only NaN"))

    def _write_failures(self, records: list[Record]) -> None:
        assert self._failures is not None
        self.n_failed += len(records)
        rows = {name: [] for name in FAILURE_SCHEMA.names}
        for record in records:
            failure = record.failure
            stage, error_type, message = (
                (failure.stage, failure.error_type, failure.message)
                if failure is not None
                else ("transform", "NoOutput", "extractor returned nothing")
            )
            warnings.warn(
                f"{record.item.id}: {stage} failed: {error_type}: {message}", stacklevel=2
            )
            for key, value in zip(
                FAILURE_SCHEMA.names,
                (record.item.id, record.item.path, stage, error_type, message),
                strict=True,
            ):
                rows[key].append(value)
        self._failures.write(pa.table(rows, schema=FAILURE_SCHEMA))

    def _meta_columns(self, records: list[Record]) -> dict[str, pa.Array]:
        columns: dict[str, pa.Array] = {
            "id": pa.array([r.item.id for r in records], pa.string()),
            "path": pa.array([r.item.path for r in records], pa.string()),
        }
        for field in META_SCHEMA:
            if field.name not in columns:
                columns[field.name] = pa.array([r.meta[field.name] for r in records], field.type)
        for field in self.labels:
            columns[field.name] = _labels_array(
                [r.item.labels.get(field.name) for r in records], field.type
            )
        for name in self.extra_columns:
            columns[name] = pa.array([r.extra.get(name) for r in records], pa.string())
        return columns

    def _flush(self) -> None:
        records, self._buffer = self._buffer, []
        if not records:
            return
        columns = self._meta_columns(records)
        if self.kind == OutputKind.VECTOR:
            matrix = np.stack([r.features for r in records])
            if self.feature_names is not None:
                for j, name in enumerate(self.feature_names):
                    columns[name] = pa.array(matrix[:, j])
            else:
                flat = pa.array(matrix.reshape(-1))
                columns["features"] = pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1])
        else:
            columns.update(self._write_frames(records))
        table = pa.table(columns)
        if self._features is None:
            self._features = _RollingParquet(self.output_dir / "features.parquet", table.schema)
        self._features.write(table)

    def _write_frames(self, records: list[Record]) -> dict[str, pa.Array]:
        if self._shard is None or self._shard.rows >= self.frames_per_shard:
            self._next_shard()
        assert self._shard is not None and self._index is not None
        offsets, counts = [], []
        offset = self._shard.rows
        for record in records:
            offsets.append(offset)
            counts.append(int(record.features.shape[0]))
            offset += counts[-1]
        matrix = np.concatenate([r.features for r in records], axis=0)
        ids = np.repeat(np.array([r.item.id for r in records], dtype=object), counts)
        frame_no = np.concatenate([np.arange(n, dtype=np.int32) for n in counts])
        frame_cols: dict[str, pa.Array] = {
            "id": pa.array(ids, pa.string()),
            "frame": pa.array(frame_no),
        }
        names = self.feature_names or [f"f{j}" for j in range(matrix.shape[1])]
        for j, name in enumerate(names):
            frame_cols[name] = pa.array(np.ascontiguousarray(matrix[:, j]))
        self._shard.write(pa.table(frame_cols))
        shard_name = f"frames/{self._shard.path.name}"
        index = {
            "id": pa.array([r.item.id for r in records], pa.string()),
            "shard": pa.array([shard_name] * len(records), pa.string()),
            "offset": pa.array(offsets, pa.int64()),
            "n_frames": pa.array(counts, pa.int64()),
            "frame_shift_s": pa.array([self.frame_shift_s] * len(records), pa.float64()),
        }
        self._index.write(pa.table(index, schema=INDEX_SCHEMA))
        return {name: index[name] for name in FRAME_META_SCHEMA.names}

    def _next_shard(self) -> None:
        frames_dir = self.output_dir / "frames"
        frames_dir.mkdir(exist_ok=True)
        if self._shard is not None:
            self._shard.close(complete=True)
        if self._index is None:
            self._index = _RollingParquet(frames_dir / "index.parquet", INDEX_SCHEMA)
        self._shard_no += 1
        self._shard = _RollingParquet(frames_dir / f"shard-{self._shard_no:05d}.parquet")

    def close(self, *, complete: bool) -> None:
        """Flush buffers and close every file; ``complete`` renames them to their final names."""
        if self._closed:
            return
        self._closed = True
        if complete:
            self._flush()
        for part in (self._features, self._shard, self._index, self._failures):
            if part is not None:
                part.close(complete=complete)

    def output_files(self) -> list[Path]:
        """The finished output files."""
        files = [self.output_dir / "features.parquet", self.output_dir / "failures.parquet"]
        frames = self.output_dir / "frames"
        if frames.is_dir():
            files += sorted(frames.glob("*.parquet"))
        return [f for f in files if f.exists()]
