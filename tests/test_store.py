"""The output store on its own (no Lightning): the lock, damaged and foreign parts, a lost or
corrupt state file, an unwritable directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audio_models.pipeline.store import (
    DAMAGED,
    FAILURE_SCHEMA,
    FEATURES_KEY,
    LOCK,
    PROGRESS,
    OutputStore,
)
from audio_models.utils.errors import UserError
from runners.extract import extract


def _part(keys: list[str]) -> pa.Table:
    return pa.table({"id": [f"id-{k}" for k in keys], "item_key": keys, "x": [1.0] * len(keys)})


def _fails(keys: list[str]) -> pa.Table:
    rows = {name: [f"{name}-{k}" for k in keys] for name in FAILURE_SCHEMA.names}
    rows["item_key"] = keys
    return pa.table(rows, schema=FAILURE_SCHEMA)


def _committed(tmp_path: Path, config_hash: str = "h1") -> OutputStore:
    store = OutputStore(tmp_path / "out", config_hash)
    store.open()
    store.save_state("run-1")
    store.commit(store.next_seq(), _part(["a", "b"]), None, None)
    store.commit(store.next_seq(), _part(["c"]), _fails(["d"]), None)
    store.release()
    return store


def test_second_open_is_refused_with_the_holder_and_released_after(tmp_path: Path) -> None:
    first = OutputStore(tmp_path / "out", "h1")
    first.open()
    second = OutputStore(tmp_path / "out", "h1")
    with pytest.raises(UserError, match=rf"in use by PID {os.getpid()} on "):
        second.open()
    first.release()
    second.open()  # free again
    second.release()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = (
        "import os, sys; from audio_models.pipeline.store import OutputStore; "
        f"s = OutputStore({str(out)!r}, 'h1'); s.open(); print('locked', flush=True); "
        "sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"PID {holder.pid}"):
            OutputStore(out, "h1").open()
    finally:
        holder.kill()
        holder.wait()
    store = OutputStore(out, "h1")
    store.open()  # the kernel dropped the dead process's lock
    assert f"PID {os.getpid()}" in (out / LOCK).read_text()
    store.release()


def test_a_run_into_a_locked_directory_fails_at_once(make_cfg, tmp_path: Path) -> None:
    holder = OutputStore(tmp_path / "out", "other")
    holder.open()
    try:
        with pytest.raises(UserError, match="is in use by PID"):
            extract(make_cfg())
        assert not (tmp_path / "out" / "features.parquet").exists()
    finally:
        holder.release()
    extract(make_cfg())  # and works once the holder is gone


def test_truncated_part_is_set_aside_and_its_items_redone(tmp_path: Path) -> None:
    _committed(tmp_path)
    part = tmp_path / "out" / PROGRESS / "part-000000.parquet"
    part.write_bytes(part.read_bytes()[:-40])  # footer gone: unreadable
    store = OutputStore(tmp_path / "out", "h1")
    store.open()
    assert store.done_keys == {"c", "d"}  # a and b will be redone
    assert (tmp_path / "out" / DAMAGED / "part-000000.parquet").exists()
    assert store.previous_run_id == "run-1"
    store.release()


def test_corrupt_state_is_ignored_and_parts_still_count(tmp_path: Path) -> None:
    _committed(tmp_path)
    (tmp_path / "out" / PROGRESS / "state.json").write_text('{"config_hash": "h1", "run')
    store = OutputStore(tmp_path / "out", "h1")
    store.open()
    assert store.done_keys == {"a", "b", "c", "d"}
    store.release()


def test_parts_of_other_settings_are_refused_without_state(tmp_path: Path) -> None:
    _committed(tmp_path, "h1")
    (tmp_path / "out" / PROGRESS / "state.json").unlink()
    with pytest.raises(UserError, match="different settings"):
        OutputStore(tmp_path / "out", "h2").open()
    store = OutputStore(tmp_path / "out", "h1")  # the same settings resume
    store.open()
    assert store.done_keys == {"a", "b", "c", "d"}
    store.release()


def test_unwritable_output_dir_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="cannot be written"):
        OutputStore(blocker / "out", "h1").open()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_dir_is_one_clear_error(tmp_path: Path) -> None:
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(UserError, match="cannot be written"):
            OutputStore(out, "h1").open()
    finally:
        out.chmod(0o755)


def test_temporary_names_are_per_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = OutputStore(tmp_path / "out", "h1")
    store.open()
    seen: list[str] = []
    real = pq.write_table

    def spy(table: pa.Table, where: object, **kwargs: object) -> None:
        seen.append(Path(str(where)).name)
        real(table, where, **kwargs)

    monkeypatch.setattr(pq, "write_table", spy)
    store.commit(store.next_seq(), _part(["a"]), None, None)
    store.release()
    assert seen == [f"part-000000.parquet.{os.getpid()}.tmp"]


def test_a_refused_open_leaves_the_directory_free(tmp_path: Path) -> None:
    _committed(tmp_path, "h1")
    with pytest.raises(UserError, match="different settings"):
        OutputStore(tmp_path / "out", "h2").open()
    store = OutputStore(tmp_path / "out", "h2", resume=False)  # as the message advises
    store.open()
    assert store.done_keys == set()
    store.release()


def test_unstamped_parts_resume_when_state_vouches(tmp_path: Path) -> None:
    # Parts written before parts carried the settings hash: state.json says whose they are.
    store = OutputStore(tmp_path / "out", "h1")
    store.open()
    store.save_state("run-1")
    pq.write_table(_part(["a"]), tmp_path / "out" / PROGRESS / "part-000000.parquet")
    store.release()
    again = OutputStore(tmp_path / "out", "h1")
    again.open()
    assert again.done_keys == {"a"}
    again.release()


@pytest.mark.parametrize("with_failures", [False, True])
def test_only_the_main_table_lists_the_feature_columns(tmp_path: Path, with_failures: bool) -> None:
    # ComParE-sized: 6,373 names. They belong to features.parquet; the failures file (empty or
    # not) stays small.
    names = [f"pcm_feature_{i:04d}_sma_de_quartile" for i in range(6373)]
    store = OutputStore(tmp_path / "out", "h1")
    store.open()
    store.commit(store.next_seq(), _part(["a"]), _fails(["b"]) if with_failures else None, None)
    store.finalize(row_group_rows=100, run_id="run-1", feature_columns=names)
    store.release()
    features, failures = store.final_files
    assert FEATURES_KEY in pq.read_schema(features).metadata
    assert FEATURES_KEY not in pq.read_schema(failures).metadata
    assert pq.read_schema(failures).metadata[b"audio_models.run_id"] == b"run-1"
    assert failures.stat().st_size < 20_000


def test_side_tables_with_snake_case_names_are_committed_and_resumed(tmp_path: Path) -> None:
    # A per-batch file is <name>-<seq>.parquet: a name with "_" or digits (pitch_summary) must
    # be found again when the store resumes and consolidates, not silently left out.
    schema = pa.schema([("id", pa.string()), ("f0_p50", pa.float32())])
    tables = {"pitch_summary": schema, "layer2_stats": schema}

    def rows(ids: list[str]) -> dict[str, pa.Table]:
        table = pa.table({"id": ids, "f0_p50": [100.0] * len(ids)}, schema=schema)
        return dict.fromkeys(tables, table)

    store = OutputStore(tmp_path / "out", "h1", tables=tables)
    store.open()
    store.commit(store.next_seq(), _part(["a", "b"]), None, None, rows(["id-a", "id-b"]))
    store.commit(store.next_seq(), None, None, None, rows(["id-c"]))  # killed before its part
    store.release()
    again = OutputStore(tmp_path / "out", "h1", tables=tables)
    again.open()  # the uncommitted rows are dropped, the item is to be redone
    assert again.done_keys == {"a", "b"}
    assert sorted(p.name for p in again.progress.glob("pitch_summary-*")) == [
        "pitch_summary-000000.parquet"
    ]
    again.commit(again.next_seq(), _part(["c"]), None, None, rows(["id-c"]))
    again.finalize(row_group_rows=100, run_id=None)
    again.release()
    for name in tables:
        ids = pq.read_table(tmp_path / "out" / f"{name}.parquet").column("id").to_pylist()
        assert ids == ["id-a", "id-b", "id-c"]
    # A finished run reopened (a grown corpus): its side rows come back with it.
    grown = OutputStore(tmp_path / "out", "h1", tables=tables)
    grown.open()
    grown.commit(grown.next_seq(), _part(["e"]), None, None, rows(["id-e"]))
    grown.finalize(row_group_rows=100, run_id=None)
    grown.release()
    ids = pq.read_table(tmp_path / "out" / "pitch_summary.parquet").column("id").to_pylist()
    assert ids == ["id-a", "id-b", "id-c", "id-e"]
    for bad in ("Pitch", "pitch-summary", "2nd"):
        with pytest.raises(ValueError, match="snake_case"):
            OutputStore(tmp_path / "bad", "h1", tables={bad: schema})
