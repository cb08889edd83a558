"""Hydra multirun sweeps as MLflow parent/child runs, and the runners.compare leaderboard."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from audio_models.sweep import JOBS_FILE, SWEEP_FILE, SweepCallback
from audio_models.tracking import MlflowTracker
from tests.sweeps import CONF, FAST, run, runs_of


def test_demo_sweep_then_compare(tmp_path: Path) -> None:
    done = run(
        "runners.extract",
        "-m",
        "extractor=egemaps,mfcc,librosa",
        *FAST,
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    parent, children = runs_of(tmp_path / "mlflow.db")
    assert sorted(c.data.tags["extractor"] for c in children) == ["egemaps", "librosa", "mfcc"]
    assert {c.data.tags["sweep_id"] for c in children} == {parent.data.tags["sweep_id"]}
    assert all(c.info.status == "FINISHED" for c in children)
    assert parent.data.params["sweep.extractor"] == "egemaps,mfcc,librosa"
    assert parent.data.metrics["n_jobs"] == 3 and parent.data.metrics["n_failed_jobs"] == 0

    compared = run("runners.compare", "hydra.run.dir=compare_out", cwd=tmp_path)
    assert compared.returncode == 0, compared.stderr[-3000:]
    assert "| egemaps |" in compared.stdout and "| librosa |" in compared.stdout
    table = pd.read_csv(tmp_path / "compare_out" / "comparison.csv")
    assert sorted(table["extractor"]) == ["egemaps", "librosa", "mfcc"]
    assert dict(zip(table["extractor"], table["n_features"], strict=True)) == {
        "egemaps": 88,  # the demo's numeric label f0_hz is not a feature
        "librosa": 193,
        "mfcc": 13,  # frame-level, mean-pooled per item
    }
    assert (table["uar"] >= 0.9).all()  # the demo's classes are separable
    parent, children = runs_of(tmp_path / "mlflow.db")
    for child in children:
        assert {"probe_accuracy", "probe_uar", "probe_macro_f1"} <= child.data.metrics.keys()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    logged = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.csv", "comparison.md", "comparison.png", JOBS_FILE} <= logged
    assert parent.data.tags["best_extractor"] in {"egemaps", "librosa", "mfcc"}


def test_parallel_joblib_sweep_against_sqlite_loses_nothing(tmp_path: Path) -> None:
    done = run(
        "runners.extract",
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=4",
        "extractor=egemaps,mfcc,fbank,egemaps_lld",
        *FAST,
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "database is locked" not in done.stderr
    _parent, children = runs_of(tmp_path / "mlflow.db")
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    for child in children:
        assert child.data.metrics["n_items"] == 20
    ledger = (tmp_path / "sweep" / JOBS_FILE).read_text().splitlines()
    assert sorted(json.loads(line)["job"] for line in ledger) == [0, 1, 2, 3]


def test_a_failed_job_does_not_stop_the_others(tmp_path: Path) -> None:
    done = run(
        "runners.extract",
        "-m",
        "extractor=xlsr,egemaps",
        *FAST,
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    # xlsr comes first and fails (its model is not in the empty offline cache); egemaps
    # still runs; the sweep exits 1.
    assert done.returncode == 1
    assert "1 of 2 sweep jobs failed" in done.stderr
    parent, children = runs_of(tmp_path / "mlflow.db")
    assert [c.data.tags["extractor"] for c in children] == ["egemaps"]
    failed = json.loads(parent.data.tags["failed_jobs"])
    assert [f["job"] for f in failed] == [0] and "extractor=xlsr" in failed[0]["overrides"]
    assert parent.data.metrics["n_failed_jobs"] == 1


def test_compare_errors(tmp_path: Path) -> None:
    nothing = run("runners.compare", cwd=tmp_path)
    assert nothing.returncode == 2 and "no runs found" in nothing.stderr
    done = run(
        "runners.extract",
        "-m",
        "extractor=egemaps",
        *FAST,
        f"hydra.sweep.dir={tmp_path / 's'}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    missing = run("runners.compare", "label=emotion", cwd=tmp_path)
    assert missing.returncode == 2 and "label column 'emotion' missing" in missing.stderr
    few = run("runners.compare", "n_splits=11", cwd=tmp_path)  # 10 clips per class
    assert few.returncode == 2 and "too few for 11 folds" in few.stderr


def test_slurm_launcher_config_composes() -> None:
    import audio_models.config  # noqa: F401

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="extract",
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1
    assert launcher.timeout_min == 720
    assert cfg.hydra.callbacks.sweep._target_ == "audio_models.sweep.SweepCallback"


def test_unreachable_tracking_server_fails_before_any_work(tmp_path: Path) -> None:
    done = run(
        "runners.extract",
        "tracking=server",
        "tracking.uri=http://127.0.0.1:9",
        "extractor=xlsr",
        "extractor.model=/nonexistent/model",  # never loaded: the server check comes first
        "device=cpu",
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "tracking server at http://127.0.0.1:9 cannot be reached" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "cache").exists()  # no dataset was generated


def _leaks(secret: str, root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_a_single_run_is_not_part_of_a_sweep_and_keeps_no_secret(tmp_path: Path) -> None:
    # Hydra's own .hydra/{config,overrides,hydra}.yaml kept raw values in the output dir.
    secrets = ("hf_SINGLESECRET1", "URIPASS2")
    done = run(
        "runners.extract",
        *FAST,
        f"+hf_token={secrets[0]}",
        f"+extra.mirror=https://user:{secrets[1]}@example.org/x",
        "hydra.run.dir=single",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("audio-models").experiment_id])
    assert len(runs) == 1 and "sweep_id" not in runs[0].data.tags
    assert runs[0].data.params["hf_token"] == "***"
    out = tmp_path / "single"
    assert not (out / ".hydra").exists()
    assert "+hf_token=***" in (out / "overrides.yaml").read_text()  # the runner's own record
    for secret in secrets:
        assert secret not in done.stdout + done.stderr
        assert _leaks(secret, tmp_path) == []


def test_a_sweep_keeps_no_secret_and_keeps_its_parent_run(tmp_path: Path) -> None:
    # MLflow rejected the param name "sweep.+hf_token": the parent stayed RUNNING, sweep.json
    # was never written and the job ran unlinked; the raw value sat in multirun.yaml,
    # .hydra/, sweep_jobs.jsonl and the launch line on the console.
    secrets = ("hf_SWEEPSECRET1", "URIPASS2")
    done = run(
        "runners.extract",
        "-m",
        "extractor=egemaps",
        f"+hf_token={secrets[0]}",
        f"+extra.mirror=https://user:{secrets[1]}@example.org/x",
        *FAST,
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "+hf_token=***" in done.stdout  # the launch line, masked
    parent, children = runs_of(tmp_path / "mlflow.db")
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep.hf_token"] == "***"
    assert parent.data.params["sweep.extra.mirror"] == "https://user:***@example.org/x"
    assert not [k for k in parent.data.params if "+" in k]
    assert [c.info.status for c in children] == ["FINISHED"]
    assert children[0].data.params["hf_token"] == "***"
    sweep = tmp_path / "sweep"
    assert json.loads((sweep / SWEEP_FILE).read_text())["parent_run_id"] == parent.info.run_id
    assert "+hf_token=***" in (sweep / "multirun.yaml").read_text()
    assert not list(tmp_path.rglob(".hydra"))
    logged = [str(r.data.params) + str(r.data.tags) for r in (parent, *children)]
    for secret in secrets:
        assert secret not in done.stdout + done.stderr
        assert not [text for text in logged if secret in text]
        assert _leaks(secret, tmp_path) == []


def test_a_failing_sweep_callback_fails_the_sweep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hydra turns a callback's exception into a warning; the sweep then ran on, exit code 0.
    store = tmp_path / "mlflow.db"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="extract",
            overrides=[
                f"tracking.uri=sqlite:///{store}",
                f"tracking.artifact_location={tmp_path / 'art'}",
                f"hydra.sweep.dir={tmp_path / 'sweep'}",
                "extractor=egemaps",
            ],
            return_hydra_config=True,
        )
    start = MlflowTracker.start

    def start_then_fail(self: MlflowTracker, **kwargs: object) -> None:
        start(self, **kwargs)  # type: ignore[arg-type]
        raise RuntimeError("the store went away")

    with monkeypatch.context() as patched:
        patched.setattr(MlflowTracker, "start", start_then_fail)
        with pytest.raises(SystemExit) as exited:
            SweepCallback().on_multirun_start(config=cfg)
    assert exited.value.code == 1
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    runs = client.search_runs([client.get_experiment_by_name("audio-models").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]  # not left RUNNING

    SweepCallback().on_multirun_start(config=cfg)
    parent = json.loads((tmp_path / "sweep" / SWEEP_FILE).read_text())["parent_run_id"]
    monkeypatch.setattr(MlflowTracker, "log_metrics", lambda self, metrics: 1 / 0)
    with pytest.raises(SystemExit) as exited:
        SweepCallback().on_multirun_end(config=cfg)
    assert exited.value.code == 1
    assert client.get_run(parent).info.status == "FAILED"
