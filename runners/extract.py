"""``python -m runners.extract``: features for a dataset, to Parquet, logged in MLflow.

Examples:
    python -m runners.extract                                  # egemaps on the demo corpus
    python -m runners.extract extractor=compare dataset=folder dataset.root=/data/corpus
    python -m runners.extract extractor=fbank device=cuda
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import resource
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

# Only what checking a configuration and listing a dataset need is imported here: torch,
# Lightning (with torchmetrics behind it) and the extractors' libraries are imported by the
# steps that use them, so a typo or a missing dataset root is reported in about a second.
from audio_models.audio import CHANNEL_POLICIES
from audio_models.config import build, run_cli, task
from audio_models.pipeline.device import DeviceSpec, is_launch_rank_zero
from audio_models.sweep import current_job
from audio_models.tracking import NullTracker, flatten, redact
from audio_models.utils.errors import UserError
from audio_models.utils.paths import conf_dir

if TYPE_CHECKING:
    from audio_models.data.datasets import AudioDataset
    from audio_models.data.items import Item
    from audio_models.data.loader import Preflight
    from audio_models.extractor import Extractor
    from audio_models.pipeline.store import OutputStore

log = logging.getLogger("runners.extract")


@dataclass
class ExtractionResult:
    """What one extraction produced."""

    output_dir: Path
    files: list[Path]
    metrics: dict[str, float]
    run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def failure_ratio(self) -> float:
        n = self.metrics["n_items"]
        return self.metrics["n_failed"] / n if n else 0.0


def _overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _peak_rss_mb() -> tuple[float, float]:
    # ru_maxrss is in KiB on Linux; CHILDREN is the largest reaped child (a loader worker).
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


def settings_hash(cfg: DictConfig, extractor: Extractor) -> str:
    """Hash of everything that changes an item's output: extractor config and provenance
    (model revision, weights hash), channel policy, preflight policies, windows and a
    reduced precision."""
    payload = {
        "extractor": OmegaConf.to_container(cfg.extractor, resolve=True),
        "provenance": extractor.provenance(),
        "channel_policy": cfg.loader.channel_policy,
        "preflight": OmegaConf.to_container(cfg.preflight, resolve=True),
    }
    precision = str(cfg.device.get("precision", "32"))
    if precision not in ("32", "32-true"):
        # bf16/fp16 change the numbers: a resume at another precision must not mix them in.
        # (fp32 stays out of the payload, so outputs written before this keep their hash.)
        payload["precision"] = precision
    if cfg.get("segments_from"):  # the segments decide the items: their table's content
        from audio_models.data.windows import segments_table
        from audio_models.utils.provenance import sha256_file

        payload["segments_from"] = sha256_file(segments_table(cfg.segments_from))
    windows = cfg.get("windows")
    if windows is not None and windows.size_s is not None:  # off: older outputs keep their hash
        payload["windows"] = OmegaConf.to_container(windows, resolve=True)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[
        :16
    ]


def _totals(store: OutputStore) -> tuple[int, int, float]:
    """Items written, items failed and audio seconds in the final outputs (all invocations)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    features, failures = store.final_files
    written = audio = 0
    if features.exists():
        durations = pq.read_table(features, columns=["duration_s"]).column(0)
        written, audio = len(durations), float(pc.sum(durations).as_py() or 0.0)
    failed = pq.ParquetFile(failures).metadata.num_rows if failures.exists() else 0
    return written, failed, audio


def _wer_metrics(transcripts: Path, text_column: str) -> dict[str, float]:
    """WER of the written transcripts against the dataset's reference column (items without
    a reference are left out; failed items have no transcript and are not counted)."""
    import pyarrow.parquet as pq

    from audio_models.evaluation import word_error_rate

    if not transcripts.exists():
        return {}
    table = pq.read_table(transcripts, columns=["text", text_column]).to_pylist()
    pairs = [(row[text_column], row["text"]) for row in table if row[text_column] is not None]
    if not pairs:
        return {}
    score = word_error_rate([str(r) for r, _ in pairs], [h or "" for _, h in pairs])
    return {"wer": score.wer, "wer_ref_words": float(score.n_ref_words), "wer_items": len(pairs)}


@dataclass
class _Checked:
    """What :func:`_check` made from the config; the extractor is described, not loaded."""

    tracker: NullTracker
    extractor: Extractor
    dataset: AudioDataset
    items: list[Item]
    device: DeviceSpec


@dataclass
class _Parts:
    """What :func:`_build_parts` made from the config, before any work."""

    tracker: NullTracker
    extractor: Extractor
    dataset: AudioDataset
    items: list[Item]
    device: DeviceSpec
    preflight: Preflight
    used: dict[str, Any]  # upstream key → RepoState of the checkouts the extractor reads
    upstreams: list[Any]


class Interrupted(KeyboardInterrupt):
    """The run was stopped by SIGINT or SIGTERM after committing what it had finished."""

    def __init__(self, signum: int, committed: int = 0, output_dir: Path | None = None) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.committed = committed  # items done in output_dir, this session's and earlier ones
        self.output_dir = output_dir


@contextmanager
def _interruptible() -> Iterator[list[int]]:
    """SIGTERM and SIGINT raise ``KeyboardInterrupt`` in the main thread during the predict
    loop, so Lightning's interrupt path runs the writer's flush even while the loader waits
    on a stuck item; the list receives the signal. The handlers (Lightning leaves SIGINT
    ignored after an interrupt) are put back afterwards."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def stop(signum: int, frame: Any) -> None:
        if not received:
            received.append(signum)
            raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, stop)
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _check(cfg: DictConfig, dataset: AudioDataset | None, rank_zero: bool) -> _Checked:
    """Check step, before torch or any weights: the loader and device settings, the dataset
    (listed and checked: a missing root, manifest or path column fails here), the extractor's
    options (its constructor reads no weights) and the tracking server (an unreachable one
    stops the run before a model loads)."""
    if cfg.loader.channel_policy not in CHANNEL_POLICIES:
        raise UserError(f"loader.channel_policy must be one of {CHANNEL_POLICIES}")
    device: DeviceSpec = build(cfg, "device")
    if (
        device.distributed
        and current_job() is not None
        and os.environ.get("SLURM_NTASKS", "1") == "1"
    ):
        # Lightning starts local ranks by re-running the command line, which in a sweep would
        # re-run the whole sweep; under SLURM every rank is a task of its own instead.
        raise UserError(
            "device=ddp in a local -m sweep is not supported: run each configuration as its own "
            "command, or sweep with hydra/launcher=slurm and tasks_per_node=device.devices"
        )
    if dataset is None:
        dataset = build(cfg, "dataset")
    dataset.check()  # a missing root or manifest: reported at once, before MLflow starts
    # The tracking server before listing: an unreachable one is reported before a large
    # corpus is listed (or the demo corpus generated). Ranks > 0 of a distributed run neither
    # log to MLflow nor clean the output directory: rank 0 does, and merges their outputs.
    tracker: NullTracker = build(cfg, "tracking") if rank_zero else NullTracker()
    items = dataset.items
    if cfg.get("segments_from"):
        from audio_models.data.windows import segment_items

        items = segment_items(items, cfg.segments_from)
    windows = cfg.get("windows")  # absent from configs saved before windows existed
    if windows is not None and windows.size_s is not None:
        from audio_models.data.windows import window_items

        items = window_items(items, windows.size_s, windows.hop_s, windows.last)
    # The extractor's options: its constructor checks them and reads no weights (load() does,
    # in the build step). Some import their own library here (openSMILE), never torch.
    device.check_available()  # imports torch only where a GPU driver is present
    extractor: Extractor = build(cfg, "extractor")
    return _Checked(tracker, extractor, dataset, items, device)


def _build_parts(cfg: DictConfig, checked: _Checked) -> _Parts:
    """Build step: the extractor's weights load here; preflight and the upstream checkouts
    it reads."""
    import lightning as L

    from audio_models.utils.repos import read_requirements, resolve

    L.seed_everything(cfg.seed, verbose=False)
    extractor = checked.extractor
    extractor.load()
    preflight: Preflight = build(cfg, "preflight")
    upstreams = read_requirements()
    used = {key: resolve(key, upstreams) for key in extractor.upstreams}  # fails if missing
    return _Parts(
        checked.tracker,
        extractor,
        checked.dataset,
        checked.items,
        checked.device,
        preflight,
        used,
        upstreams,
    )


def _run_tags(parts: _Parts, config_hash: str, linear_backend: str) -> dict[str, str]:
    from audio_models.audio.io import RESAMPLER
    from audio_models.utils.provenance import git_state, package_versions
    from audio_models.utils.repos import provenance_tags

    commit, dirty = git_state()
    tags = {
        "extractor": parts.extractor.name,
        "dataset": parts.dataset.name,
        "dataset_fingerprint": parts.dataset.fingerprint(),
        "config_hash": config_hash,
        "git_commit": commit,
        "git_dirty": str(dirty).lower(),
        "accelerator": parts.device.resolved_accelerator,
        "resampler": RESAMPLER,
        "cpu_linear_backend": linear_backend,
        **{f"version.{k}": v for k, v in package_versions().items()},
        **{f"provenance.{k}": v for k, v in parts.extractor.provenance().items()},
        # Only the upstreams this extractor reads: an eGeMAPS run tagged with fairseq's pin
        # state reads like a problem it does not have (requirements.csv is logged whole).
        **provenance_tags([up for up in parts.upstreams if up.key in parts.used]),
    }
    job = current_job()
    if job is not None:  # a multirun job: a child of the sweep's parent run
        tags["sweep_id"] = job.sweep_id
        tags["sweep_job"] = str(job.job_num)
        if job.parent_run_id:
            tags["mlflow.parentRunId"] = job.parent_run_id
    return tags


def extract(
    cfg: DictConfig,
    *,
    dataset: AudioDataset | None = None,
    overrides: list[str] | None = None,
) -> ExtractionResult:
    """Run one extraction as configured; see ``conf/extract.yaml``.

    A rerun with the same settings and ``output_dir`` resumes: committed items are skipped.
    The steps: check (config, dataset listing, tracking server; no torch), build (the
    extractor and its weights), plan (output store, writer, loader, tags), run (Lightning's
    predict loop), report (metrics, files, MLflow).

    Args:
        cfg: the composed configuration.
        dataset: items built in Python (``audio_models.extract``) instead of ``cfg.dataset``.
        overrides: what to record in ``overrides.yaml`` (default: Hydra's task overrides).

    Raises:
        UserError: for configuration or dataset problems, before any work starts.
    """
    rank_zero = is_launch_rank_zero()
    parts = _build_parts(cfg, _check(cfg, dataset, rank_zero))
    from audio_models.extractor import OutputKind  # imported by the build step already
    from audio_models.pipeline.store import TRANSCRIPT_TABLES, OutputStore

    extractor = parts.extractor
    config_hash = settings_hash(cfg, extractor)
    output_dir = Path(cfg.output_dir)
    transcribes = extractor.kind == OutputKind.TRANSCRIPT
    if transcribes and cfg.get("windows") is not None and cfg.windows.size_s is not None:
        # A transcript per fixed window cuts words in two; transcribers segment speech
        # themselves (whisperX's VAD). Speech segments (segments_from) are fine.
        raise UserError(f"windows apply to feature extractors, not to {extractor.name}")
    store = OutputStore(
        output_dir,
        config_hash,
        resume=cfg.resume,
        main_name="transcripts.parquet" if transcribes else "features.parquet",
        tables=TRANSCRIPT_TABLES if transcribes else extractor.side_tables,
    )
    if rank_zero:
        store.open()  # locks the directory; other ranks join once the process group is up
    from audio_models.pipeline.progress import quiet_lightning

    try:
        with quiet_lightning():
            return _plan_run_report(cfg, parts, store, config_hash, overrides)
    finally:
        store.release()


def _plan_run_report(
    cfg: DictConfig,
    parts: _Parts,
    store: OutputStore,
    config_hash: str,
    overrides: list[str] | None,
) -> ExtractionResult:
    import lightning as L

    from audio_models.data.loader import ExtractionDataModule
    from audio_models.extractor import OutputKind
    from audio_models.pipeline.module import ExtractionModule
    from audio_models.pipeline.onednn import use_onednn_linears
    from audio_models.pipeline.progress import ProgressLog, ThroughputProgressBar
    from audio_models.pipeline.writer import ParquetFeatureWriter
    from audio_models.utils.repos import requirements_path, uncommitted_diff

    extractor, items, tracker, device = parts.extractor, parts.items, parts.tracker, parts.device
    output_dir = store.output_dir
    # -- plan ------------------------------------------------------------------------------
    writer = ParquetFeatureWriter(
        store,
        kind=extractor.kind,
        feature_names=extractor.feature_names,
        frame_shift_s=extractor.frame_shift_s,
        items=items,
        label_columns=parts.dataset.label_columns,
        extra_columns=extractor.extra_columns,
        row_group_rows=cfg.writer.row_group_rows,
        commit_rows=cfg.loader.batch_size,
        commit_every_s=cfg.writer.commit_every_s,
        feature_groups=extractor.feature_groups,
        storage_dtype=extractor.storage_dtype,
    )
    # A bar on a terminal; in a log file (stderr redirected, a batch job) a line now and then
    # instead of thousands of carriage-return updates.
    show_bar = cfg.progress_bar if cfg.progress_bar is not None else sys.stderr.isatty()
    callbacks: list[L.Callback] = [
        writer,
        (
            ThroughputProgressBar()
            if show_bar
            else ProgressLog(every_s=30.0, total=max(len(items) - len(store.done_keys), 0))
        ),
    ]
    trainer = L.Trainer(
        **device.trainer_kwargs(),
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=show_bar,
        default_root_dir=str(output_dir),
    )
    datamodule = ExtractionDataModule(
        items=items,
        extractor=extractor,
        batch_size=cfg.loader.batch_size,
        num_workers=cfg.loader.num_workers,
        channel_policy=cfg.loader.channel_policy,
        pin_memory=device.resolved_accelerator == "cuda",
        config_hash=config_hash,
        done_keys=frozenset(store.done_keys),
        preflight=parts.preflight,
        item_timeout_s=cfg.loader.item_timeout_s,
        batch_audio_s=(
            cfg.loader.batch_audio_s
            if cfg.loader.batch_audio_s is not None
            else extractor.batch_audio_s
        ),
    )
    network = extractor.torch_module()
    linear_backend = "default"
    if (
        network is not None
        and device.resolved_accelerator == "cpu"
        and device.onednn_linear
        and use_onednn_linears(network)
    ):
        linear_backend = "oneDNN"
    tags = _run_tags(parts, config_hash, linear_backend)
    tags.update(datamodule.sample_rate_tags)  # source_sample_rates of a native-rate corpus
    resolved = OmegaConf.to_container(cfg, resolve=True)
    tracker.start(
        run_name=f"{extractor.name}-{parts.dataset.name}",
        params=flatten(redact(resolved)),
        tags=tags,
        resume_run_id=store.previous_run_id,
    )
    store.save_state(tracker.run_id)  # a killed run resumes into this MLflow run
    writer.run_id = tracker.run_id
    tracker.log_file(requirements_path())
    for key, state in parts.used.items():
        if state.dirty and state.path is not None:
            # Local edits decide the numbers too: keep them with the run.
            tracker.log_text(uncommitted_diff(state.path), f"upstream_diffs/{key}.diff")
    if store.resumed:
        log.info("resuming in %s: %d items already committed", output_dir, len(store.done_keys))

    # -- run -------------------------------------------------------------------------------
    started = time.perf_counter()
    # Loader workers are forked from this process: freezing its objects keeps the workers'
    # garbage collector from walking (and copy-on-write touching) everything imported here.
    # A caller's own frozen objects (a notebook that froze its state) stay frozen: unfreezing
    # would release theirs too, so then ours stay in the permanent generation as well.
    frozen_before = gc.get_freeze_count()
    gc.freeze()
    module = ExtractionModule(extractor)
    try:
        with _interruptible() as received:
            trainer.predict(module, datamodule=datamodule, return_predictions=False)
    except BaseException as exc:
        # Lightning turns Ctrl-C into SystemExit(1) after its on_exception hooks (the
        # writer's flush): the signal we saw, not the exception type, says it was a kill.
        if received:
            tracker.end("KILLED")
            committed = len(store.done_keys) + writer.n_processed
            raise Interrupted(received[0], committed, output_dir) from None
        tracker.end("FAILED")
        dead = datamodule.items_of_dead_workers(str(exc)) if isinstance(exc, RuntimeError) else []
        if dead:
            writer.record_crashes(
                [(items[i], datamodule.dataset.key_of(i)) for i in dead], str(exc)
            )
            names = ", ".join(repr(items[i].id) for i in dead)
            raise UserError(
                f"a loader worker died while processing {names} ({exc}). The item is recorded "
                "in the failures; rerun the same command to resume the rest."
            ) from None
        raise
    finally:
        if not frozen_before:
            gc.unfreeze()
    wall = time.perf_counter() - started

    # -- report ----------------------------------------------------------------------------
    if trainer.global_rank > 0:  # rank 0 merged this rank's outputs and logs the run
        return ExtractionResult(
            output_dir=output_dir, files=[], metrics={"n_items": 0, "n_failed": 0, "wall_s": wall}
        )
    own_rss, worker_rss = _peak_rss_mb()
    written, failed, audio = _totals(store)
    metrics = {
        "n_items": float(written + failed),
        "n_failed": float(failed),
        "n_skipped_resumed": float(writer.n_skipped),
        "n_items_planned": float(len(items)),
        "audio_seconds": audio,
        "wall_s": wall,
        "audio_s_per_s": writer.audio_seconds_now / wall if wall > 0 else 0.0,
        "padding_fraction": module.padding_fraction,
        "peak_rss_mb": own_rss,
        "peak_rss_worker_mb": worker_rss,
    }
    if extractor.kind == OutputKind.TRANSCRIPT and parts.dataset.text_column is not None:
        metrics.update(_wer_metrics(store.final_files[0], parts.dataset.text_column))
    if writer.rank_stats:  # distributed: each rank's share and throughput
        metrics["world_size"] = float(len(writer.rank_stats))
        for rank, stats in enumerate(writer.rank_stats):
            metrics[f"rank{rank}_items"] = stats["items"]
            metrics[f"rank{rank}_audio_seconds"] = stats["audio_seconds"]
            metrics[f"rank{rank}_audio_s_per_s"] = (
                stats["audio_seconds"] / stats["wall_s"] if stats["wall_s"] > 0 else 0.0
            )
        metrics["audio_s_per_s"] = sum(s["audio_seconds"] for s in writer.rank_stats) / wall
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(redact(resolved)))
    given = overrides if overrides is not None else _overrides()
    (output_dir / "overrides.yaml").write_text(OmegaConf.to_yaml(redact(given)))
    files = writer.output_files()
    tracker.log_metrics(metrics)
    tracker.log_artifacts(
        [*files, output_dir / "config.yaml", output_dir / "overrides.yaml"], base=output_dir
    )
    tracker.end("FINISHED")
    # This session's work and rate first (a resumed run did not process the earlier items),
    # then what output_dir now holds; WER where the dataset has references.
    wer = f", WER {metrics['wer']:.1%}" if "wer" in metrics else ""
    log.info(
        "this session: %d items (%d failed), %.1f s of audio in %.1f s (%.1f audio s/s); "
        "%s holds %d items (%d failed, %d done before)%s",
        writer.n_processed,
        writer.n_failed_now,
        writer.audio_seconds_now,
        wall,
        metrics["audio_s_per_s"],
        output_dir,
        written + failed,
        failed,
        writer.n_skipped,
        wer,
    )
    return ExtractionResult(
        output_dir=output_dir, files=files, metrics=metrics, run_id=tracker.run_id, tags=tags
    )


def _resume_hint(stopped: Interrupted) -> str:
    """How many items are safe and the exact command that resumes the rest."""
    # In a -m sweep, this job's own overrides (the command line would re-run the whole sweep
    # into one folder).
    given = _overrides() if current_job() is not None else sys.argv[1:]
    args = [a for a in given if not a.startswith("output_dir=") and a not in ("-m", "--multirun")]
    where = stopped.output_dir
    command = " ".join(
        shlex.quote(a)
        for a in ["python", "-m", "runners.extract", *args]
        + ([f"output_dir={where}"] if where is not None else [])
    )
    return f"{stopped.committed} items are committed in {where}; resume with: {command}"


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="extract")
@task
def main(cfg: DictConfig) -> None:
    job = current_job()
    try:
        result = extract(cfg)
    except Interrupted as stopped:
        print(f"interrupted ({stopped}): {_resume_hint(stopped)}", file=sys.stderr)
        sys.exit(128 + stopped.signum)
    except Exception as exc:
        if job is None:
            if isinstance(exc, UserError):
                print(f"error: {redact(str(exc))}", file=sys.stderr)
                sys.exit(2)
            raise
        # In a sweep a failed job must not stop the others: record it and return; the
        # sweep callback reports it and makes the sweep's exit code non-zero at the end.
        log.exception("sweep job %d failed", job.job_num)
        job.record("FAILED", None, f"{type(exc).__name__}: {exc}"[:2000])
        return
    if result.failure_ratio > cfg.max_failure_ratio:
        n_failed, n_items = int(result.metrics["n_failed"]), int(result.metrics["n_items"])
        message = (
            f"{n_failed} of {n_items} items failed "
            f"({result.failure_ratio:.0%} > max_failure_ratio={cfg.max_failure_ratio}); "
            f"see {result.output_dir / 'failures.parquet'}"
        )
        if job is not None:
            job.record("FAILED", result.run_id, message)
            return
        print(f"error: {message}", file=sys.stderr)
        sys.exit(3)
    if job is not None and is_launch_rank_zero():
        job.record("FINISHED", result.run_id)


if __name__ == "__main__":
    run_cli(main)
