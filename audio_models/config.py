"""Structured configs behind the Hydra groups; a misspelt key fails against these dataclasses.

Each ``conf/<group>/<option>.yaml`` extends a schema stored as ``schema/<group>/<name>``: the
dataset, device, tracking and run schemas are here, each extractor's beside its class.
Importing this module registers them all (the runner imports it before composing).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import MISSING, DictConfig, OmegaConf

from audio_models.data.hf import HuggingFaceDatasetConfig
from audio_models.registry import load_builtin_extractors
from audio_models.utils.errors import UserError
from audio_models.utils.paths import conf_dir

# Extractor configs live beside their classes (audio_models/audio, audio_models/speech) and
# register themselves with audio_models.registry; _register() below imports those modules.

# -- datasets -----------------------------------------------------------------------------


@dataclass
class DemoDatasetConfig:
    _target_: str = "audio_models.data.datasets.DemoDataset"
    name: str = "demo"
    root: str | None = None
    n_clips: int = 24
    seed: int = 0
    label_column: str | None = "label"


@dataclass
class FolderDatasetConfig:
    _target_: str = "audio_models.data.datasets.FolderDataset"
    name: str = "folder"
    root: str = MISSING
    pattern: list[str] = field(
        default_factory=lambda: ["**/*.wav", "**/*.flac", "**/*.ogg", "**/*.mp3"]
    )
    label_regex: str | None = None
    label_column: str | None = None
    text_column: str | None = None  # reference transcripts: transcription runs log WER


@dataclass
class ManifestDatasetConfig:
    _target_: str = "audio_models.data.datasets.ManifestDataset"
    name: str = "manifest"
    path: str = MISSING
    path_column: str = "path"
    id_column: str | None = None
    start_column: str = "start"
    end_column: str = "end"
    label_columns: list[str] | None = None
    label_column: str | None = None
    text_column: str | None = None  # reference transcripts: transcription runs log WER
    # Labels are kept as the text written ("09" stays "09") unless declared here:
    # {column: int | float | str}, e.g. dataset.label_types={age:int}. Typed Any: OmegaConf
    # cannot merge a mapping into a None typed dict[str, str], nor add keys to an empty one.
    label_types: Any = None


@dataclass
class KaldiDatasetConfig:
    _target_: str = "audio_models.data.corpora.KaldiDataset"
    name: str = "kaldi"
    root: str = MISSING  # the data directory: wav.scp, optional segments, utt2spk, text
    audio_root: str | None = None  # relative wav.scp paths resolve here (None: root)
    label_column: str | None = None
    text_column: str | None = None  # "transcript" (the text file): transcription runs log WER


@dataclass
class AudformatDatasetConfig:
    _target_: str = "audio_models.data.corpora.AudformatDataset"
    name: str = "audformat"
    root: str = MISSING  # an audformat database folder (db.yaml), e.g. where audb.load put it
    index_type: str | None = None  # filewise | segmented (None: the database's, segmented if both)
    tables: list[str] | None = None  # None: every table of that index type
    columns: list[str] | None = None  # None: every column of those tables
    split: str | None = None  # only the tables of this split (db.splits)
    label_column: str | None = None
    text_column: str | None = None  # reference transcripts: transcription runs log WER


@dataclass
class LhotseDatasetConfig:
    _target_: str = "audio_models.data.corpora.LhotseDataset"
    name: str = "lhotse"
    cuts: str = MISSING  # a CutSet manifest: cuts.jsonl or cuts.jsonl.gz
    audio_root: str | None = None  # relative recording paths resolve here (None: the cwd)
    label_column: str | None = None
    text_column: str | None = None  # "transcript": transcription runs log WER against it


# -- device and tracking ------------------------------------------------------------------


@dataclass
class DeviceConfig:
    _target_: str = "audio_models.pipeline.device.DeviceSpec"
    accelerator: str = "auto"
    devices: Any = 1
    precision: str = "32"
    onednn_linear: bool = True  # CPU: fp32 nn.Linear through oneDNN, not MKL (faster on AMD)
    strategy: str = "auto"  # ddp: one process per device, items sharded, one merged output
    num_nodes: int = 1


@dataclass
class MlflowConfig:
    _target_: str = "audio_models.tracking.MlflowTracker"
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "audio-models"
    artifact_location: str | None = "mlartifacts"  # None: the server's default (proxied)
    max_artifact_mb: float = 100.0


@dataclass
class TrackingOffConfig:
    _target_: str = "audio_models.tracking.NullTracker"


@dataclass
class EstimatorConfig:
    source: str = "upstream"  # upstream: class + params of the upstream grid's best; config
    model_path: str | None = None  # legacy upstream pickle (default: the checkout's)
    sha256: str | None = None
    trust_unverified: bool = False
    name: str = "SVC"  # with source=config: a scikit-learn classifier class name
    params: dict[str, Any] = field(
        default_factory=lambda: {"C": 10, "gamma": 0.001, "kernel": "rbf"}
    )


# -- the primary config -------------------------------------------------------------------


@dataclass
class LoaderConfig:
    batch_size: int = 8  # items per batch (the cap when batch_audio_s is set)
    num_workers: int | None = None  # None: the CPU count
    channel_policy: str = "mean"
    batch_audio_s: float | None = None  # device extractors: padded seconds per batch, by length
    # Seconds one item may take to read, decode and transform in a loader worker before it
    # becomes a failure row (stage timeout); None: no limit. Native code returns first.
    item_timeout_s: float | None = 900.0


@dataclass
class WriterConfig:
    row_group_rows: int = 512
    # Seconds between committed parts (at least one loader batch each): fewer, larger parts
    # for the final consolidation to read; a kill loses about this much finished work.
    commit_every_s: float = 2.0


@dataclass
class PreflightConfig:
    _target_: str = "audio_models.data.loader.Preflight"
    min_duration_s: float = 0.0
    max_duration_s: float | None = None
    max_silence_ratio: float | None = None
    max_clipping_ratio: float | None = None
    silence_db: float = -60.0


@dataclass
class WindowsConfig:
    """Sliding windows over every item (``audio_models.data.windows``); size_s null: off."""

    size_s: float | None = None
    hop_s: float | None = None  # null: size_s (adjacent windows); smaller: overlapping
    last: str = "partial"  # partial: keep a shorter last window | drop: full windows only


@dataclass
class ExtractConfig:
    extractor: Any = MISSING
    dataset: Any = MISSING
    device: Any = MISSING
    tracking: Any = MISSING
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    writer: WriterConfig = field(default_factory=WriterConfig)
    preflight: PreflightConfig = field(default_factory=PreflightConfig)
    windows: WindowsConfig = field(default_factory=WindowsConfig)
    # One row per detected speech segment: a vad run's output_dir or an id/start/end table.
    segments_from: str | None = None
    output_dir: str = MISSING
    resume: bool = True
    max_failure_ratio: float = 0.1
    progress_bar: bool | None = None  # None: a bar on a terminal, periodic log lines otherwise
    seed: int = 0


@dataclass
class TrainSerConfig:
    dataset: Any = MISSING
    device: Any = MISSING
    tracking: Any = MISSING
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    features: list[str] = field(default_factory=lambda: ["mfcc", "chroma", "mel"])
    sample_rate: int = 16000
    speaker_column: str | None = "speaker"  # grouped CV when the dataset has this column
    n_splits: int = 5
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    output_dir: str = MISSING
    progress_bar: bool = True
    seed: int = 0


@dataclass
class CompareConfig:
    tracking: Any = MISSING
    sweep_id: str | None = None  # None: the latest sweep in the experiment
    run_ids: list[str] | None = None  # compare these runs instead of a sweep
    label: str | None = None  # None: each run's dataset.label_column
    group_column: str | None = "speaker"  # grouped folds when the data has this column
    n_splits: int = 5
    seed: int = 0
    output_dir: str = MISSING


@dataclass
class ReproduceConfig:
    tracking: Any = MISSING
    run_id: str = MISSING  # the run to reproduce (a sweep's child run too)
    n_items: Any = 20  # items re-run (a seeded sample), or "all"
    seed: int = 0  # which items the sample takes
    rtol: float = 1e-4  # outputs are equal when |new - old| <= atol + rtol * |old|
    atol: float = 1e-5
    accelerator: str | None = None  # None: the run's device settings; cpu | cuda | auto
    num_workers: int | None = None  # None: the run's loader.num_workers
    # Classes beside the project's own that the run's config may build (exact dotted names;
    # a run of your own extractor class): the stored config is data, trusted no further.
    trust_targets: list[str] = field(default_factory=list)
    output_dir: str = MISSING


def _register() -> None:
    load_builtin_extractors()
    store = ConfigStore.instance()
    store.store(name="extract_schema", node=ExtractConfig)
    store.store(name="train_ser_schema", node=TrainSerConfig)
    store.store(name="compare_schema", node=CompareConfig)
    store.store(name="reproduce_schema", node=ReproduceConfig)
    for group, name, node in (
        ("dataset", "demo", DemoDatasetConfig),
        ("dataset", "folder", FolderDatasetConfig),
        ("dataset", "manifest", ManifestDatasetConfig),
        ("dataset", "kaldi", KaldiDatasetConfig),
        ("dataset", "audformat", AudformatDatasetConfig),
        ("dataset", "lhotse", LhotseDatasetConfig),
        ("dataset", "huggingface", HuggingFaceDatasetConfig),
        ("device", "device", DeviceConfig),
        ("tracking", "mlflow", MlflowConfig),
        ("tracking", "server", MlflowConfig),
        ("tracking", "off", TrackingOffConfig),
    ):
        store.store(group=f"schema/{group}", name=name, node=node)


_register()


def build(cfg: DictConfig, key: str) -> Any:
    """Instantiate the config group ``cfg[key]``, the one path every runner builds through.

    Raises:
        UserError: whatever the constructor raised, as one line (a ``UserError`` unchanged;
            anything else prefixed with the group), instead of Hydra's wrapped traceback.
    """
    try:
        return instantiate(cfg[key], _convert_="all")
    except InstantiationException as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, UserError):
            raise cause from None
        raise UserError(f"{key}: {cause}") from None


_Task = TypeVar("_Task", bound=Callable[..., Any])
_task_started: list[bool] = []  # set once a runner's task body runs (see run_cli)


def task(function: _Task) -> _Task:
    """Mark a runner's Hydra task function, so :func:`run_cli` can tell a configuration that
    failed to compose (the task never ran) from a failure inside the task.

    Apply it below ``@hydra.main``.
    """

    @functools.wraps(function)
    def started(*args: Any, **kwargs: Any) -> Any:
        _task_started.append(True)
        return function(*args, **kwargs)

    return started  # type: ignore[return-value]


def run_cli(main: Callable[[], Any]) -> None:
    """Run a ``@hydra.main`` entry point with the project's exit codes.

    Hydra reports an unknown option, a misspelt key or a bad value with its own message and
    exit code 1, the code of a crash; here such a composition error exits 2, like every other
    configuration error the runners report (``error: ...``, exit 2).
    """
    try:
        main()
    except SystemExit as stop:
        if stop.code == 1 and not _task_started:
            sys.exit(2)
        raise


# -- what a stored config may build -----------------------------------------------------


def known_targets() -> frozenset[str]:
    """Every ``_target_`` the project's schemas name (extractors, datasets, device, tracking,
    preflight): the only classes a config read back from a run (``runners.reproduce``) may
    build. A ``config.yaml`` is data from an artifact store others can write to; Hydra would
    call whatever dotted name it holds (``os.system``)."""
    import dataclasses

    from audio_models.registry import registered_extractors

    schemas = [v for v in globals().values() if isinstance(v, type) and dataclasses.is_dataclass(v)]
    targets = set()
    extractors = [entry.config for entry in registered_extractors().values()]
    for schema in [*schemas, *extractors]:
        for item in dataclasses.fields(schema):
            if item.name == "_target_" and isinstance(item.default, str):
                targets.add(item.default)
    return frozenset(targets)


def check_targets(cfg: Any, where: str, trusted: Sequence[str] = ()) -> None:
    """Raise unless every ``_target_`` in ``cfg`` (nested anywhere) is one of
    :func:`known_targets` or ``trusted``, by exact name.

    Raises:
        UserError: naming the key and the target.
    """
    allowed = known_targets() | set(trusted)

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                here = f"{path}.{key}" if path else str(key)
                if key == "_target_" and value not in allowed:
                    raise UserError(
                        f"{where}: {here}={value!r} is not one of the project's classes; "
                        "refusing to build it (trust_targets=[...] names classes you vouch for)"
                    )
                walk(value, here)
        elif isinstance(node, list):
            for n, value in enumerate(node):
                walk(value, f"{path}[{n}]")

    walk(OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg, "")


# -- what the command line shows ---------------------------------------------------------


def option_descriptions(group: str) -> dict[str, str]:
    """The options of ``conf/<group>/``, each with the first comment line of its YAML."""
    out: dict[str, str] = {}
    for path in sorted((conf_dir() / group).glob("*.yaml")):
        first = path.read_text().splitlines()[0] if path.stat().st_size else ""
        out[path.stem] = first.lstrip("#").strip().rstrip(",;(").strip()
    return out


def _groups_help(*groups: str) -> str:
    """``--help``'s group listing: the groups a runner uses, never the ``schema/*`` ones Hydra
    would list beside them (they hold the dataclasses the YAMLs extend, nothing to choose)."""
    lines = []
    for group in groups:
        options = option_descriptions(group)
        width = max(map(len, options), default=0)
        lines.append(f"{group}=<option>:")
        lines += [f"  {name:<{width}}  {text}".rstrip() for name, text in options.items()]
    return "\n".join(lines)


def _run_dir(default: str, *, _root_: DictConfig) -> str:
    """Hydra's run directory: ``output_dir`` when the command sets it (so ``<job>.log`` lands
    beside the outputs and no ``outputs/<date>/<time>`` is made), else ``default``."""
    if "output_dir" in _root_ and not OmegaConf.is_interpolation(_root_, "output_dir"):
        value = _root_.output_dir
        if value is not None:
            return str(value)
    return default


OmegaConf.register_new_resolver("am_groups", _groups_help, replace=True)
OmegaConf.register_new_resolver("am_run_dir", _run_dir, replace=True)
