"""The device check: every ``gpu``-marked test, then the GPU benchmarks, in one table.

    python -m benchmarks.gpu [--n-files 16] [--skip-tests] [--skip-benchmarks] [--device cpu]
    bash scripts/dev.sh gpu-check          # the same, after the environment is synced

Without a CUDA device it prints ``no CUDA device: gpu-check skipped`` and exits 0. On one
H100/H200-class GPU the whole check is sized to finish within 8 minutes (the tests get at most
``TESTS_TIMEOUT_S``; not yet timed on a GPU: the first run's title line says how long). The
table has two parts:

- tests: each ``gpu`` test (``pytest -m gpu tests/``) with its result, seconds and the figures
  it printed (the largest bf16 deviation from the CPU, the smallest share of identical
  transcripts at reduced precision, the OOM split);
- benchmarks, random weights of the real architectures on a corpus of ``--n-files`` recordings
  (1.5–20 s; real speech when ``../shared/data/speech`` is there, else synthetic vowels):
  wav2vec2 base and XLSR size (24 × 1024, layer norm) through the runner (fp32 and
  bf16-mixed) against a per-file transformers loop, the model FLOP/s the runner reached as a
  share of the device's dense bf16 peak, and the GPU utilisation sampled by ``nvidia-smi``
  while each ran (a runner well under the loop's utilisation at a similar rate is waiting on
  its loader); s2t (small) and whisperX (base, CTranslate2 float16) through the runner
  against the libraries called directly.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from audio_models.utils.errors import UserError

SKIPPED = "no CUDA device: gpu-check skipped"
REPO = Path(__file__).resolve().parents[1]
# Whole-check budget on one H100/H200 is 8 minutes: the tests get at most this much.
TESTS_TIMEOUT_S = 300


@dataclass
class Row:
    section: str
    name: str
    result: str  # passed / failed / skipped, or the runner's audio s/s
    seconds: str
    figures: str


def cuda_available() -> bool:
    """``nvidia-smi`` answers and torch sees a CUDA device."""
    if shutil.which("nvidia-smi") is None:
        return False
    import torch

    return torch.cuda.is_available()


# -- tests ------------------------------------------------------------------------------------

_DEVIATION = re.compile(r"deviation ([0-9.]+)%")
_IDENTICAL = re.compile(r"texts identical \(([0-9.]+)%\)")
_OOM = re.compile(r"oom: rows per forward attempt (\[[^\]]*\])")


def _figures(text: str) -> str:
    """The figures a test printed, summarised for one table cell."""
    parts = []
    deviations = [float(d) for d in _DEVIATION.findall(text)]
    if deviations:
        parts.append(f"bf16 deviation <= {max(deviations):.2f}%")
    identical = [float(s) for s in _IDENTICAL.findall(text)]
    if identical:
        parts.append(f"identical texts >= {min(identical):.0f}%")
    oom = _OOM.search(text)
    if oom:
        parts.append(f"OOM split, attempts {oom.group(1)}")
    return "; ".join(parts)


def run_tests(tmp: Path) -> tuple[list[Row], bool]:
    """``pytest -m gpu tests/``: one row per test, and whether none failed."""
    junit = tmp / "gpu-tests.xml"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "tests",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={junit}",
        "-o",
        "junit_logging=system-out",  # the figures each test prints, per test
    ]
    started = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=REPO, capture_output=True, text=True, timeout=TESTS_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return [Row("tests", "pytest -m gpu", "TIMEOUT", f"{TESTS_TIMEOUT_S}", "")], False
    # pytest's own summary (failures with their assertion) goes to the log, not the table.
    print(done.stdout[-6000:], file=sys.stderr)
    if not junit.exists():
        wall = f"{time.perf_counter() - started:.0f}"
        return [Row("tests", "pytest -m gpu", f"exit {done.returncode}", wall, "")], False
    rows = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            result = "FAILED"
        elif case.find("skipped") is not None:
            result = "skipped"
        else:
            result = "passed"
        out = case.findtext("system-out") or ""
        rows.append(Row("tests", name, result, f"{float(case.get('time', 0)):.1f}", _figures(out)))
    return rows, done.returncode == 0


# -- GPU utilisation --------------------------------------------------------------------------


@contextmanager
def gpu_utilisation() -> Iterator[list[int]]:
    """Samples ``utilization.gpu`` (percent of time a kernel ran) every 100 ms while the
    block runs; the list holds the samples afterwards (none without a CUDA device)."""
    import torch

    samples: list[int] = []
    if not torch.cuda.is_available() or shutil.which("nvidia-smi") is None:
        yield samples
        return
    command = [
        "nvidia-smi",
        "--query-gpu=utilization.gpu",
        "--format=csv,noheader,nounits",
        "-lms",
        "100",
    ]
    uuid = getattr(torch.cuda.get_device_properties(0), "uuid", None)
    if uuid is not None:  # the device torch uses, whatever CUDA_VISIBLE_DEVICES says
        command += ["-i", f"GPU-{uuid}"]
    sampler = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)

    def read() -> None:
        assert sampler.stdout is not None
        for line in sampler.stdout:
            if line.strip().isdigit():
                samples.append(int(line.strip()))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield samples
    finally:
        sampler.terminate()
        sampler.wait(10)
        reader.join(5)


def _rate(audio_s_per_s: float) -> str:
    """Three significant figures, without an exponent for the GPU's thousands."""
    return f"{audio_s_per_s:.0f}" if audio_s_per_s >= 100 else f"{audio_s_per_s:.3g}"


def _util(samples: list[int]) -> str:
    return f"GPU util {np.mean(samples):.0f}%" if samples else "GPU util n/a"


def _timed(fn: Callable[[], float]) -> tuple[float, list[int]]:
    with gpu_utilisation() as samples:
        seconds = fn()
    return seconds, samples


# -- benchmarks -------------------------------------------------------------------------------


def corpus(out: Path, n_files: int) -> tuple[list[Path], str]:
    """Real-speech concatenations where the shared recordings are, else synthetic vowels."""
    from benchmarks.extract import build_corpus

    try:
        return build_corpus(out, n_files, seed=1), "speech"
    except UserError:
        pass
    from audio_models.data.demo import SAMPLE_RATE, synthesize_vowel

    rng = np.random.default_rng(1)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n_files):
        seconds = rng.uniform(1.5, 20.0)
        vowel = "aiu"[i % 3]
        signal = synthesize_vowel(vowel, rng.uniform(100, 240), 0.5, seconds, rng)
        path = out / f"utt{i:04d}.wav"
        sf.write(path, signal, SAMPLE_RATE, subtype="PCM_16")
        files.append(path)
    return files, "synthetic vowels"


def ssl_rows(tmp: Path, files: list[Path], audio_s: float, workers: int, device: str) -> list[Row]:
    import torch

    from audio_models.testing import save_random_model
    from benchmarks.ssl import bf16_peak_tflops, flops_per_audio_second, per_file_loop, runner

    peak = bf16_peak_tflops(torch.cuda.get_device_name()) if device == "cuda" else None
    rows = []
    for size, label in (("base", "wav2vec2 base"), ("large", "XLSR size")):
        folder = save_random_model(tmp / f"ssl-{size}", size)
        flops = flops_per_audio_second(folder, device)
        per_file_loop(folder, files[:2], device)  # kernels and cuDNN plans, for both sides
        loop_s, loop_util = _timed(lambda f=folder: per_file_loop(f, files, device))
        loop = audio_s / loop_s
        rows.append(
            Row(
                "benchmarks",
                f"{label} per-file loop fp32",
                f"{_rate(loop)} audio s/s",
                f"{loop_s:.1f}",
                _util(loop_util),
            )
        )
        for precision in ("32", "bf16-mixed"):
            out = tmp / f"ssl-{size}-{precision}"
            with gpu_utilisation() as wall_util:
                wall, metrics, _ = runner(
                    folder, files[0].parent, out, precision, 60.0, device, workers
                )
            rate = audio_s / wall
            memory = (
                f"; peak GPU {metrics['peak_gpu_mb'] / 1024:.1f} GiB"
                if "peak_gpu_mb" in metrics
                else ""
            )
            achieved = flops * rate / 1e12
            share = f" = {achieved / peak:.1%} of bf16 peak" if peak else ""
            rows.append(
                Row(
                    "benchmarks",
                    f"{label} runner {precision}",
                    f"{_rate(rate)} audio s/s",
                    f"{wall:.1f}",
                    f"{rate / loop:.2f}x loop; predict loop {_rate(metrics['audio_s_per_s'])} "
                    f"audio s/s; {achieved:.1f} TFLOP/s{share}; {_util(wall_util)}; padding "
                    f"{metrics['padding_fraction']:.1%}{memory}",
                )
            )
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def _compute_type(device: str) -> str:
    return "float16" if device == "cuda" else "float32"  # CTranslate2 has no CPU float16


def asr_rows(tmp: Path, files: list[Path], device: str, max_new_tokens: int = 48) -> list[Row]:
    from benchmarks.asr import BASE_CTC, compare, direct_s2t, direct_whisperx, run_runner
    from benchmarks.asr_models import (
        BASE_WHISPER,
        SMALL_S2T,
        save_random_ctc_aligner,
        save_random_s2t,
        save_random_whisper_ct2,
    )

    rows = []
    folder = save_random_s2t(tmp / "s2t", **SMALL_S2T)
    s2t = [
        "extractor=s2t",
        f"extractor.model={folder}",
        "extractor.num_beams=1",
        f"extractor.max_new_tokens={max_new_tokens}",
    ]
    started = time.perf_counter()
    ours, theirs, memory = compare(
        "s2t",
        lambda c: run_runner(s2t, c, tmp / "out-s2t", device),
        lambda some: direct_s2t(folder, some, device, max_new_tokens),
        files,
        tmp,
        1,
    )
    rows.append(
        Row(
            "benchmarks",
            "s2t small runner vs direct",
            f"{_rate(ours)} audio s/s",
            f"{time.perf_counter() - started:.1f}",
            f"direct per-file generate {_rate(theirs)} audio s/s, {ours / theirs:.2f}x; {memory}",
        )
    )
    model = save_random_whisper_ct2(tmp / "whisper", **BASE_WHISPER)
    aligner = save_random_ctc_aligner(tmp / "align", **BASE_CTC)
    whisper = [
        "extractor=whisperx",
        f"extractor.model={model}",
        f"extractor.align_model={aligner}",
        "extractor.language=en",
        f"extractor.compute_type={_compute_type(device)}",
        "extractor.beam_size=1",
        f"extractor.max_new_tokens={max_new_tokens}",
        "extractor.batch_size=16",
    ]
    started = time.perf_counter()
    ours, theirs, memory = compare(
        "whisperx",
        lambda c: run_runner(whisper, c, tmp / "out-wx", device),
        lambda some: direct_whisperx(
            model, aligner, some, device, max_new_tokens, 16, _compute_type(device)
        ),
        files,
        tmp,
        1,
    )
    rows.append(
        Row(
            "benchmarks",
            f"whisperX base {_compute_type(device)} runner vs direct",
            f"{_rate(ours)} audio s/s",
            f"{time.perf_counter() - started:.1f}",
            f"whisperX direct {_rate(theirs)} audio s/s, {ours / theirs:.2f}x; {memory}",
        )
    )
    return rows


def render(rows: list[Row], title: str) -> str:
    head = Row("", "check", "result", "s", "figures")
    widths = [max(len(getattr(r, f)) for r in [head, *rows]) for f in ("name", "result", "seconds")]
    lines = [title]
    section = None
    for row in [head, *rows]:
        if row.section != section and row.section:
            section = row.section
            lines.append(f"-- {section} " + "-" * 40)
        lines.append(
            f"{row.name:<{widths[0]}}  {row.result:<{widths[1]}}  {row.seconds:>{widths[2]}}  "
            f"{row.figures}".rstrip()
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-files", type=int, default=16)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-benchmarks", action="store_true")
    parser.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="cpu: the same benchmarks on the CPU, a check of this script (--n-files 2)",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not cuda_available():
        print(SKIPPED)
        return 0
    import torch

    started = time.perf_counter()
    rows: list[Row] = []
    ok = True
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as name:
        tmp = Path(name)
        if not args.skip_tests:
            test_rows, ok = run_tests(tmp)
            rows += test_rows
        if not args.skip_benchmarks:
            files, kind = corpus(tmp / "corpus", args.n_files)
            audio_s = sum(sf.info(str(f)).duration for f in files)
            # The host's cores feed the GPU; on a 2-core CPU one worker leaves a core to the model.
            workers = min(8, max(1, (os.cpu_count() or 2) - 2))
            rows.append(
                Row("benchmarks", "corpus", kind, "", f"{len(files)} files, {audio_s:.0f} s")
            )
            for part in (
                lambda: ssl_rows(tmp, files, audio_s, workers, args.device),
                lambda: asr_rows(tmp, files, args.device),
            ):
                try:
                    rows += part()
                except Exception as exc:  # one broken benchmark must not hide the others
                    rows.append(
                        Row(
                            "benchmarks",
                            "error",
                            "FAILED",
                            "",
                            f"{type(exc).__name__}: {exc}"[:200],
                        )
                    )
                    ok = False
    where = torch.cuda.get_device_name() if args.device == "cuda" else "the CPU"
    title = (
        f"gpu-check on {where} (torch {torch.__version__}, CUDA {torch.version.cuda}) in "
        f"{time.perf_counter() - started:.0f} s"
    )
    print(render(rows, title))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
