"""The command line: clear messages and exit codes, no traceback walls."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from audio_models.data.datasets import ManifestDataset
from audio_models.data.items import segment_id
from audio_models.utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "runners.extract",
        "tracking=off",
        "device=cpu",
        "loader.num_workers=0",
        f"output_dir={tmp_path}/out",
        f"hydra.run.dir={tmp_path}/hydra",
        *overrides,
    ]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)


def test_missing_dataset_root(tmp_path: Path) -> None:
    proc = _run(tmp_path, "dataset=folder", f"dataset.root={tmp_path}/nope")
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "out" / "features.parquet").exists()


def test_manifest_without_path_column(tmp_path: Path) -> None:
    manifest = tmp_path / "m.tsv"
    manifest.write_text("file\tlabel\na.wav\tx\n")
    proc = _run(tmp_path, "dataset=manifest", f"dataset.path={manifest}")
    assert proc.returncode == 2
    assert "no path column 'path'" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_unknown_extractor(tmp_path: Path) -> None:
    proc = _run(tmp_path, "extractor=xlsr53000")
    assert proc.returncode != 0
    assert "Available options in 'extractor'" in proc.stderr
    assert "egemaps" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_failure_ratio_sets_the_exit_code(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    sf.write(corpus / "ok.wav", (0.2 * np.sin(np.arange(16000) / 10)).astype(np.float32), 16000)
    (corpus / "bad.wav").write_bytes(b"nope")
    tolerant = _run(tmp_path, "dataset=folder", f"dataset.root={corpus}", "max_failure_ratio=0.5")
    assert tolerant.returncode == 0, tolerant.stderr
    # Quiet by default: output is a pipe here, so no progress bar (no carriage returns) and
    # none of Lightning's banners or tips; the last line is this session's.
    said = tolerant.stdout + tolerant.stderr
    assert "\r" not in said
    assert "GPU available" not in said and "Tip" not in said
    assert "this session: 2 items (1 failed)" in said
    strict = _run(tmp_path, "dataset=folder", f"dataset.root={corpus}", "max_failure_ratio=0.1")
    assert strict.returncode == 3
    assert "1 of 2 items failed" in strict.stderr
    assert (tmp_path / "out" / "features.parquet").exists()  # the good item is still written


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("abc", r"row 3, column 'start': 'abc' is not a number of seconds"),
        ("-1", r"row 3, column 'start': -1(\.0)? is not a non-negative number"),
        ("inf", r"row 3, column 'start': inf is not a non-negative number"),
    ],
)
def test_manifest_bad_numbers_name_the_row(tmp_path: Path, value: str, message: str) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,start\na.wav,0\nb.wav,{value}\n")
    with pytest.raises(UserError, match=message):
        _ = ManifestDataset(path=str(manifest)).items


def test_segment_ids_are_exact_past_six_digits(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,start,end\nlong.wav,10000.1,10000.2\nlong.wav,10000.15,10000.2\n")
    ids = [item.id for item in ManifestDataset(path=str(manifest)).items]
    assert ids == ["long.wav@10000.1-10000.2", "long.wav@10000.15-10000.2"]
    assert segment_id("a.wav", 1.5, None) == "a.wav@1.5-"  # :g ids of earlier runs unchanged


def test_the_log_lands_beside_the_outputs(tmp_path: Path) -> None:
    # No hydra.run.dir here: with output_dir set, Hydra's run directory is that folder.
    command = [
        sys.executable,
        "-m",
        "runners.extract",
        "tracking=off",
        "dataset.n_clips=2",
        "loader.num_workers=0",
        f"dataset.root={tmp_path}/demo",
        f"output_dir={tmp_path}/out",
    ]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "this session: 2 items" in (tmp_path / "out" / "extract.log").read_text()
    assert not (tmp_path / "outputs").exists()


def test_no_lightning_sampler_warning(tmp_path: Path) -> None:
    # fbank batches through the loader's length-bucketing sampler, on purpose: Lightning's
    # note that it is a custom sampler is not for the user.
    proc = _run(
        tmp_path,
        "extractor=fbank",
        "dataset.n_clips=3",
        f"dataset.root={tmp_path}/d",
        "loader.batch_audio_s=10",
    )
    assert proc.returncode == 0, proc.stderr
    assert "custom batch sampler" not in proc.stdout + proc.stderr
