"""Benchmark: how soon a command answers, and what a run pays besides its predict loop.

    python -m benchmarks.startup [--n-files 240] [--repeats 3] [--corpus DIR]

Prints, from one run on this machine (each figure the best of ``--repeats`` subprocesses,
as seconds and as a ratio to ``python -c "import torch"``):

- ``import torch``;
- ``python -m runners.extract --cfg job``;
- a typo (``extractor=egemapz``) until its error; a missing dataset root until its error;
- the whole-command overhead of ``egemaps`` (the whole ``python -m runners.extract`` minus
  the predict loop it reports) on the demo corpus and on the benchmark corpus (real speech,
  as ``benchmarks.extract`` builds it), and that command's own time.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.extract import build_corpus, run_command


def _timed(args: list[str], cwd: Path, expect: int = 0) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - started
    if proc.returncode != expect:
        raise RuntimeError(
            f"{' '.join(args)} exited {proc.returncode} (expected {expect}):\n{proc.stderr[-2000:]}"
        )
    return wall, proc.stdout + proc.stderr


def _best(repeats: int, args: list[str], cwd: Path, expect: int = 0) -> float:
    return min(_timed(args, cwd, expect)[0] for _ in range(repeats))


def _run_extract(tmp: Path, name: str, *overrides: str) -> tuple[float, float]:
    return run_command(tmp, tmp / name, *overrides)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-files", type=int, default=240)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="loader workers of the runs")
    parser.add_argument("--corpus", type=Path, default=None, help="reuse/keep the corpus here")
    args = parser.parse_args(argv)
    python = sys.executable
    rows: list[tuple[str, float]] = []

    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        runner = [python, "-m", "runners.extract", "tracking=off", f"hydra.run.dir={tmp}/h"]
        torch_s = _best(args.repeats, [python, "-c", "import torch"], tmp)
        rows.append(("import torch", torch_s))
        rows.append(("--cfg job", _best(args.repeats, [*runner, "--cfg", "job"], tmp)))
        rows.append(
            ("typo until its error", _best(args.repeats, [*runner, "extractor=egemapz"], tmp, 2))
        )
        missing = [*runner, "dataset=folder", f"dataset.root={tmp}/nonexistent"]
        rows.append(("missing root until its error", _best(args.repeats, missing, tmp, 2)))

        corpus = args.corpus or tmp / "corpus"
        files = build_corpus(corpus, args.n_files)
        for f in files:  # warm the page cache so no run pays the first read
            f.read_bytes()
        _run_extract(tmp, "warm", "loader.num_workers=0")  # the demo corpus, built once
        folder = ["dataset=folder", f"dataset.root={corpus}"]
        cases = [("demo corpus", []), (f"benchmark corpus ({len(files)} files)", folder)]
        for j, (label, overrides) in enumerate(cases):
            runs = [
                _run_extract(tmp, f"run{j}-{i}", f"loader.num_workers={args.workers}", *overrides)
                for i in range(args.repeats)
            ]
            wall, loop = min(runs, key=lambda r: r[0] - r[1])
            rows.append((f"egemaps {label}: whole-command overhead", wall - loop))
            print(f"egemaps {label}: whole command {wall:.1f} s, predict loop {loop:.1f} s")

    width = max(len(name) for name, _ in rows)
    print(f"{'what':<{width}}  seconds  × import torch")
    for name, seconds in rows:
        print(f"{name:<{width}}  {seconds:7.2f}  {seconds / torch_s:6.2f}")


if __name__ == "__main__":
    main()
