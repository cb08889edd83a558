"""Nothing hangs a run, and nothing finished is lost while something does: non-regular files
are failure rows, a stuck item times out, pending items are committed on a timer, SIGTERM and
SIGINT commit and end the MLflow run as KILLED."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from audio_models.audio.smile import OpenSmileExtractor
from audio_models.data.items import Item
from audio_models.data.loader import Record
from audio_models.extractor import OutputKind
from audio_models.pipeline.store import PROGRESS, OutputStore
from audio_models.pipeline.writer import ParquetFeatureWriter
from benchmarks.reliability import voice
from runners.extract import extract
from tests.conftest import RECORD_META

REPO = Path(__file__).resolve().parents[1]
STUCK_S = 2.5  # the one clip of this length never finishes its transform


def _corpus(root: Path, n_good: int = 6) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_good):
        sf.write(root / f"clip_{i}.wav", voice(1.0 + 0.1 * i, 150 + 10 * i), 16000)
    sf.write(root / "zz_stuck.wav", voice(STUCK_S), 16000)
    return root


def test_links_to_devices_and_fifos_are_failure_rows(make_cfg, tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    root.mkdir()
    sf.write(root / "good.wav", voice(1.0), 16000)
    (root / "zero.wav").symlink_to("/dev/zero")
    os.mkfifo(root / "pipe.wav")
    result = extract(make_cfg("dataset=folder", f"dataset.root={root}", "dataset.pattern=[*.wav]"))
    failures = pd.read_parquet(result.output_dir / "failures.parquet").set_index("id")
    assert "character device" in failures.loc["zero.wav", "message"]
    assert "FIFO" in failures.loc["pipe.wav", "message"]
    assert set(failures["stage"]) == {"decode"}
    assert pq.read_metadata(result.output_dir / "features.parquet").num_rows == 1


def test_a_stuck_item_times_out_as_a_failure_row(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _corpus(tmp_path / "corpus", n_good=2)
    real = OpenSmileExtractor.transform

    def stuck(self, signal_, sample_rate):  # type: ignore[no-untyped-def]
        if len(signal_) == int(STUCK_S * sample_rate):
            time.sleep(3600)
        return real(self, signal_, sample_rate)

    monkeypatch.setattr(OpenSmileExtractor, "transform", stuck)
    started = time.monotonic()
    result = extract(make_cfg("dataset=folder", f"dataset.root={root}", "loader.item_timeout_s=1"))
    assert time.monotonic() - started < 60
    failures = pd.read_parquet(result.output_dir / "failures.parquet")
    assert failures["id"].tolist() == ["zz_stuck.wav"]
    assert failures["stage"].tolist() == ["timeout"]
    assert pq.read_metadata(result.output_dir / "features.parquet").num_rows == 2


_STUCK_RUNNER = textwrap.dedent(
    f"""
    import sys, time
    from audio_models.audio.smile import OpenSmileExtractor
    real = OpenSmileExtractor.transform
    def stuck(self, signal, sample_rate):
        if len(signal) == int({STUCK_S} * sample_rate):
            time.sleep(3600)
        return real(self, signal, sample_rate)
    OpenSmileExtractor.transform = stuck
    sys.argv = ["runners.extract", *sys.argv[1:]]
    from runners.extract import main
    main()
    """
)


def _committed_rows(out: Path) -> int:
    rows = 0
    for part in (out / PROGRESS).glob("part-*.parquet"):
        rows += pq.read_metadata(part).num_rows
    return rows


def _start_stuck(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _STUCK_RUNNER, *args],
        cwd=cwd,
        start_new_session=True,  # its group: the test ends orphaned workers afterwards
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,  # Hydra logs to stdout, errors go to stderr: one stream
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for_rows(proc: subprocess.Popen[str], out: Path, rows: int) -> None:
    deadline = time.monotonic() + 120
    while _committed_rows(out) < rows:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.monotonic() < deadline, "finished items were never committed"
        time.sleep(0.2)


def test_sigkill_and_sigterm_while_stuck_keep_finished_items(tmp_path: Path, mlflow_store) -> None:
    root = _corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    uri, tracking = mlflow_store
    args = [
        "dataset=folder",
        f"dataset.root={root}",
        f"output_dir={out}",
        "device=cpu",
        "loader.num_workers=1",  # the stuck item holds the only worker after the others
        "loader.item_timeout_s=null",
        "writer.commit_every_s=1",
        "progress_bar=false",
        *tracking,
    ]
    # SIGKILL: nothing runs on the way out; the timer committed the six finished items
    # although no batch came after them (8 per commit would otherwise be needed). The
    # killed run's loader worker lives on, stuck: it must not keep the directory locked.
    killed = _start_stuck(args, tmp_path)
    try:
        _wait_for_rows(killed, out, 6)
        killed.kill()
        killed.wait()
        _sigterm_then_rerun(args, tmp_path, out, uri)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)


def _sigterm_then_rerun(args: list[str], tmp_path: Path, out: Path, uri: str) -> None:
    # SIGTERM: committed, the MLflow run ends KILLED, the exit code says which signal.
    proc = _start_stuck(args, tmp_path)
    try:
        _sigterm(proc, uri)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    # A clean rerun skips the six and does the last one: every item exactly once.
    done = subprocess.run(
        [sys.executable, "-m", "runners.extract", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:]
    features = pd.read_parquet(out / "features.parquet")
    assert sorted(features["id"]) == [*(f"clip_{i}.wav" for i in range(6)), "zz_stuck.wav"]
    assert "this session: 1 items (0 failed)" in done.stdout
    assert "holds 7 items (0 failed, 6 done before)" in done.stdout


def _read_until(proc: subprocess.Popen[str], text: str, timeout_s: float = 180) -> list[str]:
    """Lines of ``proc``'s output up to the one containing ``text`` (never blocks for good:
    a silent, stuck process fails the test after ``timeout_s``)."""
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while not any(text in line for line in seen):
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no {text!r} within {timeout_s} s: " + "".join(seen)[-2000:]
        line = proc.stdout.readline()
        assert line, "".join(seen)[-2000:]
        seen.append(line)
    return seen


def _sigterm(proc: subprocess.Popen[str], uri: str) -> None:
    seen = _read_until(proc, "6 items already committed")
    time.sleep(3)  # in the predict loop, the worker on the stuck item
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    err = "".join(seen) + out
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "interrupted (SIGTERM): 6 items are committed in" in err
    # The command that resumes: the same overrides and output_dir.
    assert "resume with: python -m runners.extract" in err and "output_dir=" in err
    assert "graceful shutdown" not in err  # Lightning's own note is not for the user
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs(client.search_experiments()[0].experiment_id)
    assert run.info.status == "KILLED"


def test_a_failed_timed_commit_keeps_its_records_and_fails_the_run(tmp_path: Path) -> None:
    items = [Item(id=f"a{i}", path=f"/a{i}.wav") for i in range(3)]
    store = OutputStore(tmp_path, "hash")
    store.open()
    writer = ParquetFeatureWriter(
        store,
        kind=OutputKind.VECTOR,
        feature_names=["x"],
        frame_shift_s=None,
        items=items,
        label_columns=[],
        commit_rows=8,  # never reached: only the timer commits
        commit_every_s=0.2,
    )
    meta = RECORD_META
    real_commit, calls = store.commit, []

    def full_disk(*args: object, **kwargs: object) -> None:
        calls.append(1)
        raise OSError(28, "No space left on device")

    store.commit = full_disk  # type: ignore[method-assign]
    records = []
    for item in items[:2]:
        record = Record(item=item, key=item.id, meta=dict(meta))
        record.features = np.array([1.0], dtype=np.float32)
        records.append(record)
    writer.consume(records)
    deadline = time.monotonic() + 10
    while not calls and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    assert calls, "the timer never tried to commit"
    with pytest.raises(OSError, match="No space left"):  # reported in the main thread
        writer.consume([])
    assert len(writer._pending) == 2 and writer.n_processed == 0  # nothing was dropped
    store.commit = real_commit  # type: ignore[method-assign]
    writer.stop_timer()
    writer.flush()
    assert _committed_rows(tmp_path) == 2
    store.release()
