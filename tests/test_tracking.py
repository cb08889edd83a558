"""``MlflowTracker`` against a local SQLite store: locks at start-up, masking of what it logs."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow.tracking
import pytest
from mlflow.tracking import MlflowClient

from audio_models.tracking import MlflowTracker
from audio_models.utils.errors import UserError


@contextmanager
def exclusive_lock(db: Path, seconds: float) -> Iterator[threading.Thread]:
    """Another writer's transaction on ``db`` for ``seconds`` (a thread with its own connection:
    SQLite's file locks hold between connections of one process too)."""
    locked = threading.Event()

    def hold() -> None:
        connection = sqlite3.connect(db, isolation_level=None)
        try:
            connection.execute("BEGIN EXCLUSIVE")
            locked.set()
            time.sleep(seconds)
            connection.execute("ROLLBACK")
        finally:
            connection.close()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert locked.wait(10)
    try:
        yield thread
    finally:
        thread.join()


# A short SQLite busy timeout (pysqlite reads it from the URI) makes each locked attempt fail
# in 0.2 s instead of 5 s, so a few seconds of lock outlast MLflow's own start-up retries.
def _uri(db: Path) -> str:
    return f"sqlite:///{db}?timeout=0.2"


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """An existing store, opened once under another URI: MLflow's lazy imports and table
    creation are done before a test takes the lock, so the lock meets the tracker's first call
    (MLflow caches a store per URI: the tracker's URI opens it anew)."""
    db = tmp_path / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


def test_a_locked_store_is_waited_for_at_start_up(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts: list[float] = []

    def counted(*args: Any, **kwargs: Any) -> MlflowClient:
        attempts.append(time.monotonic())
        return MlflowClient(*args, **kwargs)

    monkeypatch.setattr(mlflow.tracking, "MlflowClient", counted)
    started = time.monotonic()
    with exclusive_lock(store, 4.0):
        tracker = MlflowTracker(uri=_uri(store), artifact_location=str(tmp_path / "art"))
        tracker.start(run_name="r", params={"a": "1"}, tags={})
    assert len(attempts) > 1  # opening the store met the lock and was retried
    assert time.monotonic() - started >= 4.0  # it waited for the lock, not around it
    tracker.end()
    run = MlflowClient(_uri(store)).get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"a": "1"}


def test_a_store_locked_past_the_patience_is_a_clear_error(store: Path, tmp_path: Path) -> None:
    with exclusive_lock(store, 4.0), pytest.raises(UserError, match="locked") as error:
        MlflowTracker(uri=_uri(store), artifact_location=str(tmp_path / "art"), lock_patience_s=0.5)
    assert "another process" in str(error.value)


def test_the_tracker_masks_what_it_logs(tmp_path: Path) -> None:
    # Every runner's params and tags pass the masking, redacted by the caller or not.
    tracker = MlflowTracker(
        uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_location=str(tmp_path / "art")
    )
    tracker.start(
        run_name="r",
        params={"hf_token": "SECRET1", "db": "postgresql://u:SECRET2@h/d", "max_new_tokens": "8"},
        tags={"source": "https://ghp_SECRET3@github.com/o/r.git"},
    )
    tracker.set_tags({"auth_token": "SECRET4"})
    tracker.end()
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(tracker.run_id)
    assert run.data.params == {
        "hf_token": "***",
        "db": "postgresql://u:***@h/d",
        "max_new_tokens": "8",
    }
    assert run.data.tags["source"] == "https://***@github.com/o/r.git"
    assert run.data.tags["auth_token"] == "***"
