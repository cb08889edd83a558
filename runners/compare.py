"""``python -m runners.compare``: which feature set predicts my labels best?

Takes a sweep (``sweep_id``, default the latest) or a list of ``run_ids``, reads each run's
``features.parquet`` (frame-level outputs mean-pooled per item), fits a cross-validated linear
probe (standardise + logistic regression; folds grouped by ``group_column`` when the data has
it) on ``label``, logs accuracy / UAR / macro-F1 to each run, and to the sweep's parent run a
comparison table (CSV, Markdown) and a bar chart with 95 % confidence intervals over folds.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from omegaconf import DictConfig

from audio_models.config import build
from audio_models.evaluation import SCORERS, ProbeScores, linear_probe
from audio_models.pipeline.store import (
    FEATURES_KEY,
    FRAME_META_SCHEMA,
    INDEX_COLUMNS,
    META_SCHEMA,
)
from audio_models.sweep import ROLE_TAG
from audio_models.tracking import MlflowTracker, redact
from audio_models.utils.errors import UserError
from audio_models.utils.paths import conf_dir

log = logging.getLogger("runners.compare")
_NOT_FEATURES = set(META_SCHEMA.names) | set(FRAME_META_SCHEMA.names)


@dataclass
class Comparison:
    table: pd.DataFrame  # one row per run
    parent_run_id: str | None
    files: list[Path]


def find_runs(
    tracker: MlflowTracker, sweep_id: str | None, run_ids: list[str] | None
) -> tuple[list[Any], Any | None]:
    """The runs to compare and the sweep's parent run (``None`` for explicit run ids)."""
    client = tracker.client
    if run_ids:
        runs = []
        for run_id in run_ids:
            try:
                runs.append(client.get_run(run_id))
            except Exception:
                raise UserError(f"run {run_id} not found at {tracker.uri}") from None
        return runs, None
    experiment = client.get_experiment_by_name(tracker.experiment)
    if experiment is None:
        raise UserError(f"no runs found: experiment {tracker.experiment!r} is not at {tracker.uri}")
    ids = [experiment.experiment_id]
    where = f"tags.`{ROLE_TAG}` = 'sweep'"
    if sweep_id:
        where += f" and tags.sweep_id = '{sweep_id}'"
    parents = client.search_runs(ids, where, order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        what = f"sweep {sweep_id!r}" if sweep_id else "any sweep"
        raise UserError(
            f"no runs found for {what} in experiment {tracker.experiment!r} at {tracker.uri}; "
            "run a sweep first (python -m runners.extract -m extractor=egemaps,librosa) or pass "
            "run_ids=[...]"
        )
    parent = parents[0]
    sweep = parent.data.tags["sweep_id"]
    children = client.search_runs(
        ids,
        f"tags.sweep_id = '{sweep}' and tags.`mlflow.parentRunId` = '{parent.info.run_id}' "
        "and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time ASC"],
    )
    if not children:
        raise UserError(f"no finished runs in sweep {sweep!r} at {tracker.uri}")
    return children, parent


def _run_folder(client: Any, run: Any, scratch: Path) -> Path:
    """A folder holding the run's outputs: its output_dir when still on this machine, else
    the artifacts downloaded from the tracking store."""
    local = Path(run.data.params.get("output_dir", ""))
    if (local / "features.parquet").is_file():
        return local
    target = scratch / run.info.run_id
    target.mkdir(parents=True, exist_ok=True)
    try:
        client.download_artifacts(run.info.run_id, "features.parquet", str(target))
        if "n_frames" in pq.read_schema(target / "features.parquet").names:
            client.download_artifacts(run.info.run_id, "frames", str(target))
        return target
    except Exception as exc:
        raise UserError(
            f"run {run.info.run_id}: features.parquet is neither in its output_dir ({local}) "
            f"nor among its artifacts ({type(exc).__name__})"
        ) from None


def pooled_features(folder: Path) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """Per item: the table's non-feature columns and a feature matrix (frame-level outputs
    mean-pooled per item); also the feature column names."""
    table = pd.read_parquet(folder / "features.parquet")
    if "n_frames" in table.columns:
        index = pd.read_parquet(folder / "frames" / "index.parquet", columns=INDEX_COLUMNS)
        pooled: dict[str, np.ndarray] = {}
        names: list[str] = []
        for shard, rows in index.groupby("shard"):
            frames = pd.read_parquet(folder / str(shard))
            names = [c for c in frames.columns if c not in ("id", "frame")]
            means = frames.groupby("id")[names].mean()
            for item_id in rows["id"]:
                pooled[item_id] = means.loc[item_id].to_numpy(dtype=np.float64)
        X = np.stack([pooled[i] for i in table["id"]])
        return table, X, names
    recorded = (pq.read_schema(folder / "features.parquet").metadata or {}).get(FEATURES_KEY)
    if recorded is None:
        raise UserError(
            f"{folder / 'features.parquet'} does not name its feature columns (written by an "
            "older version); rerun the extraction"
        )
    blocks, names = [], []
    for column in json.loads(recorded):
        values = table[column]
        if values.dtype == object:  # a list column: one vector per row
            block = np.stack(values.to_numpy()).astype(np.float64)
            blocks.append(block)
            names += [f"{column}_{j}" for j in range(block.shape[1])]
        else:
            blocks.append(values.to_numpy(dtype=np.float64)[:, None])
            names.append(column)
    return table, np.hstack(blocks), names


def _label_of(cfg: DictConfig, run: Any) -> str:
    label = cfg.label or run.data.params.get("dataset.label_column")
    if not label or label == "None":
        raise UserError(f"run {run.info.run_id} has no dataset.label_column; pass label=<column>")
    return str(label)


def _score_run(cfg: DictConfig, client: Any, run: Any, scratch: Path) -> tuple[ProbeScores, str]:
    folder = _run_folder(client, run, scratch)
    table, X, names = pooled_features(folder)
    label = _label_of(cfg, run)
    if label not in table.columns:
        raise UserError(
            f"label column {label!r} missing from run {run.info.run_id} "
            f"({run.data.tags.get('extractor')}); its columns: "
            f"{[c for c in table.columns if c not in _NOT_FEATURES and c not in names][:20]}"
        )
    keep = table[label].notna().to_numpy() & np.isfinite(X).all(axis=1)
    if not keep.all():
        log.warning(
            "%s: %d items without a label or with non-finite features left out",
            run.info.run_id,
            int((~keep).sum()),
        )
    y = table.loc[keep, label].astype(str).to_numpy()
    group = cfg.group_column
    groups = table.loc[keep, group].astype(str).to_numpy() if group and group in table else None
    return linear_probe(X[keep], y, groups, cfg.n_splits, seed=cfg.seed), label


def _markdown(table: pd.DataFrame) -> str:
    header = "| " + " | ".join(table.columns) + " |"
    rule = "| " + " | ".join("---" for _ in table.columns) + " |"
    rows = ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *rows]) + "\n"


def _chart(table: pd.DataFrame, path: Path, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table["extractor"])
    x = np.arange(len(names))
    width = 0.8 / len(SCORERS)
    figure, axis = plt.subplots(figsize=(max(6.0, 1.4 * len(names) + 3), 4))
    for k, metric in enumerate(SCORERS):
        axis.bar(
            x + (k - (len(SCORERS) - 1) / 2) * width,
            table[metric],
            width,
            yerr=table[f"{metric}_ci95"].fillna(0),
            capsize=3,
            label=metric,
        )
    axis.set_xticks(x, names, rotation=20)
    axis.set_ylim(0, 1.05)
    axis.set_ylabel("score (mean over folds, 95 % CI)")
    axis.set_title(f"linear probe on {label!r}")
    axis.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def compare(cfg: DictConfig) -> Comparison:
    """Score every run and log the comparison; see ``conf/compare.yaml``."""
    tracker = build(cfg, "tracking")
    if not isinstance(tracker, MlflowTracker):
        raise UserError("runners.compare reads runs from MLflow: use tracking=mlflow or server")
    runs, parent = find_runs(tracker, cfg.sweep_id, list(cfg.run_ids or []) or None)
    client = tracker.client
    rows = []
    label = None
    with tempfile.TemporaryDirectory() as scratch:
        for run in runs:
            scores, label = _score_run(cfg, client, run, Path(scratch))
            row: dict[str, Any] = {
                "extractor": run.data.tags.get("extractor", run.info.run_name),
                "run_id": run.info.run_id,
                "n_items": scores.n_items,
                "n_features": scores.n_features,
                "n_folds": len(next(iter(scores.folds.values()))),
            }
            metrics = {}
            for metric in SCORERS:
                row[metric] = round(scores.mean(metric), 4)
                row[f"{metric}_ci95"] = round(scores.ci95(metric), 4)
                metrics[f"probe_{metric}"] = scores.mean(metric)
                metrics[f"probe_{metric}_ci95"] = scores.ci95(metric)
            rows.append(row)
            tracker.run_id = run.info.run_id
            tracker.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)})
            tracker.set_tags({"probe_label": str(label)})
    table = pd.DataFrame(rows).sort_values("uar", ascending=False, kind="stable")
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    files = [output_dir / n for n in ("comparison.csv", "comparison.md", "comparison.png")]
    table.to_csv(files[0], index=False)
    files[1].write_text(_markdown(table))
    _chart(table, files[2], str(label))
    parent_id = parent.info.run_id if parent is not None else None
    if parent_id is not None:
        tracker.run_id = parent_id
        for path in files:
            tracker.log_file(path)
        best = table.iloc[0]
        tracker.log_metrics({"best_probe_uar": float(best["uar"])})
        tracker.set_tags({"best_extractor": str(best["extractor"]), "probe_label": str(label)})
    (output_dir / "comparison.json").write_text(
        json.dumps({"parent_run_id": parent_id, "runs": [r["run_id"] for r in rows]}, indent=1)
    )
    return Comparison(table=table, parent_run_id=parent_id, files=files)


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="compare")
def main(cfg: DictConfig) -> None:
    try:
        result = compare(cfg)
    except UserError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        sys.exit(2)
    print(_markdown(result.table), end="")
    where = f"parent run {result.parent_run_id}" if result.parent_run_id else "the runs"
    print(f"logged to {where}; files in {result.files[0].parent}")


if __name__ == "__main__":
    main()
