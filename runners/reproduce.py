"""``python -m runners.reproduce run_id=<id>``: does a logged run still come out the same here?

Reads the run from MLflow (SQLite store or tracking server, a sweep's child run too): its
resolved ``config.yaml`` and ``overrides.yaml``, its tags (package versions, upstream commits,
model revision and weights hash, dataset fingerprint) and its stored outputs (the artifacts,
or for files too large to log, the recorded path when its SHA-256 still matches). Then:

1. checks this environment against the tags and prints every difference;
2. re-runs a seeded sample of the run's items (``n_items``, default 20, or ``all``) through
   ``runners.extract.extract`` (the same loader, preflight and writer) into
   ``<output_dir>/rerun``, tracking off;
3. compares the re-run with the stored outputs per feature group (max absolute and relative
   difference), item status (written or failed, at which stage) and, for transcribers, texts.

Exit 0 when everything is equal (within ``rtol``/``atol``), 1 with the report otherwise, 2 for
a configuration error (no such run, nothing stored to compare with).

Examples:
    python -m runners.reproduce run_id=3f2a...                      # ./mlflow.db
    python -m runners.reproduce run_id=3f2a... n_items=all
    python -m runners.reproduce run_id=3f2a... tracking=server tracking.uri=http://host:5000
    python -m runners.reproduce run_id=3f2a... accelerator=cpu rtol=1e-2  # GPU run, CPU box
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from audio_models.config import build, check_targets, run_cli, task
from audio_models.pipeline.store import META_SCHEMA
from audio_models.tracking import MlflowTracker, redact
from audio_models.utils.errors import UserError
from audio_models.utils.paths import conf_dir

if TYPE_CHECKING:
    from audio_models.api import Run
    from audio_models.data.items import Item

log = logging.getLogger("runners.reproduce")

# Run tags that say how the numbers were computed, compared after the re-run (the re-run's
# own tags say what this environment does).
_RUNTIME_TAGS = ("accelerator", "resampler", "cpu_linear_backend")
# Output columns that describe how an item was read; compared as their own group so that a
# changed decode (duration, rate) is told apart from changed features.
_META_NUMERIC = ("duration_s", "sample_rate", "n_frames")
_READ_COLUMNS = frozenset(META_SCHEMA.names) - {"id"}  # the store's per-item read record
_TRAILING_INDEX = re.compile(r"^(?P<group>.+?)_\d+$")


@dataclass(frozen=True)
class Difference:
    """One thing that is not as the run recorded it."""

    kind: str  # package | upstream | provenance | dataset | runtime | item | rerun
    name: str
    recorded: str
    now: str

    def line(self) -> str:
        return f"{self.kind} {self.name}: run {self.recorded!s} | now {self.now!s}"


@dataclass(frozen=True)
class GroupResult:
    """How far the re-run's values of one feature group are from the stored ones."""

    group: str
    n_items: int
    n_values: int
    max_abs: float
    max_rel: float
    equal: bool  # every value within atol + rtol * |stored|


@dataclass
class Report:
    """What :func:`reproduce` found; :meth:`render` is what the command prints."""

    run_id: str
    title: str
    overrides: list[str]
    sampled: list[str] = field(default_factory=list)
    n_run_items: int = 0
    environment: list[Difference] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)  # what the environment check covered
    notes: list[str] = field(default_factory=list)
    groups: list[GroupResult] = field(default_factory=list)
    items: list[Difference] = field(default_factory=list)
    rerun_dir: Path | None = None
    rerun_error: str | None = None
    rtol: float = 0.0
    atol: float = 0.0

    @property
    def differences(self) -> list[Difference]:
        found = [*self.environment, *self.items]
        if self.rerun_error is not None:
            found.append(Difference("rerun", "extract", "finished", self.rerun_error))
        return found

    @property
    def equal(self) -> bool:
        return not self.differences and all(g.equal for g in self.groups)

    @property
    def exit_code(self) -> int:
        return 0 if self.equal else 1

    def render(self) -> str:
        lines = [f"run {self.run_id}: {self.title}"]
        lines.append(f"  overrides: {' '.join(self.overrides) if self.overrides else '(none)'}")
        lines.append("environment:")
        if self.checked:
            lines.append(f"  checked: {', '.join(self.checked)}")
        lines += [f"  DIFF {d.line()}" for d in self.environment] or ["  no differences"]
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(
            f"outputs: {len(self.sampled)} of {self.n_run_items} items re-run into "
            f"{self.rerun_dir} (rtol={self.rtol:g}, atol={self.atol:g})"
        )
        if self.rerun_error is not None:
            lines.append(f"  DIFF the re-run failed: {self.rerun_error}")
        if self.groups:
            width = max(len("group"), *(len(g.group) for g in self.groups))
            lines.append(
                f"  {'group':<{width}}  {'items':>5}  {'values':>9}  {'max abs':>10}  "
                f"{'max rel':>10}  result"
            )
            for g in self.groups:
                lines.append(
                    f"  {g.group:<{width}}  {g.n_items:>5}  {g.n_values:>9}  "
                    f"{g.max_abs:>10.3g}  {g.max_rel:>10.3g}  {'equal' if g.equal else 'DIFF'}"
                )
        lines += [f"  DIFF {d.line()}" for d in self.items[:50]]
        if len(self.items) > 50:
            lines.append(f"  ... and {len(self.items) - 50} more item differences")
        n_diff = len(self.differences) + sum(not g.equal for g in self.groups)
        lines.append(
            "result: reproduced"
            if self.equal
            else f"result: NOT reproduced ({n_diff} difference{'s' if n_diff != 1 else ''})"
        )
        return "\n".join(lines)


# -- reading the run ----------------------------------------------------------------------


def _download(client: Any, run_id: str, name: str, target: Path) -> Path | None:
    """``name`` from the run's artifacts into ``target`` (``None`` when it is not there)."""
    target.mkdir(parents=True, exist_ok=True)
    try:
        return Path(client.download_artifacts(run_id, name, str(target)))
    except Exception:
        return None


def _stored_text(client: Any, run: Any, name: str, scratch: Path) -> str | None:
    """A text file the run logged, else the one in its recorded ``output_dir``."""
    path = _download(client, run.info.run_id, name, scratch / "record")
    if path is None or not path.is_file():
        path = Path(run.data.params.get("output_dir", "")) / name
    return path.read_text() if path.is_file() else None


def _run_config(client: Any, run: Any, scratch: Path, trusted: Sequence[str] = ()) -> DictConfig:
    text = _stored_text(client, run, "config.yaml", scratch)
    if text is None:
        raise UserError(
            f"run {run.info.run_id} has no config.yaml among its artifacts nor in its output_dir "
            f"({run.data.params.get('output_dir')}): it is not a finished extraction run"
        )
    loaded = OmegaConf.create(text)
    if not isinstance(loaded, DictConfig) or "extractor" not in loaded:
        raise UserError(f"run {run.info.run_id}: its config.yaml is not an extraction config")
    # The runner stores the config resolved: an interpolation in it is not ours, and
    # oc.create/oc.decode would turn a string into a mapping with a _target_ after any check.
    if "${" in text:
        raise UserError(
            f"run {run.info.run_id}'s config.yaml holds an interpolation (${{...}}); the runner "
            "stores configs resolved, so this one was edited: refusing to build from it"
        )
    # Parse before trusting: the file comes from an artifact store; only the project's own
    # classes may be built from it (a _target_ is any dotted callable to Hydra).
    check_targets(loaded, f"run {run.info.run_id}'s config.yaml", trusted)
    return loaded


def _run_overrides(client: Any, run: Any, scratch: Path) -> list[str]:
    text = _stored_text(client, run, "overrides.yaml", scratch)
    loaded = OmegaConf.to_container(OmegaConf.create(text)) if text else []
    return [str(o) for o in loaded] if isinstance(loaded, list) else []


def _reference_dir(client: Any, run: Any, scratch: Path) -> Path:
    """A folder with the run's outputs as it logged them (``outputs.json``): logged files are
    downloaded; larger ones are linked from their recorded path when the SHA-256 matches."""
    from audio_models.utils.provenance import sha256_file

    run_id = run.info.run_id
    target = scratch / "reference"
    listing = _download(client, run_id, "outputs.json", scratch / "record")
    if listing is None:
        local = Path(run.data.params.get("output_dir", ""))
        if (local / "failures.parquet").is_file():
            log.warning("run %s lists no outputs.json: comparing with %s", run_id, local)
            return local
        raise UserError(f"run {run_id} logged no outputs (no outputs.json) and {local} is gone")
    for entry in json.loads(listing.read_text())["outputs"]:
        relative = str(entry["relative"])
        parts = Path(relative).parts
        if Path(relative).is_absolute() or ".." in parts or not parts:
            # outputs.json is data from the artifact store: no path outside the folder.
            raise UserError(f"run {run_id}: outputs.json names {relative!r}, outside the run")
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        if entry.get("logged"):
            got = _download(client, run_id, relative, destination.parent)
            if got is None:
                raise UserError(f"run {run_id}: the artifact {relative} cannot be downloaded")
            continue
        source = Path(entry["path"])
        if not source.is_file() or sha256_file(source) != entry.get("sha256"):
            raise UserError(
                f"run {run_id}: {relative} was too large to log and {source} no longer holds it "
                "(missing or another SHA-256); nothing to compare with"
            )
        destination.symlink_to(source)
    return target


# -- the environment ----------------------------------------------------------------------


def _check_packages(tags: dict[str, str]) -> tuple[list[Difference], int]:
    from audio_models.utils.provenance import package_versions

    recorded = {k.removeprefix("version."): v for k, v in tags.items() if k.startswith("version.")}
    now = package_versions(recorded)
    found = [
        Difference("package", name, version, now[name])
        for name, version in sorted(recorded.items())
        if now[name] != version
    ]
    return found, len(recorded)


def _check_upstreams(
    client: Any, run: Any, tags: dict[str, str], scratch: Path
) -> tuple[list[Difference], int]:
    """The upstream checkouts the run read: commit, and local edits (the run logged its
    uncommitted diff; its hash is compared with the checkout's diff now)."""
    from audio_models.utils.repos import RepoError, get_upstream, inspect

    keys = sorted({k.split(".")[1] for k in tags if k.startswith("repo.") and k.count(".") >= 2})
    found: list[Difference] = []
    for key in keys:
        recorded = tags.get(f"repo.{key}.commit", "unknown")
        try:
            state = inspect(get_upstream(key))
        except RepoError as exc:
            found.append(Difference("upstream", key, recorded, f"unusable: {exc}"))
            continue
        if state.commit != recorded:
            where = f" ({state.path})" if state.path is not None else ""
            found.append(
                Difference("upstream", key, recorded, f"{state.commit or 'missing'}{where}")
            )
            continue
        was_dirty = tags.get(f"repo.{key}.dirty") == "true"
        if was_dirty != state.dirty:
            found.append(
                Difference(
                    "upstream",
                    f"{key} local edits",
                    "yes" if was_dirty else "none",
                    "yes" if state.dirty else "none",
                )
            )
        elif was_dirty:
            text = _stored_text(client, run, f"upstream_diffs/{key}.diff", scratch)
            logged = hashlib.sha256(text.encode()).hexdigest() if text is not None else None
            if logged != state.diff_sha256:
                found.append(
                    Difference(
                        "upstream",
                        f"{key} local edits",
                        f"diff sha256 {logged}",
                        f"diff sha256 {state.diff_sha256}",
                    )
                )
    return found, len(keys)


def _list_dataset(run_cfg: DictConfig, tags: dict[str, str], report: Report) -> list[Item] | None:
    """The run's dataset listed again, its fingerprint checked; ``None`` when it cannot be
    (items given in Python, or the listing fails: that is a difference)."""
    if "_target_" not in run_cfg.dataset:
        report.notes.append(
            "the run's items were given in Python (no dataset config): its fingerprint cannot "
            "be checked; the sample is read from the paths its outputs record"
        )
        return None
    recorded = tags.get("dataset_fingerprint", "unknown")
    try:
        dataset = build(run_cfg, "dataset")
        items = dataset.items
        fingerprint = dataset.fingerprint()
    except UserError as exc:
        report.environment.append(Difference("dataset", "listing", recorded, f"fails: {exc}"))
        return None
    report.checked.append("dataset fingerprint")
    if fingerprint != recorded:
        report.environment.append(
            Difference(
                "dataset",
                "fingerprint (paths, sizes, mtimes)",
                recorded,
                f"{fingerprint} (the files or their list changed)",
            )
        )
    return items


# -- the sample -------------------------------------------------------------------------


def _windowed(run_cfg: DictConfig, items: list[Item] | None) -> list[Item] | None:
    """The run's windows of the listed items (``windows.size_s``): the units its outputs hold.
    The re-run gets these windows as its items, with windowing off (it would cut them again)."""
    if items is None:
        return items
    from audio_models.data.windows import segment_items, window_items

    if run_cfg.get("segments_from"):  # speech segments first, as the runner cuts them
        items = segment_items(items, run_cfg.segments_from)
    windows = run_cfg.get("windows")
    if windows is None or windows.get("size_s") is None:
        return items
    return window_items(items, windows.size_s, windows.get("hop_s"), windows.get("last", "partial"))


def _sample_ids(reference: Run, n_items: Any, seed: int) -> tuple[list[str], int]:
    ids = sorted(set(reference.items["id"].astype(str)) | set(reference.failures["id"].astype(str)))
    if isinstance(n_items, str) and n_items == "all":
        return ids, len(ids)
    if isinstance(n_items, bool) or not isinstance(n_items, int) or n_items < 1:
        raise UserError(f"n_items must be a positive number or 'all', not {n_items!r}")
    if n_items >= len(ids):
        return ids, len(ids)
    return sorted(random.Random(seed).sample(ids, n_items)), len(ids)


def _items_for(
    ids: list[str], listed: list[Item] | None, reference: Run, report: Report
) -> list[Item]:
    """The sampled items as the run's dataset lists them (ids, bounds and labels exactly), or
    from the paths the stored outputs record when the dataset cannot be listed."""
    from audio_models.data.items import Item

    by_id = {item.id: item for item in listed or []}
    items, missing = [], []
    stored = pd.concat(
        [reference.items[["id", "path"]], reference.failures[["id", "path"]]], ignore_index=True
    ).drop_duplicates("id")
    rows = stored.set_index("id")
    meta = reference.items.set_index("id") if len(reference.items) else None
    for item_id in ids:
        if item_id in by_id:
            items.append(by_id[item_id])
            continue
        if listed is not None:
            missing.append(item_id)
        path = str(rows.loc[item_id, "path"])
        start = end = None
        if meta is not None and item_id in meta.index:
            # Whole-file items were written with start 0 and end = duration: the same samples.
            start, end = float(meta.loc[item_id, "start"]), float(meta.loc[item_id, "end"])
        items.append(Item(id=item_id, path=path, start=start, end=end))
    if missing:
        report.environment.append(
            Difference(
                "dataset",
                "items",
                "listed",
                f"{len(missing)} sampled item(s) no longer listed: {missing[:5]}",
            )
        )
    return items


def _rerun_config(cfg: DictConfig, run_cfg: DictConfig, out: Path) -> DictConfig:
    rerun = OmegaConf.create(OmegaConf.to_container(run_cfg))
    rerun.tracking = {"_target_": "audio_models.tracking.NullTracker"}
    rerun.output_dir = str(out)
    rerun.resume = False
    rerun.progress_bar = False
    if rerun.device.get("strategy") not in (None, "auto") or rerun.device.get("num_nodes", 1) != 1:
        # A distributed run's outputs do not depend on how items were sharded: one process
        # re-runs the sample (a re-launch of this command per rank would re-run it N times).
        rerun.device.strategy, rerun.device.devices, rerun.device.num_nodes = "auto", 1, 1
    if rerun.get("windows") is not None:
        rerun.windows.size_s = None  # the items are the run's windows already
    if rerun.get("segments_from"):
        rerun.segments_from = None  # ... and its speech segments
    if cfg.accelerator is not None:
        rerun.device.accelerator = cfg.accelerator
    if cfg.num_workers is not None:
        rerun.loader.num_workers = cfg.num_workers
    return rerun


# -- comparing outputs --------------------------------------------------------------------


def _group_of(column: str) -> str:
    """``layer_12_mean`` stays; ``fbank_3`` → ``fbank``; unnumbered names → ``features``."""
    match = _TRAILING_INDEX.match(column)
    return match["group"] if match else "features"


def _feature_columns(folder: Path) -> list[str]:
    from audio_models.pipeline.store import FEATURES_KEY

    path = folder / "features.parquet"
    recorded = (pq.read_schema(path).metadata or {}).get(FEATURES_KEY) if path.exists() else None
    return json.loads(recorded) if recorded else []


def _frames_of(run: Run, ids: list[str]) -> dict[str, pd.DataFrame]:
    """Frame rows per item, each shard read once."""
    table = run.items[run.items["id"].isin(ids)]
    out: dict[str, pd.DataFrame] = {}
    for shard, rows in table.groupby("shard"):
        frames = pd.read_parquet(run.output_dir / str(shard))
        for _, row in rows.iterrows():
            start = int(row["offset"])
            out[str(row["id"])] = frames.iloc[start : start + int(row["n_frames"])]
    return out


def output_values(run: Run, ids: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """Per item of ``ids`` that ``run`` wrote: feature group → its stored values (float64);
    how the item was read (duration, rate, frame count) is a group of its own."""
    table = run.items.set_index("id")
    out: dict[str, dict[str, np.ndarray]] = {i: {} for i in ids if i in table.index}
    for item_id in out:
        meta = [c for c in _META_NUMERIC if c in table.columns]
        out[item_id]["meta (" + ", ".join(meta) + ")"] = table.loc[item_id, meta].to_numpy(
            np.float64
        )
    if run.transcribed:
        # Model scores: the numeric columns that are neither how the item was read nor labels.
        scores = [
            c
            for c in table.columns
            if c not in _READ_COLUMNS
            and c not in run.labels
            and pd.api.types.is_numeric_dtype(table[c])
        ]
        for item_id in out:
            if scores:
                out[item_id]["scores"] = table.loc[item_id, scores].to_numpy(np.float64)
            for side in ("segments", "words"):
                path = run.output_dir / f"{side}.parquet"
                if path.exists():
                    rows = pd.read_parquet(path)
                    rows = rows[rows["id"] == item_id]
                    numeric = [
                        c for c in rows.columns if c not in ("id", "text", "word", "speaker")
                    ]
                    out[item_id][side] = rows[numeric].to_numpy(np.float64)
        return out
    if run.frame_level:
        for item_id, frames in _frames_of(run, list(out)).items():
            columns = [c for c in frames.columns if c not in ("id", "frame")]
            groups: dict[str, list[str]] = {}
            for c in columns:
                groups.setdefault(_group_of(c), []).append(c)
            for group, names in groups.items():
                out[item_id][group] = frames[names].to_numpy(np.float64)
        return out
    columns = _feature_columns(run.output_dir)
    for item_id in out:
        row = table.loc[item_id]
        scalars: dict[str, list[float]] = {}
        for c in columns:
            value = row[c]
            if isinstance(value, np.ndarray | list):  # a list column: one group of its own
                out[item_id][c] = np.asarray(value, dtype=np.float64)
            else:
                scalars.setdefault(_group_of(c), []).append(float(value))
        for group, values in scalars.items():
            out[item_id][group] = np.asarray(values, dtype=np.float64)
    return out


def _status(run: Run, item_id: str) -> str:
    if (run.items["id"] == item_id).any():
        return "written"
    failed = run.failures[run.failures["id"] == item_id]
    if len(failed):
        row = failed.iloc[0]
        return f"failed at {row['stage']} ({row['error_type']})"
    return "absent"


def compare_outputs(
    reference: Run, rerun: Run, ids: list[str], *, rtol: float, atol: float
) -> tuple[list[GroupResult], list[Difference]]:
    """Per feature group, how far the re-run is from the stored outputs, and per item what
    differs otherwise (written vs failed, value shapes, transcript texts)."""
    items: list[Difference] = []
    for item_id in ids:
        old, new = _status(reference, item_id), _status(rerun, item_id)
        if old != new:
            items.append(Difference("item", item_id, old, new))
    written = [i for i in ids if _status(reference, i) == _status(rerun, i) == "written"]
    old_values, new_values = output_values(reference, written), output_values(rerun, written)
    stats: dict[str, dict[str, Any]] = {}
    for item_id in written:
        for group, a in old_values[item_id].items():
            b = new_values[item_id].get(group)
            if b is None or a.shape != b.shape:
                shape = "absent" if b is None else str(b.shape)
                items.append(Difference("item", f"{item_id} {group} shape", str(a.shape), shape))
                continue
            both_nan = np.isnan(a) & np.isnan(b)
            diff = np.where(both_nan, 0.0, np.abs(b - a))
            diff = np.where(np.isnan(diff), np.inf, diff)  # one side NaN
            scale = np.abs(a)
            rel = np.divide(diff, scale, out=np.where(diff > 0, np.inf, 0.0), where=scale > 0)
            ok = bool(np.all(diff <= atol + rtol * np.nan_to_num(scale)))
            entry = stats.setdefault(
                group, {"items": 0, "values": 0, "abs": 0.0, "rel": 0.0, "equal": True}
            )
            entry["items"] += 1
            entry["values"] += int(a.size)
            if a.size:
                entry["abs"] = max(entry["abs"], float(diff.max()))
                entry["rel"] = max(entry["rel"], float(rel.max()))
            entry["equal"] = entry["equal"] and ok
    if reference.transcribed:
        old_text = reference.items.set_index("id")
        new_text = rerun.items.set_index("id")
        for item_id in written:
            for column in ("text", "language"):
                a, b = old_text.loc[item_id, column], new_text.loc[item_id, column]
                if not (a == b or (pd.isna(a) and pd.isna(b))):
                    items.append(Difference("item", f"{item_id} {column}", repr(a), repr(b)))
    groups = [
        GroupResult(g, s["items"], s["values"], s["abs"], s["rel"], s["equal"])
        for g, s in stats.items()
    ]
    return groups, items


def _item_keys(run: Run, ids: list[str]) -> dict[str, str]:
    frames = [t[["id", "item_key"]] for t in (run.items, run.failures) if "item_key" in t]
    table = pd.concat(frames, ignore_index=True).drop_duplicates("id").set_index("id")
    return {i: str(table.loc[i, "item_key"]) for i in ids if i in table.index}


def _check_rerun_tags(
    cfg: DictConfig, tags: dict[str, str], now: dict[str, str], report: Report
) -> None:
    """Model provenance (revision, weights hash, …) and how the numbers were computed."""
    names = sorted({k for k in {*tags, *now} if k.startswith("provenance.")})
    for name in names:
        a, b = tags.get(name, "(not recorded)"), now.get(name, "(not reported)")
        if a != b:
            report.environment.append(
                Difference("provenance", name.removeprefix("provenance."), a, b)
            )
    report.checked.append(f"model provenance ({len(names)} tags)")
    for name in _RUNTIME_TAGS:
        if name not in tags or tags[name] == now.get(name):
            continue
        change = Difference("runtime", name, tags[name], now.get(name, "(not reported)"))
        if cfg.accelerator is not None and name in ("accelerator", "cpu_linear_backend"):
            report.notes.append(f"{change.line()} (accelerator={cfg.accelerator} was asked for)")
        else:
            report.environment.append(change)


# -- the command --------------------------------------------------------------------------


@contextmanager
def _no_download_bars() -> Iterator[None]:
    """MLflow draws a progress bar per downloaded artifact (a dozen per report): off here."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    previous = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def reproduce(cfg: DictConfig) -> Report:
    """Check the environment against run ``cfg.run_id``, re-run a sample of its items and
    compare them with its stored outputs; see the module docstring.

    Raises:
        UserError: the run cannot be read (not found, tracking off, no config or outputs
            stored) or ``n_items`` is invalid: nothing was compared.
    """
    with _no_download_bars():
        return _reproduce(cfg)


def _reproduce(cfg: DictConfig) -> Report:
    from audio_models.api import load
    from audio_models.data.datasets import ItemsDataset
    from audio_models.utils.provenance import git_state
    from runners.extract import extract

    tracker = build(cfg, "tracking")
    if not isinstance(tracker, MlflowTracker):
        raise UserError("tracking=off has no runs to reproduce: choose tracking=mlflow or server")
    client = tracker.client
    try:
        run = client.get_run(str(cfg.run_id))
    except Exception:
        raise UserError(f"run {cfg.run_id} not found at {tracker.uri}") from None
    run_id = run.info.run_id
    tags = dict(run.data.tags)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    scratch = out / "stored"
    rerun_dir = out / "rerun"
    for stale in (scratch, rerun_dir):  # a second reproduce into the same folder starts clean
        shutil.rmtree(stale, ignore_errors=True)
    run_cfg = _run_config(client, run, scratch, list(cfg.get("trust_targets") or []))
    title = (
        f"{tags.get('extractor', run_cfg.extractor.get('name'))} on {tags.get('dataset', '?')}, "
        f"{run.info.status}"
        + (f", child of sweep {tags['sweep_id']}" if "sweep_id" in tags else "")
    )
    report = Report(
        run_id=run_id,
        title=title,
        overrides=_run_overrides(client, run, scratch),
        rtol=float(cfg.rtol),
        atol=float(cfg.atol),
        rerun_dir=rerun_dir,
    )
    if run.info.status != "FINISHED":
        report.notes.append(f"the run's status is {run.info.status}: its outputs may be partial")
    reference = load(_reference_dir(client, run, scratch))
    ids, report.n_run_items = _sample_ids(reference, cfg.n_items, int(cfg.seed))
    report.sampled = ids

    found, n_packages = _check_packages(tags)
    report.environment += found
    report.checked.append(f"{n_packages} package versions")
    found, n_upstreams = _check_upstreams(client, run, tags, scratch)
    report.environment += found
    report.checked.append(f"{n_upstreams} upstream checkout(s)")
    commit, dirty = git_state()
    if tags.get("git_commit") not in (None, commit) or tags.get("git_dirty") == "true" or dirty:
        # The project's own code: a note, since a later commit usually computes the same.
        report.notes.append(
            f"project code: run at {tags.get('git_commit')} (dirty {tags.get('git_dirty')}), "
            f"now {commit} (dirty {str(dirty).lower()})"
        )
    masked = [k for k, v in run.data.params.items() if v == "***"]
    if masked:
        report.notes.append(f"values masked in the record, re-run as masked: {masked}")
    listed = _windowed(run_cfg, _list_dataset(run_cfg, tags, report))
    items = _items_for(ids, listed, reference, report)
    pd.DataFrame(
        [{"id": i.id, "path": i.path, "start": i.start, "end": i.end} for i in items]
    ).to_csv(out / "sample.csv", index=False)

    rerun_cfg = _rerun_config(cfg, run_cfg, rerun_dir)
    try:
        build(rerun_cfg, "device").check_available()
    except UserError as exc:
        raise UserError(
            f"{exc} (the run's device; accelerator=cpu re-runs it on the CPU)"
        ) from None
    try:
        result = extract(rerun_cfg, dataset=ItemsDataset(items=items), overrides=report.overrides)
    except (UserError, RuntimeError, OSError) as exc:
        # The environment cannot run it (a missing checkout, weights): that is the finding.
        report.rerun_error = redact(f"{type(exc).__name__}: {exc}")[:2000]
        return report
    _check_rerun_tags(cfg, tags, result.tags, report)
    rerun = load(rerun_dir)
    report.groups, report.items = compare_outputs(
        reference, rerun, ids, rtol=report.rtol, atol=report.atol
    )
    # (A windowed run's re-run has windowing off, so its settings hash and item keys differ
    # and this check is left out.)
    if listed is not None and result.tags.get("config_hash") == tags.get("config_hash"):
        # Same settings: an item key differs only when the item's audio bytes (or bounds) do.
        old, new = _item_keys(reference, ids), _item_keys(rerun, ids)
        changed = sorted(i for i in ids if i in old and i in new and old[i] != new[i])
        if changed:
            report.environment.append(
                Difference(
                    "dataset",
                    "audio content",
                    "as recorded",
                    f"{len(changed)} of {len(ids)} sampled items read other bytes: {changed[:5]}",
                )
            )
    return report


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="reproduce")
@task
def main(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "run_id"):
        print("error: run_id=<id> is required (the MLflow run to reproduce)", file=sys.stderr)
        sys.exit(2)
    try:
        report = reproduce(cfg)
    except UserError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        sys.exit(2)
    text = report.render()
    print(text)
    # Not reproduce.log: that name is Hydra's own log of this job, in the same folder.
    (Path(cfg.output_dir) / "report.txt").write_text(text + "\n")
    sys.exit(report.exit_code)


if __name__ == "__main__":
    run_cli(main)
