"""``runners.reproduce``: a logged run re-run and compared; what changed since is reported."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile as sf
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from audio_models.audio.smile import OpenSmileExtractor
from audio_models.testing import make_tiny
from audio_models.utils.errors import UserError
from runners.extract import extract
from runners.reproduce import Report, reproduce
from tests.conftest import CONF_DIR, REPO
from tests.gitrepos import HEADER, git, make_repo


def reproduce_cfg(uri: str, run_id: str, out: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(
            config_name="reproduce",
            overrides=[
                "tracking=mlflow",
                f"tracking.uri={uri}",
                f"run_id={run_id}",
                f"output_dir={out}",
                *overrides,
            ],
        )


def voice(seconds: float, f0: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * f0 * t) + 0.01 * rng.standard_normal(t.size)).astype(
        np.float32
    )


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """Four short generated recordings in a folder."""
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(4):
        sf.write(root / f"clip{i}.wav", voice(1.0 + 0.25 * i, 120.0 + 40 * i, i), 16000)
    return root


class ToyCheckoutExtractor(OpenSmileExtractor):
    """eGeMAPS, declared as reading the ``toy`` upstream's checkout."""

    upstreams = ("toy",)


def _run(make_cfg: Callable[..., DictConfig], tracking: list[str], *overrides: str) -> str:
    result = extract(make_cfg(*tracking, *overrides))
    assert result.run_id is not None
    return result.run_id


@pytest.mark.parametrize("name", ["egemaps", "fbank"])
def test_a_run_reproduces_exactly(make_cfg, mlflow_store, tmp_path: Path, name: str) -> None:
    uri, tracking = mlflow_store
    run_id = _run(make_cfg, tracking, f"extractor={name}", "dataset.n_clips=6")
    report = reproduce(reproduce_cfg(uri, run_id, tmp_path / "repro", "n_items=4"))
    text = report.render()
    assert report.exit_code == 0, text
    assert len(report.sampled) == 4 and report.n_run_items == 6
    assert report.groups and all(g.equal and g.max_abs == 0.0 for g in report.groups), text
    assert {g.n_items for g in report.groups} == {4}
    assert "result: reproduced" in text
    assert "dataset fingerprint" in report.checked
    # The same seed takes the same sample; the re-run went to its own folder.
    again = reproduce(reproduce_cfg(uri, run_id, tmp_path / "repro2", "n_items=4"))
    assert again.sampled == report.sampled
    assert (tmp_path / "repro" / "rerun" / "failures.parquet").is_file()


def test_a_windowed_run_reproduces(make_cfg, mlflow_store, tmp_path: Path) -> None:
    uri, tracking = mlflow_store
    run_id = _run(make_cfg, tracking, "dataset.n_clips=3", "windows.size_s=1.0")
    report = reproduce(reproduce_cfg(uri, run_id, tmp_path / "repro", "n_items=5"))
    assert report.exit_code == 0, report.render()
    assert len(report.sampled) == 5 and all("@" in i for i in report.sampled)
    assert {g.n_items for g in report.groups} == {5}


def test_a_changed_data_file_is_reported(
    make_cfg, mlflow_store, corpus: Path, tmp_path: Path
) -> None:
    uri, tracking = mlflow_store
    run_id = _run(make_cfg, tracking, "dataset=folder", f"dataset.root={corpus}")
    # Same length, same size on disk, other samples: only the content and mtime change.
    sf.write(corpus / "clip2.wav", voice(1.5, 300.0, 7), 16000)
    report = reproduce(reproduce_cfg(uri, run_id, tmp_path / "repro", "n_items=all"))
    text = report.render()
    assert report.exit_code == 1
    kinds = {(d.kind, d.name) for d in report.environment}
    assert ("dataset", "fingerprint (paths, sizes, mtimes)") in kinds, text
    content = [d for d in report.environment if d.name == "audio content"]
    assert content and "1 of 4" in content[0].now and "clip2.wav" in content[0].now, text
    (features,) = [g for g in report.groups if g.group == "features"]
    assert not features.equal and features.max_abs > 0 and features.n_items == 4
    assert "NOT reproduced" in text and "DIFF dataset fingerprint" in text


def test_a_moved_upstream_checkout_is_reported(
    make_cfg, mlflow_store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkout = tmp_path / "toy-upstream"
    commits = make_repo(checkout, 2)
    git(checkout, "checkout", "--quiet", "--detach", commits[0])
    csv = tmp_path / "requirements.csv"
    csv.write_text(HEADER + f"toy,{checkout.as_uri()},{commits[0]},TOY_REPO,,,test,MIT\n")
    monkeypatch.setenv("AUDIO_MODELS_REQUIREMENTS", str(csv))
    monkeypatch.setenv("TOY_REPO", str(checkout))
    uri, tracking = mlflow_store
    run_id = _run(
        make_cfg,
        tracking,
        f"extractor._target_={__name__}.ToyCheckoutExtractor",
        "dataset.n_clips=3",
    )
    git(checkout, "checkout", "--quiet", "--detach", commits[1])
    toy = f"{__name__}.ToyCheckoutExtractor"  # not the project's: built only when vouched for
    with pytest.raises(UserError, match="trust_targets"):
        reproduce(reproduce_cfg(uri, run_id, tmp_path / "refused"))
    report = reproduce(reproduce_cfg(uri, run_id, tmp_path / "repro", f"trust_targets=[{toy}]"))
    assert report.exit_code == 1
    (moved,) = [d for d in report.environment if d.kind == "upstream"]
    assert moved.name == "toy" and moved.recorded == commits[0]
    assert moved.now.startswith(commits[1])
    # eGeMAPS does not read the checkout: its numbers are the same, the report says so.
    assert all(g.equal for g in report.groups)
    assert f"DIFF upstream toy: run {commits[0]}" in report.render()


def test_different_model_weights_are_reported(make_cfg, mlflow_store, tmp_path: Path) -> None:
    folder = make_tiny(tmp_path / "model", "wav2vec2-group")
    uri, tracking = mlflow_store
    run_id = _run(
        make_cfg, tracking, "extractor=wav2vec2", f"extractor.model={folder}", "dataset.n_clips=3"
    )
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder)
    with torch.no_grad():
        model.encoder.layers[-1].feed_forward.output_dense.weight.mul_(1.5)
    model.save_pretrained(folder)
    report = reproduce(reproduce_cfg(uri, run_id, tmp_path / "repro"))
    text = report.render()
    assert report.exit_code == 1
    names = {d.name for d in report.environment if d.kind == "provenance"}
    assert "ssl.weights_sha256" in names, text
    (layer,) = [g for g in report.groups if g.group.startswith("layer_")]
    assert not layer.equal and layer.max_rel > 1e-3, text
    assert "DIFF provenance ssl.weights_sha256" in text


def test_configuration_errors(make_cfg, mlflow_store, tmp_path: Path) -> None:
    from audio_models.utils.errors import UserError

    uri, tracking = mlflow_store
    with pytest.raises(UserError, match="not found"):
        reproduce(reproduce_cfg(uri, "0" * 32, tmp_path / "a"))
    run_id = _run(make_cfg, tracking, "dataset.n_clips=2")
    with pytest.raises(UserError, match="n_items"):
        reproduce(reproduce_cfg(uri, run_id, tmp_path / "b", "n_items=0"))
    if not torch.cuda.is_available():  # a GPU run on a CPU box: stop before any work, say how
        with pytest.raises(UserError, match="accelerator=cpu re-runs it"):
            reproduce(reproduce_cfg(uri, run_id, tmp_path / "c", "accelerator=cuda"))


def test_a_sweep_child_from_the_command_line(tmp_path: Path) -> None:
    env = {**os.environ, "AUDIO_MODELS_CACHE": str(tmp_path / "cache")}

    def run(module: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", module, *args],
            cwd=tmp_path,
            env={**env, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=600,
        )

    done = run(
        "runners.extract",
        "-m",
        "extractor=egemaps",
        "device=cpu",
        "progress_bar=false",
        "loader.num_workers=0",
        "dataset.n_clips=3",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("audio-models")
    (child,) = [
        r
        for r in client.search_runs([experiment.experiment_id])
        if "mlflow.parentRunId" in r.data.tags
    ]
    found = run("runners.reproduce", f"run_id={child.info.run_id}", f"output_dir={tmp_path / 'r'}")
    assert found.returncode == 0, found.stdout[-3000:] + found.stderr[-3000:]
    assert "child of sweep" in found.stdout and "result: reproduced" in found.stdout
    # The report is also kept beside the re-run (stdout has the runner's log lines, too).
    assert found.stdout.strip().endswith((tmp_path / "r" / "report.txt").read_text().strip())
    missing = run("runners.reproduce", "run_id=nope", f"output_dir={tmp_path / 'x'}")
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_report_exit_code() -> None:
    report = Report(run_id="r", title="t", overrides=[])
    assert report.exit_code == 0 and "result: reproduced" in report.render()
    report.rerun_error = "RepoError: missing"
    assert report.exit_code == 1 and "re-run failed" in report.render()


@pytest.fixture
def tracking_server(tmp_path: Path) -> Iterator[str]:
    """``mlflow server`` on loopback (SQLite backend, proxied artifacts): its URI."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{uri}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail((tmp_path / "server.log").read_text()[-2000:])
            time.sleep(0.5)
        yield uri
    finally:
        server.terminate()
        server.wait(30)
        log.close()


@pytest.mark.slow
def test_a_run_on_the_tracking_server(make_cfg, tracking_server: str, tmp_path: Path) -> None:
    server = ["tracking=server", f"tracking.uri={tracking_server}"]
    run_id = _run(make_cfg, server, "extractor=fbank", "dataset.n_clips=3")
    cfg = reproduce_cfg(tracking_server, run_id, tmp_path / "repro", "tracking=server")
    report = reproduce(cfg)
    assert report.exit_code == 0, report.render()
    # The reference came through the server's artifact proxy, not the run's local folder.
    assert (tmp_path / "repro" / "stored" / "reference" / "frames" / "index.parquet").is_file()
    assert {g.n_items for g in report.groups} == {3}


@pytest.mark.parametrize(
    ("key", "target"),
    [
        ("extractor", "os.system"),
        ("extractor", "audio_models.audio.smile.OpenSmileExtractor.__init__"),  # a prefix
        ("dataset", "builtins.eval"),
        ("preflight", "subprocess.run"),
        ("nested", "os.system"),  # anywhere in the tree, not only at a group's top
    ],
)
def test_a_tampered_config_is_never_built(
    make_cfg, mlflow_store, tmp_path: Path, key: str, target: str
) -> None:
    # config.yaml comes from an artifact store others can write to: a _target_ in it is a
    # dotted callable to Hydra. Only the project's own classes are built from it.
    import mlflow
    import yaml

    uri, tracking = mlflow_store
    run_id = _run(make_cfg, tracking, "dataset.n_clips=2")
    marker = tmp_path / "ran"
    run = mlflow.MlflowClient(uri).get_run(run_id)
    stored = [
        Path(run.info.artifact_uri.removeprefix("file://")) / "config.yaml",
        Path(run.data.params["output_dir"]) / "config.yaml",
    ]
    for path in stored:
        config = yaml.safe_load(path.read_text())
        payload = {"_target_": target, "_args_": [f"touch {marker}"]}
        if key == "nested":
            config["dataset"]["extra"] = {"deeper": [payload]}
        else:
            config[key] = {**config[key], **payload}
        path.write_text(yaml.safe_dump(config))
    with pytest.raises(UserError, match="not one of the project's classes"):
        reproduce(reproduce_cfg(uri, run_id, tmp_path / "repro"))
    assert not marker.exists()


@pytest.mark.parametrize("resolver", ["oc.create", "oc.decode"])
def test_an_interpolation_in_a_stored_config_is_refused(
    make_cfg, mlflow_store, tmp_path: Path, resolver: str
) -> None:
    # oc.create/oc.decode turn a string into a mapping (with a _target_) only when resolved,
    # after any check of the raw tree: a stored config is resolved, so any ${...} is refused.
    import mlflow

    uri, tracking = mlflow_store
    run_id = _run(make_cfg, tracking, "dataset.n_clips=2")
    run = mlflow.MlflowClient(uri).get_run(run_id)
    marker = tmp_path / "ran"
    for path in (
        Path(run.info.artifact_uri.removeprefix("file://")) / "config.yaml",
        Path(run.data.params["output_dir"]) / "config.yaml",
    ):
        text = path.read_text()
        payload = f"\"${{{resolver}:'{{_target_: os.system, _args_: [touch {marker}]}}'}}\""
        head, _, rest = text.partition("dataset:")
        path.write_text(head + "dataset: " + payload + "\nold_dataset:" + rest)
    with pytest.raises(UserError, match="interpolation"):
        reproduce(reproduce_cfg(uri, run_id, tmp_path / "repro"))
    assert not marker.exists()


@pytest.mark.parametrize("relative", ["/tmp/elsewhere/x.parquet", "../../escape.parquet"])
def test_outputs_json_cannot_point_outside(
    make_cfg, mlflow_store, tmp_path: Path, relative: str
) -> None:
    import json

    import mlflow

    uri, tracking = mlflow_store
    run_id = _run(make_cfg, tracking, "dataset.n_clips=2")
    run = mlflow.MlflowClient(uri).get_run(run_id)
    listing = Path(run.info.artifact_uri.removeprefix("file://")) / "outputs.json"
    if not listing.is_file():
        pytest.skip("this run logged no outputs.json")
    data = json.loads(listing.read_text())
    data["outputs"][0]["relative"] = relative
    listing.write_text(json.dumps(data))
    with pytest.raises(UserError, match="outside the run"):
        reproduce(reproduce_cfg(uri, run_id, tmp_path / "repro"))
