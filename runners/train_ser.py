"""``python -m runners.train_ser``: retrain the upstream emotion classifier on labelled audio.

Features come from the extraction pipeline (the upstream librosa set on 16 kHz mono audio);
the estimator is the upstream grid's best (same class and hyper-parameters) or a configured
one. Cross-validation is grouped by speaker when the dataset has a speaker column. MLflow gets
accuracy, unweighted average recall, the confusion matrix (PNG) and the model (``.skops``, with
its SHA-256 for ``extractor.model_path``/``extractor.sha256``).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from audio_models.config import ExtractConfig, build, run_cli, task
from audio_models.evaluation import splitter
from audio_models.tracking import NullTracker, flatten, redact
from audio_models.utils.errors import UserError
from audio_models.utils.paths import conf_dir
from runners.extract import extract

log = logging.getLogger("runners.train_ser")
PARTS = ("mfcc", "chroma", "mel", "contrast", "tonnetz")


@dataclass
class TrainResult:
    model_path: Path
    sha256: str
    metrics: dict[str, float]
    run_id: str | None


def build_estimator(cfg: DictConfig) -> Any:
    """An unfitted estimator: the upstream grid's best (cloned) or ``name(**params)``."""
    # scikit-learn, librosa and torch are imported by the steps that use them: --help and a
    # bad configuration answer before any of them loads.
    from sklearn.base import clone

    from audio_models.speech.ser import load_classifier

    est = cfg.estimator
    if est.source == "upstream":
        model, _ = load_classifier(
            est.model_path, sha256=est.sha256, trust_unverified=est.trust_unverified
        )
        estimator = clone(model)
    elif est.source == "config":
        import sklearn.utils

        classes = {
            name: cls for name, cls in sklearn.utils.all_estimators(type_filter="classifier")
        }
        if est.name not in classes:
            raise UserError(f"estimator.name={est.name!r} is not a scikit-learn classifier")
        estimator = classes[est.name](**OmegaConf.to_container(est.params))
    else:
        raise UserError("estimator.source must be 'upstream' or 'config'")
    if "probability" in estimator.get_params():
        estimator.set_params(probability=True)  # SVC: the ser extractor needs probabilities
    return estimator


def _features(cfg: DictConfig, output_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    from audio_models.audio.librosa_features import LibrosaExtractor

    """Run the extraction pipeline with the upstream feature set; no separate MLflow run."""
    unknown = set(cfg.features) - set(PARTS)
    if unknown:
        raise UserError(f"features has unknown parts {sorted(unknown)}")
    extractor = {
        "_target_": "audio_models.audio.librosa_features.LibrosaExtractor",
        "name": "librosa",
        "sample_rate": cfg.sample_rate,
        **{p: p in cfg.features for p in PARTS},
    }
    # The extraction schema's defaults (writer, preflight, resume, …) plus this run's pieces.
    ecfg = OmegaConf.merge(
        OmegaConf.structured(ExtractConfig),
        {
            "extractor": extractor,
            "dataset": OmegaConf.to_container(cfg.dataset, resolve=True),
            "device": OmegaConf.to_container(cfg.device, resolve=True),
            "tracking": {"_target_": "audio_models.tracking.NullTracker"},
            "loader": OmegaConf.to_container(cfg.loader, resolve=True),
            "output_dir": str(output_dir / "features"),
            "max_failure_ratio": 1.0,
            "progress_bar": cfg.progress_bar,
            "seed": cfg.seed,
        },
    )
    result = extract(ecfg)
    names = LibrosaExtractor(name="x", **{p: p in cfg.features for p in PARTS}).feature_names
    return pd.read_parquet(result.output_dir / "features.parquet"), names


def _confusion_png(matrix: np.ndarray, labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from sklearn.metrics import ConfusionMatrixDisplay

    display = ConfusionMatrixDisplay(matrix, display_labels=labels)
    display.plot(cmap="Blues", colorbar=False, xticks_rotation=45)
    display.figure_.tight_layout()
    display.figure_.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(display.figure_)


def train(cfg: DictConfig) -> TrainResult:
    """Fit, cross-validate, save and log; see ``conf/train_ser.yaml``."""
    from sklearn.base import clone
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
    )
    from sklearn.model_selection import cross_val_predict

    from audio_models.speech.ser import sha256_bytes

    output_dir = Path(cfg.output_dir)
    dataset = build(cfg, "dataset")
    label = dataset.label_column
    if label is None:
        raise UserError("set dataset.label_column to the emotion column to train on")
    estimator = build_estimator(cfg)  # fails early on a bad estimator or an unverified file
    tracker: NullTracker = build(cfg, "tracking")
    table, names = _features(cfg, output_dir)
    table = table[table[label].notna()]
    if table.empty:
        raise UserError(f"no item with a {label!r} label produced features")
    X = table[names].to_numpy(dtype=np.float64)
    y = table[label].astype(str).to_numpy()
    speaker = cfg.speaker_column
    groups = table[speaker].astype(str).to_numpy() if speaker and speaker in table else None
    cv, folds = splitter(y, groups, cfg.n_splits)
    predicted = cross_val_predict(estimator, X, y, groups=groups, cv=cv)
    classes = sorted(set(y))
    metrics = {
        "accuracy": accuracy_score(y, predicted),
        "uar": balanced_accuracy_score(y, predicted),  # unweighted average recall
        "macro_f1": f1_score(y, predicted, average="macro"),
        "n_items": float(len(y)),
        "n_folds": float(folds),
    }
    model = clone(estimator).fit(X, y)

    import skops.io as sio

    output_dir.mkdir(parents=True, exist_ok=True)
    model_path = output_dir / "ser_model.skops"
    data = sio.dumps(model)
    model_path.write_bytes(data)
    digest = sha256_bytes(data)
    matrix = confusion_matrix(y, predicted, labels=classes)
    png = output_dir / "confusion_matrix.png"
    _confusion_png(matrix, classes, png)
    summary = output_dir / "ser_model.json"
    summary.write_text(
        json.dumps(
            {
                "model_path": str(model_path),
                "sha256": digest,
                "estimator": type(model).__name__,
                "params": {k: repr(v) for k, v in model.get_params().items()},
                "features": list(cfg.features),
                "classes": classes,
                "metrics": metrics,
                "grouped_by": speaker if groups is not None else None,
            },
            indent=2,
        )
    )
    tracker.start(
        run_name=f"train_ser-{dataset.name}",
        params=flatten(OmegaConf.to_container(cfg, resolve=True)),
        tags={
            "task": "train_ser",
            "dataset": dataset.name,
            "estimator": type(model).__name__,
            "model_sha256": digest,
        },
    )
    tracker.log_metrics(metrics)
    for path in (model_path, png, summary):
        tracker.log_file(path)
    tracker.end("FINISHED")
    log.info(
        "%s on %d items, %d folds%s: accuracy %.3f, UAR %.3f",
        type(model).__name__,
        len(y),
        folds,
        f" grouped by {speaker}" if groups is not None else "",
        metrics["accuracy"],
        metrics["uar"],
    )
    print(f"model: {model_path}\nsha256: {digest}")
    print(
        "use it: python -m runners.extract extractor=ser "
        f"extractor.model_path={model_path} extractor.sha256={digest}"
    )
    return TrainResult(model_path, digest, metrics, tracker.run_id)


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="train_ser")
@task
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except UserError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run_cli(main)
