"""``python -m runners.compare``: which feature set predicts my labels best?

Takes a sweep (``sweep_id``, default the latest) or a list of ``run_ids``, reads each run's
``features.parquet`` (frame-level outputs mean-pooled per item), fits a cross-validated linear
probe (standardise + logistic regression; folds grouped by ``group_column`` when the data has
it) on ``label`` and scores the out-of-fold predictions pooled over all folds: accuracy, UAR
and macro-F1 with percentile-bootstrap 95 % confidence intervals (resampling groups when the
folds are grouped), the per-fold spread beside them. Each run gets those metrics, the probe's
settings as params and its ``oof_predictions.csv``; the sweep's parent run gets the settings,
a comparison table (CSV, Markdown) and a bar chart with a chance line. The table also goes to
the log (``compare.log`` in the output directory).
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

from audio_models.config import build, run_cli, task
from audio_models.evaluation import (
    N_RESAMPLES,
    SCORERS,
    OutOfFold,
    ci_method,
    fold_design,
    linear_probe,
)
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


#: What a metric is called in the Markdown table and the chart.
_TITLES = {"uar": "UAR", "accuracy": "accuracy", "macro_f1": "macro-F1"}


@dataclass
class Comparison:
    table: pd.DataFrame  # one row per run
    parent_run_id: str | None
    files: list[Path]
    markdown: str  # the table as written to comparison.md (caption included)


@dataclass
class Scored:
    """One run's probe: its out-of-fold predictions and what they were made from."""

    oof: OutOfFold
    ids: np.ndarray  # item ids, aligned with the predictions
    label: str
    grouped_by: str | None  # the group column the folds used (None: not grouped)


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


def _score_run(cfg: DictConfig, client: Any, run: Any, scratch: Path) -> Scored:
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
    groups = None
    if group and group in table.columns:
        groups = table.loc[keep, group].astype(str).to_numpy()
    elif group:
        # Ungrouped folds put one speaker's items on both sides of a split: scores rise.
        log.warning(
            "%s: no column %r, so folds are not grouped (set group_column to the column that "
            "identifies speakers, or group_column=null to silence this)",
            run.info.run_id,
            group,
        )
    oof = linear_probe(X[keep], y, groups, cfg.n_splits, seed=cfg.seed)
    grouped_by = group if oof.groups is not None else None
    return Scored(oof, table.loc[keep, "id"].astype(str).to_numpy(), label, grouped_by)


def _warn_about_folds(run: Any, oof: OutOfFold) -> None:
    for fold, lacking in oof.missing_classes().items():
        log.warning(
            "%s: fold %d of %d has no test item of class %s; per-fold scores are not "
            "comparable (the table scores the out-of-fold predictions pooled over all folds)",
            run.info.run_id,
            fold,
            oof.n_folds,
            ", ".join(repr(c) for c in lacking),
        )


def _settings(cfg: DictConfig, label: str, design: str, ci: str) -> dict[str, str]:
    """The probe's settings, as run params (prefixed: an extraction run has its own seed)."""
    return {
        "probe.label": label,
        "probe.group_column": str(cfg.group_column),
        "probe.n_splits": str(cfg.n_splits),
        "probe.folds": design,
        "probe.seed": str(cfg.seed),
        "probe.ci": ci,
    }


def _record_settings(client: Any, run_id: str, settings: dict[str, str]) -> None:
    """Params where MLflow allows them; tags always (they describe the latest comparison)."""
    from mlflow.entities import Param, RunTag

    existing = client.get_run(run_id).data.params
    new = [Param(k, v) for k, v in settings.items() if k not in existing]
    changed = sorted(k for k, v in settings.items() if k in existing and existing[k] != v)
    if new:
        client.log_batch(run_id, params=new)
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in settings.items()])
    if changed:
        # MLflow params cannot change: a run compared again with other settings keeps the
        # first comparison's params; the tags and metrics are this comparison's.
        log.warning(
            "run %s was compared before with other %s; its params keep those, its probe.* "
            "tags and probe_* metrics are this comparison's",
            run_id,
            ", ".join(changed),
        )


def _fmt(value: float) -> str:
    return "nan" if not np.isfinite(value) else f"{value:.3f}"


def _markdown(table: pd.DataFrame, caption: str) -> str:
    """The table for people: each metric with its interval, the caption above."""
    shown = pd.DataFrame(
        {
            "extractor": table["extractor"],
            "run_id": table["run_id"],
            "n_items": table["n_items"],
            "n_features": table["n_features"],
            **{
                f"{_TITLES[m]} [95 % CI]": [
                    f"{_fmt(v)} [{_fmt(lo)}, {_fmt(hi)}]"
                    for v, lo, hi in zip(
                        table[m], table[f"{m}_ci_low"], table[f"{m}_ci_high"], strict=True
                    )
                ]
                for m in ("uar", "accuracy", "macro_f1")  # UAR first: the table's ranking
            },
            "UAR per fold (mean ± sd)": [
                f"{_fmt(mu)} ± {_fmt(sd)}"
                for mu, sd in zip(table["uar_fold_mean"], table["uar_fold_sd"], strict=True)
            ],
        }
    )
    header = "| " + " | ".join(shown.columns) + " |"
    rule = "| " + " | ".join("---" for _ in shown.columns) + " |"
    rows = ["| " + " | ".join(str(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    return caption + "\n\n" + "\n".join([header, rule, *rows]) + "\n"


def _caption(table: pd.DataFrame, label: str) -> str:
    return (
        f"Linear probe on {label!r}: scores of the out-of-fold predictions pooled over all "
        f"folds. Folds: {'; '.join(dict.fromkeys(table['folds']))}. "
        f"Intervals: {'; '.join(dict.fromkeys(table['ci']))}."
    )


def _chart_figure(table: pd.DataFrame, label: str, caption: str) -> Any:
    """Bars per run and metric with their intervals, the chance level of UAR, the caption."""
    import matplotlib

    matplotlib.use("Agg")
    import textwrap

    import matplotlib.pyplot as plt

    names = list(table["extractor"])
    x = np.arange(len(names))
    width = 0.8 / len(SCORERS)
    figure, axis = plt.subplots(figsize=(max(7.0, 1.4 * len(names) + 4), 5))
    for k, metric in enumerate(SCORERS):
        values = table[metric].to_numpy(dtype=float)
        below = np.clip(values - table[f"{metric}_ci_low"].to_numpy(dtype=float), 0, None)
        above = np.clip(table[f"{metric}_ci_high"].to_numpy(dtype=float) - values, 0, None)
        axis.bar(
            x + (k - (len(SCORERS) - 1) / 2) * width,
            values,
            width,
            yerr=np.nan_to_num(np.vstack([below, above])),
            capsize=3,
            label=_TITLES[metric],
        )
    # UAR of a guess that ignores the features (any constant or random one) is 1 / classes.
    chance = 1.0 / int(table["n_classes"].max())
    axis.axhline(
        chance, color="black", linestyle="--", linewidth=1, label=f"chance UAR {chance:.2f}"
    )
    axis.set_xticks(x, names, rotation=20)
    axis.set_ylim(0, 1.05)
    axis.set_ylabel("score (pooled out-of-fold, 95 % CI)")
    axis.set_title(f"linear probe on {label!r}")
    axis.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.text(0.01, 0.01, textwrap.fill(caption, 130), fontsize=7, va="bottom", ha="left")
    figure.tight_layout(rect=(0, 0.12, 1, 1))
    return figure


def _chart(table: pd.DataFrame, path: Path, label: str, caption: str) -> None:
    import matplotlib.pyplot as plt

    figure = _chart_figure(table, label, caption)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _row(run: Any, scored: Scored, seed: int) -> tuple[dict[str, Any], dict[str, float]]:
    """One table row and the run's probe_* metrics."""
    oof = scored.oof
    scores, per_fold = oof.scores(), oof.fold_scores()
    intervals = oof.bootstrap_ci(n_resamples=N_RESAMPLES, seed=seed)
    row: dict[str, Any] = {
        "extractor": run.data.tags.get("extractor", run.info.run_name),
        "run_id": run.info.run_id,
        "n_items": oof.n_items,
        "n_groups": len(set(oof.groups.tolist())) if oof.groups is not None else None,
        "n_features": oof.n_features,
        "n_classes": len(oof.classes),
        "n_folds": oof.n_folds,
        "n_folds_missing_class": len(oof.missing_classes()),
    }
    metrics: dict[str, float] = {"probe_n_folds_missing_class": float(len(oof.missing_classes()))}
    for metric in SCORERS:
        lo, hi = intervals[metric]
        spread = np.asarray(per_fold[metric])
        values = {
            metric: scores[metric],
            f"{metric}_ci_low": lo,
            f"{metric}_ci_high": hi,
            f"{metric}_fold_mean": float(spread.mean()),
            f"{metric}_fold_sd": float(spread.std(ddof=1)) if len(spread) > 1 else float("nan"),
        }
        row.update({k: round(v, 4) for k, v in values.items()})
        metrics.update({f"probe_{k}": v for k, v in values.items()})
    row["folds"] = fold_design(scored.grouped_by, oof.n_folds, seed)
    row["ci"] = ci_method(scored.grouped_by)
    return row, metrics


def _write_oof(path: Path, scored: Scored) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    oof = scored.oof
    frame = pd.DataFrame(
        {"id": scored.ids, "fold": oof.fold, "label": oof.y, "prediction": oof.prediction}
    )
    frame.to_csv(path, index=False)


def compare(cfg: DictConfig) -> Comparison:
    """Score every run and log the comparison; see ``conf/compare.yaml``."""
    tracker = build(cfg, "tracking")
    if not isinstance(tracker, MlflowTracker):
        raise UserError("runners.compare reads runs from MLflow: use tracking=mlflow or server")
    runs, parent = find_runs(tracker, cfg.sweep_id, list(cfg.run_ids or []) or None)
    client = tracker.client
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    label = ""
    with tempfile.TemporaryDirectory() as scratch:
        for run in runs:
            scored = _score_run(cfg, client, run, Path(scratch))
            label = scored.label
            _warn_about_folds(run, scored.oof)
            row, metrics = _row(run, scored, cfg.seed)
            rows.append(row)
            run_id = run.info.run_id
            oof_file = output_dir / "oof" / run_id / "oof_predictions.csv"
            _write_oof(oof_file, scored)
            tracker.run_id = run_id
            tracker.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)})
            tracker.log_file(oof_file)
            tracker.set_tags({"probe_label": label})
            _record_settings(client, run_id, _settings(cfg, label, row["folds"], row["ci"]))
    table = pd.DataFrame(rows).sort_values("uar", ascending=False, kind="stable")
    caption = _caption(table, label)
    markdown = _markdown(table, caption)
    files = [output_dir / n for n in ("comparison.csv", "comparison.md", "comparison.png")]
    table.to_csv(files[0], index=False)
    files[1].write_text(markdown)
    _chart(table, files[2], label, caption)
    parent_id = parent.info.run_id if parent is not None else None
    if parent_id is not None:
        tracker.run_id = parent_id
        for path in files:
            tracker.log_file(path)
        best = table.iloc[0]
        tracker.log_metrics({"best_probe_uar": float(best["uar"])})
        tracker.set_tags({"best_extractor": str(best["extractor"]), "probe_label": label})
        settings = _settings(
            cfg,
            label,
            "; ".join(dict.fromkeys(table["folds"])),
            "; ".join(dict.fromkeys(table["ci"])),
        )
        _record_settings(client, parent_id, settings)
    (output_dir / "comparison.json").write_text(
        json.dumps({"parent_run_id": parent_id, "runs": [r["run_id"] for r in rows]}, indent=1)
    )
    # Through the logger, not print: Hydra's job logging sends it to the console and to
    # compare.log in the output directory (print reached the console only).
    where = f"parent run {parent_id}" if parent_id else "the runs"
    log.info("comparison of %d runs\n%s", len(rows), markdown)
    log.info("logged to %s; files in %s", where, output_dir)
    return Comparison(table=table, parent_run_id=parent_id, files=files, markdown=markdown)


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="compare")
@task
def main(cfg: DictConfig) -> None:
    try:
        compare(cfg)
    except UserError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run_cli(main)
