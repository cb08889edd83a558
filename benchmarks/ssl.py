"""Benchmark: wav2vec2-family embeddings through the runner vs a per-file transformers loop.

    python -m benchmarks.ssl [--n-files 24] [--sizes base large] [--precision 32 bf16-mixed]
    python -m benchmarks.ssl --whisper [--sizes] [--repeats 3]  # bare --sizes: whisper only

Random weights of the real architectures (base: wav2vec2-base, group-norm encoder; large:
XLSR-53's layer-norm encoder, 24 layers × 1024) cost what the trained models cost, without a
download. The reference loop runs ``Wav2Vec2FeatureExtractor`` + the model on each file and mean
pools the last layer; the runner does the same through ``runners.extract`` (in-process,
tracking off). Prints audio seconds per second of both, their ratio, the runner's padding
fraction and peak memory and, for bf16, the largest deviation from fp32. Both run on the same
device (``--device``, default cuda when present); on a GPU it also prints the model FLOP/s the
runner achieved as a fraction of the device's dense bf16 peak (``--peak-tflops`` overrides
the table below).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import soundfile as sf
import torch
from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

from audio_models.testing import (  # the random-model factories tests use too
    SIZES,
    save_random_model,
    save_random_whisper_base,
)
from benchmarks.extract import build_corpus, compose_extract

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by device-name fragment.
BF16_PEAK_TFLOPS = {
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H100 PCIe": 756.0,
    "H100": 756.0,
    "A100": 312.0,
    "L40S": 362.1,
    "L4": 121.0,
    "A10G": 70.0,
    "RTX 4090": 165.2,
}


def bf16_peak_tflops(name: str) -> float | None:
    for fragment, peak in BF16_PEAK_TFLOPS.items():
        if fragment in name:
            return peak
    return None


def flops_per_audio_second(folder: Path, device: str) -> float:
    """Model FLOPs (matmuls and convolutions) per second of 16 kHz audio, counted by
    ``torch.utils.flop_counter`` on a 10-second input."""
    from torch.utils.flop_counter import FlopCounterMode

    model = Wav2Vec2Model.from_pretrained(folder).eval().to(device)
    x = torch.zeros(1, 160000, device=device)
    # no_grad, not inference_mode: the weight-norm parametrization of the positional
    # convolution fails under FlopCounterMode in inference mode.
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 10.0


def per_file_loop(folder: Path, files: list[Path], device: str) -> float:
    """Seconds for the plain transformers loop over ``files`` (mean-pooled last layer)."""
    feature_extractor = Wav2Vec2FeatureExtractor.from_pretrained(folder)
    model = Wav2Vec2Model.from_pretrained(folder).eval().to(device)
    started = time.perf_counter()
    with torch.inference_mode():
        for path in files:
            audio, rate = sf.read(path, dtype="float32")
            inputs = feature_extractor(audio, sampling_rate=rate, return_tensors="pt")
            inputs = {k: v.to(device) for k, v in inputs.items()}
            model(**inputs).last_hidden_state[0].mean(0).cpu()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def runner(
    folder: Path,
    corpus: Path,
    out: Path,
    precision: str,
    batch_audio_s: float,
    device: str,
    workers: int,
) -> tuple[float, dict[str, float], Path]:
    """Seconds for the whole ``extract()`` call (model load included), its metrics, output."""
    from runners.extract import extract

    cfg = compose_extract(
        [
            "extractor=wav2vec2",
            f"extractor.model={folder}",
            "dataset=folder",
            f"dataset.root={corpus}",
            f"device={device}",
            f"device.precision={precision}",
            f"loader.num_workers={workers}",
            "loader.batch_size=32",
            f"loader.batch_audio_s={batch_audio_s}",
            f"output_dir={out}",
        ]
    )
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = extract(cfg)
    wall = time.perf_counter() - started
    metrics = dict(result.metrics)
    if device == "cuda":
        metrics["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return wall, metrics, out / "features.parquet"


def cli_runner(
    folder: Path,
    corpus: Path,
    out: Path,
    device: str,
    devices: int,
    workers: int,
    *,
    ddp: bool = True,
) -> tuple[float, Path]:
    """Seconds for ``python -m runners.extract`` (a subprocess: start-up included), with
    ``device=ddp`` over ``devices`` processes (DDP's launcher starts the other ranks by
    re-running the command), or on one device (``ddp=False``): the whole command as typed."""
    import subprocess
    import sys

    command = [
        sys.executable,
        "-m",
        "runners.extract",
        "extractor=wav2vec2",
        f"extractor.model={folder}",
        "dataset=folder",
        f"dataset.root={corpus}",
        *(
            ["device=ddp", f"device.accelerator={device}", f"device.devices={devices}"]
            if ddp
            else [f"device={device}"]
        ),
        f"loader.num_workers={workers}",
        "loader.batch_size=32",
        "loader.batch_audio_s=60",
        "tracking=off",
        "progress_bar=false",
        f"output_dir={out}",
        f"hydra.run.dir={out}-hydra",
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started, out / "features.parquet"


def ddp_scaling(folder: Path, corpus: Path, tmp: Path, audio_s: float, args: Any) -> None:
    """Throughput with 1 and N processes, scaling efficiency, and whether they agree."""
    n = args.ddp_devices
    per_rank_workers = 1 if args.device == "cpu" else 4
    results = {}
    for devices in (1, n):
        wall, features = cli_runner(
            folder,
            corpus,
            tmp / f"ddp-{folder.name}-{devices}",
            args.device,
            devices,
            per_rank_workers,
        )
        results[devices] = (audio_s / wall, pd.read_parquet(features).sort_values("id"))
    (one, a), (many, b) = results[1], results[n]
    column = next(c for c in a.columns if c.startswith("layer_"))
    same = len(a) == len(b) and list(a["id"]) == list(b["id"])
    worst = np.abs(np.stack(a[column]) - np.stack(b[column])).max() if same else float("nan")
    print(
        f"ddp on {args.device}: 1 process {one:.2f} audio s/s, {n} processes {many:.2f} audio "
        f"s/s (whole command, start-up included), speed-up {many / one:.2f}x, scaling "
        f"efficiency {many / one / n:.0%}; same items {same}, max |difference| {worst:.2g}"
    )


def whisper_line(tmp: Path, corpus: Path, files: list[Path], audio_s: float, args: Any) -> None:
    """``extractor=whisper_encoder`` on whisper-base's encoder (random weights) against the
    per-file loop: ``WhisperFeatureExtractor`` + the encoder on each file, the frames that
    cover the recording mean pooled (every file here is under the 30 s window). The two run
    alternately ``--repeats`` times and the best of each counts: on a shared 2-core machine
    one pass varies by ±15%, more than the difference being measured."""
    import math

    from transformers import WhisperFeatureExtractor, WhisperModel

    from runners.extract import extract

    folder = save_random_whisper_base(tmp / "whisper-base")
    feature_extractor = WhisperFeatureExtractor.from_pretrained(folder)
    encoder = WhisperModel.from_pretrained(folder).encoder.eval().to(args.device)

    def loop() -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            for path in files:
                audio, rate = sf.read(path, dtype="float32")
                inputs = feature_extractor(audio, sampling_rate=rate, return_tensors="pt")
                states = encoder(inputs.input_features.to(args.device)).last_hidden_state
                states[0, : math.ceil(len(audio) / 320)].mean(0).cpu()
        if args.device == "cuda":
            torch.cuda.synchronize()
        return audio_s / (time.perf_counter() - started)

    workers = 1 if args.device == "cpu" else min(8, max(1, (os.cpu_count() or 2) - 2))

    def run(attempt: int) -> tuple[float, float]:
        cfg = compose_extract(
            [
                "extractor=whisper_encoder",
                f"extractor.model={folder}",
                "dataset=folder",
                f"dataset.root={corpus}",
                f"device={args.device}",
                f"loader.num_workers={workers}",
                "loader.batch_size=16",
                f"output_dir={tmp / f'whisper-out-{attempt}'}",
            ]
        )
        started = time.perf_counter()
        result = extract(cfg)
        return audio_s / (time.perf_counter() - started), result.metrics["audio_s_per_s"]

    loops, runs = [], []
    for attempt in range(args.repeats):
        loops.append(loop())
        runs.append(run(attempt))
    rate, predict = max(runs)
    best = max(loops)
    passes = ", ".join(f"{r:.2f}/{lp:.2f}" for (r, _), lp in zip(runs, loops, strict=True))
    print(
        f"whisper_encoder base 32: runner {rate:.2f} audio s/s (whole extract(); predict loop "
        f"{predict:.2f}), per-file loop {best:.2f} audio s/s, ratio {rate / best:.2f}x, best of "
        f"{args.repeats} alternating passes (runner/loop per pass: {passes})"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-files", type=int, default=24)
    parser.add_argument("--sizes", nargs="*", default=["base", "large"], choices=sorted(SIZES))
    parser.add_argument("--precision", nargs="+", default=["32", "bf16-mixed"])
    parser.add_argument("--batch-audio-s", type=float, default=60.0)
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"]
    )
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak")
    parser.add_argument(
        "--ddp-devices",
        type=int,
        default=0,
        help="also run device=ddp with 1 and this many processes and print the scaling",
    )
    parser.add_argument(
        "--whisper", action="store_true", help="also run whisper_encoder (whisper-base size)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="whisper_encoder: alternating passes, best counts"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    # On a 2-core CPU one loader process leaves a core to the model; a GPU host feeds it with
    # more, so the loader never becomes the bottleneck.
    workers = 1 if args.device == "cpu" else min(8, max(1, (os.cpu_count() or 2) - 2))
    peak = args.peak_tflops
    if args.device == "cuda":
        name = torch.cuda.get_device_name()
        peak = peak or bf16_peak_tflops(name)
        print(f"device: {name}, dense bf16 peak {peak} TFLOP/s; loader workers {workers}")
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        files = build_corpus(corpus, args.n_files, seed=1)
        audio_s = sum(sf.info(str(f)).duration for f in files)
        threads = torch.get_num_threads()
        print(f"corpus: {len(files)} files, {audio_s:.1f} s of audio; torch threads {threads}")
        if args.whisper:
            whisper_line(Path(tmp), corpus, files, audio_s, args)
        for size in args.sizes:
            folder = save_random_model(Path(tmp) / size, size)
            loop = audio_s / per_file_loop(folder, files, args.device)
            flops = flops_per_audio_second(folder, args.device)
            outputs = {}
            for precision in args.precision:
                wall, metrics, features = runner(
                    folder,
                    corpus,
                    Path(tmp) / f"{size}-{precision}",
                    precision,
                    args.batch_audio_s,
                    args.device,
                    workers,
                )
                outputs[precision] = np.stack(
                    pd.read_parquet(features).sort_values("id")[
                        "layer_12_mean" if size == "base" else "layer_24_mean"
                    ]
                )
                deviation = ""
                if precision != "32" and "32" in outputs:
                    worst = np.abs(outputs[precision] - outputs["32"]).max()
                    deviation = f", max |bf16 - fp32| {worst:.3g}"
                rate = audio_s / wall
                memory = f"peak RSS {metrics['peak_rss_mb']:.0f} MiB"
                if "peak_gpu_mb" in metrics:
                    memory += f", peak GPU {metrics['peak_gpu_mb']:.0f} MiB"
                achieved = flops * rate / 1e12
                utilisation = f", model {achieved:.1f} TFLOP/s"
                if peak:
                    utilisation += f" = {achieved / peak:.1%} of bf16 peak"
                print(
                    f"{size} {precision}: runner {rate:.2f} audio s/s "
                    f"(predict loop {metrics['audio_s_per_s']:.2f}), per-file loop (fp32) "
                    f"{loop:.2f} audio s/s, ratio {rate / loop:.2f}x, padding fraction "
                    f"{metrics['padding_fraction']:.3f}, {memory}{utilisation}{deviation}"
                )
            command, _ = cli_runner(
                folder, corpus, Path(tmp) / f"{size}-command", args.device, 1, workers, ddp=False
            )
            print(
                f"{size} 32: whole command (python -m runners.extract, start-up and model load "
                f"included) {audio_s / command:.2f} audio s/s in {command:.1f} s, ratio to the "
                f"per-file loop {audio_s / command / loop:.2f}x"
            )
            if args.ddp_devices > 1:
                ddp_scaling(folder, corpus, Path(tmp), audio_s, args)


if __name__ == "__main__":
    main()
