"""Benchmark: wav2vec2-family embeddings through the runner vs a per-file transformers loop.

    python -m benchmarks.ssl [--n-files 24] [--sizes base large] [--precision 32 bf16-mixed]

Random weights of the real architectures (base: wav2vec2-base, group-norm encoder; large:
XLSR-53's layer-norm encoder, 24 layers × 1024) cost what the trained models cost, without a
download. The reference loop runs ``Wav2Vec2FeatureExtractor`` + the model on each file and mean
pools the last layer; the runner does the same through ``runners.extract`` (in-process,
tracking off). Prints audio seconds per second of both, their ratio, the runner's padding
fraction and, for bf16, the largest deviation from fp32.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

from benchmarks.extract import build_corpus, compose_extract

SIZES = {
    "base": {"feat_extract_norm": "group", "do_stable_layer_norm": False},
    "large": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "feat_extract_norm": "layer",
        "do_stable_layer_norm": True,
        "conv_bias": True,
    },
}


def save_random_model(folder: Path, size: str) -> Path:
    torch.manual_seed(0)
    Wav2Vec2Model(Wav2Vec2Config(**SIZES[size])).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=16000,
        do_normalize=True,
        return_attention_mask=size == "large",
    ).save_pretrained(folder)
    return folder


def per_file_loop(folder: Path, files: list[Path]) -> float:
    """Seconds for the plain transformers loop over ``files`` (mean-pooled last layer)."""
    feature_extractor = Wav2Vec2FeatureExtractor.from_pretrained(folder)
    model = Wav2Vec2Model.from_pretrained(folder).eval()
    started = time.perf_counter()
    with torch.inference_mode():
        for path in files:
            audio, rate = sf.read(path, dtype="float32")
            inputs = feature_extractor(audio, sampling_rate=rate, return_tensors="pt")
            model(**inputs).last_hidden_state[0].mean(0)
    return time.perf_counter() - started


def runner(
    folder: Path, corpus: Path, out: Path, precision: str, batch_audio_s: float
) -> tuple[float, float, Path]:
    from runners.extract import extract

    cfg = compose_extract(
        [
            "extractor=wav2vec2",
            f"extractor.model={folder}",
            "dataset=folder",
            f"dataset.root={corpus}",
            f"device.precision={precision}",
            "loader.num_workers=1",
            "loader.batch_size=8",
            f"loader.batch_audio_s={batch_audio_s}",
            f"output_dir={out}",
        ]
    )
    started = time.perf_counter()
    result = extract(cfg)
    return (
        time.perf_counter() - started,
        result.metrics["padding_fraction"],
        out / "features.parquet",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-files", type=int, default=24)
    parser.add_argument("--sizes", nargs="+", default=["base", "large"], choices=sorted(SIZES))
    parser.add_argument("--precision", nargs="+", default=["32", "bf16-mixed"])
    parser.add_argument("--batch-audio-s", type=float, default=60.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        files = build_corpus(corpus, args.n_files, seed=1)
        audio_s = sum(sf.info(str(f)).duration for f in files)
        threads = torch.get_num_threads()
        print(f"corpus: {len(files)} files, {audio_s:.1f} s of audio; torch threads {threads}")
        for size in args.sizes:
            folder = save_random_model(Path(tmp) / size, size)
            loop = audio_s / per_file_loop(folder, files)
            outputs = {}
            for precision in args.precision:
                wall, padding, features = runner(
                    folder, corpus, Path(tmp) / f"{size}-{precision}", precision, args.batch_audio_s
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
                print(
                    f"{size} {precision}: runner {rate:.2f} audio s/s, per-file loop (fp32) "
                    f"{loop:.2f} audio s/s, ratio {rate / loop:.2f}x, "
                    f"padding fraction {padding:.3f}{deviation}"
                )


if __name__ == "__main__":
    main()
