"""The one place that talks to MLflow."""

from __future__ import annotations

import itertools
import json
import logging
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from audio_models.utils.errors import UserError
from audio_models.utils.provenance import sha256_file

log = logging.getLogger(__name__)

_MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
_BATCH = 100  # MLflow's limit on params per log_batch call


REDACTED = "***"

# What makes a config key secret. Keys are compared by their segments (split at "_", ".", "-",
# any other non-alphanumeric and camelCase humps; lower-cased, trailing digits dropped), not by
# substring: "max_new_tokens", "tokenizer" and "author" are no secrets; "hf_token", "apiKey",
# "DB_PASSWORD" and "sweep.+hf_token" are.
_SECRET_WORDS = frozenset(
    {
        "token",
        "password",
        "passwd",
        "pwd",
        "passphrase",
        "secret",
        "secrets",
        "credential",
        "credentials",
        "auth",
        "authorization",
        "apikey",
        "bearer",
        "cookie",
    }
)
# One-word spellings glue a secret word to another ("hftoken", "dbpassword", "oauth").
_SECRET_ENDINGS = (
    "token",
    "password",
    "passwd",
    "secret",
    "auth",
    "apikey",
    "accesskey",
    "privatekey",
)
# "key" alone names a mapping key, a column, a sort key; next to these words it is a secret.
_SECRET_PAIRS = frozenset(
    {
        ("api", "key"),
        ("access", "key"),
        ("private", "key"),
        ("client", "key"),
        ("session", "key"),
        ("signing", "key"),
        ("encryption", "key"),
        ("master", "key"),
        ("ssh", "key"),
    }
)
# A key ending in "env" ("hf_token_env") holds the *name* of the environment variable that
# carries the secret; the name is kept so that the record says where the token came from.
_NAMES_A_VARIABLE = "env"

# A URI: scheme "://" and everything up to whitespace, a quote or an angle bracket. Hydra
# escapes the values of a sweep's job overrides ("https\://u\:pw@h", "a\ b"), so a backslash
# keeps the character after it, here and in an assigned value.
_URI = re.compile(
    r"\b(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*\\?://)(?P<rest>(?:\\.|[^\s'\"<>`\\])*\\?)"
)
# "key=" as in a Hydra override, a query string or a launch line; the key starts the text or
# follows a space, quote, bracket, comma, "?", "&" or ";". Only a secret key's value is
# consumed (a quoted one whole; else up to a space or quote, commas included: "hf_token=a,b"),
# so that "mirror=x,hf_token=y" (Hydra's override_dirname) still finds the second key.
_ASSIGNED_KEY = re.compile(r"(?<![^\s\"'\[(,{?&;])(?P<key>[+~]{0,2}[A-Za-z_][\w.\-/@]*)=")
_ASSIGNED_VALUE = re.compile(r"'[^']*'?|\"[^\"]*\"?|(?:\\.|[^\s\"'\\])*\\?")


def _segments(key: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", key)  # apiKey -> api Key
    spaced = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1 \2", spaced)  # HFToken -> HF Token
    parts = re.split(r"[^a-z0-9]+", spaced.lower())
    return [p.rstrip("0123456789") for p in parts if p.rstrip("0123456789")]


def is_secret_key(key: str) -> bool:
    """Whether a config key (or an override's, a flattened param's) names a secret."""
    parts = _segments(key)
    if not parts or parts[-1] == _NAMES_A_VARIABLE:
        return False
    return any(p in _SECRET_WORDS or p.endswith(_SECRET_ENDINGS) for p in parts) or any(
        pair in _SECRET_PAIRS for pair in itertools.pairwise(parts)
    )


def _mask_user_info(match: re.Match[str]) -> str:
    # urllib.parse.urlsplit ends the netloc at the first "/", which cuts a password that has
    # one ("mysql://u:pa/ss@db" gives the host "u:pa"); so the user-info ends here at the LAST
    # "@" of the URI and is split at its first ":", as urllib splits a netloc it has found.
    scheme, rest = match["scheme"], match["rest"]
    user_info, at, host = rest.rpartition("@")
    if not at:
        return match[0]
    user, colon, _password = user_info.partition(":")
    if not colon and any(c in user_info for c in "/?#"):
        return match[0]  # an "@" in the path or query ("https://host/@user"): no credentials
    # Without a password the user part alone may be the credential (https://ghp_…@github.com)
    # and cannot be told from a user name, so all of it goes; with one, the user name stays.
    return f"{scheme}{user}:{REDACTED}@{host}" if colon else f"{scheme}{REDACTED}@{host}"


def _mask_assignments(text: str) -> str:
    pieces, done = [], 0
    for match in _ASSIGNED_KEY.finditer(text):
        if match.start() < done or not is_secret_key(match["key"]):
            continue  # inside a value masked already, or nothing to mask
        value = _ASSIGNED_VALUE.match(text, match.end())  # matches "" at the least
        pieces += [text[done : match.end()], REDACTED]
        done = value.end() if value else match.end()
    return "".join([*pieces, text[done:]])


def redact(value: Any) -> Any:
    """The masking pass for everything this project writes or logs.

    Mappings: the value of a secret key (``is_secret_key``) becomes ``***`` (``None`` stays, an
    unset secret); other values are redacted in turn. Lists likewise. Strings, taken as free
    text: ``key=value`` with a secret key (a Hydra override, a launch line, a query string)
    loses its value, and the user-info of every URI is masked (``u:***@host``, or ``***@host``
    when there is no password). Other values are returned as they are; redacting twice changes
    nothing more.
    """
    if isinstance(value, Mapping):
        return {
            k: REDACTED if v is not None and is_secret_key(str(k)) else redact(v)
            for k, v in value.items()
        }
    if isinstance(value, str):
        return _URI.sub(_mask_user_info, _mask_assignments(value))
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        return [redact(v) for v in value]
    return value


class RedactingFilter(logging.Filter):
    """Masks log records with ``redact``: their message and their traceback text."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
            masked = redact(message)
            if masked != message:
                record.msg, record.args = masked, None
            if record.exc_info and not record.exc_text:
                record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        except Exception:  # a filter that raises would break the logging call itself
            pass
        return True


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` → ``{"a.b": "1"}``; lists are kept as JSON."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, list | tuple) else str(value)
            flat[name] = text[:_MAX_PARAM_LEN]
    return flat


class NullTracker:
    """``tracking=off``: logs nothing."""

    run_id: str | None = None

    def start(
        self,
        *,
        run_name: str,
        params: Mapping[str, str],
        tags: Mapping[str, str],
        resume_run_id: str | None = None,
    ) -> None:
        """Open a run, or reopen ``resume_run_id`` (no-op)."""

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        """Record metrics (no-op)."""

    def log_artifacts(self, files: list[Path], *, base: Path) -> None:
        """Attach files (no-op)."""

    def log_text(self, text: str, name: str) -> None:
        """Attach a text file (no-op)."""

    def log_file(self, path: Path) -> None:
        """Attach one file at the artifact root (no-op)."""

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Add tags to the open run (no-op)."""

    def end(self, status: str = "FINISHED") -> None:
        """Close the run (no-op)."""


def _while_locked(
    fn: Callable[..., Any], *args: Any, patience_s: float, store: str, **kwargs: Any
) -> Any:
    """``fn(*args, **kwargs)``, retried with jittered backoff while the SQLite store is locked.

    Parallel sweep jobs share one SQLite file; SQLite lets one writer in at a time and the
    others fail with "database is locked" once its busy timeout passes. After ``patience_s``
    the lock is reported as a ``UserError`` instead of losing the job's record silently.
    """
    deadline = time.monotonic() + patience_s
    delay = 0.05
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if "database is locked" not in str(exc):
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise UserError(
                    f"the MLflow store {store} stayed locked for {patience_s:g} s: another "
                    "process holds a write transaction on it. Rerun when that process is done; "
                    "for many parallel writers use a tracking server (tracking=server)"
                ) from exc
            time.sleep(min(delay * (1 + random.random()), left))
            delay = min(delay * 2, 2.0)


class _RetryingClient:
    """An ``MlflowClient`` whose calls wait (``_while_locked``) while a SQLite store is locked."""

    def __init__(self, client: Any, *, patience_s: float = 120.0, store: str = "") -> None:
        self._client = client
        self._patience_s = patience_s
        self._store = store

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            return _while_locked(
                attr, *args, patience_s=self._patience_s, store=self._store, **kwargs
            )

        return call


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """A clear error, before any work, when an HTTP tracking server does not answer."""
    import requests

    url = uri.rstrip("/") + "/health"
    try:
        response = requests.get(url, timeout=timeout_s)
        response.raise_for_status()
    except requests.RequestException as exc:
        reason = redact(str(exc).splitlines()[0][:200])
        raise UserError(
            f"the MLflow tracking server at {redact(uri)} cannot be reached ({type(exc).__name__}:"
            f" {reason}); start it (mlflow server …, see the README) or "
            "choose tracking=mlflow (a local SQLite store) or tracking=off"
        ) from None


class MlflowTracker(NullTracker):
    """One MLflow run per extraction.

    Args:
        uri: tracking URI; the default SQLite file lives where the command runs.
        experiment: experiment name (created on first use).
        artifact_location: where a new experiment stores artifacts.
        max_artifact_mb: output files larger than this are recorded by path and SHA-256
            (in ``outputs.json``) instead of being copied into the artifact store.
        lock_patience_s: how long every store call, opening the store included, waits for a
            locked SQLite store before it fails with a ``UserError``.

    ``uri`` is kept with its credentials masked (it is what messages show); the client alone
    holds the real one. Params and tags pass ``redact`` here, whoever built them.
    """

    def __init__(
        self,
        *,
        uri: str = "sqlite:///mlflow.db",
        experiment: str = "audio-models",
        artifact_location: str | None = "mlartifacts",
        max_artifact_mb: float = 100.0,
        lock_patience_s: float = 120.0,
    ) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = redact(uri)
        self.experiment = experiment
        self.artifact_location = artifact_location
        self.max_artifact_mb = max_artifact_mb
        if uri.startswith(("http://", "https://")):
            check_reachable(uri)
        # Creating the client opens a SQLite store (its tables, a first query): that is the
        # first contact and meets a lock held by another job like any later call does.
        client = _while_locked(
            MlflowClient, tracking_uri=uri, patience_s=lock_patience_s, store=self.uri
        )
        self.client = _RetryingClient(client, patience_s=lock_patience_s, store=self.uri)
        self.run_id = None

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        location = (
            Path(self.artifact_location).expanduser().resolve().as_uri()
            if self.artifact_location
            else None  # a tracking server's own artifact root
        )
        try:
            return self.client.create_experiment(self.experiment, artifact_location=location)
        except Exception:
            # Another job of a parallel sweep may have created it a moment ago.
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    def start(
        self,
        *,
        run_name: str,
        params: Mapping[str, str],
        tags: Mapping[str, str],
        resume_run_id: str | None = None,
    ) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.exceptions import MlflowException

        params, tags = redact(dict(params)), redact(dict(tags))
        if resume_run_id:
            try:
                self.client.get_run(resume_run_id)
            except MlflowException:
                log.warning(
                    "run %s of the interrupted extraction is not in %s", resume_run_id, self.uri
                )
            else:
                # Same settings, same run: its params stand; it is marked running again.
                self.run_id = resume_run_id
                self.client.update_run(resume_run_id, status="RUNNING")
                self.client.log_batch(
                    resume_run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]
                )
                self.client.set_tag(resume_run_id, "resumed", "true")
                log.info("resuming MLflow run %s at %s", resume_run_id, self.uri)
                return
        if resume_run_id:
            tags = {**tags, "resumed_from": resume_run_id}
        run = self.client.create_run(
            self._experiment_id(), run_name=run_name, tags={k: str(v) for k, v in tags.items()}
        )
        self.run_id = run.info.run_id
        items = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _BATCH])
        self.client.log_batch(self.run_id, tags=[RunTag("mlflow.runName", run_name)])
        log.info("MLflow run %s in experiment %r at %s", self.run_id, self.experiment, self.uri)

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()]
        )

    def log_artifacts(self, files: list[Path], *, base: Path) -> None:
        manifest = []
        for path in files:
            rel = path.relative_to(base)
            size = path.stat().st_size
            entry = {"path": str(path.resolve()), "relative": rel.as_posix(), "bytes": size}
            if size <= self.max_artifact_mb * 1e6:
                parent = rel.parent.as_posix()
                self.client.log_artifact(self.run_id, str(path), None if parent == "." else parent)
                entry["logged"] = True
            else:
                entry["sha256"] = sha256_file(path)
                entry["logged"] = False
            manifest.append(entry)
        self.client.log_dict(self.run_id, {"outputs": manifest}, "outputs.json")

    def log_text(self, text: str, name: str) -> None:
        # Not redacted here: texts are diffs and ledgers that must stay byte-exact; callers
        # redact the data a text is built from.
        self.client.log_text(self.run_id, text, name)

    def log_file(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        tags = redact(dict(tags))
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)
