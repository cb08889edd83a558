"""Hydra multirun sweeps as MLflow parent/child runs.

``SweepCallback`` (registered in ``conf/extract.yaml``) opens a parent run when a multirun
starts and writes ``sweep.json`` into the sweep directory; every job — in this process (basic
launcher) or another one (joblib, SLURM) — reads it and opens its run as a child (tags
``mlflow.parentRunId`` and ``sweep_id``), then appends its outcome to ``sweep_jobs.jsonl``.
When the sweep ends the parent gets the job counts and the failed jobs, and a sweep with a
failed job exits non-zero after every other job has run.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
JOBS_FILE = "sweep_jobs.jsonl"
ROLE_TAG = "audio_models.role"  # "sweep" on parent runs


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
                "overrides": self.overrides,
                "status": status,
                "run_id": run_id,
                "error": error,
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


class SweepCallback(Callback):
    """Opens the sweep's parent run and closes it with the jobs' outcomes."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / JOBS_FILE).unlink(missing_ok=True)
        sweep_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        overrides = [str(o) for o in config.hydra.overrides.task]
        info: dict[str, Any] = {"sweep_id": sweep_id, "overrides": overrides}
        tracker = _tracker(config)
        if tracker.run_id is None and hasattr(tracker, "client"):
            # Created here, before the jobs start: the store's tables and the experiment
            # then exist before parallel jobs race to create them.
            tracker.start(
                run_name=f"sweep-{sweep_id}",
                params={f"sweep.{o.split('=', 1)[0]}": o.split("=", 1)[-1] for o in overrides},
                tags={ROLE_TAG: "sweep", "sweep_id": sweep_id, "sweep_dir": str(sweep_dir)},
            )
            info["parent_run_id"] = tracker.run_id
            info["tracking_uri"] = tracker.uri
        (sweep_dir / SWEEP_FILE).write_text(json.dumps(info, indent=1))
        log.info("sweep %s in %s (parent run %s)", sweep_id, sweep_dir, info.get("parent_run_id"))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
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
            tracker.log_metrics({"n_jobs": len(jobs), "n_failed_jobs": len(failed)})
            tracker.set_tags(
                {
                    "failed_jobs": json.dumps(
                        [{"job": j["job"], "overrides": j["overrides"]} for j in failed]
                    )[:5000]
                }
            )
            tracker.log_text("\n".join(json.dumps(j) for j in jobs) + "\n", JOBS_FILE)
            tracker.end("FAILED" if jobs and len(failed) == len(jobs) else "FINISHED")
        if failed:
            for job in failed:
                print(
                    f"sweep job {job['job']} ({' '.join(job['overrides'])}) failed: {job['error']}",
                    file=sys.stderr,
                )
            print(f"error: {len(failed)} of {len(jobs)} sweep jobs failed", file=sys.stderr)
            # Raised past Hydra's callback guard on purpose: the sweep's exit code says it.
            raise SystemExit(1)
