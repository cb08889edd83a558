"""Hydra multirun sweeps as MLflow parent/child runs.

``SweepCallback`` (registered in ``conf/extract.yaml``) opens a parent run when a multirun
starts and writes ``sweep.json`` into the sweep directory; every job — in this process (basic
launcher) or another one (joblib, SLURM) — reads it and opens its run as a child (tags
``mlflow.parentRunId`` and ``sweep_id``), then appends its outcome to ``sweep_jobs.jsonl``.
When the sweep ends the parent gets the job counts and the failed jobs, and a sweep with a
failed job exits non-zero after every other job has run.

Nothing it writes or logs carries a secret: overrides, params, the ledger, Hydra's
``multirun.yaml`` and the launcher's "#0 : ..." lines all pass ``audio_models.tracking.redact``.
A failure of the callback itself (no parent run, say) fails the sweep.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from audio_models.tracking import RedactingFilter, redact
from audio_models.utils.errors import UserError

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
JOBS_FILE = "sweep_jobs.jsonl"
MULTIRUN_FILE = "multirun.yaml"  # Hydra's record of the sweep's config, in the sweep dir
ROLE_TAG = "audio_models.role"  # "sweep" on parent runs
# Where Hydra's launchers log "#<job> : <overrides>" (a logger's own filter: Hydra replaces the
# handlers whenever it configures logging, between jobs too).
_LAUNCHER_LOGGERS = (
    "hydra._internal.core_plugins.basic_launcher",
    "hydra_plugins.hydra_joblib_launcher._core",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher",
)


@dataclass(frozen=True)
class SweepJob:
    """What a multirun job knows about its sweep."""

    sweep_dir: Path
    sweep_id: str
    parent_run_id: str | None
    job_num: int
    overrides: list[str]

    def record(self, status: str, run_id: str | None, error: str | None = None) -> None:
        """Append this job's outcome to the sweep's ledger (one short line, one write)."""
        line = json.dumps(
            {
                "job": self.job_num,
                "overrides": redact(self.overrides),
                "status": status,
                "run_id": run_id,
                "error": redact(error),
            }
        )
        fd = os.open(self.sweep_dir / JOBS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)


def current_job() -> SweepJob | None:
    """The sweep of the running Hydra job, or ``None`` outside a multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN:
        return None
    sweep_dir = Path(hydra.sweep.dir).resolve()
    info = _read_sweep_file(sweep_dir)
    return SweepJob(
        sweep_dir=sweep_dir,
        sweep_id=info.get("sweep_id") or sweep_dir.name,
        parent_run_id=info.get("parent_run_id"),
        job_num=int(hydra.job.num),
        overrides=list(hydra.overrides.task),
    )


def _read_sweep_file(sweep_dir: Path) -> dict[str, Any]:
    path = sweep_dir / SWEEP_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _tracker(config: DictConfig) -> Any:
    from hydra.utils import instantiate

    return instantiate(config.tracking)


def sweep_params(overrides: list[str]) -> dict[str, str]:
    """The parent run's ``sweep.<key>`` params, one per override, values masked.

    Hydra's "+"/"++"/"~" prefixes are dropped ("+hf_token=x" is ``sweep.hf_token``): MLflow
    rejects "+" in a param name, and that used to leave the sweep without its parent run.
    """
    params = {}
    for override in overrides:
        key, sep, value = override.partition("=")
        name = re.sub(r"[^\w.\- :/]", "_", key.lstrip("+~"))  # what MLflow allows in a name
        if key.startswith("~"):
            value = f"(deleted) {value}".strip() if sep else "(deleted)"
        params[f"sweep.{name}"] = value
    return redact(params)


def _redact_yaml_file(path: Path) -> None:
    """Rewrite a YAML file Hydra wrote with its secrets masked (atomically: parallel jobs may
    do the same at once; interpolations are kept as they are)."""
    if not path.is_file():
        return
    container = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    masked = redact(container)
    if masked == container:
        return
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    partial.write_text(OmegaConf.to_yaml(OmegaConf.create(masked)))
    os.replace(partial, path)


def _mask_launch_lines() -> None:
    for name in _LAUNCHER_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(RedactingFilter())


def _fail(what: str, exc: BaseException) -> NoReturn:
    """End the sweep: Hydra only warns when a callback raises an ``Exception``."""
    print(f"error: {what}: {redact(f'{type(exc).__name__}: {exc}')}", file=sys.stderr)
    raise SystemExit(2 if isinstance(exc, UserError) else 1) from None


class SweepCallback(Callback):
    """Opens the sweep's parent run and closes it with the jobs' outcomes; masks secrets in
    what Hydra writes and logs (``multirun.yaml``, ``.hydra/`` if enabled, the job's log)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _mask_launch_lines()  # before the launcher logs its first line
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        tracker = None
        try:
            sweep_dir.mkdir(parents=True, exist_ok=True)
            (sweep_dir / JOBS_FILE).unlink(missing_ok=True)
            sweep_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
            overrides = [str(o) for o in config.hydra.overrides.task]
            info: dict[str, Any] = {"sweep_id": sweep_id, "overrides": redact(overrides)}
            tracker = _tracker(config)
            if tracker.run_id is None and hasattr(tracker, "client"):
                # Created here, before the jobs start: the store's tables and the experiment
                # then exist before parallel jobs race to create them.
                tracker.start(
                    run_name=f"sweep-{sweep_id}",
                    params=sweep_params(overrides),
                    tags={ROLE_TAG: "sweep", "sweep_id": sweep_id, "sweep_dir": str(sweep_dir)},
                )
                info["parent_run_id"] = tracker.run_id
                info["tracking_uri"] = redact(tracker.uri)
            (sweep_dir / SWEEP_FILE).write_text(json.dumps(info, indent=1))
            log.info("sweep %s in %s (parent run %s)", sweep_id, sweep_dir, tracker.run_id)
        except Exception as exc:
            # Without sweep.json the jobs would run as unlinked runs under a parent left
            # RUNNING: stop before any job starts, the parent (if any) marked FAILED.
            if tracker is not None and getattr(tracker, "run_id", None) is not None:
                try:
                    tracker.end("FAILED")
                except Exception:
                    log.warning("the sweep's parent run %s stays open", tracker.run_id)
            _fail("the sweep could not start", exc)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.types import RunMode

        # This job's own log lines (console and <job>.log), tracebacks included.
        for handler in logging.getLogger().handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())
        hydra = config.hydra
        if hydra.output_subdir is not None:  # re-enabled by the user: Hydra wrote raw values
            for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
                _redact_yaml_file(Path(hydra.runtime.output_dir) / hydra.output_subdir / name)
        if hydra.mode == RunMode.MULTIRUN:
            # Hydra writes multirun.yaml after on_multirun_start, before the first job:
            # the first job to start masks it (on_multirun_end again, for a sweep of none).
            _redact_yaml_file(Path(hydra.sweep.dir) / MULTIRUN_FILE)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            failed, n_jobs = self._close(config)
        except Exception as exc:
            _fail("the sweep's record could not be completed", exc)
        if failed:
            for job in failed:
                overrides = " ".join(redact(job["overrides"]))
                print(
                    f"sweep job {job['job']} ({overrides}) failed: {redact(job['error'])}",
                    file=sys.stderr,
                )
            print(f"error: {len(failed)} of {n_jobs} sweep jobs failed", file=sys.stderr)
            # Raised past Hydra's callback guard on purpose: the sweep's exit code says it.
            raise SystemExit(1)

    def _close(self, config: DictConfig) -> tuple[list[dict[str, Any]], int]:
        """Mask ``multirun.yaml``, give the parent run the jobs' outcomes and close it."""
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        _redact_yaml_file(sweep_dir / MULTIRUN_FILE)
        info = _read_sweep_file(sweep_dir)
        jobs = []
        ledger = sweep_dir / JOBS_FILE
        if ledger.is_file():
            jobs = [json.loads(line) for line in ledger.read_text().splitlines() if line.strip()]
        failed = [j for j in jobs if j["status"] != "FINISHED"]
        parent = info.get("parent_run_id")
        if parent:
            tracker = _tracker(config)
            tracker.run_id = parent
            try:
                tracker.log_metrics({"n_jobs": len(jobs), "n_failed_jobs": len(failed)})
                tracker.set_tags(
                    {
                        "failed_jobs": json.dumps(
                            [{"job": j["job"], "overrides": j["overrides"]} for j in failed]
                        )[:5000]
                    }
                )
                tracker.log_text("\n".join(json.dumps(j) for j in jobs) + "\n", JOBS_FILE)
            except Exception:
                # An incomplete record is a failed one, not one that looks still running.
                try:
                    tracker.end("FAILED")
                except Exception:
                    log.warning("the sweep's parent run %s stays open", parent)
                raise
            tracker.end("FAILED" if jobs and len(failed) == len(jobs) else "FINISHED")
        return failed, len(jobs)
