"""Benchmark: transcription through the runner vs the libraries called directly.

    python -m benchmarks.asr [--n-files 24] [--models s2t whisperx] [--device cpu|cuda]

Random weights of the real architectures (s2t: s2t-small-librispeech's 12 + 6 layers, d_model
256; whisperx: Whisper-base's 6 + 6 layers, d_model 512, CTranslate2; alignment: a
wav2vec2-base-size CTC model) cost what trained models cost, without a download. Both sides
use the same model files and decoding settings (greedy, at most ``--max-new-tokens`` tokens: a
random model never says end-of-text, so every utterance decodes the same number of tokens on
both sides). In one run, audio seconds per second of:

- ``s2t``: the runner (``extractor=s2t``, batched ``generate``, loader workers) against a
  per-file transformers loop (``Speech2TextProcessor`` + ``generate`` per file);
- ``whisperx``: the runner (``extractor=whisperx``) against whisperX called directly on each
  file (``load_audio`` + ``transcribe`` + ``align``), the same model, VAD and aligner.

Both sides are timed as whole jobs, model loading included (a direct script loads its models
too). A warm-up pass of each on two files comes first (first calls into CTranslate2 and oneDNN
build kernels that later calls reuse, which would favour whichever side runs second), then
``--repeats`` alternating runs; the best of each is compared. Prints the ratios and the
runner's peak memory.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import soundfile as sf
import torch

from benchmarks.asr_models import (
    BASE_WHISPER,
    SMALL_S2T,
    save_random_ctc_aligner,
    save_random_s2t,
    save_random_whisper_ct2,
)
from benchmarks.extract import PeakTreeRss, build_corpus, compose_extract

# wav2vec2-base (whisperX's default English aligner is WAV2VEC2_ASR_BASE_960H).
BASE_CTC = {"d_model": 768, "layers": 12, "heads": 12, "ffn": 3072, "conv": 512}


def run_runner(
    overrides: list[str], corpus: Path, out: Path, device: str
) -> tuple[float, tuple[float, float]]:
    """Seconds of the whole ``extract()`` call and peak RSS (MiB): of the main process, and of
    the process tree (forked loader workers share the parent's pages; each counts them)."""
    from runners.extract import extract

    cfg = compose_extract(
        [
            *overrides,
            f"device={device}",
            "dataset=folder",
            f"dataset.root={corpus}",
            f"output_dir={out}",
            "resume=false",
        ]
    )
    with PeakTreeRss() as memory:
        started = time.perf_counter()
        result = extract(cfg)
        wall = time.perf_counter() - started
    if result.metrics["n_failed"]:
        raise RuntimeError(f"runner failed on {result.metrics['n_failed']} items")
    return wall, (memory.self_peak_mb, memory.peak_mb)


def compare(
    name: str,
    runner: Callable[[Path], tuple[float, tuple[float, float]]],
    direct: Callable[[list[Path]], float],
    files: list[Path],
    root: Path,
    repeats: int,
) -> tuple[float, float, str]:
    """Audio s/s of the runner and of the direct path (best of ``repeats`` alternating runs
    after a warm-up of each on two files) and the runner's peak memory, as text."""
    warm = root / f"warm-{name}"
    warm.mkdir()
    for path in files[:2]:
        (warm / path.name).symlink_to(path)
    runner(warm)
    direct(files[:2])
    audio_s = sum(sf.info(f).duration for f in files)
    ours, theirs, main, tree = [], [], 0.0, 0.0
    for _ in range(repeats):
        wall, (main_rss, tree_rss) = runner(files[0].parent)
        ours.append(audio_s / wall)
        main, tree = max(main, main_rss), max(tree, tree_rss)
        theirs.append(audio_s / direct(files))
    return max(ours), max(theirs), f"peak RSS {main:.0f} MiB (process tree {tree:.0f} MiB)"


def direct_s2t(folder: Path, files: list[Path], device: str, max_new_tokens: int) -> float:
    """Seconds of the per-file transformers loop, model loading included."""
    from transformers import Speech2TextForConditionalGeneration, Speech2TextProcessor

    started = time.perf_counter()
    processor = Speech2TextProcessor.from_pretrained(folder)
    model = Speech2TextForConditionalGeneration.from_pretrained(folder).eval().to(device)
    with torch.inference_mode():
        for path in files:
            audio, rate = sf.read(path, dtype="float32")
            inputs = processor(audio, sampling_rate=rate, return_tensors="pt").to(device)
            tokens = model.generate(
                inputs["input_features"],
                attention_mask=inputs["attention_mask"],
                num_beams=1,
                max_new_tokens=max_new_tokens,
            )
            processor.batch_decode(tokens, skip_special_tokens=True)
    return time.perf_counter() - started


def direct_whisperx(
    model: Path,
    aligner: Path,
    files: list[Path],
    device: str,
    max_new_tokens: int,
    batch: int,
    compute_type: str = "float32",
) -> float:
    """Seconds of whisperX's own calls, file by file, model loading included (float32 by
    default, the CPU's type; ``benchmarks.gpu`` passes float16 on CUDA)."""
    import whisperx

    from audio_models.speech.whisper import ensure_punkt

    ensure_punkt("en")  # the same sentence splitter the runner gets (punkt_tab is a download)
    started = time.perf_counter()
    pipeline = whisperx.load_model(
        str(model), device, compute_type=compute_type, language="en", asr_options={"beam_size": 1}
    )
    pipeline.model.max_length = max_new_tokens
    align_model, metadata = whisperx.load_align_model("en", device, model_name=str(aligner))
    for path in files:
        audio = whisperx.load_audio(str(path))
        result = pipeline.transcribe(audio, batch_size=batch, language="en")
        whisperx.align(result["segments"], align_model, metadata, audio, device)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-files", type=int, default=24)
    parser.add_argument("--models", nargs="+", default=["s2t", "whisperx"])
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--whisper-batch", type=int, default=16, help="whisperX chunk batch")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per path")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"]
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = build_corpus(root / "corpus", args.n_files)
        audio_s = sum(sf.info(f).duration for f in files)
        print(f"corpus: {len(files)} files, {audio_s:.1f} s of speech; device {args.device}")
        if "s2t" in args.models:
            folder = save_random_s2t(root / "s2t", **SMALL_S2T)
            overrides = [
                "extractor=s2t",
                f"extractor.model={folder}",
                "extractor.num_beams=1",
                f"extractor.max_new_tokens={args.max_new_tokens}",
            ]
            ours, loop, peak = compare(
                "s2t",
                lambda corpus: run_runner(overrides, corpus, root / "out-s2t", args.device),
                lambda some: direct_s2t(folder, some, args.device, args.max_new_tokens),
                files,
                root,
                args.repeats,
            )
            print(
                f"s2t (small, random): runner {ours:.2f} audio s/s, per-file transformers loop "
                f"{loop:.2f}, ratio {ours / loop:.2f}x (target >= 1.3x), {peak}"
            )
        if "whisperx" in args.models:
            model = save_random_whisper_ct2(root / "whisper", **BASE_WHISPER)
            aligner = save_random_ctc_aligner(root / "align", **BASE_CTC)
            overrides = [
                "extractor=whisperx",
                f"extractor.model={model}",
                f"extractor.align_model={aligner}",
                "extractor.language=en",
                "extractor.compute_type=float32",
                "extractor.beam_size=1",
                f"extractor.max_new_tokens={args.max_new_tokens}",
                f"extractor.batch_size={args.whisper_batch}",
            ]
            ours, direct, peak = compare(
                "whisperx",
                lambda corpus: run_runner(overrides, corpus, root / "out-wx", args.device),
                lambda some: direct_whisperx(
                    model, aligner, some, args.device, args.max_new_tokens, args.whisper_batch
                ),
                files,
                root,
                args.repeats,
            )
            print(
                f"whisperx (base, random): runner {ours:.2f} audio s/s, whisperX direct "
                f"{direct:.2f}, ratio {ours / direct:.2f}x (target >= 0.9x), "
                f"{peak}"
            )


if __name__ == "__main__":
    main()
