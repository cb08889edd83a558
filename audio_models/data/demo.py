"""A deterministic synthetic corpus: voiced vowels in two classes that features can separate.

Class ``low``: f0 around 110 Hz, quieter; class ``high``: f0 around 220 Hz, louder. Each clip
is a glottal pulse train shaped by the formants of /a/, /i/ or /u/, with jitter, vibrato and
an onset/offset envelope, 1–6 s long, 16 kHz PCM16.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import soundfile as sf

DEMO_VERSION = 1
SAMPLE_RATE = 16000
_FORMANTS = {  # (F1, F2, F3) in Hz, adult averages
    "a": (730.0, 1090.0, 2440.0),
    "i": (270.0, 2290.0, 3010.0),
    "u": (300.0, 870.0, 2240.0),
}
_CLASSES = {"low": (110.0, 0.25), "high": (220.0, 0.6)}  # (mean f0, peak amplitude)


def _resonator(signal: np.ndarray, freq: float, bandwidth: float, sr: int) -> np.ndarray:
    from scipy.signal import lfilter  # scipy.signal costs seconds; only a first demo run pays

    r = np.exp(-np.pi * bandwidth / sr)
    theta = 2 * np.pi * freq / sr
    a = [1.0, -2 * r * np.cos(theta), r * r]
    return lfilter([1.0 - r], a, signal)


def synthesize_vowel(
    vowel: str, f0: float, amplitude: float, duration_s: float, rng: np.random.Generator
) -> np.ndarray:
    """One voiced vowel as float32 in [-1, 1]."""
    n = int(duration_s * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    vibrato = 1.0 + 0.02 * np.sin(2 * np.pi * rng.uniform(4.0, 6.0) * t)
    jitter = 1.0 + 0.005 * rng.standard_normal(n).cumsum() / np.sqrt(np.arange(1, n + 1))
    phase = np.cumsum(f0 * vibrato * jitter) / SAMPLE_RATE
    source = (phase % 1.0) - 0.5  # sawtooth: a crude glottal flow derivative
    source += 0.01 * rng.standard_normal(n)  # aspiration noise
    out = source
    for freq, bw in zip(_FORMANTS[vowel], (80.0, 100.0, 120.0), strict=True):
        out = _resonator(out, freq, bw, SAMPLE_RATE)
    ramp = min(n // 4, int(0.05 * SAMPLE_RATE))
    envelope = np.ones(n)
    envelope[:ramp] = np.linspace(0.0, 1.0, ramp)
    envelope[n - ramp :] = np.linspace(1.0, 0.0, ramp)
    out = out * envelope
    out = amplitude * out / np.max(np.abs(out))
    return out.astype(np.float32)


def ensure_demo_corpus(root: Path, n_clips: int = 24, seed: int = 0) -> Path:
    """Write the demo corpus under ``root`` (once) and return its ``labels.csv``.

    The corpus is a pure function of ``(n_clips, seed, DEMO_VERSION)``; a marker file records
    them so a changed request regenerates it.
    """
    if n_clips < 2:
        raise ValueError("the demo corpus needs at least 2 clips")
    root = Path(root)
    marker = root / f".complete-v{DEMO_VERSION}-n{n_clips}-s{seed}"
    labels = root / "labels.csv"
    if marker.exists() and labels.exists():
        return labels
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob(".complete-*"):
        old.unlink()
    rng = np.random.default_rng(seed)
    rows = []
    vowels = sorted(_FORMANTS)
    for i in range(n_clips):
        label = "low" if i % 2 == 0 else "high"
        vowel = vowels[(i // 2) % len(vowels)]
        mean_f0, amplitude = _CLASSES[label]
        f0 = mean_f0 * rng.uniform(0.9, 1.1)
        duration = float(rng.uniform(1.0, 6.0))
        signal = synthesize_vowel(vowel, f0, amplitude * rng.uniform(0.85, 1.0), duration, rng)
        name = f"{label}_{vowel}_{i:03d}.wav"
        sf.write(root / name, signal, SAMPLE_RATE, subtype="PCM_16")
        rows.append({"path": name, "label": label, "vowel": vowel, "f0_hz": round(f0, 2)})
    with labels.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    marker.touch()
    return labels
