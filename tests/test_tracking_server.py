"""tracking=server for real: PostgreSQL (the Debian package) behind ``mlflow server``.

The fixture initialises a throw-away PostgreSQL cluster on loopback, starts ``mlflow server``
with it as the backend store and a temporary directory as the artifact root, then an
extraction and a 2-job sweep log to it and everything is read back with ``MlflowClient``.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import requests
from mlflow.tracking import MlflowClient

from audio_models.sweep import ROLE_TAG

FAST = ["device=cpu", "progress_bar=false", "loader.num_workers=0", "dataset.n_clips=20"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pg_bin() -> Path | None:
    found = shutil.which("initdb") or next(
        iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)), None
    )
    return Path(found).resolve().parent if found else None


def _as_db_user(command: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root: use the package's postgres account.
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *command]
    return command


@pytest.fixture(scope="module")
def mlflow_server() -> Iterator[str]:
    pg = _pg_bin()
    if pg is None:
        pytest.skip(
            "PostgreSQL is not installed (apt-get install postgresql; `bash scripts/dev.sh test` "
            "installs it when run as root)"
        )
    root = Path(tempfile.mkdtemp(prefix="am-pg-", dir="/tmp"))
    data, sockets = root / "data", root / "sock"
    sockets.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")
    port, http = _free_port(), _free_port()
    server = None
    try:
        subprocess.run(
            _as_db_user([str(pg / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]),
            check=True,
            capture_output=True,
        )
        subprocess.run(
            _as_db_user(
                [
                    str(pg / "pg_ctl"),
                    "-D",
                    str(data),
                    "-l",
                    str(root / "postgres.log"),
                    "-o",
                    f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1",
                    "-w",
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [str(pg / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow"],
            check=True,
            capture_output=True,
        )
        artifacts = root / "artifacts"
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                f"postgresql://postgres@127.0.0.1:{port}/mlflow",
                "--artifacts-destination",
                str(artifacts),
                "--host",
                "127.0.0.1",
                "--port",
                str(http),
                "--workers",
                "1",
            ],
            stdout=open(root / "mlflow.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        uri = f"http://127.0.0.1:{http}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{uri}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((root / "mlflow.log").read_text()[-3000:])
            time.sleep(0.5)
        yield uri
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        if data.exists():
            subprocess.run(
                _as_db_user([str(pg / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"]),
                capture_output=True,
            )
        shutil.rmtree(root, ignore_errors=True)


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runners.extract", *args],
        cwd=tmp_path,
        env={**os.environ, "AUDIO_MODELS_CACHE": str(tmp_path / "cache")},
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_extraction_and_sweep_on_a_postgres_backed_server(
    mlflow_server: str, tmp_path: Path
) -> None:
    server = ["tracking=server", f"tracking.uri={mlflow_server}", "tracking.experiment=team"]
    single = _run(tmp_path, *server, *FAST, "hydra.run.dir=single")
    assert single.returncode == 0, single.stderr[-3000:]
    sweep = _run(
        tmp_path, "-m", *server, "extractor=mfcc,egemaps", *FAST, f"hydra.sweep.dir={tmp_path}/s"
    )
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to a local store

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("team")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get(ROLE_TAG) == "sweep"]
    assert len(runs) == 4 and len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["extractor"] for r in children) == ["egemaps", "mfcc"]
    plain = next(r for r in runs if r not in children and r not in parents)
    assert plain.data.params["extractor.feature_set"] == "eGeMAPSv02"
    assert plain.data.metrics["n_items"] == 20
    assert plain.data.tags["dataset"] == "demo"
    # Artifacts went through the server into its artifact root; read one back.
    names = {a.path for a in client.list_artifacts(plain.info.run_id)}
    assert {"features.parquet", "config.yaml", "outputs.json"} <= names
    local = client.download_artifacts(plain.info.run_id, "features.parquet", str(tmp_path))
    served = pd.read_parquet(local)
    written = pd.read_parquet(tmp_path / "single" / "features.parquet")
    pd.testing.assert_frame_equal(served, written)
