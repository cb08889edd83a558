"""Benchmark: egemaps through the runner vs opensmile's own batch path, at 1 and 2 workers.

    python -m benchmarks.extract [--n-files 120] [--workers 1 2] [--corpus DIR]
                                 [--seconds 1.5 20]

Builds a corpus of real speech (concatenations of ``../shared/data/speech`` recordings, 1.5–20 s,
16 kHz) and prints, from one process, audio seconds per second of
``python -m runners.extract extractor=egemaps`` (in-process, tracking off, whole ``extract()``
call timed) and of ``opensmile.Smile(num_workers=N, multiprocessing=True).process_files``,
each the best of ``--repeats`` alternating runs, the ratios, and the runner's peak memory
(main process plus loader workers, sampled); then the whole command as a user types it (a
subprocess: imports, config, listing, loader start-up and writing included) beside the
predict loop it reports.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import opensmile
import psutil
import soundfile as sf
from omegaconf import DictConfig

from audio_models.audio.io import decode
from audio_models.utils.errors import UserError

SHARED_SPEECH = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech"
RATE = 16000


def build_corpus(
    out: Path,
    n_files: int,
    source: Path = SHARED_SPEECH,
    seed: int = 0,
    seconds: tuple[float, float] = (1.5, 20.0),
) -> list[Path]:
    """Write ``n_files`` WAVs of ``seconds`` (uniform; default 1.5–20 s), each a random
    concatenation of real recordings."""
    recordings = sorted(p for p in source.rglob("*") if p.suffix in {".wav", ".flac"})
    if not recordings:
        raise UserError(f"no recordings under {source}: the benchmark needs ../shared/data/speech")
    signals = [decode(str(p), target_sample_rate=RATE).signal for p in recordings]
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n_files):
        target = rng.uniform(*seconds)
        parts, total = [], 0
        while total < target * RATE:
            piece = signals[rng.integers(len(signals))]
            parts.append(piece)
            total += len(piece)
        signal = np.concatenate(parts)[: int(target * RATE)]
        path = out / f"utt{i:04d}.wav"
        sf.write(path, signal, RATE, subtype="PCM_16")
        files.append(path)
    return files


class PeakTreeRss:
    """Samples the RSS of this process plus its children every 20 ms; keeps the peaks of the
    tree (``peak_mb``) and of this process alone (``self_peak_mb``: forked children share its
    pages, which the tree's sum counts once per process)."""

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self.self_peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = own = me.memory_info().rss
            for proc in me.children(recursive=True):
                with contextlib.suppress(psutil.Error):  # a worker may exit meanwhile
                    total += proc.memory_info().rss
            self.peak_mb = max(self.peak_mb, total / 2**20)
            self.self_peak_mb = max(self.self_peak_mb, own / 2**20)
            time.sleep(0.02)

    def __enter__(self) -> PeakTreeRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def compose_extract(overrides: list[str]) -> DictConfig:
    """``conf/extract.yaml`` composed with ``overrides`` (CPU, tracking off, no progress bar)."""
    from hydra import compose, initialize_config_dir

    conf = Path(__file__).resolve().parents[1] / "conf"
    base = ["device=cpu", "tracking=off", "progress_bar=false"]
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose(config_name="extract", overrides=base + overrides)


def run_runner(
    corpus: Path, workers: int, out: Path, *, sample_memory: bool = False
) -> tuple[float, float, float]:
    """Seconds for the whole ``extract()`` call, its predict-loop seconds, peak tree RSS (MiB).

    The RSS sampler takes CPU from a 2-core machine, so timed runs go without it
    (``sample_memory=False`` returns 0 for the peak).
    """
    from runners.extract import extract

    cfg = compose_extract(
        [
            "extractor=egemaps",
            "dataset=folder",
            f"dataset.root={corpus}",
            f"loader.num_workers={workers}",
            f"output_dir={out}",
        ]
    )
    memory = PeakTreeRss() if sample_memory else contextlib.nullcontext()
    with memory:
        started = time.perf_counter()
        result = extract(cfg)
        wall = time.perf_counter() - started
    if result.metrics["n_failed"]:
        raise RuntimeError(f"runner failed on {result.metrics['n_failed']} items")
    return wall, result.metrics["wall_s"], memory.peak_mb if sample_memory else 0.0


_LOOP = re.compile(r"of audio in ([0-9.]+) s")


def run_command(cwd: Path, out: Path, *overrides: str) -> tuple[float, float]:
    """The whole ``python -m runners.extract extractor=egemaps`` command (imports, config,
    dataset listing, loader start-up, writing) and the predict loop it reports, in seconds."""
    args = [
        sys.executable,
        "-m",
        "runners.extract",
        "extractor=egemaps",
        "tracking=off",
        "device=cpu",
        "progress_bar=false",
        f"output_dir={out}",
        f"hydra.run.dir={out}-hydra",
        *overrides,
    ]
    started = time.perf_counter()
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - started
    found = _LOOP.search(proc.stdout + proc.stderr)
    if proc.returncode != 0 or found is None:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return wall, float(found.group(1))


def run_opensmile(files: list[Path], workers: int) -> float:
    smile = opensmile.Smile(
        feature_set=opensmile.FeatureSet.eGeMAPSv02,
        feature_level=opensmile.FeatureLevel.Functionals,
        num_workers=workers,
        multiprocessing=True,
    )
    started = time.perf_counter()
    frame = smile.process_files([str(f) for f in files])
    wall = time.perf_counter() - started
    if len(frame) != len(files):
        raise RuntimeError("opensmile returned the wrong number of rows")
    return wall


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-files", type=int, default=120)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--corpus", type=Path, default=None, help="reuse/keep the corpus here")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per path")
    parser.add_argument(
        "--seconds", type=float, nargs=2, default=[1.5, 20.0], help="file durations (min max)"
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        corpus = args.corpus or Path(tmp) / "corpus"
        files = build_corpus(corpus, args.n_files, seconds=tuple(args.seconds))
        audio_s = sum(sf.info(str(f)).duration for f in files)
        for f in files:  # warm the page cache so neither path pays the first read
            f.read_bytes()
        mean = audio_s / len(files)
        print(f"corpus: {len(files)} files, {audio_s:.1f} s of audio ({mean:.1f} s mean)")
        results: dict[int, dict[str, float]] = {}
        for workers in args.workers:
            # Alternate the two paths and keep each one's best of --repeats: the machine's
            # speed drifts, and one noisy run should not decide a ratio.
            smile_walls, runner_walls, loop_walls = [], [], []
            for repeat in range(args.repeats):
                smile_walls.append(run_opensmile(files, workers))
                wall, loop, _ = run_runner(corpus, workers, Path(tmp) / f"out{workers}-{repeat}")
                runner_walls.append(wall)
                loop_walls.append(loop)
            # The whole command as a user types it: start-up included.
            command, command_loop = run_command(
                Path(tmp),
                Path(tmp) / f"cmd{workers}",
                "dataset=folder",
                f"dataset.root={corpus}",
                f"loader.num_workers={workers}",
            )
            # One more, untimed run for the memory peak.
            peaks = [
                run_runner(corpus, workers, Path(tmp) / f"mem{workers}", sample_memory=True)[2]
            ]
            results[workers] = {
                "runner": audio_s / min(runner_walls),
                "loop": audio_s / min(loop_walls),
                "opensmile": audio_s / min(smile_walls),
                "peak": max(peaks),
                "command": audio_s / command,
            }
            peak = max(peaks)
            r = results[workers]
            print(
                f"workers={workers}: runner {r['runner']:.1f} audio s/s "
                f"(predict loop {r['loop']:.1f}), "
                f"opensmile process_files {r['opensmile']:.1f} audio s/s, "
                f"runner/opensmile {r['runner'] / r['opensmile']:.2f}x, "
                f"runner peak RSS {peak:.0f} MiB"
            )
            print(
                f"workers={workers}: whole command (python -m runners.extract) "
                f"{r['command']:.1f} audio s/s in {command:.1f} s, of which predict loop "
                f"{command_loop:.1f} s; whole command/opensmile "
                f"{r['command'] / r['opensmile']:.2f}x"
            )
        if 1 in results and 2 in results:
            one, two = results[1], results[2]
            print(
                f"scaling 2 vs 1 worker: runner {two['runner'] / one['runner']:.2f}x, "
                f"opensmile {two['opensmile'] / one['opensmile']:.2f}x"
            )


if __name__ == "__main__":
    main()
