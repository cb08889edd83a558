"""Upstream research repositories: the pins in ``requirements.csv`` and their checkouts.

Each row names a repository, the commit the project is pinned to and an environment variable
that points at the user's own checkout instead. :func:`resolve` says where a repository is and
what state it is in; :func:`setup_repo` clones/moves checkouts; :func:`provenance_tags` is what
every MLflow run records.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from audio_models.utils.errors import UserError
from audio_models.utils.paths import default_external_dir, default_requirements_path

REQUIRED_COLUMNS = ("key", "repository", "commit", "env", "role", "license")
_SHA = re.compile(r"^[0-9a-f]{40}$")
_KEY = re.compile(r"^[a-z][a-z0-9_]*$")
_ENV = re.compile(r"^[A-Z][A-Z0-9_]*$")


class RepoError(UserError):
    """An upstream repository cannot be used; the message says how to fix it."""


def requirements_path() -> Path:
    """``$AUDIO_MODELS_REQUIREMENTS`` or the project's ``requirements.csv``."""
    return Path(os.environ.get("AUDIO_MODELS_REQUIREMENTS", default_requirements_path()))


def external_dir() -> Path:
    """``$AUDIO_MODELS_EXTERNAL``, else ``<checkout>/external/audio`` (installed from a wheel:
    ``<cache>/external``, see :func:`audio_models.utils.paths.default_external_dir`)."""
    return Path(os.environ.get("AUDIO_MODELS_EXTERNAL", default_external_dir()))


@dataclass(frozen=True)
class Upstream:
    """One row of ``requirements.csv``."""

    key: str
    repository: str
    commit: str
    env: str
    role: str
    license: str
    package: str = ""  # importable package of the same project, if any
    release: str = ""  # the registry release the pinned commit corresponds to

    @property
    def name(self) -> str:
        """Folder name of the checkout: the repository URL's last component."""
        tail = self.repository.rstrip("/").rsplit("/", 1)[-1]
        return tail.removesuffix(".git")

    @property
    def default_path(self) -> Path:
        return external_dir() / self.name


def read_requirements(path: Path | None = None) -> list[Upstream]:
    """Read and validate ``requirements.csv``.

    Raises:
        RepoError: naming the file and row for a missing column, empty field, malformed commit,
            key or variable name, or a duplicate key.
    """
    path = Path(path) if path is not None else requirements_path()
    if not path.is_file():
        raise RepoError(f"{path} does not exist")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise RepoError(f"{path}: missing columns {missing} (has {columns})")
        rows: list[Upstream] = []
        seen: dict[str, int] = {}
        for line, row in enumerate(reader, start=2):
            where = f"{path}:{line} (key {row.get('key')!r})"
            if None in row or any(row.get(c) is None for c in columns):
                raise RepoError(f"{where}: wrong number of fields")
            values = {k: (v or "").strip() for k, v in row.items() if k is not None}
            empty = [c for c in REQUIRED_COLUMNS if not values[c]]
            if empty:
                raise RepoError(f"{where}: empty {empty}")
            if not _KEY.match(values["key"]):
                raise RepoError(f"{where}: key must be lower_snake_case")
            if not _SHA.match(values["commit"]):
                raise RepoError(f"{where}: commit {values['commit']!r} is not a full 40-hex SHA")
            if not _ENV.match(values["env"]):
                raise RepoError(f"{where}: env {values['env']!r} is not a variable name")
            if values["key"] in seen:
                raise RepoError(f"{where}: duplicate key, first at line {seen[values['key']]}")
            seen[values["key"]] = line
            rows.append(Upstream(**{f: values.get(f, "") for f in Upstream.__dataclass_fields__}))
    return rows


def get_upstream(key: str, requirements: list[Upstream] | None = None) -> Upstream:
    rows = requirements if requirements is not None else read_requirements()
    for row in rows:
        if row.key == key:
            return row
    raise RepoError(f"no upstream {key!r} in requirements.csv (keys: {[r.key for r in rows]})")


# -- git ----------------------------------------------------------------------------------


def _git(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}  # never hang on a credential prompt
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout, proc.stderr)
    return proc


def is_checkout(path: Path) -> bool:
    if not path.is_dir():
        return False
    proc = _git(path, "rev-parse", "--show-toplevel", check=False)
    return proc.returncode == 0 and Path(proc.stdout.strip()).resolve() == path.resolve()


def head(path: Path) -> str:
    return _git(path, "rev-parse", "HEAD").stdout.strip()


def is_dirty(path: Path) -> bool:
    """Tracked files differ from HEAD (untracked build litter does not count)."""
    return bool(_git(path, "status", "--porcelain", "--untracked-files=no").stdout.strip())


def blob_at(path: Path, commit: str, relpath: str) -> str | None:
    """Object id of ``relpath`` at ``commit`` (``None`` when either is unknown there)."""
    proc = _git(path, "rev-parse", f"{commit}:{relpath}", check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def uncommitted_diff(path: Path) -> str:
    return _git(path, "diff", "HEAD", "--binary").stdout


# -- state --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RepoState:
    """Where an upstream is and whether it matches its pin.

    ``source`` is ``checkout`` (under ``external/audio``), ``env`` (the override variable),
    ``package==<version>`` (only the registry release is installed) or ``missing``.
    """

    key: str
    path: Path | None
    source: str
    commit: str | None
    pinned: str
    dirty: bool = False
    diff_sha256: str | None = None

    @property
    def matches_pin(self) -> bool:
        return self.commit == self.pinned

    def tags(self) -> dict[str, str]:
        prefix = f"repo.{self.key}"
        return {
            f"{prefix}.commit": self.commit or "unknown",
            f"{prefix}.pinned": self.pinned,
            f"{prefix}.matches_pin": str(self.matches_pin).lower(),
            f"{prefix}.dirty": str(self.dirty).lower(),
            f"{prefix}.source": self.source,
        }


def _checkout_state(up: Upstream, path: Path, source: str) -> RepoState:
    dirty = is_dirty(path)
    diff_hash = hashlib.sha256(uncommitted_diff(path).encode()).hexdigest() if dirty else None
    return RepoState(up.key, path, source, head(path), up.commit, dirty, diff_hash)


def _missing_message(up: Upstream) -> str:
    return (
        f"upstream {up.key!r} ({up.repository}) is not checked out: run "
        f"`python -m audio_models.scripts.setup_audio_repos --only {up.key}` or set {up.env} "
        "to an existing checkout"
    )


def inspect(up: Upstream) -> RepoState:
    """The state of one upstream, never raising for a missing checkout."""
    override = os.environ.get(up.env)
    if override:
        path = Path(override).expanduser()
        if not is_checkout(path):
            raise RepoError(
                f"{up.env}={override} is not a git checkout (upstream {up.key!r}, {up.repository})"
            )
        return _checkout_state(up, path, "env")
    if is_checkout(up.default_path):
        return _checkout_state(up, up.default_path, "checkout")
    if up.package:
        try:
            version = metadata.version(up.package)
        except metadata.PackageNotFoundError:
            version = None
        if version is not None:
            # The registry release is the pinned commit only when it is the release the pin
            # was taken from (requirements.csv says which).
            commit = up.commit if version == up.release else None
            return RepoState(up.key, None, f"package=={version}", commit, up.commit)
    return RepoState(up.key, None, "missing", None, up.commit)


def resolve(key: str, requirements: list[Upstream] | None = None) -> RepoState:
    """The checkout of upstream ``key`` (override variable first, then ``external/audio``).

    Raises:
        RepoError: when there is no checkout, pointing at ``setup_audio_repos`` and the variable.
    """
    up = get_upstream(key, requirements)
    state = inspect(up)
    if state.path is None:
        raise RepoError(_missing_message(up))
    return state


def provenance_tags(requirements: list[Upstream] | None = None) -> dict[str, str]:
    """``repo.<key>.*`` tags for every upstream (a broken override is recorded, not raised)."""
    tags: dict[str, str] = {}
    for up in requirements if requirements is not None else read_requirements():
        try:
            tags.update(inspect(up).tags())
        except RepoError as exc:
            tags[f"repo.{up.key}.source"] = f"error: {exc}"[:250]
    return tags


# -- set-up -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SetupResult:
    key: str
    ok: bool
    message: str


def _fetch_pin(path: Path, up: Upstream) -> None:
    # A shallow, blob-less fetch of exactly the pinned commit; servers that refuse fetching
    # by SHA get a full fetch instead.
    proc = _git(
        path, "fetch", "--depth", "1", "--filter=blob:none", "origin", up.commit, check=False
    )
    if proc.returncode != 0:
        _git(path, "fetch", "--filter=blob:none", "--tags", "origin")
    _git(path, "checkout", "--quiet", "--detach", up.commit)


def setup_repo(up: Upstream, *, update: bool = False) -> SetupResult:
    """Bring one upstream to its pin; never moves a checkout with local changes."""
    override = os.environ.get(up.env)
    if override:
        path = Path(override).expanduser()
        if not is_checkout(path):
            return SetupResult(
                up.key, False, f"{up.env}={override} is not a git checkout ({up.repository})"
            )
        actual = head(path)
        if actual != up.commit:
            return SetupResult(
                up.key,
                True,
                f"warning: {up.env}={path} is at {actual}, pinned {up.commit}; used as is",
            )
        return SetupResult(up.key, True, f"using {up.env}={path} at the pin {up.commit[:12]}")
    path = up.default_path
    if path.exists():
        if not is_checkout(path):
            return SetupResult(
                up.key, False, f"{path} exists but is not a git checkout; move it away"
            )
        actual = head(path)
        if actual == up.commit:
            return SetupResult(up.key, True, f"{path} already at the pin {up.commit[:12]}")
        if is_dirty(path):
            return SetupResult(
                up.key,
                False,
                f"{path} has local changes (at {actual[:12]}, pinned {up.commit[:12]}); left as is",
            )
        if not update:
            return SetupResult(
                up.key,
                True,
                f"warning: {path} is at {actual[:12]}, pinned {up.commit[:12]}; --update moves it",
            )
        try:
            _fetch_pin(path, up)
        except subprocess.CalledProcessError as exc:
            return SetupResult(up.key, False, _clone_error(up, exc))
        return SetupResult(
            up.key, True, f"{path} moved from {actual[:12]} to the pin {up.commit[:12]}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        _git(path.parent, "init", "--quiet", str(path))
        _git(path, "remote", "add", "origin", up.repository)
        _fetch_pin(path, up)
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(path, ignore_errors=True)  # no half-made checkout left behind
        return SetupResult(up.key, False, _clone_error(up, exc))
    return SetupResult(up.key, True, f"cloned {up.repository} at {up.commit[:12]} into {path}")


def _clone_error(up: Upstream, exc: subprocess.CalledProcessError) -> str:
    detail = (exc.stderr or "").strip().splitlines()
    last = detail[-1] if detail else f"git exited with {exc.returncode}"
    return (
        f"cannot fetch {up.key} from {up.repository} at {up.commit}: {last}. "
        f"Without network access, set {up.env} to an existing checkout."
    )


def import_origin(up: Upstream) -> str:
    """Where the running environment imports the upstream's package from."""
    if not up.package:
        return "-"
    spec = importlib.util.find_spec(up.package)
    if spec is None or spec.origin is None:
        return "not installed"
    origin = Path(spec.origin).resolve()
    try:
        state_path = inspect(up).path
    except RepoError:
        state_path = None
    if state_path is not None and origin.is_relative_to(state_path.resolve()):
        return f"checkout ({origin.parent})"
    try:
        return f"registry release {metadata.version(up.package)} ({origin.parent})"
    except metadata.PackageNotFoundError:
        return f"other ({origin.parent})"


def install_editable(up: Upstream, *, python: str | None = None) -> SetupResult:
    """Install the upstream's checkout in editable mode into ``python``'s environment.

    ``python`` defaults to the running interpreter.
    """
    python = python or sys.executable
    if not up.package:
        return SetupResult(up.key, False, f"{up.key} is not a Python package (no package column)")
    try:
        state = resolve(up.key, [up])
    except RepoError as exc:
        return SetupResult(up.key, False, str(exc))
    # uv when it is around (a uv-made venv has no pip), else the environment's own pip.
    uv = shutil.which("uv")
    if uv is not None:
        command = [uv, "pip", "install", "--python", python, "--no-deps", "-e", str(state.path)]
    else:
        command = [python, "-m", "pip", "install", "--no-deps", "-e", str(state.path)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        return SetupResult(up.key, False, f"editable install failed: {proc.stderr.strip()[-500:]}")
    return SetupResult(up.key, True, f"{up.package} now imports from {state.path} (editable)")
