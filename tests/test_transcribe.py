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
from audio_models.extractor import Placement
from audio_models.speech.s2t import Speech2TextExtractor
from audio_models.testing import loaded
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

    extractor = loaded(Speech2TextExtractor(model=str(tiny_s2t)))
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


@pytest.mark.usefixtures("offline_hub")
def test_s2t_missing_model_offline_is_one_clear_error() -> None:
    with pytest.raises(UserError, match=r"cannot load model 'facebook/s2t-small-librispeech-asr'"):
        loaded(Speech2TextExtractor(model="facebook/s2t-small-librispeech-asr"))


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


def _harvard_overrides(manifest: Path) -> list[str]:
    return [
        "dataset=manifest",
        f"dataset.path={manifest}",
        "dataset.path_column=file",
        "dataset.text_column=transcript",
    ]


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
            *_harvard_overrides(manifest),
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
    common = ["extractor=s2t", f"extractor.model={tiny_s2t}"]
    first = _harvard_manifest(tmp_path / "a", segments=True, n=6)
    extract(make_cfg(*common, *_harvard_overrides(first), out="run"))
    # The corpus grows: the finished run reopens, only new items run, nothing is duplicated.
    grown = _harvard_manifest(tmp_path / "b", segments=True)
    result = extract(make_cfg(*common, *_harvard_overrides(grown), out="run"))
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


# -- whisperX ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from benchmarks.asr_models import save_random_ctc_aligner, save_random_whisper_ct2

    root = tmp_path_factory.mktemp("whisper")
    return save_random_whisper_ct2(root / "ct2"), save_random_ctc_aligner(root / "align")


def _whisper_overrides(tiny_whisper: tuple[Path, Path]) -> list[str]:
    model, aligner = tiny_whisper
    return [
        "extractor=whisperx",
        f"extractor.model={model}",
        f"extractor.align_model={aligner}",
        "extractor.language=en",
        "extractor.max_new_tokens=12",
        "extractor.batch_size=4",
    ]


def _times_inside(words: pd.DataFrame, segments: pd.DataFrame, bounds: pd.DataFrame) -> None:
    """Every time lies inside its recording (item bounds) and words never go backwards."""
    for table in (segments, words):
        timed = table.dropna(subset=["start", "end"])
        lo = bounds.loc[timed["id"], "start"].to_numpy()
        hi = bounds.loc[timed["id"], "end"].to_numpy()
        assert (timed["start"].to_numpy() >= lo - 1e-6).all()
        assert (timed["end"].to_numpy() <= hi + 1e-6).all()
        assert (timed["start"] <= timed["end"]).all()
    for _, group in words.dropna(subset=["start"]).groupby("id"):
        ordered = group.sort_values(["segment", "word_index"])
        assert ordered["start"].is_monotonic_increasing


@pytest.mark.parametrize("language", ["en", None])
def test_whisperx_runner_equals_whisperx_called_directly(
    make_cfg, mlflow_store, tiny_whisper, speech_dir: Path, tmp_path: Path, language: str | None
) -> None:
    """The runner batches VAD chunks across files; each file's result is still exactly what
    whisperX's transcribe + align give for that file alone (language fixed or detected)."""
    import whisperx

    from benchmarks.asr_models import WHISPER_LANGUAGES

    uri, tracking = mlflow_store
    manifest = _harvard_manifest(tmp_path / "data")
    result = extract(
        make_cfg(
            *_whisper_overrides(tiny_whisper),
            f"extractor.language={language or 'null'}",
            *_harvard_overrides(manifest),
            *tracking,
        )
    )
    ids = {str(p) for p in HARVARD.glob("*.wav")}
    transcripts, segments, words = _check_tables(result.output_dir, ids)
    assert transcripts["language"].isin(WHISPER_LANGUAGES).all() and len(words) > 0
    _times_inside(words, segments, transcripts.set_index("id"))
    run = mlflow.MlflowClient(uri).get_run(result.run_id)
    assert "wer" in run.data.metrics and run.data.metrics["wer_ref_words"] == 71
    assert run.data.tags["provenance.whisperx.sentence_splitter"] in {
        "punkt_tab",
        "untrained-punkt",
    }
    # The reference: whisperX's own calls on its own audio loading, the same model.
    model, aligner = tiny_whisper
    pipeline = whisperx.load_model(str(model), "cpu", compute_type="float32", language=language)
    pipeline.model.max_length = 12
    align_model, metadata = whisperx.load_align_model("en", "cpu", model_name=str(aligner))
    for path in sorted(ids):
        audio = whisperx.load_audio(path)
        direct = pipeline.transcribe(audio, batch_size=4, language=language)
        assert transcripts.set_index("id").loc[path, "language"] == direct["language"]
        metadata = {**metadata, "language": direct["language"]}
        direct = whisperx.align(direct["segments"], align_model, metadata, audio, "cpu")
        ours = words[words["id"] == path].sort_values(["segment", "word_index"])
        expected = [w for s in direct["segments"] for w in s["words"]]
        assert list(ours["word"]) == [w["word"] for w in expected]
        np.testing.assert_allclose(ours["start"], [w["start"] for w in expected], atol=1e-3)
        np.testing.assert_allclose(ours["end"], [w["end"] for w in expected], atol=1e-3)
        text = " ".join(s["text"].strip() for s in direct["segments"])
        assert transcripts.set_index("id").loc[path, "text"] == text


def test_whisperx_no_speech_and_manifest_offsets(
    make_cfg, tiny_whisper, speech_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    sf.write(data / "silence.wav", (1e-4 * rng.standard_normal(48000)).astype(np.float32), 16000)
    speech, rate = sf.read(HARVARD / "spk1_snt1.wav", dtype="float32")
    padded = np.concatenate([np.zeros(2 * rate, np.float32), speech])
    sf.write(data / "late.wav", padded, rate)
    manifest = data / "manifest.csv"
    pd.DataFrame(
        {"path": ["silence.wav", "late.wav", "late.wav"], "start": [None, 1.5, None]}
    ).to_csv(manifest, index=False)
    result = extract(
        make_cfg(*_whisper_overrides(tiny_whisper), "dataset=manifest", f"dataset.path={manifest}")
    )
    assert pd.read_parquet(result.output_dir / "failures.parquet").empty
    transcripts, segments, words = _check_tables(
        result.output_dir, {"silence.wav", "late.wav@1.5-", "late.wav"}
    )
    by_id = transcripts.set_index("id")
    assert by_id.loc["silence.wav", "text"] == ""  # no speech: an empty transcript, no failure
    assert not (segments["id"] == "silence.wav").any()
    _times_inside(words, segments, by_id)
    # The segment that starts 1.5 s into the file reports times from the file's start: the
    # same speech, the same words at the same times as the whole file.
    late, whole = (words[words["id"] == i].reset_index() for i in ("late.wav@1.5-", "late.wav"))
    assert len(late) > 0 and (late["start"] >= 2.0 - 0.1).all()
    np.testing.assert_allclose(late["start"], whole["start"], atol=0.05)


def test_whisperx_clear_errors_before_any_work(
    monkeypatch: pytest.MonkeyPatch, tiny_whisper, tmp_path: Path
) -> None:
    from audio_models.speech.whisper import WhisperXExtractor

    model, _ = tiny_whisper
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(UserError, match=r"diarize=true needs a Hugging Face token .* HF_TOKEN"):
        loaded(WhisperXExtractor(model="small", diarize=True))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set here: the token check above runs online
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(UserError, match=r"cannot load Whisper model 'tiny'.*local CTranslate2"):
        loaded(WhisperXExtractor(model="tiny"))
    # English alignment defaults to a torchaudio bundle that is downloaded on first use.
    with pytest.raises(UserError, match=r"WAV2VEC2_ASR_BASE_960H .*not downloaded"):
        loaded(WhisperXExtractor(model=str(model), language="en"))
    with pytest.raises(UserError, match=r"alignment model 'jonatasgrosman/.*not in the hub cache"):
        loaded(WhisperXExtractor(model=str(model), language="nl"))
    with pytest.raises(UserError, match="silero"):
        loaded(WhisperXExtractor(model=str(model), vad_method="silero"))
    with pytest.raises(UserError, match=r"without model\.bin"):
        loaded(WhisperXExtractor(model=str(tmp_path)))


def test_whisperx_option_instantiates(tiny_whisper) -> None:
    from hydra.utils import instantiate

    from audio_models.speech.whisper import WhisperXExtractor
    from tests.conftest import compose_extract

    cfg = compose_extract([*_whisper_overrides(tiny_whisper), "output_dir=x"])
    extractor = instantiate(cfg.extractor, _convert_="all")
    assert isinstance(extractor, WhisperXExtractor) and extractor.placement == Placement.HOST
    assert extractor.provenance()["whisperx.align_model.en"] == str(tiny_whisper[1])
    default = compose_extract(["extractor=whisperx", "output_dir=x"]).extractor
    assert default.model == "small" and default.vad_method == "pyannote" and not default.diarize


def test_whisperx_token_is_read_but_never_logged(
    monkeypatch: pytest.MonkeyPatch, make_cfg, tiny_whisper
) -> None:
    from audio_models.speech.whisper import WhisperXExtractor
    from runners.extract import settings_hash

    model, _ = tiny_whisper
    monkeypatch.setenv("AM_TEST_TOKEN", "hf_secret_value")
    extractor = loaded(
        WhisperXExtractor(model=str(model), align=False, diarize=True, hf_token_env="AM_TEST_TOKEN")
    )
    cfg = make_cfg(*_whisper_overrides(tiny_whisper), "extractor.hf_token_env=AM_TEST_TOKEN")
    assert "hf_secret_value" not in str(extractor.provenance())
    assert "hf_secret_value" not in str(cfg) + settings_hash(cfg, extractor)


def test_punkt_is_provided_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import nltk
    from nltk.data import load

    from audio_models.speech.whisper import ensure_punkt

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "empty")])
    assert ensure_punkt("de") == "untrained-punkt"
    splitter = load("tokenizers/punkt_tab/german.pickle")
    assert splitter.tokenize("Das ist gut. Und das auch.") == ["Das ist gut.", "Und das auch."]
    assert ensure_punkt("de") == "untrained-punkt"  # idempotent


# -- English-only Whisper models, the all-failed table ----------------------------------------


@pytest.fixture(scope="module")
def tiny_whisper_en(tiny_whisper) -> Path:
    """The tiny random Whisper as an English-only model: CTranslate2 takes a vocabulary whose
    last entry is not the empty string as English-only (the folder's name does not say so, as
    with a packaged model)."""
    import json
    import shutil

    model, _ = tiny_whisper
    english = model.with_name("english-only")
    shutil.copytree(model, english)
    vocabulary = json.loads((english / "vocabulary.json").read_text())
    vocabulary[-1] = "<|30.02|>"
    (english / "vocabulary.json").write_text(json.dumps(vocabulary))
    return english


def test_english_only_model_with_language_null_runs_as_english(
    make_cfg, tiny_whisper, tiny_whisper_en: Path, speech_dir: Path, tmp_path: Path, caplog
) -> None:
    """whisperX's language detection refuses an English-only model: every item failed after
    the model loaded. Now the run is English, and says so in the log and the run's tags."""
    manifest = _harvard_manifest(tmp_path / "data", n=3)
    with caplog.at_level("WARNING", logger="audio_models.speech.whisper"):
        result = extract(
            make_cfg(
                *_whisper_overrides(tiny_whisper),
                f"extractor.model={tiny_whisper_en}",
                "extractor.language=null",
                *_harvard_overrides(manifest),
            )
        )
    assert "English-only Whisper model" in caplog.text and "runs as English" in caplog.text
    assert pd.read_parquet(result.output_dir / "failures.parquet").empty
    transcripts, _, words = _check_tables(result.output_dir, set(pd.read_csv(manifest)["file"]))
    assert (transcripts["language"] == "en").all() and len(words) > 0
    assert result.tags["provenance.whisperx.language"].startswith("en (English-only")


def test_english_only_is_what_ctranslate2_says(tiny_whisper, tiny_whisper_en: Path) -> None:
    import ctranslate2

    from audio_models.speech.whisper import english_only

    assert not ctranslate2.models.Whisper(str(tiny_whisper_en)).is_multilingual
    assert english_only(str(tiny_whisper_en), tiny_whisper_en)  # by CTranslate2, not the name
    assert not english_only(str(tiny_whisper[0]), tiny_whisper[0])
    # By the name (the hub's .en models need no load): only below a multilingual vocabulary.
    assert english_only("Systran/faster-whisper-tiny.en", tiny_whisper[0])


def test_english_only_model_with_another_language_stops_before_any_work(
    tiny_whisper_en: Path,
) -> None:
    from audio_models.speech.whisper import WhisperXExtractor

    with pytest.raises(UserError, match=r"English-only Whisper model: set extractor\.language=en"):
        loaded(WhisperXExtractor(model=str(tiny_whisper_en), language="de", align=False))


def test_transcripts_table_is_written_when_every_item_failed(
    make_cfg, tiny_whisper, tmp_path: Path
) -> None:
    import audio_models as am

    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.wav", "b.wav"):
        (data / name).write_text("not audio")
    result = extract(
        make_cfg(*_whisper_overrides(tiny_whisper), "dataset=folder", f"dataset.root={data}")
    )
    assert len(pd.read_parquet(result.output_dir / "failures.parquet")) == 2
    for name in ("transcripts", "segments", "words"):
        table = pd.read_parquet(result.output_dir / f"{name}.parquet")
        assert table.empty and "id" in table.columns
    transcripts = pd.read_parquet(result.output_dir / "transcripts.parquet")
    assert {"id", "path", "text", "language", "avg_logprob"} <= set(transcripts.columns)
    assert am.load(result.output_dir).transcripts.empty  # no FileNotFoundError


# The real faster-whisper tiny.en (align=false, WER, equality with transcribe): test_real_whisper.py


def test_a_retried_whisperx_load_equals_a_clean_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """load() failing half-way (an aligner not there yet) leaves nothing half-set: the retry
    gives the language and provenance of a clean load."""
    import json

    from audio_models.speech import whisper
    from audio_models.speech.whisper import WhisperXExtractor

    folder = tmp_path / "tiny.en"
    folder.mkdir()
    (folder / "model.bin").write_bytes(b"x")
    (folder / "vocabulary.json").write_text(json.dumps([str(i) for i in range(51864)]))
    failures = {"left": 0}

    def aligner(self, language: str):  # whisperx.load_align_model's part, offline-flaky
        if failures["left"]:
            failures["left"] -= 1
            raise UserError("cannot load alignment model (offline)")
        self._aligners[language] = (None, {})
        self._provenance[f"whisperx.align_model.{language}"] = "WAV2VEC2_ASR_BASE_960H"
        return self._aligners[language]

    monkeypatch.setattr(WhisperXExtractor, "_aligner", aligner)
    monkeypatch.setattr(whisper, "ensure_punkt", lambda language: "punkt_tab")
    clean = WhisperXExtractor(model=str(folder))
    clean.load()
    failures["left"] = 1
    retried = WhisperXExtractor(model=str(folder))
    with pytest.raises(UserError, match="alignment model"):
        retried.load()
    assert retried.language is None  # not yet decided: the load did not finish
    retried.load()
    assert retried.language == clean.language == "en"
    assert retried.provenance() == clean.provenance()
    assert "whisperx.language" in clean.provenance()
