"""Run a runner under ``python -X importtime`` and check which heavy libraries it imported
before it answered (shared by the fail-fast tests)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

HEAVY = ("torch", "lightning", "torchmetrics", "transformers", "opensmile", "sklearn")


def _imported(stderr: str) -> set[str]:
    return set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", stderr, re.MULTILINE))


def run_light(
    tmp_path: Path, runner: str, *args: str, allow: tuple[str, ...] = ()
) -> tuple[subprocess.CompletedProcess[str], str]:
    command = [sys.executable, "-X", "importtime", "-m", runner, *args]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    report = "\n".join(line for line in proc.stderr.splitlines() if line.startswith("import time:"))
    message = "\n".join(
        line for line in proc.stderr.splitlines() if not line.startswith("import time:")
    )
    heavy = {m for m in _imported(report) if m.split(".")[0] in set(HEAVY) - set(allow)}
    assert not heavy, f"imported before the error: {sorted(heavy)[:8]}"
    return proc, message
