"""Transcription extractors: Speech2Text and whisperX on tiny random models built offline."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from audio_models.evaluation import word_error_rate
from audio_models.speech.s2t import Speech2TextExtractor
from audio_models.utils.errors import UserError
from benchmarks.asr_models import save_random_s2t
from runners.extract import extract

HARVARD = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech" / "harvard"


@pytest.fixture(scope="module")
def tiny_s2t(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_s2t(tmp_path_factory.mktemp("s2t") / "model")


def _voices(n: int, seed: int = 0) -> list[np.ndarray]:
    """Vowel-like signals of different lengths and pitches (16 kHz)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = np.arange(int(16000 * (0.6 + 0.45 * i))) / 16000
        f0 = 110 + 40 * i
        x = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 8))
        out.append((0.1 * x + 0.003 * rng.standard_normal(t.size)).astype(np.float32))
    return out


def _batch(signals: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([s.size for s in signals])
    waveforms = torch.zeros(len(signals), int(lengths.max()))
    for row, s in enumerate(signals):
        waveforms[row, : s.size] = torch.from_numpy(s)
    return waveforms, lengths


def test_s2t_batch_equals_transformers_on_each_file(tiny_s2t: Path) -> None:
    from transformers import Speech2TextForConditionalGeneration, Speech2TextProcessor

    extractor = Speech2TextExtractor(model=str(tiny_s2t))
    signals = _voices(4)
    with torch.inference_mode():
        batched = extractor.forward(*_batch(signals))
    processor = Speech2TextProcessor.from_pretrained(tiny_s2t)
    model = Speech2TextForConditionalGeneration.from_pretrained(tiny_s2t).eval()
    for signal, ours in zip(signals, batched, strict=True):
        inputs = processor(signal, sampling_rate=16000, return_tensors="pt")
        features, _ = extractor.input_features(
            torch.from_numpy(signal)[None], torch.tensor([signal.size])
        )
        # float32 mean/std in another summation order than numpy: ~1e-4 on unit-variance values
        assert (features[0] - inputs["input_features"][0]).abs().max() < 1e-3
        with torch.inference_mode():
            ref = model.generate(
                inputs["input_features"],
                attention_mask=inputs["attention_mask"],
                return_dict_in_generate=True,
                output_scores=True,
            )
        text = processor.batch_decode(ref.sequences, skip_special_tokens=True)[0].strip()
        logprobs = model.compute_transition_scores(ref.sequences, ref.scores, normalize_logits=True)
        assert ours.text == text
        assert ours.scores["avg_logprob"] == pytest.approx(float(logprobs.mean()), abs=1e-4)
        assert [s.text for s in ours.segments] == ([text] if text else [])
        assert ours.segments[0].end == pytest.approx(signal.size / 16000)


def test_s2t_missing_model_offline_is_one_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UserError, match=r"cannot load model 'facebook/s2t-small-librispeech-asr'"):
        Speech2TextExtractor(model="facebook/s2t-small-librispeech-asr")


def _harvard_manifest(folder: Path, *, segments: bool = False, n: int | None = None) -> Path:
    """The Harvard sentences as a manifest with their transcripts (optionally as segments)."""
    table = pd.read_csv(HARVARD / "transcripts.tsv", sep="\t")
    table["file"] = [str(HARVARD / f) for f in table["file"]]
    if segments:  # each file as two halves
        halves = []
        for _, row in table.iterrows():
            duration = sf.info(row["file"]).duration
            for start, end in ((0.0, duration / 2), (duration / 2, duration)):
                halves.append({**row, "start": start, "end": end})
        table = pd.DataFrame(halves)
    if n is not None:
        table = table.head(n)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "manifest.csv"
    table.to_csv(path, index=False)
    return path


def _check_tables(out: Path, ids: set[str]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    transcripts = pd.read_parquet(out / "transcripts.parquet")
    segments = pd.read_parquet(out / "segments.parquet")
    words = pd.read_parquet(out / "words.parquet")
    assert set(transcripts["id"]) == ids and transcripts["id"].is_unique
    assert {"id", "text", "language", "avg_logprob"} <= set(transcripts.columns)
    assert list(segments.columns[:6]) == ["id", "segment", "start", "end", "text", "speaker"]
    assert {"id", "segment", "word", "start", "end", "score"} <= set(words.columns)
    assert set(segments["id"]) <= ids and set(words["id"]) <= ids
    # A transcript is its segments' text, in order.
    for item_id, group in segments.groupby("id"):
        text = transcripts.set_index("id").loc[item_id, "text"]
        assert " ".join(group.sort_values("segment")["text"].str.strip()) == text.strip()
    return transcripts, segments, words


def test_s2t_runner_on_harvard_logs_wer(
    make_cfg, mlflow_store, tiny_s2t: Path, speech_dir: Path, tmp_path: Path
) -> None:
    uri, tracking = mlflow_store
    manifest = _harvard_manifest(tmp_path / "data")
    result = extract(
        make_cfg(
            "extractor=s2t",
            f"extractor.model={tiny_s2t}",
            "dataset=manifest",
            f"dataset.path={manifest}",
            "dataset.path_column=file",
            "dataset.text_column=transcript",
            *tracking,
        )
    )
    ids = {str(p) for p in HARVARD.glob("*.wav")}  # a manifest item's id is its path
    transcripts, segments, _ = _check_tables(result.output_dir, ids)
    expected = word_error_rate(list(transcripts["transcript"]), list(transcripts["text"]))
    run = mlflow.MlflowClient(uri).get_run(result.run_id)
    assert run.data.metrics["wer"] == pytest.approx(expected.wer)
    n_words = sum(len(t.split()) for t in transcripts["transcript"])
    assert run.data.metrics["wer_ref_words"] == expected.n_ref_words == n_words == 71
    artifacts = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(result.run_id)}
    assert {"transcripts.parquet", "segments.parquet", "words.parquet"} <= artifacts
    # s2t has no time stamps: one segment spanning the recording.
    merged = segments.merge(transcripts[["id", "duration_s"]], on="id")
    assert (merged["start"] == 0).all() and np.allclose(merged["end"], merged["duration_s"])


def test_s2t_manifest_segments_are_offset_and_resume_keeps_side_tables(
    make_cfg, tiny_s2t: Path, speech_dir: Path, tmp_path: Path
) -> None:
    common = ["extractor=s2t", f"extractor.model={tiny_s2t}", "dataset=manifest"]
    common += ["dataset.path_column=file", "dataset.text_column=transcript"]
    first = _harvard_manifest(tmp_path / "a", segments=True, n=6)
    extract(make_cfg(*common, f"dataset.path={first}", out="run"))
    # The corpus grows: the finished run reopens, only new items run, nothing is duplicated.
    grown = _harvard_manifest(tmp_path / "b", segments=True)
    result = extract(make_cfg(*common, f"dataset.path={grown}", out="run"))
    assert result.metrics["n_skipped_resumed"] == 6
    table = pd.read_csv(grown)
    ids = set(pd.read_parquet(result.output_dir / "transcripts.parquet")["id"])
    assert len(ids) == len(table) == 20
    transcripts, segments, words = _check_tables(result.output_dir, ids)
    assert not segments.duplicated(["id", "segment"]).any()
    assert not words.duplicated(["id", "segment", "word_index"]).any()
    bounds = transcripts.set_index("id")[["start", "end"]]
    for _, row in segments.iterrows():
        start, end = bounds.loc[row["id"]]
        assert row["start"] == pytest.approx(start) and row["end"] == pytest.approx(end)
    assert (segments["start"] > 0).sum() == 10  # the second halves start mid-file


def test_word_error_rate_normalises_case_and_punctuation() -> None:
    score = word_error_rate(["The child, almost hurt.", "   "], ["the CHILD almost hurts", "x"])
    assert score.n_ref_words == 4 and score.substitutions == 1 and score.wer == 0.25
    with pytest.raises(ValueError, match="no reference"):
        word_error_rate([""], ["a"])


def test_s2t_option_instantiates(tiny_s2t: Path) -> None:
    from hydra.utils import instantiate

    from tests.conftest import compose_extract

    cfg = compose_extract(["extractor=s2t", f"extractor.model={tiny_s2t}", "output_dir=x"])
    extractor = instantiate(cfg.extractor, _convert_="all")
    assert isinstance(extractor, Speech2TextExtractor) and extractor.batch_audio_s == 240.0
    assert extractor.provenance()["s2t.revision"] == "local"
    default = compose_extract(["extractor=s2t", "output_dir=x"]).extractor.model
    assert default == "facebook/s2t-small-librispeech-asr"
