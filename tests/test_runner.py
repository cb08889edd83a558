"""End-to-end runs of the extraction runner: outputs, MLflow, bad input."""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import Dataset, get_worker_info

from audio_models.data.items import Item
from audio_models.data.loader import Record, SamplerOrderLoader, collate
from audio_models.utils.errors import UserError
from runners.extract import extract
from tests.conftest import EXTRACTORS

META = ["id", "path", "start", "end", "duration_s", "sample_rate"]


def _check_outputs(out: Path, name: str, n_items: int, labels: list[str]) -> pd.DataFrame:
    _, kind, width = EXTRACTORS[name]
    table = pd.read_parquet(out / "features.parquet")
    assert len(table) == n_items
    assert list(table.columns[: len(META)]) == META
    for label in labels:
        assert label in table.columns
    assert (table["duration_s"] > 0).all()
    np.testing.assert_allclose(table["end"] - table["start"], table["duration_s"])
    assert pd.read_parquet(out / "failures.parquet").empty
    if kind.value == "frames":
        index = pd.read_parquet(out / "frames" / "index.parquet")
        assert list(index.columns) == ["id", "shard", "offset", "n_frames", "frame_shift_s"]
        assert list(index["id"]) == list(table["id"])
        total = sum(len(pd.read_parquet(out / shard)) for shard in index["shard"].unique())
        assert total == index["n_frames"].sum()
        # ~duration / shift frames per item
        ratio = index["n_frames"] * index["frame_shift_s"] / table["duration_s"]
        assert ratio.between(0.8, 1.01).all()
    else:
        assert table.shape[1] >= width
        features = table.iloc[:, -width:].to_numpy(float)
        assert np.isfinite(features).mean() > 0.95
    return table


@pytest.mark.parametrize("name", sorted(EXTRACTORS))
def test_every_extractor_on_demo(make_cfg, name: str) -> None:
    result = extract(make_cfg(f"extractor={name}"))
    _check_outputs(result.output_dir, name, 24, ["label", "vowel", "f0_hz"])
    assert result.metrics["n_items"] == 24
    assert result.metrics["n_failed"] == 0


@pytest.mark.parametrize("name", sorted(EXTRACTORS))
def test_every_extractor_on_real_speech(make_cfg, speech_dir: Path, name: str) -> None:
    cfg = make_cfg(
        f"extractor={name}",
        "dataset=folder",
        f"dataset.root={speech_dir}",
        "dataset.label_regex='(?P<corpus>^[^/]+)/'",
        "loader.batch_size=8",
    )
    result = extract(cfg)
    n_files = len(list(speech_dir.rglob("*.wav"))) + len(list(speech_dir.rglob("*.flac")))
    table = _check_outputs(result.output_dir, name, n_files, ["corpus"])
    assert set(table["corpus"]) == {
        "harvard",
        "emodb-subset",
        "opensmile-test",
        "librispeech-hubert",
    }


def test_demo_classes_are_separable(make_cfg) -> None:
    table = pd.read_parquet(extract(make_cfg()).output_dir / "features.parquet")
    features = table.iloc[:, -88:].to_numpy(float)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    scores = cross_val_score(model, features, table["label"], cv=4)
    assert scores.mean() >= 0.9


def test_demo_is_deterministic(make_cfg, tmp_path: Path) -> None:
    a = pd.read_parquet(
        extract(make_cfg(f"dataset.root={tmp_path}/a", out="a")).output_dir / "features.parquet"
    )
    b = pd.read_parquet(
        extract(make_cfg(f"dataset.root={tmp_path}/b", out="b")).output_dir / "features.parquet"
    )
    pd.testing.assert_frame_equal(a.drop(columns="path"), b.drop(columns="path"))


@pytest.mark.parametrize("name", ["fbank", "egemaps"])
def test_batched_equals_unbatched_and_workers_equal_in_process(make_cfg, name: str) -> None:
    one = extract(make_cfg(f"extractor={name}", "loader.batch_size=1", out="one"))
    many = extract(
        make_cfg(f"extractor={name}", "loader.batch_size=7", "loader.num_workers=2", out="many")
    )
    a = pd.read_parquet(one.output_dir / "features.parquet")
    b = pd.read_parquet(many.output_dir / "features.parquet")
    if name == "fbank":
        fa = pd.concat([pd.read_parquet(one.output_dir / s) for s in sorted(a["shard"].unique())])
        fb = pd.concat([pd.read_parquet(many.output_dir / s) for s in sorted(b["shard"].unique())])
        np.testing.assert_allclose(
            fa.iloc[:, 2:].to_numpy(), fb.iloc[:, 2:].to_numpy(), rtol=1e-5, atol=1e-4
        )
        a, b = a.drop(columns=["shard", "offset"]), b.drop(columns=["shard", "offset"])
    pd.testing.assert_frame_equal(a, b, check_exact=True)


def test_mlflow_run_reads_back(make_cfg, mlflow_store, tmp_path: Path) -> None:
    uri, tracking = mlflow_store
    cfg = make_cfg(*tracking, "tracking.experiment=test-exp")
    result = extract(cfg)
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["test-exp"])
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["run_id"] == result.run_id
    assert run["status"] == "FINISHED"
    assert run["params.extractor.name"] == "egemaps"
    assert run["params.loader.batch_size"] == "4"
    assert run["params.dataset._target_"] == "audio_models.data.datasets.DemoDataset"
    for tag in (
        "extractor",
        "dataset",
        "dataset_fingerprint",
        "git_commit",
        "git_dirty",
        "version.torch",
        "version.opensmile",
        "provenance.opensmile.feature_set",
    ):
        assert run[f"tags.{tag}"], tag
    assert run["tags.extractor"] == "egemaps"
    assert run["tags.dataset"] == "demo"
    assert run["metrics.n_items"] == 24
    assert run["metrics.n_failed"] == 0
    for metric in ("audio_seconds", "wall_s", "audio_s_per_s", "peak_rss_mb"):
        assert run[f"metrics.{metric}"] > 0
    client = mlflow.MlflowClient(uri)
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {
        "features.parquet",
        "failures.parquet",
        "config.yaml",
        "overrides.yaml",
        "outputs.json",
    } <= artifacts
    local = client.download_artifacts(result.run_id, "features.parquet", str(tmp_path))
    pd.testing.assert_frame_equal(
        pd.read_parquet(local), pd.read_parquet(result.output_dir / "features.parquet")
    )


def test_large_outputs_are_recorded_by_hash(make_cfg, mlflow_store, tmp_path: Path) -> None:
    uri, tracking = mlflow_store
    cfg = make_cfg(*tracking, "tracking.max_artifact_mb=0.000001")
    result = extract(cfg)
    client = mlflow.MlflowClient(uri)
    path = client.download_artifacts(result.run_id, "outputs.json", str(tmp_path))
    entries = {e["relative"]: e for e in json.loads(Path(path).read_text())["outputs"]}
    assert entries["features.parquet"]["logged"] is False
    assert len(entries["features.parquet"]["sha256"]) == 64
    assert "features.parquet" not in {a.path for a in client.list_artifacts(result.run_id)}


def _write_bad_inputs(root: Path) -> None:
    t = np.arange(32000) / 16000
    good = (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + 0.3 * np.sin(2 * np.pi * 3 * t))).astype(
        np.float32
    )
    for i in range(3):
        sf.write(root / f"good{i}.wav", np.roll(good, 500 * i), 16000)
    (root / "empty.wav").write_bytes(b"")
    (root / "corrupt.wav").write_bytes(b"RIFF$\x00\x00\x00WAVEfmt " + bytes(range(256)) * 4)
    (root / "notes.mp3").write_text("this is not audio at all\n" * 50)
    sf.write(root / "tiny.wav", good[:100], 16000)  # 6 ms: shorter than any extractor's window


@pytest.mark.parametrize("name", ["egemaps", "fbank", "librosa"])
def test_bad_files_become_failure_rows(make_cfg, tmp_path: Path, name: str) -> None:
    root = tmp_path / "corpus"
    root.mkdir()
    _write_bad_inputs(root)
    manifest = tmp_path / "manifest.csv"
    rows = [f"{p.name},," for p in sorted(root.iterdir())] + [
        "good0.wav,0.5,1.5",
        "good1.wav,1.5,2.5",
    ]
    manifest.write_text("path,start,end\n" + "\n".join(f"corpus/{r}" for r in rows) + "\n")
    with pytest.warns(UserWarning, match="failed"):
        result = extract(
            make_cfg(f"extractor={name}", "dataset=manifest", f"dataset.path={manifest}")
        )
    features = pd.read_parquet(result.output_dir / "features.parquet")
    failures = pd.read_parquet(result.output_dir / "failures.parquet").set_index("id")
    assert list(failures.columns) == ["path", "stage", "error_type", "message", "item_key"]
    assert sorted(features["id"]) == [
        "corpus/good0.wav",
        "corpus/good0.wav@0.5-1.5",
        "corpus/good1.wav",
        "corpus/good2.wav",
    ]
    assert failures.loc["corpus/empty.wav", "stage"] == "decode"
    assert failures.loc["corpus/corrupt.wav", "stage"] == "decode"
    assert failures.loc["corpus/notes.mp3", "stage"] == "decode"
    assert failures.loc["corpus/good1.wav@1.5-2.5", "stage"] == "segment"
    assert failures.loc["corpus/tiny.wav", "stage"] == "preflight"
    assert result.metrics["n_items"] == 9
    assert result.metrics["n_failed"] == 5


def test_cuda_without_a_gpu_is_a_clear_error(make_cfg) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(UserError, match="no CUDA device"):
        extract(make_cfg("device=cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_fbank_on_cuda_equals_cpu(make_cfg, precision: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cpu = extract(make_cfg("extractor=fbank", out="cpu"))
    gpu = extract(
        make_cfg("extractor=fbank", "device=cuda", f"device.precision={precision}", out="gpu")
    )
    a, b = (pd.read_parquet(r.output_dir / "frames" / "shard-00000.parquet") for r in (cpu, gpu))
    np.testing.assert_allclose(
        a.iloc[:, 2:].to_numpy(), b.iloc[:, 2:].to_numpy(), rtol=1e-4, atol=1e-3
    )


class _SlowFirst(Dataset):
    """Item 0 takes a second, the others a hundredth; each record says which worker made it."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, index: int) -> Record:
        time.sleep(1.0 if index == 0 else 0.01)
        worker = get_worker_info()
        record = Record(item=Item(id=str(index), path=""), index=index)
        record.extra = {"worker": str(worker.id if worker else -1)}
        return record


@pytest.mark.parametrize("batch_size", [1, 3])
def test_free_workers_take_the_next_items_and_batches_keep_sampler_order(
    batch_size: int,
) -> None:
    # Dealt in turn (PyTorch's default), each worker would get half the items and the fast one
    # would wait for the slow one; taken as the workers free up, the fast one does nearly all.
    order = [5, 0, *range(6, 24), *range(1, 5)]
    loader = SamplerOrderLoader(
        _SlowFirst(), batch_size=batch_size, sampler=order, num_workers=2, collate_fn=collate
    )
    batches = list(loader)
    assert [r.index for b in batches for r in b.records] == order
    assert [[r.index for r in b.records] for b in batches] == [list(b) for b in loader._order]
    by_worker = [r.extra["worker"] for b in batches for r in b.records]
    slow = next(r.extra["worker"] for b in batches for r in b.records if r.index == 0)
    assert by_worker.count(slow) <= len(order) // 4


def test_held_back_batches_are_bounded() -> None:
    # The slow item would hold 22 finished items back; with room for 4 the earliest of them go
    # out ahead of it, every item exactly once.
    order = [5, 0, *range(6, 24), *range(1, 5)]
    loader = SamplerOrderLoader(
        _SlowFirst(), batch_size=1, sampler=order, num_workers=2, collate_fn=collate, max_ahead=4
    )
    out = [r.index for b in loader for r in b.records]
    assert sorted(out) == sorted(order)
    assert out[0] == 5
    assert out.index(0) > 4  # released ahead of it, earliest first
    assert out[1:5] == sorted(out[1:5])
