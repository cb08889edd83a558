"""The wheel works without the checkout: configs and pins travel in it, every entry point runs
from another directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]


def _uv() -> list[str]:
    # scripts/dev.sh installs uv with pip --user when it is missing: look where that lands.
    for found in (shutil.which("uv"), Path.home() / ".local" / "bin" / "uv"):
        if found and Path(found).is_file():
            return [str(found)]
    for python in ("python3", sys.executable):
        probe = subprocess.run([python, "-m", "uv", "--version"], capture_output=True)
        if probe.returncode == 0:
            return [python, "-m", "uv"]
    pytest.skip("uv is not installed (scripts/dev.sh installs it)")


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_installed_wheel_runs_outside_the_checkout(tmp_path: Path) -> None:
    uv = _uv()
    dist = tmp_path / "dist"
    _run([*uv, "build", "--wheel", "-o", str(dist), str(REPO)], REPO, dict(os.environ))
    (wheel,) = dist.glob("audio_models-*.whl")
    # A throw-away environment: the wheel without dependencies, the locked ones reused from
    # this environment through a path entry (whose own .pth files, among them the editable
    # install of the checkout, are not processed).
    venv = tmp_path / "venv"
    _run([*uv, "venv", "-q", "-p", sys.executable, str(venv)], tmp_path, dict(os.environ))
    python = venv / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            text=True,
        ).strip()
    )
    (site / "_locked_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(
        [*uv, "pip", "install", "-q", "--python", str(python), "--no-deps", str(wheel)],
        tmp_path,
        dict(os.environ),
    )
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "AUDIO_MODELS_EXTERNAL"}}
    env["AUDIO_MODELS_CACHE"] = str(tmp_path / "cache")
    where = _run(
        [
            str(python),
            "-c",
            "import sys, audio_models, runners; from audio_models.utils import paths;"
            "print(audio_models.__file__); print(runners.__file__); print(paths.conf_dir());"
            "print(paths.default_external_dir());"
            f"print(any(p.rstrip('/') == {str(REPO)!r} for p in sys.path))",
        ],
        work,
        env,
    ).stdout.split()
    assert all(str(site) in line for line in where[:3]), where
    assert where[3] == str(tmp_path / "cache" / "external")
    assert where[4] == "False"  # the checkout is not importable from there
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking = ["tracking=mlflow", f"tracking.uri={uri}", f"tracking.artifact_location={work}/a"]
    _run(
        [
            str(python),
            "-m",
            "runners.extract",
            *tracking,
            "progress_bar=false",
            "loader.num_workers=0",
            f"output_dir={work}/demo",
        ],
        work,
        env,
    )
    features = work / "demo" / "features.parquet"
    assert pq.read_metadata(features).num_rows == 24
    run_id = pq.read_schema(features).metadata[b"audio_models.run_id"].decode()
    compared = _run(
        [
            str(python),
            "-m",
            "runners.compare",
            *tracking[:2],
            f"run_ids=[{run_id}]",
            f"output_dir={work}/cmp",
        ],
        work,
        env,
    )
    assert "| egemaps |" in compared.stdout
    listed = _run(
        [str(python), "-m", "audio_models.scripts.setup_audio_repos", "--list"], work, env
    )
    assert "fairseq" in listed.stdout
    api = _run(
        [
            str(python),
            "-c",
            "import audio_models as am, pandas as pd; "
            f"files = pd.read_parquet({str(features)!r}).path.tolist()[:2]; "
            "print(am.extract(files, 'egemaps', num_workers=0, device='cpu').shape)",
        ],
        work,
        env,
    )
    assert "(2, 88)" in api.stdout
