"""Kaldi data directories and audformat databases as datasets: items, labels, segments, refusals,
end-to-end runs, resume, and ``audio_models.extract(db)``."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import audformat
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from hydra import compose, initialize_config_dir

import audio_models as am
from audio_models.data.corpora import AudformatDataset, KaldiDataset
from audio_models.utils.errors import UserError
from runners.compare import compare, pooled_features
from runners.extract import extract
from tests.conftest import CONF_DIR

REPO = Path(__file__).resolve().parents[1]
SR = 16000


def _wav(path: Path, seconds: float = 1.0, f0: float = 150.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * SR)) / SR
    rng = np.random.default_rng(int(f0))
    tone = 0.3 * np.sin(2 * np.pi * f0 * t) + 0.01 * rng.standard_normal(t.size)
    sf.write(path, tone.astype(np.float32), SR)


# -- Kaldi --------------------------------------------------------------------------------


def _kaldi(root: Path, *, segments: bool = True) -> Path:
    """A data directory: two recordings (one absolute, one relative path), three utterances
    when segmented, speakers that look like numbers and transcripts with odd spacing."""
    audio = root / "audio"
    _wav(audio / "rec1.wav", 2.0, 140.0)
    _wav(audio / "rec2.wav", 1.0, 220.0)
    data = root / "data"
    data.mkdir(parents=True)
    (data / "wav.scp").write_text(f"rec1 {audio / 'rec1.wav'}\nrec2 ../audio/rec2.wav\n")
    if segments:
        (data / "segments").write_text("u1 rec1 0 0.5\nu2 rec1 0.5 -1\n\nu3 rec2 0.1 0.9\n")
        (data / "utt2spk").write_text("u1 09\nu2 09\nu3 007\n")
        (data / "text").write_text("u1 HELLO  world\nu2\nu3 sí, 1e3\n", encoding="utf-8")
    else:
        (data / "utt2spk").write_text("rec1 09\nrec2 007\n")
    return data


def test_kaldi_segments_give_utterances(tmp_path: Path) -> None:
    data = _kaldi(tmp_path)
    items = KaldiDataset(root=str(data)).items
    rec1, rec2 = str(tmp_path / "audio" / "rec1.wav"), str(tmp_path / "audio" / "rec2.wav")
    assert [(i.id, i.path, i.start, i.end) for i in items] == [
        ("u1", rec1, 0.0, 0.5),
        ("u2", rec1, 0.5, None),  # Kaldi's -1: to the end of the recording
        ("u3", rec2, 0.1, 0.9),
    ]
    # Labels as written: "09" stays text, the transcript keeps its spacing, no words: missing.
    assert [i.labels for i in items] == [
        {"speaker": "09", "transcript": "HELLO  world"},
        {"speaker": "09", "transcript": None},
        {"speaker": "007", "transcript": "sí, 1e3"},
    ]


def test_kaldi_without_segments_gives_recordings(tmp_path: Path) -> None:
    data = _kaldi(tmp_path, segments=False)
    items = KaldiDataset(root=str(data)).items
    assert [(i.id, i.start, i.end, i.labels) for i in items] == [
        ("rec1", None, None, {"speaker": "09"}),
        ("rec2", None, None, {"speaker": "007"}),
    ]
    # Relative paths resolve against audio_root when set (a recipe's working directory).
    (data / "wav.scp").write_text("rec2 audio/rec2.wav\n")
    (data / "utt2spk").unlink()
    items = KaldiDataset(root=str(data), audio_root=str(tmp_path)).items
    assert items[0].path == str(tmp_path / "audio" / "rec2.wav")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("sh -c {command} |", "is a piped command"),
        ("{command}|", "is a piped command"),
        ("| {command}", "is a piped command"),
        ("-", "reads standard input"),
        ("/data/feats.ark:1234", "points into an archive"),
        ("/data/a.wav extra", "expected '<recording-id> <path>', got 3 fields"),
    ],
)
def test_kaldi_refuses_what_is_not_a_plain_path(tmp_path: Path, entry: str, message: str) -> None:
    data = _kaldi(tmp_path, segments=False)
    marker = tmp_path / "marker"
    command = shlex.quote(f"touch {marker}")
    with (data / "wav.scp").open("a") as handle:
        handle.write(f"rec3 {entry.format(command=command)}\n")
    with pytest.raises(UserError, match=rf"wav\.scp line 3: .*{message}") as info:
        _ = KaldiDataset(root=str(data)).items
    assert "\n" not in str(info.value)
    assert not marker.exists()  # refused, never run


def test_kaldi_piped_line_stops_the_command_before_any_work(tmp_path: Path) -> None:
    data = _kaldi(tmp_path)
    marker = tmp_path / "marker"
    with (data / "wav.scp").open("a") as handle:
        handle.write(f"rec3 touch {marker} |\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "runners.extract",
            "dataset=kaldi",
            f"dataset.root={data}",
            "tracking=off",
            "device=cpu",
            "loader.num_workers=0",
            f"output_dir={tmp_path}/out",
            f"hydra.run.dir={tmp_path}/hydra",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"{data / 'wav.scp'} line 3: 'rec3' is a piped command" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not marker.exists()
    assert not (tmp_path / "out" / "features.parquet").exists()


@pytest.mark.parametrize(
    ("filename", "content", "message"),
    [
        ("segments", "u1 rec1 0 0.5\nu2 rec1 0.5\n", r"segments line 2: expected .* got 3 fields"),
        ("segments", "u1 rec1 0 0.5\nu2 rec9 0 1\n", r"segments line 2: recording 'rec9' is not"),
        ("segments", "u1 rec1 0.5 0.5\n", r"segments line 1: end 0.5 is not after start 0.5"),
        ("segments", "u1 rec1 0.7 0.2\n", r"segments line 1: end 0.2 is not after start 0.7"),
        ("segments", "u1 rec1 0 abc\n", r"segments line 1: end 'abc' is not a number"),
        ("segments", "u1 rec1 -1 2\n", r"segments line 1: start -1 is negative"),
        ("segments", "u1 rec1 0 1\nu1 rec2 0 1\n", r"line 2: 'u1' is listed twice .*line 1"),
        ("utt2spk", "u1 a\nu2 b c\n", r"utt2spk line 2: expected .* got 3 fields"),
        ("utt2spk", "u1 a\nu7 b\n", r"utt2spk line 2: utterance 'u7' is not among the items"),
        ("text", "u1 hi\n\nu9 there\n", r"text line 3: utterance 'u9' is not among the items"),
        ("wav.scp", "rec1\n", r"wav\.scp line 1: expected .* got 1 fields"),
    ],
)
def test_kaldi_bad_lines_are_named(
    tmp_path: Path, filename: str, content: str, message: str
) -> None:
    data = _kaldi(tmp_path)
    (data / filename).write_text(content)
    with pytest.raises(UserError, match=message):
        _ = KaldiDataset(root=str(data)).items


def test_kaldi_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        _ = KaldiDataset(root=str(tmp_path / "nope")).items
    with pytest.raises(UserError, match=r"has no wav\.scp"):
        _ = KaldiDataset(root=str(tmp_path)).items


def test_kaldi_end_to_end_resumes_and_keeps_failures(make_cfg, tmp_path: Path) -> None:
    data = _kaldi(tmp_path)
    # A recording whose file is missing: its utterance is a failure row, not a stop.
    (data / "wav.scp").write_text(
        (data / "wav.scp").read_text() + f"rec3 {tmp_path / 'gone.wav'}\n"
    )
    (data / "segments").write_text((data / "segments").read_text() + "u4 rec3 0 1\n")
    overrides = [
        "extractor=egemaps",
        "dataset=kaldi",
        f"dataset.root={data}",
        "dataset.text_column=transcript",
        "max_failure_ratio=0.5",
    ]
    first = extract(make_cfg(*overrides))
    out = first.output_dir
    table = pq.read_table(out / "features.parquet", columns=["id", "start", "end", "speaker"])
    assert table.column("id").to_pylist() == ["u1", "u2", "u3"]
    assert str(table.schema.field("speaker").type) == "string"
    assert table.column("speaker").to_pylist() == ["09", "09", "007"]
    assert table.column("end").to_pylist()[0] == pytest.approx(0.5)
    assert table.column("end").to_pylist()[1] == pytest.approx(2.0)  # -1: the recording's end
    assert pq.read_table(out / "features.parquet", columns=["transcript"]).column(
        0
    ).to_pylist() == ["HELLO  world", None, "sí, 1e3"]
    failures = pd.read_parquet(out / "failures.parquet")
    assert failures["id"].tolist() == ["u4"]
    before = pd.read_parquet(out / "features.parquet")
    again = extract(make_cfg(*overrides))
    assert again.metrics["n_skipped_resumed"] == 4  # the utterance ids matched (u4: its row)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "features.parquet"), before)
    # What runners.compare reads, grouped by speaker.
    frame, X, _ = pooled_features(out)
    assert frame["speaker"].tolist() == ["09", "09", "007"] and X.shape == (3, 88)


# -- audformat ----------------------------------------------------------------------------


def _database(root: Path) -> audformat.Database:
    """A tiny database: a filewise table (speaker as text, age as int, a categorical code
    whose labels look like numbers), segmented emotion tables in a train and a test split."""
    files = ["audio/a.wav", "audio/b.wav", "audio/c.wav", "audio/d.wav"]
    for k, file in enumerate(files):
        _wav(root / file, 1.0, 120.0 + 40 * k)
    db = audformat.Database("tiny", source="tests", usage=audformat.define.Usage.RESEARCH)
    db.schemes["speaker"] = audformat.Scheme("str")
    db.schemes["age"] = audformat.Scheme("int")
    db.schemes["code"] = audformat.Scheme(labels={"01": {"meaning": "x"}, "09": {"meaning": "y"}})
    db.schemes["emotion"] = audformat.Scheme(labels=["happy", "sad"])
    db.splits["train"] = audformat.Split(audformat.define.SplitType.TRAIN)
    db.splits["test"] = audformat.Split(audformat.define.SplitType.TEST)
    db["files"] = audformat.Table(audformat.filewise_index(files))
    for column, values in (
        ("speaker", ["09", "09", "007", "007"]),
        ("age", [30, 30, None, 41]),
        ("code", ["09", "01", "09", None]),
    ):
        db["files"][column] = audformat.Column(scheme_id=column)
        db["files"][column].set(values)
    for split, index in (
        ("train", audformat.segmented_index(files[:2], [0, 0.2], [0.5, pd.NaT])),
        ("test", audformat.segmented_index(files[2:], [0.1, 0], [0.9, 0.6])),
    ):
        table = f"emotion.{split}"
        db[table] = audformat.Table(index, split_id=split)
        db[table]["emotion"] = audformat.Column(scheme_id="emotion")
        db[table]["emotion"].set(["happy", "sad"])
    db.save(str(root))
    return db


def test_audformat_filewise(tmp_path: Path) -> None:
    _database(tmp_path / "db")
    items = AudformatDataset(root=str(tmp_path / "db"), index_type="filewise").items
    assert [i.id for i in items] == ["audio/a.wav", "audio/b.wav", "audio/c.wav", "audio/d.wav"]
    assert items[0].path == str(tmp_path / "db" / "audio" / "a.wav")
    assert (items[0].start, items[0].end) == (None, None)
    # Text as written, the int scheme stays a number, the categorical gives its labels.
    assert [i.labels for i in items] == [
        {"speaker": "09", "age": 30, "code": "09"},
        {"speaker": "09", "age": 30, "code": "01"},
        {"speaker": "007", "age": None, "code": "09"},
        {"speaker": "007", "age": 41, "code": None},
    ]
    assert type(items[0].labels["age"]) is int


def test_audformat_segmented_splits_tables_and_columns(tmp_path: Path) -> None:
    root = tmp_path / "db"
    _database(root)
    # Default: the segmented tables (both splits), their columns only.
    items = AudformatDataset(root=str(root)).items
    bounds = {i.id: (i.start, i.end, i.labels) for i in items}
    assert bounds == {
        "audio/a.wav@0-0.5": (0.0, 0.5, {"emotion": "happy"}),
        "audio/b.wav@0.2-": (0.2, None, {"emotion": "sad"}),  # NaT: to the end of the file
        "audio/c.wav@0.1-0.9": (0.1, 0.9, {"emotion": "happy"}),
        "audio/d.wav@0-0.6": (0.0, 0.6, {"emotion": "sad"}),
    }
    # A split keeps its tables' items; the filewise table (no split) labels each segment.
    test = AudformatDataset(
        root=str(root), split="test", tables=["files", "emotion.train", "emotion.test"]
    ).items
    assert [(i.id, i.labels) for i in test] == [
        ("audio/c.wav@0.1-0.9", {"speaker": "007", "age": None, "code": "09", "emotion": "happy"}),
        ("audio/d.wav@0-0.6", {"speaker": "007", "age": 41, "code": None, "emotion": "sad"}),
    ]
    chosen = AudformatDataset(
        root=str(root), tables=["files", "emotion.train"], columns=["emotion", "speaker"]
    ).items
    assert [i.labels for i in chosen] == [
        {"emotion": "happy", "speaker": "09"},
        {"emotion": "sad", "speaker": "09"},
    ]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"split": "dev"}, r"dataset.split='dev' is not a split .* \['test', 'train'\]"),
        ({"tables": ["nope"]}, r"dataset.tables: \['nope'\] not in the database"),
        ({"columns": ["mood"]}, r"dataset.columns: \['mood'\] not in the chosen tables"),
        (
            {"index_type": "filewise", "tables": ["emotion.test"]},
            "segmented: a segment's labels cannot label a whole file",
        ),
        ({"index_type": "frames"}, "dataset.index_type='frames'"),
    ],
)
def test_audformat_bad_choices_are_named(tmp_path: Path, options: dict, message: str) -> None:
    _database(tmp_path / "db")
    with pytest.raises(UserError, match=message):
        _ = AudformatDataset(root=str(tmp_path / "db"), **options).items


def test_audformat_missing_database(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"has no db\.yaml"):
        _ = AudformatDataset(root=str(tmp_path)).items


def test_audformat_end_to_end_resumes_and_keeps_failures(make_cfg, tmp_path: Path) -> None:
    root = tmp_path / "db"
    _database(root)
    (root / "audio" / "d.wav").write_bytes(b"not audio")  # a failure row, not a stop
    overrides = [
        "extractor=egemaps",
        "dataset=audformat",
        f"dataset.root={root}",
        "dataset.index_type=filewise",
        "dataset.label_column=code",
        "max_failure_ratio=0.5",
    ]
    out = extract(make_cfg(*overrides)).output_dir
    table = pq.read_table(out / "features.parquet", columns=["id", "speaker", "age", "code"])
    assert table.column("id").to_pylist() == ["audio/a.wav", "audio/b.wav", "audio/c.wav"]
    assert str(table.schema.field("speaker").type) == "string"
    assert str(table.schema.field("age").type) == "int64"  # the scheme declares int
    assert table.column("speaker").to_pylist() == ["09", "09", "007"]
    assert table.column("age").to_pylist() == [30, 30, None]
    assert table.column("code").to_pylist() == ["09", "01", "09"]
    assert pd.read_parquet(out / "failures.parquet")["id"].tolist() == ["audio/d.wav"]
    again = extract(make_cfg(*overrides))
    assert again.metrics["n_skipped_resumed"] == 4  # ids matched, the failure row too
    frame, X, _ = pooled_features(out)
    assert frame["speaker"].tolist() == ["09", "09", "007"] and X.shape == (3, 88)


def test_am_extract_takes_a_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = _database(tmp_path / "db")
    monkeypatch.chdir(tmp_path)  # relative files resolve against db.root, not here
    result = am.extract(db, extractor="egemaps", num_workers=0)
    # The database's own index (relative files, NaT end), so results join its tables.
    expected = audformat.utils.union([db["emotion.train"].index, db["emotion.test"].index])
    assert sorted(map(tuple, result.index.tolist()), key=str) == sorted(
        map(tuple, expected.tolist()), key=str
    )
    joined = db["emotion.train"].get().join(result.drop(columns="emotion"), how="inner")
    assert len(joined) == 2 and joined["emotion"].tolist() == ["happy", "sad"]
    assert isinstance(result["emotion"].dtype, pd.CategoricalDtype)
    assert result.shape == (4, 1 + 88) and not result.attrs["failures"]


def test_compare_probes_an_audformat_run_grouped_by_speaker(
    make_cfg, mlflow_store: tuple[str, list[str]], tmp_path: Path
) -> None:
    # Four speakers (ids that look like numbers), each with two low and two high clips.
    root = tmp_path / "db"
    files, speakers, emotions = [], [], []
    for s in range(4):
        for k in range(4):
            file = f"audio/s{s}_{k}.wav"
            emotion = "happy" if k % 2 else "sad"
            _wav(root / file, 0.5, (240.0 if emotion == "happy" else 120.0) + 5 * s + k)
            files.append(file)
            speakers.append(f"0{s}")
            emotions.append(emotion)
    db = audformat.Database("probe")
    db.schemes["speaker"] = audformat.Scheme("str")
    db.schemes["emotion"] = audformat.Scheme(labels=["happy", "sad"])
    db["files"] = audformat.Table(audformat.filewise_index(files))
    for column, values in (("speaker", speakers), ("emotion", emotions)):
        db["files"][column] = audformat.Column(scheme_id=column)
        db["files"][column].set(values)
    db.save(str(root))
    _, tracking = mlflow_store
    run = extract(
        make_cfg(
            "extractor=egemaps",
            "dataset=audformat",
            f"dataset.root={root}",
            "dataset.label_column=emotion",
            *tracking,
        )
    )
    import audio_models.config  # noqa: F401  (registers the schemas)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="compare",
            overrides=[
                *tracking,
                f"run_ids=[{run.run_id}]",
                "n_splits=2",
                f"output_dir={tmp_path / 'compare'}",
            ],
        )
    table = compare(cfg).table
    assert table["folds"].tolist() == ["stratified group 2-fold by 'speaker' (shuffled, seed 0)"]
