"""The one place that talks to MLflow."""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from audio_models.utils.errors import UserError
from audio_models.utils.provenance import sha256_file

log = logging.getLogger(__name__)

_MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
_BATCH = 100  # MLflow's limit on params per log_batch call


# Config keys whose values must never reach MLflow or logged files.
_SECRET = re.compile(r"(token|secret|password|passwd|api[_-]?key|credential|auth)", re.IGNORECASE)
REDACTED = "***"


def redact(value: Any) -> Any:
    """A copy of a config container with secret-looking keys' values replaced by ``***``.

    Also masks ``user:password@`` in URIs (a tracking URI with credentials, say).
    """
    if isinstance(value, Mapping):
        return {
            k: REDACTED if _SECRET.search(str(k)) and v is not None else redact(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str):
        masked = re.sub(r"(://[^/:@\s]+):[^@/\s]+@", r"\1:" + REDACTED + "@", value)
        key, sep, _ = masked.partition("=")  # a Hydra override "hf_token=abc"
        if sep and _SECRET.search(key):
            return f"{key}={REDACTED}"
        return masked
    return value


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


class _RetryingClient:
    """An ``MlflowClient`` whose calls retry while a SQLite store is locked.

    Parallel sweep jobs share one SQLite file; SQLite lets one writer in at a time and the
    others fail with "database is locked" once its busy timeout passes. Each call is retried
    with jittered backoff for up to ``patience_s`` instead of losing the job's record.
    """

    def __init__(self, client: Any, patience_s: float = 120.0) -> None:
        self._client = client
        self._patience_s = patience_s

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._retry(attr, *args, **kwargs)

        return call

    def _retry(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        deadline = time.monotonic() + self._patience_s
        delay = 0.05
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if "database is locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 2.0)


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """A clear error, before any work, when an HTTP tracking server does not answer."""
    import requests

    url = uri.rstrip("/") + "/health"
    try:
        response = requests.get(url, timeout=timeout_s)
        response.raise_for_status()
    except requests.RequestException as exc:
        raise UserError(
            f"the MLflow tracking server at {redact(uri)} cannot be reached ({type(exc).__name__}:"
            f" {str(exc).splitlines()[0][:200]}); start it (mlflow server …, see the README) or "
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
    """

    def __init__(
        self,
        *,
        uri: str = "sqlite:///mlflow.db",
        experiment: str = "audio-models",
        artifact_location: str | None = "mlartifacts",
        max_artifact_mb: float = 100.0,
    ) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.experiment = experiment
        self.artifact_location = artifact_location
        self.max_artifact_mb = max_artifact_mb
        if uri.startswith(("http://", "https://")):
            check_reachable(uri)
        self.client = _RetryingClient(MlflowClient(tracking_uri=uri))
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
        self.client.log_text(self.run_id, text, name)

    def log_file(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)
