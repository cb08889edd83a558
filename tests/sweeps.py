"""Running the runners in a subprocess and reading back a sweep's MLflow runs (shared by the
sweep tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from audio_models.sweep import ROLE_TAG

CONF = Path(__file__).resolve().parents[1] / "conf"
FAST = ["device=cpu", "progress_bar=false", "loader.num_workers=0", "dataset.n_clips=20"]


def run(module: str, *args: str, cwd: Path, env: dict[str, str] | None = None):
    environment = {**os.environ, "AUDIO_MODELS_CACHE": str(cwd / "cache"), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
    )


def runs_of(store: Path) -> tuple[object, list[object]]:
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("audio-models")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get(ROLE_TAG) == "sweep"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return parents[0], children
