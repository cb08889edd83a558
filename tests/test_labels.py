"""Labels are data: a dataset's label cells reach features.parquet with their exact characters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from audio_models.config import build
from audio_models.data.datasets import DemoDataset, FolderDataset, ManifestDataset
from audio_models.utils.errors import UserError
from runners.extract import extract

# Ids and codes that type inference mangled (9, 7, 1000.0, NaN) and an empty cell.
WRITTEN = ["09", "007", "1e3", "NA", ""]
EXPECTED = ["09", "007", "1e3", "NA", None]  # an empty cell is a missing label, not "nan"


def _clips(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    t = np.arange(8000) / 16000
    for k, name in enumerate(names):
        tone = 0.3 * np.sin(2 * np.pi * (150 + 20 * k) * t) + 0.01 * rng.standard_normal(t.size)
        sf.write(folder / name, tone.astype(np.float32), 16000)


def _manifest(folder: Path, fmt: str) -> Path:
    names = [f"clip{k}.wav" for k in range(len(WRITTEN))]
    _clips(folder, names)
    if fmt == "jsonl":
        path = folder / "m.jsonl"
        # 1e3 as a JSON number keeps its digits; "" and null (or no key) are missing labels.
        lines = [
            '{"path": "clip0.wav", "speaker": "09", "code": "09"}',
            '{"path": "clip1.wav", "speaker": "007", "code": 7}',
            '{"path": "clip2.wav", "speaker": "1e3", "code": 1e3}',
            '{"path": "clip3.wav", "speaker": "NA", "code": true}',
            '{"path": "clip4.wav", "speaker": "", "code": null}',
        ]
        path.write_text("\n".join(lines) + "\n")
        return path
    sep = "\t" if fmt == "tsv" else ","
    path = folder / f"m.{fmt}"
    rows = [sep.join(["path", "speaker", "code"])]
    rows += [sep.join([n, w, w]) for n, w in zip(names, WRITTEN, strict=True)]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_manifest_labels_keep_their_characters(tmp_path: Path, fmt: str) -> None:
    items = ManifestDataset(path=str(_manifest(tmp_path, fmt))).items
    assert [i.labels["speaker"] for i in items] == EXPECTED
    codes = [i.labels["code"] for i in items]
    assert codes == (["09", "7", "1e3", "true", None] if fmt == "jsonl" else EXPECTED)


def test_folder_regex_labels_keep_their_characters(tmp_path: Path) -> None:
    _clips(tmp_path, [f"{w}_x.wav" for w in WRITTEN])
    dataset = FolderDataset(root=str(tmp_path), label_regex=r"(?P<speaker>[0-9A-Za-z]*)_x")
    labels = {i.id: i.labels["speaker"] for i in dataset.items}
    assert labels == {f"{w}_x.wav": e for w, e in zip(WRITTEN, EXPECTED, strict=True)}


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "folder"])
def test_labels_reach_features_parquet_exactly(make_cfg, tmp_path: Path, fmt: str) -> None:
    data = tmp_path / "data"
    if fmt == "folder":
        _clips(data, [f"{w}_x.wav" for w in WRITTEN])
        dataset = [
            "dataset=folder",
            f"dataset.root={data}",
            "dataset.label_regex='(?P<speaker>[0-9A-Za-z]*)_x'",
        ]
    else:
        dataset = ["dataset=manifest", f"dataset.path={_manifest(data, fmt)}"]
    out = extract(make_cfg("extractor=egemaps", *dataset)).output_dir
    # Read with Arrow: a missing label is null there (pandas would show it as NaN).
    table = pq.read_table(out / "features.parquet", columns=["id", "speaker"])
    assert str(table.schema.field("speaker").type) == "string"
    found = dict(zip(*(table.column(c).to_pylist() for c in ("id", "speaker")), strict=True))
    if fmt == "folder":
        assert found == {f"{w}_x.wav": e for w, e in zip(WRITTEN, EXPECTED, strict=True)}
    else:
        assert found == {f"clip{k}.wav": e for k, e in enumerate(EXPECTED)}
    assert pd.read_parquet(out / "features.parquet")["speaker"].isna().sum() == 1


def test_declared_label_types_convert_and_name_a_bad_cell(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,speaker,f0\na.wav,09,110.5\nb.wav,10,\n")
    dataset = ManifestDataset(path=str(manifest), label_types={"f0": "float"})
    assert [i.labels for i in dataset.items] == [
        {"speaker": "09", "f0": 110.5},
        {"speaker": "10", "f0": None},
    ]
    manifest.write_text("path,f0\na.wav,110.5\nb.wav,high\n")
    with pytest.raises(UserError, match=r"row 3, column 'f0': 'high' is not float"):
        _ = ManifestDataset(path=str(manifest), label_types={"f0": "float"}).items
    with pytest.raises(UserError, match="label type is one of"):
        ManifestDataset(path=str(manifest), label_types={"f0": "double"})


def test_demo_declares_its_measurement(tmp_path: Path) -> None:
    items = DemoDataset(root=str(tmp_path), n_clips=2).items
    assert isinstance(items[0].labels["f0_hz"], float)
    assert items[0].labels["label"] == "low"


def test_empty_or_na_bounds_still_mean_the_whole_file(tmp_path: Path) -> None:
    # Bounds are numbers, not labels: an empty or NA bound keeps meaning "the file's own".
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,start,end\na.wav,NA,\nb.wav,0.5,nan\n")
    items = ManifestDataset(path=str(manifest)).items
    assert [(i.start, i.end) for i in items] == [(None, None), (0.5, None)]


def test_a_bad_jsonl_line_is_named(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": "a.wav"}) + "\n{oops\n")
    with pytest.raises(UserError, match="line 2"):
        _ = ManifestDataset(path=str(manifest)).items


def test_label_types_from_the_command_line(make_cfg, tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,age,speaker\n/a.wav,30,09\n")
    cfg = make_cfg("dataset=manifest", f"dataset.path={manifest}", "dataset.label_types={age:int}")
    (item,) = build(cfg, "dataset").items
    assert item.labels == {"age": 30, "speaker": "09"}
