"""Fail fast: configuration errors are reported before torch is imported.

Each command runs in a subprocess under ``python -X importtime``, whose report lists every
module the process imported; a configuration error must exit 2 with its one line without
``torch`` (or Lightning, or an extractor's library) in that list.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from audio_models.pipeline.device import gpu_driver_absent
from tests.importcheck import run_light as _run


def _setup(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "corpus").mkdir()
    no_path = tmp_path / "no_path.csv"
    no_path.write_text("file,label\na.wav,x\n")
    return {"corpus": str(tmp_path / "corpus"), "no_path": str(no_path)}


CASES: dict[str, tuple[list[str], str]] = {
    "typo in an option": (["extractor=egemapz"], "Could not find 'extractor/egemapz'"),
    "unknown key": (["loader.batchsize=4"], "Could not override 'loader.batchsize'"),
    "bad value": (["loader.batch_size=abc"], "could not be converted to Integer"),
    "missing dataset root": (
        ["dataset=folder", "dataset.root={tmp}/nope"],
        "error: dataset root '{tmp}/nope' does not exist",
    ),
    "missing manifest": (
        ["dataset=manifest", "dataset.path={tmp}/missing.csv"],
        "error: manifest '{tmp}/missing.csv' does not exist",
    ),
    "manifest without its path column": (
        ["dataset=manifest", "dataset.path={no_path}"],
        "no path column 'path'",
    ),
    "label_regex without groups": (
        ["dataset=folder", "dataset.root={corpus}", "dataset.label_regex=spk"],
        "error: dataset.label_regex needs named groups",
    ),
    "bad channel policy": (
        ["loader.channel_policy=left"],
        "error: loader.channel_policy must be one of",
    ),
    # Lightning's true half precision casts the waveforms too (it crashed on our batch).
    "true half precision": (["device.precision=bf16-true"], "(use bf16-mixed or 16-mixed)"),
    "split joining": (
        ["dataset=huggingface", "dataset.path={corpus}", "dataset.split=train+test"],
        "error: dataset.split='train+test': one split per run",
    ),
    "bad split slice": (
        ["dataset=huggingface", "dataset.path={corpus}", "dataset.split='train[1:x]'"],
        "error: dataset.split='train[1:x]': Unrecognized instruction format",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_configuration_errors_exit_2_before_torch(tmp_path: Path, case: str) -> None:
    paths = _setup(tmp_path) | {"tmp": str(tmp_path)}
    args, expected = CASES[case]
    proc, message = _run(
        tmp_path,
        "runners.extract",
        "tracking=off",
        f"hydra.run.dir={tmp_path}/hydra",
        *(a.format(**paths) for a in args),
    )
    assert proc.returncode == 2, message
    assert expected.format(**paths) in message
    assert "Traceback" not in message + proc.stdout


EXTRACTOR_CASES: dict[str, tuple[list[str], str, tuple[str, ...]]] = {
    "ssl pooling": (
        ["extractor=wav2vec2", "extractor.pooling=max"],
        "error: extractor.pooling must be one of",
        (),
    ),
    "ssl layers": (
        ["extractor=xlsr", "extractor.layers=last"],
        "error: extractor.layers must be a list of indices or 'all'",
        (),
    ),
    "fbank cepstra": (
        ["extractor=mfcc", "extractor.num_ceps=200"],
        "error: extractor.num_ceps",
        (),
    ),
    "fbank band": (
        ["extractor=fbank", "extractor.high_freq=9000"],
        "error: extractor.low_freq=20.0 / high_freq=9000.0",
        (),
    ),
    "crepe range": (["extractor=crepe", "extractor.fmin=5"], "error: extractor.fmin=5.0", ()),
    "whisperx rate": (["extractor=whisperx", "extractor.sample_rate=8000"], "16000", ()),
    "openSMILE set": (
        ["extractor=egemaps", "extractor.feature_set=eGeMAPSv9"],
        "error: extractor.feature_set must be one of",
        ("opensmile",),  # its own library checks the name; still no torch
    ),
}


@pytest.mark.parametrize("case", EXTRACTOR_CASES)
def test_extractor_option_errors_exit_2_before_torch(tmp_path: Path, case: str) -> None:
    """The extractor is described (options checked) before torch or any weights load."""
    args, expected, allow = EXTRACTOR_CASES[case]
    proc, message = _run(
        tmp_path,
        "runners.extract",
        "tracking=off",
        f"hydra.run.dir={tmp_path}/hydra",
        *args,
        allow=allow,
    )
    assert proc.returncode == 2, message
    assert expected in message
    assert "Traceback" not in message + proc.stdout


def test_cuda_without_a_driver_exits_2_before_torch(tmp_path: Path) -> None:
    if gpu_driver_absent() is None:
        pytest.skip("a GPU driver is present: torch decides, after its import")
    proc, message = _run(tmp_path, "runners.extract", "tracking=off", "device=cuda")
    assert proc.returncode == 2
    lines = message.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: device=cuda but no CUDA device")


@pytest.mark.parametrize("flags", [["--help"], ["--cfg", "job"]])
def test_help_and_cfg_need_no_torch(tmp_path: Path, flags: list[str]) -> None:
    proc, message = _run(tmp_path, "runners.extract", *flags)
    assert proc.returncode == 0, message
    assert "extractor" in proc.stdout
    if flags == ["--help"]:
        # The groups a user chooses from, with what each option is; not Hydra's schema/* groups.
        assert "schema/" not in proc.stdout
        assert "extractor=<option>:" in proc.stdout and "dataset=<option>:" in proc.stdout
        assert re.search(r"^  egemaps +openSMILE eGeMAPSv02 functionals", proc.stdout, re.M)


@pytest.mark.parametrize(
    ("runner", "groups", "absent"),
    [
        ("runners.compare", ["tracking"], ["extractor", "dataset", "device"]),
        ("runners.train_ser", ["dataset", "device", "tracking"], ["extractor"]),
    ],
)
def test_other_runners_help_lists_only_their_groups(
    tmp_path: Path, runner: str, groups: list[str], absent: list[str]
) -> None:
    proc, message = _run(tmp_path, runner, "--help")
    assert proc.returncode == 0, message
    assert "schema/" not in proc.stdout
    for group in groups:
        assert f"{group}=<option>:" in proc.stdout
    for group in absent:
        assert f"{group}=<option>:" not in proc.stdout


@pytest.mark.parametrize("runner", ["runners.compare", "runners.train_ser"])
def test_other_runners_typos_exit_2_before_torch(tmp_path: Path, runner: str) -> None:
    proc, message = _run(tmp_path, runner, "tracking=nowhere", f"hydra.run.dir={tmp_path}/h")
    assert proc.returncode == 2, message
    assert "Could not find 'tracking/nowhere'" in message


def test_a_missing_root_is_reported_before_mlflow_starts(tmp_path: Path) -> None:
    # The default tracking (a SQLite store where the command runs) is not created for a run
    # that cannot start.
    proc, message = _run(
        tmp_path,
        "runners.extract",
        "dataset=folder",
        f"dataset.root={tmp_path}/nope",
        f"hydra.run.dir={tmp_path}/h",
    )
    assert proc.returncode == 2 and "does not exist" in message
    assert not (tmp_path / "mlflow.db").exists()


def test_the_driver_check_refuses_only_what_cannot_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import audio_models.pipeline.device as device

    assert "/dev/dxg" in device._DRIVER_PATHS and "/dev/nvidia0" in device._DRIVER_PATHS
    node = tmp_path / "dxg"  # e.g. WSL2's /dev/dxg: no NVIDIA nodes, CUDA works
    node.touch()
    monkeypatch.setattr(device, "_DRIVER_PATHS", (str(tmp_path / "absent"), str(node)))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert device.gpu_driver_absent() is None  # torch decides
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert "hides every device" in (device.gpu_driver_absent() or "")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    node.unlink()
    assert "no GPU driver" in (device.gpu_driver_absent() or "")


@pytest.mark.xfail(
    strict=True,
    reason=(
        "torchmetrics 1.9.0 (the newest release; lightning imports it through "
        "lightning.fabric.utilities.imports.compare_version) imports transformers "
        "(functional/text/bert.py), torchvision's model zoo (image/arniqa.py, dists.py) and "
        "scipy.signal (its SRMRpy patch) eagerly: Lightning-AI/torchmetrics#3457. When a "
        "release defers them, this passes (strict: then it fails as a reminder to "
        "`uv lock --upgrade-package torchmetrics` and drop the xfail)"
    ),
)
def test_lightning_imports_no_model_zoo() -> None:
    """What every run pays for before its first item (issue #16's import-chain target)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import lightning.pytorch"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = set(re.findall(r"\|\s*(\S+)$", proc.stderr, re.MULTILINE))
    unused = {"transformers", "torchvision.models", "scipy.signal"} & imported
    assert not unused, f"import lightning.pytorch imported {sorted(unused)}"
