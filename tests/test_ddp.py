"""device=ddp on the CPU (gloo): sharded ranks, one merged output equal to a single process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from audio_models.data.loader import shard
from tests.conftest import frames_by_id

DDP = ["device=ddp", "device.accelerator=cpu", "device.devices=2"]
COMMON = ["progress_bar=false", "loader.num_workers=1", "loader.batch_size=4"]


def _extract(tmp_path: Path, out: Path, *overrides: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "runners.extract", *COMMON, f"output_dir={out}", *overrides],
        cwd=tmp_path,
        env={**os.environ, "AUDIO_MODELS_CACHE": str(tmp_path / "cache")},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]


def _features(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "features.parquet").sort_values("id").reset_index(drop=True)


def test_shards_cover_every_item_once_balanced_by_length() -> None:
    durations = [float(d) for d in np.random.default_rng(0).uniform(1, 20, size=101)]
    parts = [shard(101, rank, 4, durations) for rank in range(4)]
    assert sorted(i for part in parts for i in part) == list(range(101))
    totals = [sum(durations[i] for i in part) for part in parts]
    assert max(totals) - min(totals) < 20  # at most about one item's worth apart
    assert all(part == sorted(part) for part in parts)
    assert shard(5, 0, 1, None) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "extractor", [["extractor=egemaps"], ["extractor=fbank", "loader.batch_audio_s=12"]]
)
def test_ddp_on_the_demo_equals_one_process(tmp_path: Path, extractor: list[str]) -> None:
    tracking = [
        "tracking=mlflow",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"tracking.artifact_location={tmp_path}/art",
    ]
    _extract(tmp_path, tmp_path / "ddp", *DDP, *extractor, *tracking)
    _extract(tmp_path, tmp_path / "one", "device=cpu", "tracking=off", *extractor)
    ddp, one = _features(tmp_path / "ddp"), _features(tmp_path / "one")
    assert len(ddp) == 24 and ddp["id"].is_unique
    columns = [c for c in one.columns if c not in ("shard", "offset")]
    pd.testing.assert_frame_equal(ddp[columns], one[columns], check_exact=True)
    if "n_frames" in one.columns:
        pd.testing.assert_frame_equal(
            frames_by_id(tmp_path / "ddp"), frames_by_id(tmp_path / "one"), check_exact=True
        )
        assert not (tmp_path / "ddp" / ".progress").exists()
    # One MLflow run, from rank 0, with both ranks' shares.
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("audio-models").experiment_id])
    assert len(runs) == 1
    metrics = runs[0].data.metrics
    assert metrics["world_size"] == 2 and metrics["n_items"] == 24
    assert metrics["rank0_items"] + metrics["rank1_items"] == 24
    assert min(metrics["rank0_items"], metrics["rank1_items"]) >= 10


def test_ddp_resumes_what_one_process_started(tmp_path: Path) -> None:
    """A corpus half done by one process, grown, then finished by two ranks: every item
    exactly once, with the values of an uninterrupted run."""
    _extract(tmp_path, tmp_path / "full", "device=cpu", "tracking=off")  # makes the demo
    demo = sorted((tmp_path / "cache").rglob("*.wav"))
    assert len(demo) == 24
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in demo[:10]:
        shutil.copy(path, corpus / path.name)
    folder = ["dataset=folder", f"dataset.root={corpus}", "dataset.label_column=null"]
    _extract(tmp_path, tmp_path / "grown", "device=cpu", "tracking=off", *folder)
    for path in demo[10:]:
        shutil.copy(path, corpus / path.name)
    _extract(tmp_path, tmp_path / "grown", *DDP, "tracking=off", *folder)
    _extract(tmp_path, tmp_path / "reference", "device=cpu", "tracking=off", *folder)
    grown, reference = _features(tmp_path / "grown"), _features(tmp_path / "reference")
    assert len(grown) == 24 and grown["id"].is_unique
    features = [c for c in reference.columns if c.startswith(("F0", "loudness", "mfcc"))]
    assert features
    pd.testing.assert_frame_equal(grown[features], reference[features], check_exact=True)


def test_ddp_on_real_speech_equals_one_process(tmp_path: Path, speech_dir: Path) -> None:
    data = ["dataset=folder", f"dataset.root={speech_dir / 'harvard'}", "tracking=off"]
    _extract(tmp_path, tmp_path / "ddp", *DDP, "extractor=egemaps", *data)
    _extract(tmp_path, tmp_path / "one", "device=cpu", "extractor=egemaps", *data)
    ddp, one = _features(tmp_path / "ddp"), _features(tmp_path / "one")
    assert len(ddp) == len(one) > 0
    pd.testing.assert_frame_equal(ddp, one, check_exact=True)


def test_ddp_in_a_local_sweep_is_refused_clearly(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "runners.extract",
            "-m",
            *DDP,
            "tracking=off",
            *COMMON,
            f"hydra.sweep.dir={tmp_path / 's'}",
        ],
        cwd=tmp_path,
        env={**os.environ, "AUDIO_MODELS_CACHE": str(tmp_path / "cache")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 1
    assert "device=ddp in a local -m sweep is not supported" in done.stderr


def test_ddp_transcripts_equal_one_process(tmp_path: Path) -> None:
    """Transcription side tables (segments, words) merge across ranks like the main table."""
    from benchmarks.asr_models import save_random_s2t

    model = save_random_s2t(tmp_path / "s2t")
    s2t = ["extractor=s2t", f"extractor.model={model}", "tracking=off"]
    _extract(tmp_path, tmp_path / "ddp", *DDP, *s2t)
    _extract(tmp_path, tmp_path / "one", "device=cpu", *s2t)
    tables = {}
    for run in ("ddp", "one"):
        tables[run] = {
            name: pd.read_parquet(tmp_path / run / f"{name}.parquet")
            .sort_values([c for c in ("id", "segment", "word_index") if c in keys])
            .reset_index(drop=True)
            for name, keys in (
                ("transcripts", ["id"]),
                ("segments", ["id", "segment"]),
                ("words", ["id", "segment", "word_index"]),
            )
        }
    assert len(tables["ddp"]["transcripts"]) == 24
    for name in ("transcripts", "segments", "words"):
        ddp, one = tables["ddp"][name], tables["one"][name]
        text = [c for c in ("id", "text", "word", "start", "end") if c in one.columns]
        pd.testing.assert_frame_equal(ddp[text], one[text], check_exact=True)
    # Scores: other batch compositions, the same numbers up to float summation order.
    np.testing.assert_allclose(
        tables["ddp"]["transcripts"]["avg_logprob"],
        tables["one"]["transcripts"]["avg_logprob"],
        atol=1e-4,
    )
    assert not (tmp_path / "ddp" / ".progress").exists()
