"""Reliability report: bad recordings, kill -9 and resume, memory at 1× and 10× the files.

    python -m benchmarks.reliability [--kills 3] [--good 40] [--extractor egemaps]

Builds a corpus of broken and awkward recordings (a link to /dev/zero and a FIFO among them)
mixed with good ones, runs
``python -m runners.extract`` on it in a subprocess, SIGKILLs it at random points and reruns
until it completes, then prints: items in, written, failed (by reason), lost (must be 0) and
duplicated (must be 0). Then two concurrent runs into one output directory (the second must be
refused, nothing corrupted) and a SIGKILL while the loader is stuck on an item (the finished
items must be kept). Then measures the peak RSS (process tree, sampled) of full runs over
N and 10·N files, and the peak RSS and time of one 30-minute recording through each extractor
(``--long-extractors``; the SSL one on random weights of wav2vec2-base, chunked).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import soundfile as sf

# name → expected outcome: "ok" or the failure stage.
BAD_AND_AWKWARD: dict[str, str] = {
    "zero.wav": "decode",
    "truncated.wav": "decode",
    "text.wav": "decode",
    "random.flac": "decode",
    "one_sample.wav": "preflight",
    "nan.wav": "decode",
    "loop.wav": "decode",
    "pcm8.wav": "ok",
    "pcm24.wav": "ok",
    "float32.wav": "ok",
    "stereo48k.wav": "ok",
    "zeros.wav": "ok",
    "spaces and ünïcödé ñ.wav": "ok",
    "voice.mp3": "ok",
    "voice.ogg": "ok",
    "devzero.wav": "decode",  # a link to /dev/zero: read forever before it was refused
    "fifo.wav": "decode",  # a named pipe: open() blocked forever before it was refused
}


def voice(seconds: float, f0: float = 160.0, sr: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * f0 * t) * (1 + 0.5 * np.sin(2 * np.pi * 4 * t))).astype(
        np.float32
    )


def build_bad_corpus(root: Path, seed: int = 0) -> dict[str, str]:
    """Write every file of :data:`BAD_AND_AWKWARD` into ``root``; returns that table."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    clip = voice(2.0)
    (root / "zero.wav").write_bytes(b"")
    sf.write(root / "truncated.wav.src", clip, 16000, format="WAV")
    (root / "truncated.wav").write_bytes((root / "truncated.wav.src").read_bytes()[:30])
    (root / "truncated.wav.src").unlink()
    (root / "text.wav").write_text("definitely not audio\n" * 20)
    (root / "random.flac").write_bytes(rng.bytes(5000))
    sf.write(root / "one_sample.wav", clip[:1], 16000)
    nan = clip.copy()
    nan[100], nan[200] = np.nan, np.inf
    sf.write(root / "nan.wav", nan, 16000, subtype="FLOAT")
    (root / "loop.wav").symlink_to(root / "loop.wav")
    sf.write(root / "pcm8.wav", clip, 16000, subtype="PCM_U8")
    sf.write(root / "pcm24.wav", clip, 16000, subtype="PCM_24")
    sf.write(root / "float32.wav", clip, 16000, subtype="FLOAT")
    sf.write(root / "stereo48k.wav", np.stack([clip, clip * 0.5], 1).repeat(3, axis=0), 48000)
    sf.write(root / "zeros.wav", np.zeros(160000, dtype=np.float32), 16000)
    sf.write(root / "spaces and ünïcödé ñ.wav", clip, 16000)
    sf.write(root / "voice.mp3", clip, 16000, format="MP3")
    sf.write(root / "voice.ogg", clip, 16000, format="OGG")
    (root / "devzero.wav").symlink_to("/dev/zero")
    os.mkfifo(root / "fifo.wav")
    return dict(BAD_AND_AWKWARD)


def _command(extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "runners.extract",
        "device=cpu",
        "tracking=off",
        "progress_bar=false",
        *extra,
    ]


def kill_and_resume(overrides: list[str], out: Path, kills: int, seed: int = 0) -> int:
    """Run until complete, SIGKILLing the first ``kills`` attempts after a random number of
    committed parts; returns the number of kills made."""
    rng = random.Random(seed)
    progress = out / ".progress"
    made = 0
    while True:
        proc = subprocess.Popen(
            _command([*overrides, f"output_dir={out}"]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        target = (
            len(list(progress.glob("part-*.parquet"))) + rng.randint(1, 4) if made < kills else None
        )
        while proc.poll() is None:
            if target is not None and len(list(progress.glob("part-*.parquet"))) >= target:
                time.sleep(rng.uniform(0.0, 0.3))
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                made += 1
                break
            time.sleep(0.02)
        else:
            _, err = proc.communicate()
            if proc.returncode not in (0, 3):  # 3: failure ratio above the limit, still complete
                raise RuntimeError(err.decode()[-2000:])
            return made


def concurrent_runs_report(tmp: Path, n_files: int = 300) -> None:
    """Two runs into one ``output_dir`` started together: one must be refused at once, the
    other must finish with every item exactly once in readable files."""
    folder = tmp / "concurrent"
    folder.mkdir()
    for i in range(n_files):
        sf.write(folder / f"c{i:03d}.wav", voice(2.0, f0=110 + i % 100), 16000)
    out = tmp / "concurrent_out"
    command = _command(
        ["dataset=folder", f"dataset.root={folder}", f"output_dir={out}", "loader.num_workers=1"]
    )
    runs = [
        subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(run.communicate()[1], run.returncode) for run in runs]
    refused = [err for err, code in results if code == 2 and "is in use by" in err]
    finished = [code for _, code in results if code == 0]
    rows = pd.read_parquet(out / "features.parquet")["id"]
    message = next(
        (line for line in (refused[0] if refused else "").splitlines() if "error:" in line), "-"
    )
    print(
        f"two runs into one output_dir at once: {len(refused)} refused ({message[:100]}), "
        f"{len(finished)} finished; {rows.nunique()}/{n_files} items, "
        f"{len(rows) - rows.nunique()} duplicated, files readable"
    )


_STUCK = """
import sys, time
from audio_models.audio.smile import OpenSmileExtractor
real = OpenSmileExtractor.transform
def stuck(self, signal, sample_rate):
    if len(signal) == int(2.5 * sample_rate):
        time.sleep(3600)
    return real(self, signal, sample_rate)
OpenSmileExtractor.transform = stuck
sys.argv = ["runners.extract", *sys.argv[1:]]
from runners.extract import main
main()
"""


def stuck_kill_report(tmp: Path, n_good: int = 6) -> None:
    """SIGKILL while the loader is stuck on an item: the items finished before it are kept
    (the writer's timer committed them though no batch followed), and a rerun completes."""
    folder = tmp / "stuck"
    folder.mkdir()
    for i in range(n_good):
        sf.write(folder / f"s{i:02d}.wav", voice(1.0 + 0.1 * i), 16000)
    sf.write(folder / "zz_stuck.wav", voice(2.5), 16000)
    out = tmp / "stuck_out"
    args = [
        "dataset=folder",
        f"dataset.root={folder}",
        f"output_dir={out}",
        "loader.num_workers=1",
        "loader.item_timeout_s=null",
        "writer.commit_every_s=1",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-c", _STUCK, *_command(args)[3:]],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    started = time.perf_counter()
    kept = 0
    while time.perf_counter() - started < 120 and kept < n_good:
        kept = sum(
            pd.read_parquet(p, columns=["id"]).shape[0]
            for p in (out / ".progress").glob("part-*.parquet")
        )
        time.sleep(0.2)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    rerun = subprocess.run(
        _command([*args, "loader.item_timeout_s=900"]), capture_output=True, text=True
    )
    rows = pd.read_parquet(out / "features.parquet")["id"]
    print(
        f"SIGKILL while an item is stuck: {kept}/{n_good} finished items kept; rerun exit "
        f"{rerun.returncode}, {rows.nunique()}/{n_good + 1} items, "
        f"{len(rows) - rows.nunique()} duplicated"
    )


def long_recording_report(tmp: Path, extractors: list[str], minutes: float = 30.0) -> None:
    """One ``minutes``-long recording through each extractor: peak RSS and wall time."""
    from audio_models.testing import FULL_ECAPA, save_random_ecapa, save_random_model

    folder = tmp / "long"
    folder.mkdir()
    seconds = minutes * 60
    signal = np.concatenate([voice(10.0, f0=100 + 5 * (i % 20)) for i in range(int(seconds // 10))])
    sf.write(folder / "long.wav", signal, 16000, subtype="PCM_16")
    print(f"one {minutes:.0f}-minute recording, per extractor:")
    for name in extractors:
        extra = []
        if name in ("wav2vec2", "hubert", "wavlm", "xlsr"):
            size = "large" if name == "xlsr" else "base"
            extra = [f"extractor.model={save_random_model(tmp / f'model-{size}', size)}"]
        if name == "ecapa":
            extra = [f"extractor.model={save_random_ecapa(tmp / 'ecapa', **FULL_ECAPA)}"]
        command = _command(
            [
                f"extractor={name}",
                *extra,
                "dataset=folder",
                f"dataset.root={folder}",
                f"output_dir={tmp / f'long-{name}'}",
            ]
        )
        started = time.perf_counter()
        try:
            peak = peak_tree_rss_mb(command)
        except RuntimeError as exc:
            print(f"  {name:12s} did not run: {exc}")
            continue
        wall = time.perf_counter() - started
        table = pd.read_parquet(tmp / f"long-{name}" / "features.parquet", columns=["duration_s"])
        print(
            f"  {name:12s} peak RSS {peak:6.0f} MiB, {wall:6.1f} s, "
            f"{len(table)} row of {table['duration_s'].iloc[0]:.0f} s"
        )


def peak_tree_rss_mb(command: list[str]) -> float:
    """Run ``command`` and sample the RSS of its process tree every 20 ms; the peak in MiB."""
    proc = psutil.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0.0
    while proc.poll() is None:
        total = 0
        try:
            for p in [proc, *proc.children(recursive=True)]:
                total += p.memory_info().rss
        except psutil.Error:
            pass
        peak = max(peak, total / 2**20)
        time.sleep(0.02)
    if proc.returncode != 0:
        raise RuntimeError(f"{command} exited {proc.returncode}")
    return peak


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--good", type=int, default=40, help="good recordings mixed in")
    parser.add_argument("--extractor", default="egemaps")
    parser.add_argument(
        "--memory-files", type=int, default=30, help="N for the 1× / 10× memory runs"
    )
    parser.add_argument(
        "--long-extractors",
        nargs="*",
        default=[
            "egemaps",
            "egemaps_lld",
            "compare",
            "librosa",
            "fbank",
            "mfcc",
            "wav2vec2",
            "ecapa",
        ],
        help="extractors to run on one 30-minute recording (none: skip)",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "corpus"
        expected = build_bad_corpus(root / "bad")
        good = root / "good"
        good.mkdir()
        for i in range(args.good):
            sf.write(good / f"good{i:03d}.wav", voice(1.0 + (i % 5), f0=120 + 3 * i), 16000)
        manifest = Path(tmp) / "manifest.csv"
        rows = [str(p) for p in sorted((root / "bad").iterdir())] + [
            str(p) for p in sorted(good.iterdir())
        ]
        rows += [str(root / "bad" / "missing.wav"), f"{good / 'good000.wav'},0.5,9.0"]
        frame = pd.DataFrame(
            {
                "path": rows,
                "start": [None] * (len(rows) - 1) + [0.5],
                "end": [None] * (len(rows) - 1) + [9.0],
            }
        )
        frame.to_csv(manifest, index=False)
        n_in = len(frame)
        out = Path(tmp) / "out"
        overrides = [
            f"extractor={args.extractor}",
            "dataset=manifest",
            f"dataset.path={manifest}",
            "loader.batch_size=2",
            "loader.num_workers=1",
            "writer.commit_every_s=0",  # a part per batch: the kills land between commits
            "max_failure_ratio=1.0",
        ]
        made = kill_and_resume(overrides, out, args.kills)
        written = pd.read_parquet(out / "features.parquet")
        failed = pd.read_parquet(out / "failures.parquet")
        ids = Counter([*written["id"], *failed["id"]])
        duplicated = sum(n - 1 for n in ids.values() if n > 1)
        lost = n_in - len(ids)
        print(f"kill-and-resume trial: {made} SIGKILLs, then a complete run ({args.extractor})")
        print(
            f"items in: {n_in}, written: {len(written)}, failed: {len(failed)}, "
            f"lost: {lost}, duplicated: {duplicated}"
        )
        for (stage, error_type), n in Counter(
            zip(failed["stage"], failed["error_type"], strict=True)
        ).items():
            print(f"  failed at {stage} ({error_type}): {n}")
        by_name = {
            Path(i.split("@")[0]).name: s
            for i, s in zip(failed["id"], failed["stage"], strict=True)
        }
        wrong = [n for n, outcome in expected.items() if (outcome == "ok") != (n not in by_name)]
        matched = len(expected) - len(wrong)
        print(
            f"bad/awkward files with the expected outcome: {matched}/{len(expected)}"
            + (f" (unexpected: {wrong})" if wrong else "")
        )

        concurrent_runs_report(Path(tmp))
        stuck_kill_report(Path(tmp))

        sizes = {}
        for factor in (1, 10):
            folder = Path(tmp) / f"mem{factor}"
            folder.mkdir()
            for i in range(args.memory_files * factor):
                sf.write(folder / f"f{i:05d}.wav", voice(3.0, f0=100 + (i % 50)), 16000)
            command = _command(
                [
                    f"extractor={args.extractor}",
                    "dataset=folder",
                    f"dataset.root={folder}",
                    f"output_dir={Path(tmp) / f'memout{factor}'}",
                ]
            )
            sizes[factor] = peak_tree_rss_mb(command)
        print(
            f"peak RSS (process tree): {args.memory_files} files {sizes[1]:.0f} MiB, "
            f"{10 * args.memory_files} files {sizes[10]:.0f} MiB, ratio {sizes[10] / sizes[1]:.2f}x"
        )
        if args.long_extractors:
            long_recording_report(Path(tmp), args.long_extractors)


if __name__ == "__main__":
    main()
