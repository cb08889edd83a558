"""requirements.csv, setup_audio_repos and upstream provenance, against local git repositories."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from audio_models.audio.smile import OpenSmileExtractor
from audio_models.scripts.setup_audio_repos import main as setup_main
from audio_models.utils.repos import (
    RepoError,
    read_requirements,
    resolve,
)
from runners.extract import extract
from tests.gitrepos import HEADER, make_repo
from tests.gitrepos import git as _git


@pytest.fixture
def upstream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A local upstream with 3 commits, a requirements.csv pinning the first, temp external/."""
    origin = tmp_path / "origin" / "toy-upstream"
    commits = make_repo(origin)
    csv = tmp_path / "requirements.csv"

    def write(pin: str, url: str | None = None, extra: str = "") -> None:
        url = url or origin.as_uri()
        csv.write_text(HEADER + f"toy,{url},{pin},TOY_REPO,,,test upstream,MIT\n" + extra)

    write(commits[0])
    monkeypatch.setenv("AUDIO_MODELS_REQUIREMENTS", str(csv))
    monkeypatch.setenv("AUDIO_MODELS_EXTERNAL", str(tmp_path / "external"))
    monkeypatch.delenv("TOY_REPO", raising=False)
    return {
        "origin": origin,
        "commits": commits,
        "write": write,
        "checkout": tmp_path / "external" / "toy-upstream",
    }


def test_clone_at_pin_then_noop(upstream, capsys: pytest.CaptureFixture[str]) -> None:
    assert setup_main([]) == 0
    checkout = upstream["checkout"]
    assert _git(checkout, "rev-parse", "HEAD") == upstream["commits"][0]
    assert _git(checkout, "rev-parse", "--abbrev-ref", "HEAD") == "HEAD"  # detached
    assert "cloned" in capsys.readouterr().out
    assert setup_main([]) == 0
    assert "already at the pin" in capsys.readouterr().out
    state = resolve("toy")
    assert (state.path, state.commit, state.pinned, state.dirty, state.source) == (
        checkout,
        upstream["commits"][0],
        upstream["commits"][0],
        False,
        "checkout",
    )
    assert state.matches_pin


def test_update_moves_only_clean_checkouts(upstream, capsys: pytest.CaptureFixture[str]) -> None:
    assert setup_main([]) == 0
    checkout = upstream["checkout"]
    upstream["write"](upstream["commits"][2])
    assert setup_main([]) == 0
    assert "--update moves it" in capsys.readouterr().out
    assert _git(checkout, "rev-parse", "HEAD") == upstream["commits"][0]
    assert setup_main(["--update"]) == 0
    assert _git(checkout, "rev-parse", "HEAD") == upstream["commits"][2]
    # Local edits: never moved, never overwritten.
    (checkout / "model.txt").write_text("my edit\n")
    upstream["write"](upstream["commits"][1])
    assert setup_main(["--update"]) == 1
    assert "has local changes" in capsys.readouterr().out
    assert _git(checkout, "rev-parse", "HEAD") == upstream["commits"][2]
    assert (checkout / "model.txt").read_text() == "my edit\n"
    state = resolve("toy")
    assert state.dirty and not state.matches_pin and len(state.diff_sha256) == 64


def test_override_variable_wins(upstream, tmp_path: Path, monkeypatch, capsys) -> None:
    mine = tmp_path / "mine"
    subprocess.run(["git", "clone", "-q", str(upstream["origin"]), str(mine)], check=True)
    _git(mine, "checkout", "-q", "--detach", upstream["commits"][1])
    monkeypatch.setenv("TOY_REPO", str(mine))
    assert setup_main([]) == 0
    out = capsys.readouterr().out
    assert upstream["commits"][1] in out and upstream["commits"][0] in out  # both commits named
    assert not upstream["checkout"].exists()  # nothing cloned
    state = resolve("toy")
    assert (state.path, state.source, state.matches_pin) == (mine, "env", False)
    monkeypatch.setenv("TOY_REPO", str(tmp_path))  # not a checkout
    assert setup_main([]) == 1
    assert "is not a git checkout" in capsys.readouterr().out


def test_unreachable_repository_names_url_and_variable(upstream, tmp_path, capsys) -> None:
    good = tmp_path / "origin" / "other"
    good_pin = make_repo(good, 1)[0]
    bad_url = (tmp_path / "nowhere" / "lost-repo").as_uri()
    upstream["write"](
        "a" * 40, url=bad_url, extra=f"other,{good.as_uri()},{good_pin},OTHER_REPO,,,x,MIT\n"
    )
    assert setup_main([]) == 1
    out = capsys.readouterr().out
    assert bad_url in out and "TOY_REPO" in out and "FAILED" in out
    assert not upstream["checkout"].exists()
    assert (tmp_path / "external" / "other" / "model.txt").exists()  # the other one still set up


def test_unknown_commit_is_an_error(upstream, capsys) -> None:
    upstream["write"]("b" * 40)
    assert setup_main([]) == 1
    assert "cannot fetch toy" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("toy,file:///x,abc123,TOY_REPO,,,r,MIT\n", "not a full 40-hex SHA"),
        ("toy,file:///x," + "A" * 40 + ",TOY_REPO,,,r,MIT\n", "not a full 40-hex SHA"),
        (
            "toy,file:///x,"
            + "a" * 40
            + ",TOY_REPO,,,r,MIT\ntoy,file:///y,"
            + "b" * 40
            + ",T2,,,r,MIT\n",
            "duplicate key",
        ),
        ("toy,file:///x," + "a" * 40 + ",TOY_REPO,,,,MIT\n", "empty ['role']"),
        ("toy,file:///x," + "a" * 40 + "\n", "wrong number of fields"),
    ],
)
def test_malformed_rows_name_the_row(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "requirements.csv"
    path.write_text(HEADER + body)
    with pytest.raises(RepoError, match=re.escape(message)) as info:
        read_requirements(path)
    assert f"{path}:" in str(info.value)


def test_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "requirements.csv"
    path.write_text("key,repository,commit\ntoy,file:///x," + "a" * 40 + "\n")
    with pytest.raises(RepoError, match=r"missing columns \['env', 'role', 'license'\]"):
        read_requirements(path)


def test_project_requirements_are_valid() -> None:
    rows = {
        r.key: r
        for r in read_requirements(Path(__file__).resolve().parents[1] / "requirements.csv")
    }
    assert set(rows) == {"emotion_recognition", "fairseq", "whisperx", "speechbrain"}
    assert rows["fairseq"].env == "FAIRSEQ_REPO"
    assert rows["whisperx"].release == "3.8.6"


def test_missing_checkout_points_at_the_fix(upstream) -> None:
    with pytest.raises(RepoError, match=r"setup_audio_repos --only toy.*TOY_REPO"):
        resolve("toy")


def test_list(upstream, capsys) -> None:
    setup_main([])
    capsys.readouterr()
    assert setup_main(["--list"]) == 0
    out = capsys.readouterr().out
    assert f"pinned={upstream['commits'][0]}" in out and f"actual={upstream['commits'][0]}" in out
    assert "dirty=false" in out and "source=checkout" in out


class ToyCheckoutExtractor(OpenSmileExtractor):
    """eGeMAPS, declared as reading the ``toy`` upstream's checkout (for provenance tests)."""

    upstreams = ("toy",)


def test_run_records_upstream_provenance(upstream, make_cfg, mlflow_store, tmp_path: Path) -> None:
    setup_main([])
    # A second upstream the extractor does not read: the run carries no tags for it.
    upstream["write"](
        upstream["commits"][0], extra=f"unused,https://example.invalid/u,{'a' * 40},U,,,x,MIT\n"
    )
    (upstream["checkout"] / "model.txt").write_text("locally tuned weights\n")
    uri, tracking = mlflow_store
    cfg = make_cfg(
        *tracking,
        f"extractor._target_={__name__}.ToyCheckoutExtractor",
        "dataset.n_clips=4",
    )
    result = extract(cfg)
    run = mlflow.MlflowClient(uri).get_run(result.run_id)
    tags = run.data.tags
    assert tags["repo.toy.commit"] == upstream["commits"][0]
    assert tags["repo.toy.pinned"] == upstream["commits"][0]
    assert tags["repo.toy.matches_pin"] == "true"
    assert tags["repo.toy.dirty"] == "true"
    assert tags["repo.toy.source"] == "checkout"
    assert {key.split(".")[1] for key in tags if key.startswith("repo.")} == {"toy"}
    client = mlflow.MlflowClient(uri)
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert "requirements.csv" in artifacts
    diff = Path(client.download_artifacts(result.run_id, "upstream_diffs/toy.diff", str(tmp_path)))
    assert "+locally tuned weights" in diff.read_text()


def test_extractor_needing_a_missing_checkout_fails_before_work(upstream, make_cfg) -> None:
    cfg = make_cfg(f"extractor._target_={__name__}.ToyCheckoutExtractor")
    with pytest.raises(RepoError, match="TOY_REPO"):
        extract(cfg)
    assert not (Path(cfg.output_dir) / "features.parquet").exists()


@pytest.mark.skipif(shutil.which("uv") is None, reason="needs uv for an offline editable install")
def test_editable_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    origin = tmp_path / "origin" / "toypkg"
    pin = make_repo(origin, 2, package="toypkg_am")[1]
    csv = tmp_path / "requirements.csv"
    csv.write_text(HEADER + f"toypkg,{origin.as_uri()},{pin},TOYPKG_REPO,toypkg_am,,pkg,MIT\n")
    monkeypatch.setenv("AUDIO_MODELS_REQUIREMENTS", str(csv))
    monkeypatch.setenv("AUDIO_MODELS_EXTERNAL", str(tmp_path / "external"))
    assert setup_main([]) == 0
    venv = tmp_path / "venv"
    subprocess.run(
        [shutil.which("uv"), "venv", "-q", "--python", sys.executable, str(venv)], check=True
    )
    python = str(venv / "bin" / "python")
    monkeypatch.setattr(sys, "executable", python)
    assert setup_main(["--editable", "toypkg"]) == 0, capsys.readouterr().out
    where = subprocess.run(
        [python, "-c", "import toypkg_am; print(toypkg_am.__file__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).resolve().is_relative_to((tmp_path / "external" / "toypkg").resolve())
