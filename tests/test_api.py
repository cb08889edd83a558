"""The Python API: ``audio_models.extract`` equals the CLI's Parquet, keeps labels and the
caller's index, carries failures, resumes, and leaves the process as it found it."""

from __future__ import annotations

import gc
import random
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

import audio_models as am
from audio_models.testing import make_tiny
from audio_models.utils.errors import UserError
from benchmarks.reliability import voice
from runners.extract import extract as cli_extract

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four short voiced clips at two rates, in a folder with a subfolder."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "sub").mkdir()
    for i, (name, sr) in enumerate(
        [("a.wav", 16000), ("b.wav", 16000), ("sub/c.wav", 22050), ("sub/d.flac", 16000)]
    ):
        sf.write(root / name, voice(1.0 + 0.3 * i, 120 + 20 * i, sr), sr)
    return root


def _cli_features(make_cfg, root: Path, *overrides: str) -> pd.DataFrame:
    result = cli_extract(make_cfg("dataset=folder", f"dataset.root={root}", *overrides))
    return pd.read_parquet(result.output_dir / "features.parquet").sort_values("path")


def test_extractors_lists_every_config_with_a_description() -> None:
    names = am.extractors()
    assert {"egemaps", "fbank", "wav2vec2", "whisperx"} <= set(names)
    assert all(text and not text.startswith("#") for text in names.values())


def test_egemaps_equals_the_cli_for_a_folder_and_a_list(make_cfg, corpus: Path) -> None:
    cli = _cli_features(make_cfg, corpus)
    by_folder = am.extract(corpus, "egemaps", num_workers=0, device="cpu")
    files = sorted(str(p) for p in corpus.rglob("*.*"))
    by_list = am.extract(files, "egemaps", num_workers=0, device="cpu")
    assert by_folder.index.names == ["file", "start", "end"]
    assert by_folder.shape == (4, 88)
    names = [c for c in cli.columns if c in by_folder.columns]
    assert len(names) == 88
    for frame in (by_folder, by_list):
        frame = frame.sort_index(level="file")
        np.testing.assert_array_equal(frame[names].to_numpy(), cli[names].to_numpy())
        assert list(frame.index.get_level_values("file")) == list(cli["path"])
        ends = frame.index.get_level_values("end").total_seconds()
        np.testing.assert_allclose(ends, cli["end"].to_numpy())


def test_fbank_frames_equal_the_cli(make_cfg, corpus: Path) -> None:
    result = cli_extract(make_cfg("dataset=folder", f"dataset.root={corpus}", "extractor=fbank"))
    run = am.load(result.output_dir)
    df = am.extract(corpus, "fbank", num_workers=0, device="cpu", batch_size=3)
    assert df.index.names == ["file", "start", "end", "frame"]
    assert df.shape[1] == 80
    pd.testing.assert_frame_equal(df, run.features)
    first = run.items.iloc[0]
    np.testing.assert_array_equal(
        run.frames(first["id"]).drop(columns=["id", "frame"]).to_numpy(),
        df.xs(first["path"], level="file").to_numpy(),
    )
    assert len(df) == int(run.items["n_frames"].sum())


def test_tiny_wav2vec2_equals_the_cli_and_process_signal(
    make_cfg, corpus: Path, tmp_path: Path
) -> None:
    model = make_tiny(tmp_path / "w2v2", "wav2vec2-layer")
    options = {"model": str(model), "layers": [1, -1], "pooling": "mean_std"}
    cli = _cli_features(
        make_cfg,
        corpus,
        "extractor=wav2vec2",
        f"extractor.model={model}",
        "extractor.layers=[1,-1]",
        "extractor.pooling=mean_std",
    )
    df = am.extract(corpus, "wav2vec2", num_workers=0, device="cpu", **options).sort_index()
    assert list(df.columns) == ["layer_1_mean", "layer_1_std", "layer_3_mean", "layer_3_std"]
    for column in df.columns:
        np.testing.assert_array_equal(np.stack(df[column]), np.stack(cli[column]))
    # One signal through load_extractor: the same numbers as the batched run (fp32 CPU).
    ex = am.load_extractor("wav2vec2", **options)
    signal, sr = sf.read(corpus / "a.wav", dtype="float32")
    vector = ex.process_signal(signal, sr)
    row = df.xs(str(corpus / "a.wav"), level="file").iloc[0]
    np.testing.assert_allclose(vector, np.concatenate(list(row)), rtol=1e-5, atol=1e-5)


def test_dataframe_source_keeps_labels_exactly_and_the_callers_index(corpus: Path) -> None:
    index = pd.MultiIndex.from_arrays(
        [
            ["a.wav", "a.wav", "sub/c.wav"],
            pd.to_timedelta([0.0, 0.5, 0.1], unit="s"),
            pd.to_timedelta([0.5, np.nan, 0.9], unit="s"),
        ],
        names=["file", "start", "end"],
    )
    table = pd.DataFrame(
        {"speaker": ["09", "09", "10"], "score": [1, 2, 3], "ok": [True, False, True]},
        index=index,
    ).astype({"speaker": "category"})
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(corpus)  # relative files resolve against the working directory
        df = am.extract(table, "egemaps", num_workers=0, device="cpu")
    assert df.index.equals(index)  # relative paths and the NaT end as given: joins work
    assert df["speaker"].dtype == table["speaker"].dtype
    assert df["speaker"].astype(str).tolist() == ["09", "09", "10"]
    assert df["score"].tolist() == [1, 2, 3]
    assert df["ok"].tolist() == [True, False, True]
    assert df.shape[1] == 3 + 88
    ex = am.load_extractor("egemaps")
    segment = ex.process_file(str(corpus / "a.wav"), start=0.5)
    np.testing.assert_array_equal(segment, df.iloc[1, 3:].to_numpy(dtype=np.float32))


def test_failures_are_returned_and_warned(corpus: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF not really")
    files = [str(corpus / "a.wav"), str(bad)]
    with pytest.warns(UserWarning, match="1 of 2 items failed"):
        df = am.extract(files, "egemaps", num_workers=0, device="cpu")
    assert len(df) == 1
    failures = pd.DataFrame(df.attrs["failures"])
    assert failures["path"].tolist() == [str(bad)] and failures["stage"].tolist() == ["decode"]
    with pytest.warns(UserWarning, match="1 of 1 items failed"):
        none = am.extract(
            [str(bad)], "egemaps", num_workers=0, device="cpu", output_dir=tmp_path / "none"
        )
    assert none.empty and none.index.names == ["file", "start", "end"]
    # Every item failed, and the run still has its (empty) table beside the failures.
    assert pq.read_metadata(tmp_path / "none" / "features.parquet").num_rows == 0
    # Results concatenate (attrs hold plain records, which pandas can compare).
    both = pd.concat([df, am.extract([str(corpus / "b.wav")], "egemaps", num_workers=0)])
    assert len(both) == 2


def test_output_dir_keeps_files_and_resumes(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = am.extract(corpus, "egemaps", num_workers=0, device="cpu", output_dir=out)
    assert (out / "features.parquet").exists() and first.attrs["output_dir"] == out
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no failures, no warning
        again = am.extract(corpus, "egemaps", num_workers=0, device="cpu", output_dir=out)
    assert again.attrs["metrics"]["n_skipped_resumed"] == 4
    pd.testing.assert_frame_equal(first, again)
    run = am.load(out)
    assert run.config["extractor"]["name"] == "egemaps"
    pd.testing.assert_frame_equal(run.features, first)
    # Another list into the same directory: only the items of this call come back.
    other = am.extract([str(corpus / "a.wav")], "egemaps", num_workers=0, output_dir=out)
    assert other.index.get_level_values("file").tolist() == [str(corpus / "a.wav")]


def test_override_values_are_quoted_exactly() -> None:
    from audio_models.api import _value, compose_config

    for text in ["/tmp/a\\b", "/tmp/it's", "/tmp/${oc.env:HOME}", "/tmp/x\\", "a,b c=d$", "-3"]:
        cfg = compose_config("extract", ["tracking=off", f"output_dir={_value(text)}"])
        assert cfg.output_dir == text


def test_temporary_outputs_are_removed(corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import audio_models.api as api

    made: list[str] = []
    mkdtemp = api.tempfile.mkdtemp

    def recording(**kwargs: str) -> str:
        made.append(mkdtemp(**kwargs))
        return made[-1]

    monkeypatch.setattr(api.tempfile, "mkdtemp", recording)
    df = am.extract([str(corpus / "a.wav")], "egemaps", num_workers=0, device="cpu")
    assert df.attrs["output_dir"] is None and len(df) == 1
    assert len(made) == 1 and not Path(made[0]).exists()


def test_no_global_state_changes(corpus: Path) -> None:
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    frozen, threads = gc.get_freeze_count(), torch.get_num_threads()
    am.extract([str(corpus / "a.wav")], "egemaps", num_workers=0, device="cpu")
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert gc.get_freeze_count() == frozen and torch.get_num_threads() == threads


def test_a_callers_frozen_objects_stay_frozen(corpus: Path) -> None:
    kept = [object() for _ in range(10)]
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        am.extract([str(corpus / "a.wav")], "egemaps", num_workers=0, device="cpu")
        assert gc.get_freeze_count() >= frozen > 0  # the caller's set was not unfrozen
    finally:
        gc.unfreeze()
    del kept


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: am.extract(c, "egemapz"), r"extractor/egemapz"),
        (lambda c: am.extract(c, "egemaps", feature_sett="x"), r"feature_sett"),
        (lambda c: am.extract(c, "wav2vec2", pooling="median", model="/x"), r"pooling"),
        (lambda c: am.extract(c / "nope", "egemaps"), r"does not exist"),
        (lambda c: am.extract(c, overrides=["loader.channel_policy=left"]), r"channel_policy"),
        (lambda c: am.extract(42, "egemaps"), r"source must be"),
    ],
)
def test_configuration_mistakes_are_one_line(corpus: Path, call, message: str) -> None:
    with pytest.raises(UserError, match=message) as info:
        call(corpus)
    assert "\n" not in str(info.value)


def test_train_ser_reports_a_constructor_error_as_a_user_error(tmp_path: Path) -> None:
    # The runners share one build path: no Hydra InstantiationException traceback.
    from audio_models.api import compose_config
    from runners.train_ser import train

    cfg = compose_config(
        "train_ser",
        [
            "dataset=folder",
            f"dataset.root={tmp_path}",
            "dataset.label_regex='(?P<x'",
            "tracking=off",
            f"output_dir={tmp_path / 'o'}",
        ],
    )
    with pytest.raises(UserError, match="label_regex is not a valid regex"):
        train(cfg)


def test_readme_python_section_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's "Python" section is executed as written (on the demo corpus)."""
    text = README.read_text()
    section = text.split("## Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "the README has a Python section with code"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").mkdir()
    for name, f0 in (("a.wav", 110), ("b.wav", 220)):
        sf.write(tmp_path / "corpus" / name, voice(1.5, f0), 16000)
    namespace: dict[str, object] = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)


def test_docstring_examples_run() -> None:
    import doctest

    import audio_models.api as api

    for module in (am, api):
        result = doctest.testmod(
            module, extraglobs={"am": am, "np": np}, optionflags=doctest.ELLIPSIS
        )
        assert result.failed == 0 and result.attempted > 0, module.__name__
