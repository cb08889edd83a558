"""The Python door into the pipeline: ``audio_models.extract(...)`` returns a DataFrame.

It composes the same Hydra configuration as ``python -m runners.extract`` and runs the same
``extract()`` (loader workers, preflight, ``predict_step``, failure rows, resume), so the
numbers equal the CLI's. Results are indexed like audinterface's: ``(file, start, end)`` with
``start``/``end`` as :class:`pandas.Timedelta`.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import re
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from audio_models.data.items import Item, segment_id
from audio_models.utils.errors import UserError
from audio_models.utils.paths import conf_dir

__all__ = ["Run", "extract", "extractors", "load", "load_extractor"]

INDEX = ["file", "start", "end"]
_COMPOSE_LOCK = threading.Lock()
_MANIFEST_SUFFIXES = {".csv", ".tsv", ".tab", ".jsonl", ".ndjson"}
# Columns of features.parquet that describe how an item was read, not what it is; kept in
# ``Run.items`` and left out of the feature frame a user analyses.
_META_COLUMNS = (
    "id",
    "path",
    "start",
    "end",
    "duration_s",
    "sample_rate",
    "source_sample_rate",
    "n_channels",
    "channel_policy",
    "silence_ratio",
    "clipping_ratio",
    "item_key",
    "n_frames",
    "frame_shift_s",
    "shard",
    "offset",
)


def extractors() -> dict[str, str]:
    """The extractor names with a one-line description each.

    Example:
        >>> import audio_models as am
        >>> am.extractors()["egemaps"]
        "openSMILE eGeMAPSv02 functionals: 88 named columns, the file's own sample rate"
    """
    from audio_models.config import option_descriptions

    return option_descriptions("extractor")


# -- composing ----------------------------------------------------------------------------


def _value(value: Any) -> str:
    """A Python value in Hydra's override grammar (strings always quoted)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | np.integer | np.floating):
        return repr(value.item() if isinstance(value, np.generic) else value)
    if isinstance(value, str | os.PathLike):
        # Hydra's quoted strings: backslashes are literal except before a quote, an
        # interpolation or the closing quote (there they are doubled); quotes and ``${`` are
        # escaped, so a path is never interpolated.
        text = re.sub(r"(\\+)(?='|\$\{|$)", lambda m: m.group(1) * 2, str(value))
        text = text.replace("'", "\\'").replace("${", "\\${")
        return f"'{text}'"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, Iterable):
        return "[" + ",".join(_value(v) for v in value) + "]"
    raise UserError(f"cannot pass a {type(value).__name__} as a config value: {value!r}")


def compose_config(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with ``overrides`` as the CLI would.

    Works inside a running Hydra application too (its global state is restored afterwards).

    Raises:
        UserError: a misspelt option or key, or a bad value (Hydra's message, one line).
    """
    import audio_models.config  # noqa: F401  (registers the structured configs)

    with _COMPOSE_LOCK:  # Hydra's global state: one composition at a time
        return _compose(config_name, overrides)


def _compose(config_name: str, overrides: Sequence[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from hydra.initialize import get_gh_backup, restore_gh_from_backup
    from omegaconf.errors import OmegaConfBaseException

    backup = get_gh_backup()
    try:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise UserError(" ".join(str(exc).split())) from None
    finally:
        restore_gh_from_backup(backup)


def _option_overrides(group: str, options: dict[str, Any]) -> list[str]:
    return [f"{group}.{key}={_value(value)}" for key, value in options.items()]


# -- sources ------------------------------------------------------------------------------


def _seconds(value: Any) -> float | None:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    if isinstance(value, pd.Timedelta | np.timedelta64):
        return pd.Timedelta(value).total_seconds()
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"start/end must be seconds or a pandas.Timedelta, got {value!r}") from None


def _as_timedelta(value: Any) -> pd.Timedelta:
    if isinstance(value, pd.Timedelta | np.timedelta64):
        return pd.Timedelta(value)  # as given, to the nanosecond: results join the caller's
    seconds = _seconds(value)
    return pd.NaT if seconds is None else pd.to_timedelta(seconds, unit="s")


@dataclass
class _Source:
    """What a caller passed, as Hydra overrides (paths) or in-memory items (lists, frames)."""

    overrides: list[str] = field(default_factory=list)
    items: list[Item] | None = None
    # item id → the (file, start, end) the caller wrote, so that results join their index.
    index: dict[str, tuple[Any, Any, Any]] = field(default_factory=dict)
    # label column → the caller's dtype (categoricals, nullable integers come back as such)
    dtypes: dict[str, Any] = field(default_factory=dict)


def _items_source(rows: Iterable[tuple[Any, Any, Any, dict[str, Any]]]) -> _Source:
    items, index = [], {}
    for file, start, end, labels in rows:
        path = os.fspath(file)
        begin, stop = _seconds(start), _seconds(end)
        item_id = path if begin is None and stop is None else segment_id(path, begin, stop)
        items.append(
            Item(
                id=item_id,
                path=os.path.abspath(os.path.expanduser(path)),
                start=begin,
                end=stop,
                labels=labels,
            )
        )
        index[item_id] = (file, start, end)
    return _Source(items=items, index=index)


def _source(source: Any) -> _Source:
    import sys

    from audio_models.data.datasets import AudioDataset

    if isinstance(source, AudioDataset):  # a dataset object with its options set
        return _Source(items=source.items)

    # A Database object means audformat is imported already: no import for other sources.
    audformat = sys.modules.get("audformat")
    if audformat is not None and isinstance(source, audformat.Database):
        from audio_models.data.corpora import AudformatDataset

        dataset = AudformatDataset.from_database(source)
        # Results come back on the database's own (file, start, end), so they join its tables.
        return _Source(items=dataset.items, index=dataset.index, dtypes=dataset.dtypes)
    lhotse = sys.modules.get("lhotse")
    if lhotse is not None and isinstance(source, lhotse.CutSet):
        from audio_models.data.corpora import LhotseDataset

        return _Source(items=LhotseDataset.from_cuts(source).items)
    hf = sys.modules.get("datasets")  # likewise a Hugging Face Dataset means datasets is imported
    if hf is not None and isinstance(
        source, (getattr(hf, "Dataset", ()), getattr(hf, "DatasetDict", ()))
    ):
        from audio_models.data.hf import HuggingFaceDataset

        return _Source(items=HuggingFaceDataset.from_dataset(source).items)
    if isinstance(source, pd.DataFrame | pd.Series | pd.Index):
        frame = source.to_frame() if isinstance(source, pd.Series) else source
        if isinstance(frame, pd.Index):
            frame = pd.DataFrame(index=frame)
        names = list(frame.index.names)
        if names[0] != "file" and "file" in frame.columns:
            frame = frame.set_index(["file", *[c for c in ("start", "end") if c in frame]])
            names = list(frame.index.names)
        if names[0] != "file":
            raise UserError(
                "a DataFrame source needs a 'file' index level (audformat's filewise or "
                f"(file, start, end) segmented index) or a 'file' column; got index {names}"
            )
        extra = [n for n in names if n not in INDEX]
        if extra:
            raise UserError(f"unexpected index levels {extra}: use file, start, end")
        labels = frame.reset_index(drop=True).to_dict(orient="records")
        keys = frame.index.to_frame(index=False)
        starts = keys["start"] if "start" in keys else [None] * len(keys)
        ends = keys["end"] if "end" in keys else [None] * len(keys)
        source_ = _items_source(
            (f, s, e, {k: _plain(v) for k, v in lab.items()})
            for f, s, e, lab in zip(keys["file"], starts, ends, labels, strict=True)
        )
        source_.dtypes = dict(frame.dtypes.items())
        return source_
    if isinstance(source, str | os.PathLike):
        path = Path(source).expanduser()
        if path.is_dir():
            return _Source(overrides=["dataset=folder", f"dataset.root={_value(path.resolve())}"])
        if not path.exists():
            raise UserError(f"{str(path)!r} does not exist")
        if path.suffix.lower() in _MANIFEST_SUFFIXES:
            return _Source(overrides=["dataset=manifest", f"dataset.path={_value(path.resolve())}"])
        return _items_source([(source, None, None, {})])
    if isinstance(source, Iterable):
        files = list(source)
        if not files:
            raise UserError("no files to process")
        return _items_source((f, None, None, {}) for f in files)
    raise UserError(
        "source must be a folder, a manifest (.csv/.tsv/.jsonl), a list of files, a DataFrame "
        "with a file index, an audformat.Database, a lhotse CutSet or a Hugging Face Dataset; "
        f"got {type(source).__name__}"
    )


def _plain(value: Any) -> Any:
    """Labels as Python values: numpy scalars unwrapped, missing values as ``None``."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and np.isnan(value):
        return None
    return None if value is pd.NA or value is pd.NaT else value


# -- running ------------------------------------------------------------------------------


@contextmanager
def _preserved_globals() -> Iterator[None]:
    """Put back what a run changes process-wide: the random generators Lightning seeds, its
    seed variables, the garbage collector's frozen set and torch's thread count."""
    import torch

    py_state, np_state = random.getstate(), np.random.get_state()
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    env = {k: os.environ.get(k) for k in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")}
    frozen, threads = gc.get_freeze_count(), torch.get_num_threads()
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if not frozen:  # the runner unfreezes too; this covers a run that failed before it
            gc.unfreeze()
        torch.set_num_threads(threads)


def extract(
    source: Any,
    extractor: str = "egemaps",
    *,
    device: str = "auto",
    output_dir: str | os.PathLike[str] | None = None,
    resume: bool = True,
    num_workers: int | None = None,
    batch_size: int | None = None,
    tracking: str | bool = False,
    progress: bool = False,
    overrides: Sequence[str] = (),
    **options: Any,
) -> pd.DataFrame:
    """Extract features of ``source`` with ``extractor``, the way ``runners.extract`` does.

    Args:
        source: a folder (every audio file under it), a manifest (``.csv``/``.tsv``/
            ``.jsonl``, as ``dataset=manifest``), a list of audio files, or a DataFrame whose
            index is audformat's filewise (``file``) or segmented (``file``, ``start``,
            ``end``) index; its columns are carried along as labels, unchanged; or an
            ``audformat.Database`` (its segmented tables' index, else its filewise one, and
            their columns as labels, as ``dataset=audformat`` reads them; results come back
            on the database's ``(file, start, end)``); or a Hugging Face ``datasets.Dataset``
            (or a one-split ``DatasetDict``) with an ``audio`` column, read as
            ``dataset=huggingface`` reads a split (embedded audio decoded from its bytes; ids
            its audio paths, else row numbers counted from its first row); or any dataset
            object of :mod:`audio_models.data` with its options set
            (``HuggingFaceDataset.from_dataset(ds, split="test[:100]", id_column="uid")``).
        extractor: one of :func:`extractors`.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda``.
        output_dir: keep the outputs there (Parquet files as the CLI writes them; a rerun
            resumes). ``None``: a temporary directory, removed before returning.
        resume: skip items a previous run in ``output_dir`` committed.
        num_workers: loader processes (``None``: one per CPU core; ``0``: this process).
        batch_size: items per batch.
        tracking: ``False``/``"off"`` (default), ``True``/``"mlflow"`` (the CLI's store in
            the current directory) or another ``conf/tracking`` option.
        progress: show the progress bar.
        overrides: further Hydra overrides, as on the command line
            (``["loader.channel_policy=first", "preflight.min_duration_s=0.5"]``).
        **options: the extractor's config keys (``layers=[6, 12]``, ``pooling="mean_std"``,
            ``model="/models/w2v2-base"``).

    Returns:
        Features indexed by ``(file, start, end)`` (``start``/``end`` as ``pd.Timedelta``:
        the segment as decoded, or as given in a DataFrame source), label columns first, then
        text columns (``ser``'s ``emotion``), then the features named as in
        ``features.parquet``. Frame-level extractors: one row per frame, with a ``frame``
        index level. Transcribers: the transcripts. Each side table of the run is in
        ``attrs`` under its name: a transcriber's ``segments`` and ``words``, the VAD's
        ``segments``, ``crepe``'s ``pitch_summary`` (one row per item beside its frames).
        ``attrs["failures"]`` holds the failure rows (a warning says how
        many), ``attrs["metrics"]`` the run's metrics, ``attrs["output_dir"]`` where the files
        are (``None`` when they were temporary). Tables in ``attrs`` are lists of records
        (``pd.DataFrame(df.attrs["failures"])``): pandas compares ``attrs`` when results are
        concatenated, which a DataFrame cannot answer.

    Raises:
        UserError: a configuration mistake (unknown extractor or key, bad value, missing
            path), before any model loads.

    Example:
        >>> import audio_models as am
        >>> df = am.extract(files, "egemaps", num_workers=0)  # doctest: +SKIP
        >>> df.shape  # doctest: +SKIP
        (2, 88)
    """
    from runners.extract import extract as run_extract

    src = _source(source)
    if isinstance(tracking, bool):
        tracking = "mlflow" if tracking else "off"
    keep = output_dir is not None
    out = Path(output_dir) if keep else Path(tempfile.mkdtemp(prefix="audio_models-"))
    given = [
        f"extractor={extractor}",
        *src.overrides,
        f"device={device}",
        f"tracking={tracking}",
        f"progress_bar={_value(progress)}",
        f"resume={_value(resume)}",
        *([f"loader.num_workers={num_workers}"] if num_workers is not None else []),
        *([f"loader.batch_size={batch_size}"] if batch_size is not None else []),
        *_option_overrides("extractor", options),
        *overrides,
    ]
    try:
        cfg = compose_config("extract", [*given, f"output_dir={_value(out.resolve())}"])
        dataset = None
        if src.items is not None:
            from audio_models.data.datasets import ItemsDataset

            dataset = ItemsDataset(items=src.items)
            # The record of the run says what it read, not the composed default corpus.
            cfg.dataset = OmegaConf.create({"name": dataset.name, "n_items": len(src.items)})
        with _preserved_globals():
            result = run_extract(cfg, dataset=dataset, overrides=given)
        run = load(out)
        windowed = cfg.windows.size_s is not None or bool(cfg.segments_from)

        def asked(ids: pd.Series) -> pd.Series:
            # With windows or speech segments (segments_from), rows are
            # ``<item id>@<start>-<end>`` of the items asked for.
            mask = ids.isin(src.index)
            if windowed:
                mask |= ids.str.rsplit("@", n=1).str[0].isin(src.index)
            return mask

        if src.index:  # an output_dir may also hold items of earlier calls: only these
            run.given = src.index
            run.items = run.items[asked(run.items["id"])].reset_index(drop=True)
            if len(run.failures):
                run.failures = run.failures[asked(run.failures["id"])]
        frame = run.features if not run.transcribed else run.transcripts
        for column, dtype in src.dtypes.items():
            if column in frame.columns:
                with contextlib.suppress(TypeError, ValueError):
                    frame[column] = frame[column].astype(dtype)
        # Plain records, not DataFrames: pandas compares attrs when concatenating results,
        # which DataFrames cannot answer.
        frame.attrs.update(
            failures=run.failures.to_dict(orient="records"),
            metrics=dict(result.metrics),
            output_dir=out if keep else None,
        )
        # Side tables (a transcriber's segments and words, the VAD's segments, CREPE's
        # pitch_summary) as records, each under its name.
        for name in run.tables:
            table = run.table(name)
            if src.index:
                table = table[asked(table["id"])]
            frame.attrs[name] = table.to_dict(orient="records")
        if len(run.failures):
            warnings.warn(
                f"{len(run.failures)} of {len(run.failures) + len(run.items)} items failed "
                "(pd.DataFrame(result.attrs['failures']) lists them)",
                stacklevel=2,
            )
        return frame
    finally:
        if not keep:
            shutil.rmtree(out, ignore_errors=True)


# -- reading a run ------------------------------------------------------------------------


def _timed_index(
    table: pd.DataFrame, given: dict[str, tuple[Any, Any, Any]] | None = None
) -> pd.MultiIndex:
    """``(file, start, end)`` of each row: the absolute path and the decoded segment, or
    what the caller wrote for the item (``given``: relative paths, NaT ends kept)."""
    files = table["path"].tolist()
    starts = pd.to_timedelta(table["start"].to_numpy(), unit="s").tolist()
    ends = pd.to_timedelta(table["end"].to_numpy(), unit="s").tolist()
    if given:
        for row, item_id in enumerate(table["id"]):
            if item_id not in given:
                # A window (windows.size_s) of a caller's item, ``<item id>@<start>-<end>``:
                # the caller's file, the window's own times.
                parent = given.get(item_id.rsplit("@", 1)[0])
                if parent is not None:
                    files[row] = parent[0]
                continue
            file, start, end = given[item_id]
            files[row] = file
            if start is not None:
                starts[row] = _as_timedelta(start)
            if end is not None:
                ends[row] = _as_timedelta(end)
    return pd.MultiIndex.from_arrays([files, starts, ends], names=INDEX)


def _feature_columns(path: Path) -> list[str] | None:
    import json

    from audio_models.pipeline.store import FEATURES_KEY

    recorded = (pq.read_schema(path).metadata or {}).get(FEATURES_KEY)
    return json.loads(recorded) if recorded is not None else None


@dataclass
class Run:
    """A finished run's tables (see :func:`load`).

    Attributes:
        output_dir: the run's directory.
        items: the main table as stored (``features.parquet`` or ``transcripts.parquet``),
            one row per item with every metadata column.
        failures: ``failures.parquet``.
        config: the resolved configuration (``config.yaml``), secrets masked.
    """

    output_dir: Path
    items: pd.DataFrame
    failures: pd.DataFrame
    config: dict[str, Any]
    transcribed: bool
    #: item id → the ``(file, start, end)`` a caller of :func:`extract` wrote.
    given: dict[str, tuple[Any, Any, Any]] = field(default_factory=dict)

    @property
    def frame_level(self) -> bool:
        return "shard" in self.items.columns

    @property
    def labels(self) -> list[str]:
        """Label and text columns (everything that is neither metadata nor a feature)."""
        names = set(self._features()) | set(_META_COLUMNS)
        if self.transcribed:
            names |= {"text", "language"}
        return [c for c in self.items.columns if c not in names]

    def _features(self) -> list[str]:
        if self.transcribed:
            return []
        path = self.output_dir / "features.parquet"
        if self.frame_level:
            shards = sorted((self.output_dir / "frames").glob("shard-*.parquet"))
            recorded = _feature_columns(shards[0]) if shards else None
            return recorded or []
        if not path.exists():
            return []  # every item failed
        recorded = _feature_columns(path)
        if recorded is None:
            raise UserError(f"{path} does not name its feature columns (an older version)")
        return recorded

    @property
    def features(self) -> pd.DataFrame:
        """Labels and features indexed by ``(file, start, end)``; frame-level runs: one row
        per frame with a fourth index level ``frame``."""
        if self.transcribed:
            raise UserError(f"{self.output_dir} holds transcripts: use .transcripts")
        table = self.items
        if not self.frame_level:
            columns = self.labels + self._features()
            frame = table[columns].copy()
            frame.index = _timed_index(table, self.given)
            return frame
        frames = self.frames()
        meta = table.set_index("id")
        index = _timed_index(table, self.given)
        where = dict(zip(table["id"], range(len(table)), strict=True))
        rows = frames["id"].map(where).to_numpy()
        full = pd.MultiIndex.from_arrays(
            [
                index.get_level_values(0)[rows],
                index.get_level_values(1)[rows],
                index.get_level_values(2)[rows],
                frames["frame"].to_numpy(),
            ],
            names=[*INDEX, "frame"],
        )
        labels = meta.loc[frames["id"], self.labels].reset_index(drop=True)
        values = frames.drop(columns=["id", "frame"]).reset_index(drop=True)
        out = pd.concat([labels, values], axis=1)
        out.index = full
        return out

    def frames(self, item_id: str | None = None) -> pd.DataFrame:
        """Frame rows (``id``, ``frame``, features) of one item, or of every item."""
        if not self.frame_level:
            raise UserError(f"{self.output_dir} holds one vector per item, not frames")
        if item_id is None:
            # Each item's rows by its index entry (shard, offset, n_frames): a shard can still
            # hold the frames of an earlier version of an item that was redone.
            parts, cache = [], {}
            for _, row in self.items.iterrows():
                shard = row["shard"]
                if shard not in cache:
                    cache = {shard: pd.read_parquet(self.output_dir / shard)}
                start = int(row["offset"])
                parts.append(cache[shard].iloc[start : start + int(row["n_frames"])])
            if not parts:
                return pd.DataFrame(columns=["id", "frame"])
            return pd.concat(parts, ignore_index=True)
        match = self.items[self.items["id"] == item_id]
        if match.empty:
            raise KeyError(item_id)
        row = match.iloc[0]
        shard = pd.read_parquet(self.output_dir / row["shard"])
        return shard.iloc[int(row["offset"]) : int(row["offset"]) + int(row["n_frames"])]

    @property
    def transcripts(self) -> pd.DataFrame:
        """Transcription runs: one row per item (``text``, ``language``, scores, labels)."""
        if not self.transcribed:
            raise UserError(f"{self.output_dir} holds features: use .features")
        frame = self.items.drop(columns=[c for c in _META_COLUMNS if c in self.items])
        frame.index = _timed_index(self.items, self.given)
        return frame

    @property
    def tables(self) -> list[str]:
        """Names of the run's side tables, ``<name>.parquet`` beside the main table (a
        transcriber's ``segments`` and ``words``, the VAD's ``segments``, CREPE's
        ``pitch_summary``): rows keyed by ``id``, any number per item."""
        main = {"features.parquet", "transcripts.parquet", "failures.parquet"}
        return sorted(
            p.stem for p in self.output_dir.glob("*.parquet") if p.is_file() and p.name not in main
        )

    def table(self, name: str) -> pd.DataFrame:
        """The side table ``<name>.parquet`` (see :attr:`tables`)."""
        path = self.output_dir / f"{name}.parquet"
        if name not in self.tables:
            raise UserError(f"{self.output_dir} has no {name}.parquet (its tables: {self.tables})")
        return pd.read_parquet(path)

    @property
    def segments(self) -> pd.DataFrame:
        return self.table("segments")

    @property
    def words(self) -> pd.DataFrame:
        return self.table("words")


def load(output_dir: str | os.PathLike[str]) -> Run:
    """Read a finished run's outputs.

    Example:
        >>> run = am.load("outputs/2026-12-03/10-32-15")  # doctest: +SKIP
        >>> run.features.head()  # doctest: +SKIP

    Raises:
        UserError: ``output_dir`` holds no finished run (an interrupted one: rerun it).
    """
    folder = Path(output_dir)
    features, transcripts = folder / "features.parquet", folder / "transcripts.parquet"
    # Transcription runs write transcripts.parquet even when every item failed (runs from
    # before that wrote only segments and words; a VAD run has segments but features).
    transcribed = transcripts.exists() or (
        not features.exists() and (folder / "words.parquet").exists()
    )
    main = transcripts if transcribed else features
    failures_path = folder / "failures.parquet"
    if (folder / ".progress").is_dir() or not failures_path.exists():
        raise UserError(
            f"{folder} holds no finished run (an interrupted one finishes when you rerun it)"
        )
    failures = pd.read_parquet(failures_path)
    # A run whose every item failed has its failures but no main table.
    items = (
        pd.read_parquet(main)
        if main.exists()
        else pd.DataFrame({c: pd.Series(dtype=float) for c in ("start", "end")}).assign(
            id=pd.Series(dtype=str), path=pd.Series(dtype=str)
        )
    )
    config_path = folder / "config.yaml"
    config: dict[str, Any] = {}
    if config_path.exists():
        loaded = OmegaConf.to_container(OmegaConf.load(config_path))
        config = loaded if isinstance(loaded, dict) else {}
    return Run(
        output_dir=folder,
        items=items,
        failures=failures,
        config=config,
        transcribed=transcribed,
    )


def load_extractor(
    name: str, *, overrides: Sequence[str] = (), device: str = "cpu", **options: Any
) -> Any:
    """One extractor, configured as ``extractor=<name>`` with ``options``, ready for
    ``process_signal(signal, sample_rate)`` and ``process_file(path, start=, end=)``.

    Example:
        >>> ex = am.load_extractor("egemaps")
        >>> ex.process_signal(np.zeros(16000, np.float32), 16000).shape
        (88,)
    """
    from audio_models.config import build

    cfg = compose_config(
        "extract",
        [
            f"extractor={name}",
            "tracking=off",
            "output_dir=unused",
            *_option_overrides("extractor", options),
            *overrides,
        ],
    )
    extractor = build(cfg, "extractor")
    extractor.load()  # weights read here, so a missing model is reported by this call
    module = extractor.torch_module()
    if module is not None:
        module.eval().to(device)
    return extractor
