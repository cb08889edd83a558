"""Local git repositories for the upstream-pin tests (not a test module: test_repos,
test_ser and test_reproduce build their upstreams here)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

HEADER = "key,repository,commit,env,package,release,role,license\n"


def git(cwd: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.org",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.org",
    }
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True, env=env
    ).stdout.strip()


def make_repo(path: Path, n_commits: int = 3, package: str | None = None) -> list[str]:
    path.mkdir(parents=True)
    git(path, "init", "--quiet", "-b", "main")
    commits = []
    for i in range(n_commits):
        (path / "model.txt").write_text(f"weights v{i}\n")
        if package:
            (path / package).mkdir(exist_ok=True)
            (path / package / "__init__.py").write_text(f"VERSION = {i}\n")
            (path / "pyproject.toml").write_text(
                f'[project]\nname = "{package}"\nversion = "0.{i}"\n'
                '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
            )
        git(path, "add", "-A")
        git(path, "commit", "--quiet", "-m", f"commit {i}")
        commits.append(git(path, "rev-parse", "HEAD"))
    return commits
