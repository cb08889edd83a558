"""runners.compare on a speaker-grouped design: pooled out-of-fold scores, their intervals, the
probe's settings on every run, the predictions as artifacts, the chart and the log."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from audio_models.evaluation import OutOfFold, classification_scores
from audio_models.pipeline.store import FEATURES_KEY
from audio_models.sweep import ROLE_TAG
from runners.compare import _chart_figure, _warn_about_folds, compare
from tests.conftest import CONF_DIR

LABEL = "speaker_sex"
# Speakers → (class, clips, whether their clips look like the other class). Speaker m0's six
# clips sit among the female clips, every other clip in its own class's cluster: whatever the
# folds, the probe gets exactly m0's clips wrong. Pooled over all folds, male recall is 6/12
# and UAR (1 + 0.5) / 2 = 0.75. The fold that holds m0 has male recall c / (6 + c), c the
# other male clips it holds (0 to 6), so its UAR is at least 0.5; every other fold scores 1
# (a fold without a male clip scores female recall alone). The mean over 3 folds is therefore
# at least (2 + 0.5) / 3 = 0.833: fold averaging inflates UAR on this design, whatever the split.
SPEAKERS = {
    **{f"f{i}": ("F", 4, False) for i in range(6)},
    "m0": ("M", 6, True),
    **{f"m{i}": ("M", 2, False) for i in (1, 2, 3)},
}
POOLED_UAR = 0.75
N_SPLITS = 3


def _features(folder: Path, *, separable: bool, seed: int) -> Path:
    """A features.parquet as the writer leaves it (feature columns named in its metadata)."""
    rng = np.random.default_rng(seed)
    rows = []
    for speaker, (sex, n, looks_other) in SPEAKERS.items():
        side = 1.0 if sex == "M" else -1.0
        if looks_other and not separable:
            side = -side
        for j in range(n):
            rows.append(
                {
                    "id": f"{speaker}/{j:02d}.wav",
                    LABEL: sex,
                    "speaker": speaker,
                    "f0": 5.0 * side + rng.normal(0, 0.3),
                    "f1": rng.normal(0, 1.0),
                }
            )
    folder.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    table = table.replace_schema_metadata({FEATURES_KEY: json.dumps(["f0", "f1"]).encode()})
    pq.write_table(table, folder / "features.parquet")
    return folder


def _sweep(root: Path) -> tuple[str, dict[str, str]]:
    """A finished sweep in a real MLflow store: the parent's id, extractor → child id."""
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.create_experiment("audio-models", (root / "art").resolve().as_uri())
    parent = client.create_run(experiment, tags={ROLE_TAG: "sweep", "sweep_id": "s1"})
    children = {}
    for k, (name, separable) in enumerate((("confused", False), ("clean", True))):
        child = client.create_run(
            experiment,
            tags={"sweep_id": "s1", "mlflow.parentRunId": parent.info.run_id, "extractor": name},
        )
        folder = _features(root / name, separable=separable, seed=k)
        client.log_param(child.info.run_id, "output_dir", str(folder))
        client.log_param(child.info.run_id, "dataset.label_column", LABEL)
        client.set_terminated(child.info.run_id)
        children[name] = child.info.run_id
    return parent.info.run_id, children


def _tracking(root: Path) -> list[str]:
    return [f"tracking.uri=sqlite:///{root / 'mlflow.db'}", f"tracking.artifact_location={root}"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One `python -m runners.compare` on the sweep (Hydra's job logging included)."""
    root = tmp_path_factory.mktemp("compare")
    parent, children = _sweep(root)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "runners.compare",
            *_tracking(root),
            f"n_splits={N_SPLITS}",
            "hydra.run.dir=out",
        ],
        cwd=root,
        env={**os.environ, "AUDIO_MODELS_CACHE": str(root / "cache")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    return {"root": root, "parent": parent, "children": children, "client": client, "done": done}


def _oof(compared: dict, name: str) -> pd.DataFrame:
    client, root = compared["client"], compared["root"]
    run_id = compared["children"][name]
    target = root / "downloaded" / name
    target.mkdir(parents=True, exist_ok=True)
    path = client.download_artifacts(run_id, "oof_predictions.csv", str(target))
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def test_uar_is_pooled_over_folds_not_averaged(compared: dict) -> None:
    oof = _oof(compared, "confused")
    assert list(oof.columns) == ["id", "fold", "label", "prediction"]
    assert len(oof) == sum(n for _, n, _ in SPEAKERS.values())
    y, pred = oof["label"], oof["prediction"]
    metrics = compared["client"].get_run(compared["children"]["confused"]).data.metrics
    assert metrics["probe_uar"] == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-12)
    assert metrics["probe_accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    assert metrics["probe_macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-12)
    assert metrics["probe_uar"] == pytest.approx(POOLED_UAR)
    # The design's promise, checked on the folds the run actually used: averaging inflates.
    folds = oof.groupby("fold")
    by_fold = [balanced_accuracy_score(f["label"], f["prediction"]) for _, f in folds]
    assert len(by_fold) == N_SPLITS
    assert np.mean(by_fold) >= (2 + 0.5) / 3 - 1e-12 > POOLED_UAR
    assert metrics["probe_uar_fold_mean"] == pytest.approx(np.mean(by_fold))
    # A speaker never sits on both sides of a split.
    speakers = oof["id"].str.split("/").str[0]
    assert (oof.groupby(speakers)["fold"].nunique() == 1).all()


def test_intervals_bootstrap_over_speakers_and_say_so(compared: dict) -> None:
    out = compared["root"] / "out"
    table = pd.read_csv(out / "comparison.csv").set_index("extractor")
    assert table.loc["confused", "uar"] == pytest.approx(POOLED_UAR, abs=1e-4)
    assert table.loc["clean", "uar"] == 1.0
    for metric in ("uar", "accuracy", "macro_f1"):
        row = table.loc["confused"]
        assert row[f"{metric}_ci_low"] <= row[metric] <= row[f"{metric}_ci_high"]
    # All six of m0's clips stand or fall together: resampling speakers, not clips, gives a
    # wider interval than 36 independent clips would.
    row = table.loc["confused"]
    assert row["uar_ci_high"] - row["uar_ci_low"] > 0.2
    assert (table["n_groups"] == len(SPEAKERS)).all()
    assert set(table["ci"]) == {"95 % percentile bootstrap over 'speaker' groups (1000 resamples)"}
    markdown = (out / "comparison.md").read_text()
    assert "out-of-fold predictions pooled over all folds" in markdown
    assert "percentile bootstrap over 'speaker' groups" in markdown
    assert f"stratified group {N_SPLITS}-fold by 'speaker'" in markdown


def test_settings_are_params_on_the_parent_and_every_child(compared: dict) -> None:
    client = compared["client"]
    for run_id in [compared["parent"], *compared["children"].values()]:
        params = client.get_run(run_id).data.params
        assert params["probe.label"] == LABEL
        assert params["probe.group_column"] == "speaker"
        assert params["probe.n_splits"] == str(N_SPLITS)
        assert params["probe.seed"] == "0"
        assert params["probe.folds"].startswith(f"stratified group {N_SPLITS}-fold by 'speaker'")
        assert "bootstrap over 'speaker' groups" in params["probe.ci"]


def test_predictions_and_table_are_artifacts(compared: dict) -> None:
    client = compared["client"]
    for run_id in compared["children"].values():
        assert "oof_predictions.csv" in {a.path for a in client.list_artifacts(run_id)}
    logged = {a.path for a in client.list_artifacts(compared["parent"])}
    assert {"comparison.csv", "comparison.md", "comparison.png"} <= logged
    clean = _oof(compared, "clean")
    assert (clean["label"] == clean["prediction"]).all()


def test_the_table_reaches_compare_log(compared: dict) -> None:
    log_file = compared["root"] / "out" / "compare.log"
    text = log_file.read_text()
    assert "| confused |" in text and "| clean |" in text
    assert "UAR [95 % CI]" in text
    assert "| confused |" in compared["done"].stdout  # still on the console


def test_chart_has_a_chance_line_and_names_the_folds(compared: dict) -> None:
    import matplotlib.pyplot as plt

    out = compared["root"] / "out"
    table = pd.read_csv(out / "comparison.csv")
    caption = (out / "comparison.md").read_text().split("\n\n")[0]
    figure = _chart_figure(table, LABEL, caption)
    try:
        axis = figure.axes[0]
        flat = [ln for ln in axis.get_lines() if len(set(ln.get_ydata())) == 1]
        assert any(ln.get_ydata()[0] == 0.5 and "chance" in ln.get_label() for ln in flat)
        texts = " ".join(t.get_text() for t in figure.texts).replace("\n", " ")
        assert f"stratified group {N_SPLITS}-fold by 'speaker'" in texts
        assert "bootstrap" in texts
    finally:
        plt.close(figure)


def test_a_fold_without_a_class_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    # Fold 2 holds no "M" item: its own UAR would be female recall alone.
    oof = OutOfFold(
        y=np.array(["F", "M", "F", "F"], dtype=object),
        prediction=np.array(["F", "M", "F", "M"], dtype=object),
        fold=np.array([1, 1, 2, 2]),
        groups=None,
        n_folds=2,
        n_features=1,
    )

    class Run:  # the part of an MLflow run the warning reads
        class info:
            run_id = "r1"

    with caplog.at_level(logging.WARNING, logger="runners.compare"):
        _warn_about_folds(Run, oof)
    assert "fold 2 of 2 has no test item of class 'M'" in caplog.text


def test_scores_equal_scikit_learn_on_resamples() -> None:
    # The bootstrap scores confusion matrices with its own code: it must agree with sklearn,
    # classes missing from a resample's truth or predictions included.
    rng = np.random.default_rng(3)
    for _ in range(100):
        n = int(rng.integers(1, 25))
        y = np.array([f"c{v}" for v in rng.integers(0, 3, n)], dtype=object)
        p = np.array([f"c{v}" for v in rng.integers(0, 4, n)], dtype=object)
        ours = classification_scores(y, p)
        with warnings.catch_warnings():
            # sklearn's note that a predicted class is absent from the truth: the case tested.
            # and that one class alone makes a 1 x 1 confusion matrix.
            warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
            warnings.filterwarnings("ignore", message="A single label was found")
            assert ours["uar"] == pytest.approx(balanced_accuracy_score(y, p), abs=1e-12)
            assert ours["accuracy"] == pytest.approx(accuracy_score(y, p), abs=1e-12)
            macro_f1 = f1_score(y, p, average="macro", zero_division=0.0)
            assert ours["macro_f1"] == pytest.approx(macro_f1, abs=1e-12)


def test_comparing_again_with_other_settings_keeps_params_and_says_so(
    compared: dict, caplog: pytest.LogCaptureFixture
) -> None:
    # MLflow params cannot change: a second comparison (4 folds) records its settings as tags
    # and warns that the params are the first comparison's.
    root = compared["root"]
    import audio_models.config  # noqa: F401  (registers the schemas)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="compare",
            overrides=[*_tracking(root), "n_splits=4", f"output_dir={root / 'again'}"],
        )
    with caplog.at_level(logging.WARNING, logger="runners.compare"):
        result = compare(cfg)
    assert set(result.table["n_folds"]) == {4}
    run = compared["client"].get_run(compared["children"]["confused"])
    assert run.data.params["probe.n_splits"] == str(N_SPLITS)
    assert run.data.tags["probe.n_splits"] == "4"
    assert "was compared before with other probe.folds, probe.n_splits" in caplog.text
