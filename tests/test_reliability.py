"""Never lose work: kill -9 and resume, bad recordings, OOM splitting, dying workers, safety."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import mlflow
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from audio_models.audio.kaldi import KaldiExtractor
from audio_models.audio.smile import OpenSmileExtractor
from audio_models.data.items import Item
from audio_models.data.loader import Record
from audio_models.extractor import OutputKind
from audio_models.pipeline import writer as writer_module
from audio_models.pipeline.store import PROGRESS, OutputStore
from audio_models.pipeline.writer import ParquetFeatureWriter
from audio_models.utils.errors import UserError
from benchmarks.reliability import build_bad_corpus, voice
from runners.extract import extract
from tests.conftest import RECORD_META, frames_by_id

REPO = Path(__file__).resolve().parents[1]


def _run_killing(tmp_path: Path, overrides: list[str], kills: int, seed: int) -> list[int]:
    """Run the CLI, SIGKILL its process group after a random number of committed batches,
    repeat until a run completes. Returns the part counts at which it was killed."""
    command = [sys.executable, "-m", "runners.extract", *overrides]
    rng = random.Random(seed)
    killed_at = []
    progress = (
        Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")))
        / ".progress"
    )
    for attempt in range(kills + 1):
        proc = subprocess.Popen(
            command,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        target = (
            len(list(progress.glob("part-*.parquet"))) + rng.randint(1, 4)
            if attempt < kills
            else None
        )
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if target is not None and len(list(progress.glob("part-*.parquet"))) >= target:
                time.sleep(rng.uniform(0.0, 0.3))  # land anywhere, mid-write included
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                killed_at.append(target)
                break
            time.sleep(0.02)
        else:
            _, err = proc.communicate()
            assert proc.returncode == 0, err.decode()[-3000:]
            return killed_at
    raise AssertionError("the run never completed")


@pytest.mark.slow
def test_kill_and_resume_writes_every_item_once(tmp_path: Path) -> None:
    out = tmp_path / "out"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = [
        "extractor=egemaps",
        "dataset.n_clips=40",
        f"dataset.root={tmp_path}/demo",
        "loader.batch_size=2",
        "loader.num_workers=1",
        "writer.commit_every_s=0",  # a part per batch: kills land between many commits
        "progress_bar=false",
        "device=cpu",
        f"tracking.uri={uri}",
        f"tracking.artifact_location={tmp_path}/art",
        "tracking.experiment=resume",
    ]
    killed = _run_killing(tmp_path, [*common, f"output_dir={out}"], kills=3, seed=1)
    assert len(killed) == 3
    assert not (out / ".progress").exists()
    resumed = pd.read_parquet(out / "features.parquet")
    assert resumed["id"].is_unique and len(resumed) == 40
    assert pd.read_parquet(out / "failures.parquet").empty
    # The uninterrupted reference, same settings.
    reference = [o for o in common if not o.startswith("tracking.")]
    reference += [f"output_dir={tmp_path}/ref", "tracking=off"]
    subprocess.run(
        [sys.executable, "-m", "runners.extract", *reference],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    ref = pd.read_parquet(tmp_path / "ref" / "features.parquet")
    pd.testing.assert_frame_equal(
        resumed.sort_values("id").reset_index(drop=True),
        ref.sort_values("id").reset_index(drop=True),
        check_exact=True,
    )
    # One MLflow run, resumed by id, finished, counting all items.
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["resume"])
    assert len(runs) == 1
    assert runs.iloc[0]["status"] == "FINISHED"
    assert runs.iloc[0]["metrics.n_items"] == 40
    assert runs.iloc[0]["tags.resumed"] == "true"


@pytest.mark.slow
def test_kill_and_resume_frames(tmp_path: Path) -> None:
    out = tmp_path / "out"
    common = [
        "extractor=fbank",
        "dataset.n_clips=16",
        f"dataset.root={tmp_path}/demo",
        "loader.batch_size=1",
        "loader.num_workers=1",
        "writer.commit_every_s=0",  # a part per batch: kills land between many commits
        "progress_bar=false",
        "device=cpu",
        "tracking=off",
    ]
    _run_killing(tmp_path, [*common, f"output_dir={out}"], kills=2, seed=7)
    subprocess.run(
        [sys.executable, "-m", "runners.extract", *common, f"output_dir={tmp_path}/ref"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    index = pd.read_parquet(out / "frames" / "index.parquet")
    assert index["id"].is_unique and len(index) == 16
    shards = {p.name for p in (out / "frames").glob("shard-*.parquet")}
    assert shards == {Path(s).name for s in index["shard"]}  # no orphan shard left behind
    a, b = frames_by_id(out), frames_by_id(tmp_path / "ref")
    pd.testing.assert_frame_equal(a, b, check_exact=True)


def _three_tones(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A folder with a0..a2.wav (1 s tones) and the time axis to write more."""
    root = tmp_path / "corpus"
    root.mkdir()
    t = np.arange(16000) / 16000
    for i in range(3):
        tone = (0.3 * np.sin(2 * np.pi * (150 + 20 * i) * t)).astype(np.float32)
        sf.write(root / f"a{i}.wav", tone, 16000)
    return root, t


def test_rerun_skips_and_grown_corpus_adds(make_cfg, tmp_path: Path) -> None:
    root, t = _three_tones(tmp_path)
    first = extract(make_cfg("dataset=folder", f"dataset.root={root}"))
    assert first.metrics["n_items"] == 3
    again = extract(make_cfg("dataset=folder", f"dataset.root={root}"))
    assert again.metrics["n_skipped_resumed"] == 3 and again.metrics["n_items"] == 3
    sf.write(root / "b.wav", (0.3 * np.sin(2 * np.pi * 400 * t)).astype(np.float32), 16000)
    grown = extract(make_cfg("dataset=folder", f"dataset.root={root}"))
    assert grown.metrics["n_skipped_resumed"] == 3
    table = pd.read_parquet(grown.output_dir / "features.parquet")
    assert sorted(table["id"]) == ["a0.wav", "a1.wav", "a2.wav", "b.wav"]
    # Edited audio changes the item's key: processed again, its new row replaces the old one.
    sf.write(root / "a0.wav", (0.3 * np.sin(2 * np.pi * 700 * t)).astype(np.float32), 16000)
    edited = extract(make_cfg("dataset=folder", f"dataset.root={root}"))
    assert edited.metrics["n_skipped_resumed"] == 3 and edited.metrics["n_items"] == 4
    table = pd.read_parquet(edited.output_dir / "features.parquet").set_index("id")
    assert table.index.is_unique
    reference = extract(make_cfg("dataset=folder", f"dataset.root={root}", out="check"))
    check = pd.read_parquet(reference.output_dir / "features.parquet").set_index("id")
    pd.testing.assert_frame_equal(
        table.loc[check.index].drop(columns="path"), check.drop(columns="path")
    )
    # Changed settings never mix into the same outputs:
    with pytest.raises(UserError, match="different settings"):
        extract(make_cfg("dataset=folder", f"dataset.root={root}", "extractor=compare"))
    fresh = extract(
        make_cfg("dataset=folder", f"dataset.root={root}", "extractor=compare", "resume=false")
    )
    assert fresh.metrics["n_skipped_resumed"] == 0
    assert pd.read_parquet(fresh.output_dir / "features.parquet").shape[1] > 6000


def test_grown_corpus_keeps_finished_frames(make_cfg, tmp_path: Path) -> None:
    root, t = _three_tones(tmp_path)
    overrides = ["extractor=fbank", "dataset=folder", f"dataset.root={root}", "loader.batch_size=1"]
    extract(make_cfg(*overrides))
    sf.write(root / "b.wav", (0.3 * np.sin(2 * np.pi * 400 * t)).astype(np.float32), 16000)
    grown = extract(make_cfg(*overrides))
    reference = extract(make_cfg(*overrides, out="ref"))
    assert grown.metrics["n_skipped_resumed"] == 3
    pd.testing.assert_frame_equal(
        frames_by_id(grown.output_dir), frames_by_id(reference.output_dir), check_exact=True
    )


def test_bad_and_awkward_recordings(make_cfg, tmp_path: Path) -> None:
    root = tmp_path / "corpus dir"
    expected = build_bad_corpus(root)
    good = root / "ok.wav"
    sf.write(good, voice(2.0), 16000)
    manifest = tmp_path / "m.csv"
    rows = [f'"{p}",,' for p in sorted(root.iterdir())]
    rows += [f'"{root / "missing.wav"}",,', f'"{good}",1.5,3.5']
    manifest.write_text("path,start,end\n" + "\n".join(rows) + "\n")
    for name in ("egemaps", "fbank"):
        overrides = [f"extractor={name}", "dataset=manifest", f"dataset.path={manifest}"]
        with pytest.warns(UserWarning):
            result = extract(make_cfg(*overrides, "max_failure_ratio=1.0", out=name))
        table = pd.read_parquet(result.output_dir / "features.parquet")
        table.index = table["id"].map(lambda p: Path(p).name)
        failures = pd.read_parquet(result.output_dir / "failures.parquet")
        names = failures["id"].map(lambda p: Path(p.split("@")[0]).name)
        failed = dict(zip(names, failures["stage"], strict=True))
        assert set(table.index) == {n for n, o in expected.items() if o == "ok"} | {"ok.wav"}, name
        assert failed == {
            **{n: o for n, o in expected.items() if o != "ok"},
            "missing.wav": "decode",
            "ok.wav": "segment",
        }
        assert table.loc["zeros.wav", "silence_ratio"] == 1.0
        assert table.loc["stereo48k.wav", "n_channels"] == 2
        # A rerun skips every committed item, failures included: nothing is duplicated.
        again = extract(make_cfg(*overrides, "max_failure_ratio=1.0", out=name))
        assert again.metrics["n_skipped_resumed"] == len(table) + len(failures)
        assert pd.read_parquet(again.output_dir / "failures.parquet")["id"].is_unique


def test_preflight_policies_skip_on_purpose(make_cfg) -> None:
    with pytest.warns(UserWarning, match="PolicySkip"):
        result = extract(make_cfg("preflight.min_duration_s=3.0", "max_failure_ratio=1.0"))
    failures = pd.read_parquet(result.output_dir / "failures.parquet")
    features = pd.read_parquet(result.output_dir / "features.parquet")
    assert len(failures) + len(features) == 24
    assert (failures["error_type"] == "PolicySkip").all() and (features["duration_s"] >= 3.0).all()


def test_thirty_minute_recording(make_cfg, tmp_path: Path) -> None:
    root = tmp_path / "long"
    root.mkdir()
    rng = np.random.default_rng(1)
    n = 16000 * 1800
    t = np.arange(n, dtype=np.float64) / 16000
    signal = (0.2 * np.sin(2 * np.pi * 140 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.5 * t))).astype(
        np.float32
    )
    signal += 0.01 * rng.standard_normal(n).astype(np.float32)
    sf.write(root / "long.wav", signal, 16000, subtype="PCM_16")
    from audio_models.testing import make_tiny, make_tiny_ecapa

    # Learned models on tiny random weights: chunking keeps their memory bounded (the
    # per-extractor peak RSS at full size is in `python -m benchmarks.reliability`).
    models = {
        "xlsr": [
            f"extractor.model={make_tiny(tmp_path / 'w2v', 'wav2vec2-layer')}",
            "extractor.pooling=none",
        ],
        "ecapa": [f"extractor.model={make_tiny_ecapa(tmp_path / 'ecapa')}"],
    }
    for name in ("fbank", "egemaps", "xlsr", "ecapa"):
        result = extract(
            make_cfg(
                f"extractor={name}",
                *models.get(name, []),
                "dataset=folder",
                f"dataset.root={root}",
                out=name,
            )
        )
        table = pd.read_parquet(result.output_dir / "features.parquet")
        assert table["duration_s"].iloc[0] == pytest.approx(1800.0)
        if name == "fbank":
            assert table["n_frames"].iloc[0] == 179998
        if name == "xlsr":  # stitched chunks: the whole file's frame grid
            # tiny conv stack: receptive field 185 samples, stride 80
            assert table["n_frames"].iloc[0] == (16000 * 1800 - 185) // 80 + 1


class _OomBelowTwo(KaldiExtractor):
    """fbank that runs out of memory for batches of more than two items."""

    calls: ClassVar[list[int]] = []

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        type(self).calls.append(waveforms.shape[0])
        if waveforms.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return super().forward(waveforms, lengths)


def test_out_of_memory_splits_the_batch(make_cfg) -> None:
    _OomBelowTwo.calls.clear()
    cfg = make_cfg(
        "extractor=fbank", f"extractor._target_={__name__}._OomBelowTwo", "loader.batch_size=8"
    )
    result = extract(cfg)
    assert result.metrics["n_failed"] == 0 and result.metrics["n_items"] == 24
    assert 8 in _OomBelowTwo.calls and 4 in _OomBelowTwo.calls and 2 in _OomBelowTwo.calls
    reference = extract(make_cfg("extractor=fbank", "loader.batch_size=2", out="ref"))
    pd.testing.assert_frame_equal(
        frames_by_id(result.output_dir), frames_by_id(reference.output_dir), check_exact=True
    )


class _PoisonedSmile(OpenSmileExtractor):
    """eGeMAPS whose worker process dies on a constant 0.5 signal."""

    def transform(self, signal: np.ndarray, sample_rate: int) -> np.ndarray:
        if signal.size and np.all(signal == 0.5):
            time.sleep(0.5)  # the runner has taken the items before this one meanwhile
            os.kill(os.getpid(), signal_module.SIGKILL)
        return super().transform(signal, sample_rate)


signal_module = signal


def test_dead_worker_is_reported_with_its_item(make_cfg, tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    root.mkdir()
    t = np.arange(16000) / 16000
    for i in range(4):
        sf.write(
            root / f"good{i}.wav",
            (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32),
            16000,
            subtype="FLOAT",
        )
    sf.write(root / "poison.wav", np.full(16000, 0.5, dtype=np.float32), 16000, subtype="FLOAT")
    overrides = [
        f"extractor._target_={__name__}._PoisonedSmile",
        "dataset=folder",
        f"dataset.root={root}",
        "loader.num_workers=1",
        "loader.batch_size=1",
        "max_failure_ratio=1.0",
    ]
    with pytest.raises(UserError, match=r"worker died while processing 'poison\.wav'"):
        extract(make_cfg(*overrides))
    result = extract(make_cfg(*overrides))  # the rerun resumes and completes
    # The items finished before the crash were committed by the failed run (pending ones
    # too, not only those past commit_every_s): the rerun computed none of them again, nor
    # the poisoned one (its failure row is committed).
    assert result.metrics["n_skipped_resumed"] == 5
    failures = pd.read_parquet(result.output_dir / "failures.parquet")
    assert list(failures["id"]) == ["poison.wav"] and failures["stage"].iloc[0] == "worker"
    assert len(pd.read_parquet(result.output_dir / "features.parquet")) == 4


def test_every_torch_load_is_weights_only() -> None:
    offenders = []
    for path in (REPO / "audio_models").rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{path}:{number}")
            if re.search(r"weights_only\s*=\s*False", line):
                offenders.append(f"{path}:{number}")
    assert not offenders, offenders


def test_manifest_ids_cannot_escape_the_output_dir(make_cfg, tmp_path: Path) -> None:
    audio = tmp_path / "a.wav"
    sf.write(audio, (0.3 * np.sin(np.arange(16000) / 5)).astype(np.float32), 16000)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"id,path\n../../escaped,{audio}\n/abs/escaped,{audio}\n")
    result = extract(
        make_cfg(
            "extractor=fbank",
            "dataset=manifest",
            f"dataset.path={manifest}",
            "dataset.id_column=id",
        )
    )
    assert sorted(pd.read_parquet(result.output_dir / "features.parquet")["id"]) == [
        "../../escaped",
        "/abs/escaped",
    ]
    assert not list(tmp_path.rglob("escaped*")) and not Path("/abs").exists()
    assert all(p.resolve().is_relative_to(result.output_dir.resolve()) for p in result.files)


def test_secrets_never_reach_mlflow(make_cfg, mlflow_store) -> None:
    uri, tracking = mlflow_store
    cfg = make_cfg(
        *tracking,
        "+hf_token=hf_SECRETVALUE123",
        "+extra.api_key=SECRETKEY456",
    )
    result = extract(cfg)
    run = mlflow.MlflowClient(uri).get_run(result.run_id)
    everything = (
        str(run.data.params) + str(run.data.tags) + (result.output_dir / "config.yaml").read_text()
    )
    assert "SECRETVALUE123" not in everything and "SECRETKEY456" not in everything
    assert run.data.params["hf_token"] == "***"


@pytest.mark.parametrize(
    ("every_s", "cap_bytes", "parts"), [(0.0, 2**26, 6), (3600.0, 2**26, 1), (3600.0, 16, 6)]
)
def test_commits_gather_batches_for_commit_every_s(
    tmp_path: Path, monkeypatch, every_s: float, cap_bytes: int, parts: int
) -> None:
    # 12 finished records in batches of 2: a part per batch with commit_every_s=0, one part
    # (at the end) when the interval never passes, a part per batch again when each batch's
    # features (16 bytes) reach the pending-memory cap.
    monkeypatch.setattr(writer_module, "_PENDING_BYTES", cap_bytes)
    items = [Item(id=f"a{i}", path=f"/a{i}.wav") for i in range(12)]
    store = OutputStore(tmp_path, "hash")
    store.open()
    writer = ParquetFeatureWriter(
        store,
        kind=OutputKind.VECTOR,
        feature_names=["x", "y"],
        frame_shift_s=None,
        items=items,
        label_columns=[],
        commit_rows=2,
        commit_every_s=every_s,
    )
    meta = RECORD_META
    counts = []
    for start in range(0, 12, 2):
        batch = []
        for item in items[start : start + 2]:
            record = Record(item=item, key=item.id, meta=dict(meta))
            record.features = np.array([1.0, 2.0], dtype=np.float32)
            batch.append(record)
        writer.consume(batch)
        counts.append(len(list((tmp_path / PROGRESS).glob("part-*.parquet"))))
    writer.flush()
    assert counts == ([1, 2, 3, 4, 5, 6] if parts == 6 else [0] * 6)
    assert len(list((tmp_path / PROGRESS).glob("part-*.parquet"))) == parts
    store.finalize(row_group_rows=512, run_id=None, feature_columns=writer.feature_columns)
    table = pd.read_parquet(tmp_path / "features.parquet")
    assert list(table["id"]) == [item.id for item in items]
