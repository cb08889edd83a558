"""Hugging Face ``datasets`` corpora (``dataset=huggingface``, ``am.extract(ds)``): items, ids
and labels, refusals before torch, and features equal to ``dataset=folder`` on the same audio,
whether the dataset points at the files or embeds their bytes; resume and bad rows."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from datasets import Audio, ClassLabel, Dataset, DatasetDict, Features, Value, load_from_disk

import audio_models as am
from audio_models.data.hf import HuggingFaceDataset
from audio_models.utils.errors import UserError
from runners.extract import extract
from tests.importcheck import run_light as _run

SR = 16000
FEATURES = Features(
    {
        "audio": Audio(),
        "speaker": Value("string"),
        "emotion": ClassLabel(names=["angry", "happy"]),
        "text": Value("string"),
        "path": Value("string"),  # Common Voice has one: named like an output column, left out
    }
)


def _corpus(root: Path) -> list[Path]:
    """Generated recordings in three formats (a stereo WAV, a FLAC at 8 kHz, an OGG)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    t = np.arange(int(1.3 * SR)) / SR
    tone = (0.3 * np.sin(2 * np.pi * 140 * t) + 0.02 * rng.standard_normal(t.size)).astype("f4")
    sf.write(root / "a.wav", np.stack([tone, 0.5 * tone], axis=1), SR)
    sf.write(root / "b.flac", tone[::2][: int(0.9 * 8000)], 8000)
    sf.write(root / "c.ogg", tone[: int(1.1 * SR)], SR)
    return [root / "a.wav", root / "b.flac", root / "c.ogg"]


def _dataset(files: list[Path]) -> Dataset:
    n = len(files)
    return Dataset.from_dict(
        {
            "audio": [str(f) for f in files],
            "speaker": [["09", "007"][i % 2] for i in range(n)],
            "emotion": [[0, 1, -1][i % 3] for i in range(n)],
            "text": [["hello world", None][i % 2] for i in range(n)],
            "path": [f.name for f in files],
        },
        features=FEATURES,
    )


def _saved(files: list[Path], where: Path, split: str = "test") -> Path:
    """A save_to_disk folder: ``save_to_disk`` embeds the files' bytes (their paths become
    file names), so its audio is decoded from memory."""
    DatasetDict({split: _dataset(files), "train": _dataset(files[:1])}).save_to_disk(str(where))
    return where


def test_saved_dataset_embeds_bytes_and_reads_labels(tmp_path: Path) -> None:
    files = _corpus(tmp_path / "corpus")
    saved = _saved(files, tmp_path / "saved")
    dataset = HuggingFaceDataset(path=str(saved), split="test", text_column="text")
    items = dataset.items
    assert [i.id for i in items] == ["a.wav", "b.flac", "c.ogg"]
    assert all(i.blob is not None for i in items)  # embedded: no file is read
    assert items[0].blob.read() == files[0].read_bytes()
    # ClassLabel as names (-1: missing), text as written, "text" written as "transcript".
    assert [i.labels for i in items] == [
        {"speaker": "09", "emotion": "angry", "transcript": "hello world"},
        {"speaker": "007", "emotion": "happy", "transcript": None},
        {"speaker": "09", "emotion": None, "transcript": "hello world"},
    ]
    assert dataset.text_column == "transcript"
    assert dataset.fingerprint() == HuggingFaceDataset(path=str(saved), split="test").fingerprint()


@pytest.mark.parametrize(
    ("split", "rows"),
    [("test[1:]", [1, 2]), ("test[:-1]", [0, 1]), ("test [34%:]", [1, 2]), ("test[2:9]", [2])],
)
def test_a_split_slice_reads_those_rows(tmp_path: Path, split: str, rows: list[int]) -> None:
    """datasets' own slice syntax; the rows keep their ids (file names here)."""
    files = _corpus(tmp_path / "corpus")
    saved = _saved(files, tmp_path / "saved")
    items = HuggingFaceDataset(path=str(saved), split=split).items
    assert [i.id for i in items] == [files[r].name for r in rows]
    assert [i.blob.read() for i in items] == [files[r].read_bytes() for r in rows]
    assert [i.labels["speaker"] for i in items] == [["09", "007"][r % 2] for r in rows]


def test_runner_reads_a_quoted_split_slice(make_cfg, tmp_path: Path) -> None:
    files = _corpus(tmp_path / "corpus")
    saved = _saved(files, tmp_path / "saved")
    cfg = make_cfg(
        "extractor=mfcc", "dataset=huggingface", f"dataset.path={saved}", "dataset.split='test[1:]'"
    )
    result = extract(cfg)
    assert sorted(_items(result.output_dir).index.unique()) == ["b.flac", "c.ogg"]
    assert result.metrics["n_items"] == 2


def test_slice_ids_are_decided_on_the_whole_split(tmp_path: Path) -> None:
    """A slice's rows get the ids they have in the whole split, even where the slice alone
    would have unique paths: two slices never share an id, and a slice resumes into a run
    of the whole split as itself."""
    files = _corpus(tmp_path / "corpus")
    repeated = _dataset(files + files)  # each path twice: ids are row numbers
    whole = HuggingFaceDataset.from_dataset(repeated).items
    assert [i.id for i in whole] == [str(n) for n in range(6)]
    for split, rows in (("train[:3]", [0, 1, 2]), ("train[3:]", [3, 4, 5])):
        part = HuggingFaceDataset.from_dataset(repeated, split=split).items
        assert [i.id for i in part] == [str(r) for r in rows]
        assert [i.path for i in part] == [whole[r].path for r in rows]
    embedded = repeated.cast_column("audio", Audio(decode=False)).map(
        lambda row: {"audio": {"bytes": Path(row["audio"]["path"]).read_bytes(), "path": None}}
    )
    tail = HuggingFaceDataset.from_dataset(embedded, split="train[4:]").items
    assert [i.id for i in tail] == ["4", "5"]
    assert [i.blob.read() for i in tail] == [files[1].read_bytes(), files[2].read_bytes()]


def test_a_dataset_loaded_as_a_slice_is_named_by_that_string(tmp_path: Path) -> None:
    files = _corpus(tmp_path / "corpus")
    sliced = Dataset.from_dict(_dataset(files).to_dict(), features=FEATURES, split="train[1:]")
    items = HuggingFaceDataset.from_dataset(sliced, split="train[1:]").items
    assert len(items) == 3  # already that slice: not sliced again
    assert len(HuggingFaceDataset.from_dataset(sliced).items) == 3
    with pytest.raises(
        UserError, match=r"split='train': the dataset given holds split 'train\[1:\]'"
    ):
        _ = HuggingFaceDataset.from_dataset(sliced, split="train").items


def test_a_dataset_loaded_from_a_row_numbers_its_rows_from_there(tmp_path: Path) -> None:
    """load_dataset(split="train[3:]") numbers its rows as the same slice of the whole
    split does, so two such subsets never share a row-number id in one output_dir."""
    files = _corpus(tmp_path / "corpus")
    mapping = _dataset(files * 3).to_dict()  # paths repeated, in the slice too: row numbers
    rows = {column: values[3:] for column, values in mapping.items()}
    tail = Dataset.from_dict(rows, features=FEATURES, split="train[3:]")  # as loaded
    whole = Dataset.from_dict(mapping, features=FEATURES, split="train")
    expected = [str(n) for n in range(3, 9)]
    assert [i.id for i in HuggingFaceDataset.from_dataset(tail).items] == expected
    configured = HuggingFaceDataset.from_dataset(whole, split="train[3:]").items
    assert [i.id for i in configured] == expected


def test_an_empty_id_outside_the_slice_is_not_an_error(tmp_path: Path) -> None:
    files = _corpus(tmp_path / "corpus")
    ds = _dataset(files).add_column("uid", [None, "u1", "u2"])
    items = HuggingFaceDataset.from_dataset(ds, split="train[1:]", id_column="uid").items
    assert [i.id for i in items] == ["u1", "u2"]
    with pytest.raises(UserError, match="id_column='uid' has empty values"):
        _ = HuggingFaceDataset.from_dataset(ds, id_column="uid").items


def test_am_extract_takes_a_configured_dataset_object(tmp_path: Path) -> None:
    files = _corpus(tmp_path / "corpus")
    ds = _dataset(files)
    both = DatasetDict({"test": ds, "train": ds.select([0])})
    with pytest.raises(UserError, match=r"pass one of them \(dataset\['test'\]\)"):
        am.extract(both, "mfcc", num_workers=0)
    chosen = HuggingFaceDataset.from_dataset(both, split="test[1:]")
    result = am.extract(chosen, "mfcc", num_workers=0)
    names = {Path(f).name for f in result.index.get_level_values("file")}
    assert names == {"b.flac", "c.ogg"}


def test_audiofolder_rows_are_files_with_folder_ids(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    _corpus(corpus / "angry")
    shutil.copy(corpus / "angry" / "a.wav", corpus / "happy.wav")
    (corpus / "happy").mkdir()
    shutil.move(corpus / "happy.wav", corpus / "happy" / "a.wav")
    dataset = HuggingFaceDataset(
        path="audiofolder", data_dir=str(corpus), cache_dir=str(tmp_path / "cache")
    )
    items = dataset.items
    # The audio's path relative to data_dir: the id dataset=folder gives the same file.
    assert [i.id for i in items] == ["angry/a.wav", "angry/b.flac", "angry/c.ogg", "happy/a.wav"]
    assert all(i.blob is None and Path(i.path).is_file() for i in items)
    assert [i.labels["label"] for i in items] == ["angry", "angry", "angry", "happy"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"path": "{tmp}/nope"}, "is not a folder .* nor a builder"),
        ({"path": "someone/some_corpus"}, "Hub datasets are not downloaded"),
        ({"path": "audiofolder"}, "set dataset.data_dir"),
        ({"path": "audiofolder", "data_dir": "{tmp}/nope"}, "data_dir .* does not exist"),
        ({"path": "{saved}"}, r"has splits \['test', 'train'\]: choose one"),
        ({"path": "{saved}", "split": "dev"}, r"split='dev' is not a split .*\['test', 'train'\]"),
        ({"path": "{saved}", "split": "test", "audio_column": "wav"}, "audio_column='wav' is not"),
        ({"path": "{saved}", "split": "test", "audio_column": "emotion"}, "not an Audio column"),
        ({"path": "{saved}", "split": "test", "label_columns": ["age"]}, r"\['age'\] are not"),
        ({"path": "{saved}", "split": "test", "id_column": "nope"}, "id_column='nope' is not"),
        ({"path": "{saved}", "split": "test+train"}, "one split per run"),
        ({"path": "{saved}", "split": "test[abc]"}, r"split='test\[abc\]': Unrecognized"),
        ({"path": "{saved}", "split": "test[:2](up)"}, "rounding must be"),
        ({"path": "{saved}", "split": "test[:2"}, "not a split name with an optional slice"),
        ({"path": "{saved}", "split": "dev[:2]"}, r"split='dev' is not a split .*\['test'"),
        ({"path": "{saved}", "split": "test[5:2]"}, r"'test\[5:2\]' selects none of the 3 rows"),
        ({"path": "{saved}", "split": "test[:120%]"}, "Percent slice boundaries must be"),
        ({"path": "{saved}", "split": "test[+1:]"}, r"Unrecognized instruction format: test\["),
    ],
)
def test_mistakes_are_one_line(tmp_path: Path, options: dict, message: str) -> None:
    saved = _saved(_corpus(tmp_path / "corpus"), tmp_path / "saved")
    given = {
        k: v.format(tmp=tmp_path, saved=saved) if isinstance(v, str) else v
        for k, v in options.items()
    }
    with pytest.raises(UserError, match=message):
        _ = HuggingFaceDataset(**given).items


def test_mistakes_stop_the_runner_before_torch(tmp_path: Path) -> None:
    saved = _saved(_corpus(tmp_path / "corpus"), tmp_path / "saved")
    for args, expected in [
        ([f"dataset.path={tmp_path}/nope"], "is not a folder"),
        ([f"dataset.path={saved}", "dataset.split=dev"], "dataset.split='dev' is not a split"),
        ([f"dataset.path={saved}", "dataset.split=test", "dataset.audio_column=wav"], "'wav'"),
    ]:
        proc, message = _run(
            tmp_path,
            "runners.extract",
            "tracking=off",
            f"hydra.run.dir={tmp_path}/hydra",
            "dataset=huggingface",
            *args,
        )
        assert proc.returncode == 2, message
        assert expected in message and message.strip().startswith("error:"), message


def _items(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "features.parquet").set_index("id").sort_index()


def _assert_same_numbers(hf: Path, folder: Path) -> None:
    """The same items read the same way (bounds, rates, channels) and exactly the same
    feature values (pooled or per frame)."""
    items, reference = _items(hf), _items(folder)
    assert list(items.index) == list(reference.index)
    meta = ["duration_s", "sample_rate", "source_sample_rate", "n_channels", "start", "end"]
    pd.testing.assert_frame_equal(items[meta], reference[meta])
    expected = am.load(folder).features.reset_index(level="file", drop=True)
    got = am.load(hf).features.reset_index(level="file", drop=True)
    assert expected.shape[1] > 10 and len(expected) >= len(reference)
    pd.testing.assert_frame_equal(got[expected.columns], expected, check_exact=True)


def _equal_to_folder(make_cfg, tmp_path: Path, files: list[Path], extractor: str) -> None:
    corpus = files[0].parent
    folder = extract(
        make_cfg(f"extractor={extractor}", "dataset=folder", f"dataset.root={corpus}", out="folder")
    )
    saved = tmp_path / "saved"
    _dataset(files).save_to_disk(str(saved))
    embedded = extract(
        make_cfg(
            f"extractor={extractor}", "dataset=huggingface", f"dataset.path={saved}", out="embedded"
        )
    )
    on_files = extract(
        make_cfg(
            f"extractor={extractor}",
            "dataset=huggingface",
            "dataset.path=audiofolder",
            f"dataset.data_dir={corpus}",
            f"dataset.cache_dir={tmp_path / 'cache'}",
            out="files",
        )
    )
    assert len(_items(folder.output_dir)) == len(files)
    for run in (embedded, on_files):
        _assert_same_numbers(run.output_dir, folder.output_dir)
    # The labels came along: the saved dataset's speaker, written as text.
    assert _items(embedded.output_dir)["speaker"].tolist()[:2] == ["09", "007"]


def test_generated_audio_equals_folder_embedded_or_not(make_cfg, tmp_path: Path) -> None:
    _equal_to_folder(make_cfg, tmp_path, _corpus(tmp_path / "corpus"), "fbank")


def test_recordings_equal_folder_embedded_or_not(make_cfg, tmp_path: Path, speech_dir) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    picked = [
        *sorted((speech_dir / "harvard").glob("*.wav"))[:3],
        *sorted((speech_dir / "emodb-subset" / "wav").glob("*.wav"))[:2],
    ]
    for f in picked:  # a flat folder: the embedded rows' ids are the file names
        shutil.copy(f, corpus / f.name)
    _equal_to_folder(make_cfg, tmp_path, sorted(corpus.iterdir()), "egemaps")


def test_embedded_audio_resumes_and_bad_bytes_are_failure_rows(make_cfg, tmp_path: Path) -> None:
    files = _corpus(tmp_path / "corpus")
    good = _dataset(files).cast_column("audio", Audio(decode=False))
    bad = Dataset.from_dict(
        {
            "audio": [{"bytes": b"not audio at all", "path": None}],
            "speaker": ["1"],
            "emotion": [0],
            "text": [None],
            "path": ["x"],
        },
        features=good.features,
    )
    from datasets import concatenate_datasets

    saved = tmp_path / "saved"
    concatenate_datasets([good, bad]).cast_column("audio", Audio()).save_to_disk(str(saved))
    assert load_from_disk(str(saved)).num_rows == 4
    overrides = [
        "extractor=fbank",
        "dataset=huggingface",
        f"dataset.path={saved}",
        "max_failure_ratio=0.5",
        "loader.num_workers=1",
        "windows.size_s=0.5",
    ]
    first = extract(make_cfg(*overrides))
    out = first.output_dir
    failures = pd.read_parquet(out / "failures.parquet")
    # Ids: row numbers (the bad row has no file name, so paths cannot name every row).
    assert failures["id"].tolist() == ["3"] and failures["stage"].tolist() == ["decode"]
    assert "cannot read audio bytes: Format not recognised" in failures["message"][0]
    before = pd.read_parquet(out / "features.parquet")
    assert sorted(set(before["id"].str.rsplit("@", n=1).str[0])) == ["0", "1", "2"]
    again = extract(make_cfg(*overrides))
    assert again.metrics["n_skipped_resumed"] == len(before) + 1  # the failure row's too
    pd.testing.assert_frame_equal(pd.read_parquet(out / "features.parquet"), before)


def test_am_extract_takes_a_dataset(tmp_path: Path) -> None:
    files = _corpus(tmp_path / "corpus")
    in_memory = _dataset(files)
    embedded = in_memory.cast_column("audio", Audio(decode=False)).map(
        lambda row: {"audio": {"bytes": Path(row["audio"]["path"]).read_bytes(), "path": None}}
    )
    by_files = am.extract(files, "fbank", num_workers=0)
    for source in (in_memory, embedded.cast_column("audio", Audio())):
        result = am.extract(source, "fbank", num_workers=0)
        assert len(result) == len(by_files) > 3  # frames
        np.testing.assert_array_equal(result[by_files.columns].to_numpy(), by_files.to_numpy())
        labels = result[["emotion", "speaker"]].groupby(level="file", sort=False).nth(0)
        emotion = labels["emotion"].astype(object)
        assert emotion.where(emotion.notna(), None).tolist() == ["angry", "happy", None]
        assert labels["speaker"].tolist() == ["09", "007", "09"]
