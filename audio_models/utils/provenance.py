"""Provenance: git state, package versions, dataset fingerprints and file hashes."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

from audio_models.utils.paths import PROJECT_ROOT, in_checkout

# Packages whose versions decide the numbers a run produces; logged as tags on every run.
MISSION_PACKAGES: tuple[str, ...] = (
    "torch",
    "torchaudio",
    "lightning",
    "hydra-core",
    "omegaconf",
    "transformers",
    "sentencepiece",
    "whisperx",
    "librosa",
    "opensmile",
    "scikit-learn",
    "scipy",
    "numpy",
    "mlflow",
    "pyarrow",
    "soundfile",
)


def package_versions(names: Iterable[str] = MISSION_PACKAGES) -> dict[str, str]:
    """Installed version of each package, ``"not-installed"`` where absent."""
    versions: dict[str, str] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not-installed"
    return versions


def git_state(repo: Path | None = None) -> tuple[str, bool]:
    """The commit checked out in ``repo`` (default: the project's checkout) and whether
    tracked files differ from it.

    Returns ``("unknown", False)`` outside a git checkout (an installed wheel, say: there the
    enclosing repository, if any, is the user's, not the one that produced the numbers).
    """
    if repo is None:
        if not in_checkout():
            return "unknown", False
        repo = PROJECT_ROOT
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False
    return commit, bool(status.strip())


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks so large files do not load into memory."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint_files(paths: Iterable[Path], root: Path | None = None) -> str:
    """Hash of (relative path, size, mtime) of every file: changes when the data changes.

    Cheap by design (no content reads), so it runs on large corpora before extraction starts.
    """
    digest = hashlib.sha256()
    for path in sorted({Path(p) for p in paths}):
        name = path.relative_to(root).as_posix() if root is not None else path.as_posix()
        try:
            stat = path.stat()
            digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:  # missing or a symlink loop: the item fails later, the hash notes it
            digest.update(f"{name}\0unreadable\n".encode())
    return digest.hexdigest()
