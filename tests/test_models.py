"""Issue #17's model extractors on tiny random models saved locally: whisper_encoder, ser_dim
and audio_classifier equal the model run directly on each file, batched equals one by one,
and a checkpoint without its head is refused."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from transformers import (
    AutoModelForAudioClassification,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Model,
    WhisperFeatureExtractor,
    WhisperModel,
)

from audio_models.extractor import Output
from audio_models.speech.classifier import AudioClassifierExtractor
from audio_models.speech.ser_dim import DIMENSIONS, DimensionalEmotionExtractor
from audio_models.speech.whisper_encoder import WhisperEncoderExtractor
from audio_models.testing import (
    TINY_LABELS,
    loaded,
    make_tiny,
    make_tiny_classifier,
    make_tiny_ser_dim,
    make_tiny_whisper,
)
from audio_models.utils.errors import UserError
from runners.extract import extract
from tests.conftest import compose_extract


def _batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    waveforms = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        t = torch.arange(n) / 16000
        tone = 0.3 * torch.sin(2 * torch.pi * (120 + 40 * i) * t)
        waveforms[i, :n] = tone + 0.05 * torch.randn(n, generator=generator)
    return waveforms, torch.tensor(lengths)


def _one_by_one(extractor, waveforms: torch.Tensor, lengths: torch.Tensor) -> list:
    return [
        extractor.forward(waveforms[row : row + 1, :n], lengths[row : row + 1])[0]
        for row, n in enumerate(lengths.tolist())
    ]


def _values(out) -> torch.Tensor:
    return out.values if isinstance(out, Output) else out


# -- whisper_encoder --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_whisper(tmp_path_factory.mktemp("whisper"))


def _whisper(folder: Path, **kwargs) -> WhisperEncoderExtractor:
    return loaded(WhisperEncoderExtractor(name="w", model=str(folder), overlap_s=0.2, **kwargs))


@pytest.mark.parametrize("n", [1, 159, 160, 161, 319, 320, 321, 7000, 15679])
def test_whisper_keeps_the_frames_that_cover_the_recording(whisper_dir: Path, n: int) -> None:
    """ceil(n / 320) frames: the feature extractor's ceil(n / 160) log-mel frames of real
    samples, through the conv stack as it really computes (not just its length formula)."""
    extractor = _whisper(whisper_dir)
    assert int(extractor._frame_counts(torch.tensor([n]))) == math.ceil(n / 320)
    fe = WhisperFeatureExtractor.from_pretrained(whisper_dir)
    inputs = fe(np.zeros(n, np.float32), sampling_rate=16000, return_attention_mask=True)
    mel_frames = int(np.sum(inputs["attention_mask"]))
    assert mel_frames == math.ceil(n / 160)
    encoder = extractor.network
    mel = torch.zeros(1, encoder.config.num_mel_bins, mel_frames)
    with torch.inference_mode():
        convolved = encoder.conv2(torch.nn.functional.gelu(encoder.conv1(mel)))
    assert convolved.shape[-1] == math.ceil(n / 320)


def test_whisper_equals_the_encoder_on_each_file(whisper_dir: Path) -> None:
    extractor = _whisper(whisper_dir, layers=[0, -1], pooling="mean")
    frames = _whisper(whisper_dir, layers=[-1], pooling="none")
    fe = WhisperFeatureExtractor.from_pretrained(whisper_dir)
    encoder = WhisperModel.from_pretrained(whisper_dir).encoder.eval()
    waveforms, lengths = _batch([12000, 7001, 15680])
    with torch.inference_mode():
        ours, ours_frames = (
            extractor.forward(waveforms, lengths),
            frames.forward(waveforms, lengths),
        )
        for row, n in enumerate(lengths.tolist()):
            inputs = fe(waveforms[row, :n].numpy(), sampling_rate=16000, return_tensors="pt")
            states = encoder(inputs.input_features, output_hidden_states=True).hidden_states
            kept = math.ceil(n / 320)  # the frames past the recording describe padding
            expected = torch.cat([states[0][0, :kept].mean(0), states[-1][0, :kept].mean(0)])
            assert (ours[row] - expected).abs().max() <= 1e-5
            assert ours_frames[row].shape == (kept, 32)
            assert (ours_frames[row] - states[-1][0, :kept]).abs().max() <= 1e-5
    assert frames.frame_shift_s == 0.02
    assert extractor.feature_groups == [("layer_0_mean", 32), ("layer_2_mean", 32)]


@pytest.mark.parametrize("layers", [[1], [0, 1], [2], [1, 2]])
def test_whisper_runs_no_layer_above_the_deepest_requested(
    whisper_dir: Path, layers: list[int]
) -> None:
    """The encoder stops at the deepest requested layer, which runs for the kept frames only,
    and still equals the full model's hidden states (rows of two lengths in one batch)."""
    extractor = _whisper(whisper_dir, layers=layers, pooling="none")
    extractor.pad_on_cpu = True  # one forward for both rows, as on a GPU
    fe = WhisperFeatureExtractor.from_pretrained(whisper_dir)
    encoder = WhisperModel.from_pretrained(whisper_dir).encoder.eval()
    calls: list[int] = []
    for index, layer in enumerate(extractor.network.layers, start=1):
        layer.register_forward_hook(lambda *_, index=index: calls.append(index))
    waveforms, lengths = _batch([12000, 4001])
    with torch.inference_mode():
        ours = extractor.forward(waveforms, lengths)
        for row, n in enumerate(lengths.tolist()):
            inputs = fe(waveforms[row, :n].numpy(), sampling_rate=16000, return_tensors="pt")
            states = encoder(inputs.input_features, output_hidden_states=True).hidden_states
            kept = math.ceil(n / 320)
            expected = torch.cat([states[layer][0, :kept] for layer in layers], dim=1)
            assert (ours[row] - expected).abs().max() <= 1e-5
    # The deepest layer runs through its parts (not the hooked module call); none above it.
    assert set(calls) == set(range(1, max(layers)))


@pytest.mark.parametrize("pooling", ["mean_std", "none"])
@pytest.mark.parametrize("shared", [True, False], ids=["one-forward", "cpu-rows-alone"])
def test_whisper_batched_equals_one_by_one(whisper_dir: Path, pooling: str, shared: bool) -> None:
    """Rows shorter and longer than the (1 s) window in one batch: the long one in chunks."""
    extractor = _whisper(whisper_dir, layers="all", pooling=pooling)
    extractor.pad_on_cpu = shared  # the GPU's shared forward, or the CPU's row by row
    waveforms, lengths = _batch([16000 * 3 + 77, 5000, 12000, 5000])
    with torch.inference_mode():
        batched = extractor.forward(waveforms, lengths)
        alone = _one_by_one(extractor, waveforms, lengths)
    for a, b in zip(batched, alone, strict=True):
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-5
    if pooling == "none":
        assert batched[0].shape == (math.ceil((16000 * 3 + 77) / 320), 3 * 32)


def test_whisper_long_recording_pools_its_stitched_frames(whisper_dir: Path) -> None:
    waveforms, lengths = _batch([16000 * 4 + 123])
    with torch.inference_mode():
        frames = _whisper(whisper_dir, pooling="none", chunk_batch=2).forward(waveforms, lengths)
        pooled = _whisper(whisper_dir, pooling="mean_std").forward(waveforms, lengths)
    assert len(_whisper(whisper_dir).chunk_starts(int(lengths[0]))) > 4
    reference = torch.cat([frames[0].mean(0), frames[0].std(0, unbiased=False)])
    assert (pooled[0] - reference).abs().max() <= 1e-5


def test_whisper_refuses_an_overlap_that_does_not_fit_the_window(whisper_dir: Path) -> None:
    with pytest.raises(UserError, match="overlap"):
        loaded(WhisperEncoderExtractor(name="w", model=str(whisper_dir), overlap_s=2.0))


# -- ser_dim ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ser_dim_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_ser_dim(tmp_path_factory.mktemp("ser_dim"))


def test_ser_dim_equals_the_model_card_on_each_file(ser_dim_dir: Path) -> None:
    """The model card's recipe, written out: processor, wav2vec2, mean over time, dense,
    tanh, out_proj, with the weights read from the checkpoint."""
    from safetensors.torch import load_file

    extractor = loaded(
        DimensionalEmotionExtractor(name="s", model=str(ser_dim_dir), keep_embedding=True)
    )
    assert extractor.feature_names[:3] == ["arousal", "dominance", "valence"]
    assert len(extractor.feature_names) == 3 + 32
    processor = Wav2Vec2FeatureExtractor.from_pretrained(ser_dim_dir)
    encoder = Wav2Vec2Model.from_pretrained(ser_dim_dir).eval()
    weights = load_file(ser_dim_dir / "model.safetensors")
    waveforms, lengths = _batch([12000, 7000], seed=2)
    with torch.inference_mode():
        ours = extractor.forward(waveforms, lengths)
        for row, n in enumerate(lengths.tolist()):
            inputs = processor(waveforms[row, :n].numpy(), sampling_rate=16000, return_tensors="pt")
            pooled = encoder(inputs.input_values).last_hidden_state.mean(dim=1)[0]
            hidden = torch.tanh(
                weights["classifier.dense.weight"] @ pooled + weights["classifier.dense.bias"]
            )
            scores = weights["classifier.out_proj.weight"] @ hidden
            scores = scores + weights["classifier.out_proj.bias"]
            assert (ours[row] - torch.cat([scores, pooled])).abs().max() <= 1e-5


def test_ser_dim_batched_equals_one_by_one(ser_dim_dir: Path) -> None:
    extractor = loaded(
        DimensionalEmotionExtractor(
            name="s", model=str(ser_dim_dir), max_chunk_s=0.5, overlap_s=0.1
        )
    )
    extractor.pad_on_cpu = True  # the masked, padded path a GPU takes
    waveforms, lengths = _batch([16000, 9000, 4321, 9000, 20000])  # the last one in chunks
    with torch.inference_mode():
        batched = extractor.forward(waveforms, lengths)
        alone = _one_by_one(extractor, waveforms, lengths)
    for a, b in zip(batched, alone, strict=True):
        assert a.shape == (3,) and (a - b).abs().max() <= 1e-5


def test_ser_dim_refuses_a_checkpoint_without_its_head(tmp_path: Path) -> None:
    folder = make_tiny_ser_dim(tmp_path / "encoder_only", head=False)
    with pytest.raises(UserError, match=r"classifier\.dense.*random"):
        loaded(DimensionalEmotionExtractor(name="s", model=str(folder)))
    # A plain wav2vec2 checkpoint (keys without the wav2vec2. prefix) is the same case.
    with pytest.raises(UserError, match=r"classifier\.out_proj"):
        loaded(DimensionalEmotionExtractor(name="s", model=str(make_tiny(tmp_path / "plain"))))


# -- audio_classifier -------------------------------------------------------------------------

CLASSIFIERS = ["wav2vec2-layer", "hubert-group", "whisper"]


@pytest.fixture(scope="module", params=CLASSIFIERS)
def classifier_dir(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    family = request.param
    return family, make_tiny_classifier(tmp_path_factory.mktemp(family), family)


def test_classifier_equals_the_model_on_each_file(classifier_dir: tuple[str, Path]) -> None:
    family, folder = classifier_dir
    extractor = loaded(AudioClassifierExtractor(name="c", model=str(folder)))
    labels = [TINY_LABELS[i] for i in range(3)]
    assert extractor.feature_names == [f"p_{label}" for label in labels]
    assert extractor.extra_columns == ["prediction"]
    fe_class = WhisperFeatureExtractor if family == "whisper" else Wav2Vec2FeatureExtractor
    fe = fe_class.from_pretrained(folder)
    model = AutoModelForAudioClassification.from_pretrained(folder).eval()
    waveforms, lengths = _batch([12000, 7000, 15000], seed=4)
    with torch.inference_mode():
        ours = extractor.forward(waveforms, lengths)
        for row, n in enumerate(lengths.tolist()):
            inputs = fe(waveforms[row, :n].numpy(), sampling_rate=16000, return_tensors="pt")
            expected = torch.softmax(model(**inputs).logits[0], dim=-1)
            assert (ours[row].values - expected).abs().max() <= 1e-6, family
            assert abs(float(ours[row].values.sum()) - 1.0) <= 1e-6
            assert ours[row].extra == {"prediction": labels[int(expected.argmax())]}


def test_classifier_batched_equals_one_by_one(classifier_dir: tuple[str, Path]) -> None:
    family, folder = classifier_dir
    extractor = loaded(AudioClassifierExtractor(name="c", model=str(folder)))
    extractor.pad_on_cpu = True  # the masked, padded path a GPU takes (layer-norm encoders)
    waveforms, lengths = _batch([16000, 9000, 4321, 9000, 12000])
    with torch.inference_mode():
        batched = extractor.forward(waveforms, lengths)
        alone = _one_by_one(extractor, waveforms, lengths)
    for a, b in zip(batched, alone, strict=True):
        assert (a.values - b.values).abs().max() <= 1e-6, family
        assert a.extra == b.extra
    expected = {"wav2vec2-layer": "attention-mask", "hubert-group": "equal-length groups"}
    assert extractor.provenance()["classifier.padding"] == expected.get(family, "whisper window")


def test_classifier_refuses_a_missing_head(tmp_path: Path, whisper_dir: Path) -> None:
    for folder in (make_tiny(tmp_path / "plain", "wav2vec2-group"), whisper_dir):
        with pytest.raises(UserError, match=r"lacks \d+ weights.*classifier.*random"):
            loaded(AudioClassifierExtractor(name="c", model=str(folder)))


def test_whisper_classifier_refuses_recordings_over_its_window(tmp_path: Path) -> None:
    folder = make_tiny_classifier(tmp_path / "w", "whisper")
    extractor = loaded(AudioClassifierExtractor(name="c", model=str(folder)))
    waveforms, lengths = _batch([16001])
    with pytest.raises(UserError, match="at most 1 s"), torch.inference_mode():
        extractor.forward(waveforms, lengths)


# -- shared: offline, configs, runner ---------------------------------------------------------


@pytest.mark.usefixtures("offline_hub")
@pytest.mark.parametrize(
    "cls", [WhisperEncoderExtractor, DimensionalEmotionExtractor, AudioClassifierExtractor]
)
def test_missing_model_offline_is_one_clear_error(cls) -> None:
    with pytest.raises(
        UserError, match=r"cannot load model 'openai/no-such-model' \(revision abc123\).*download"
    ):
        cls(name="x", model="openai/no-such-model", revision="abc123").load()


def test_options_compose_and_instantiate(
    whisper_dir: Path, ser_dim_dir: Path, tmp_path: Path
) -> None:
    defaults = {
        "whisper_encoder": "openai/whisper-base",
        "ser_dim": "audeering/wav2vec2-large-robust-12-ft-emotion-msp-dim",
    }
    for name, model in defaults.items():
        assert compose_extract([f"extractor={name}", "output_dir=x"]).extractor.model == model
    classifier = make_tiny_classifier(tmp_path / "c", "wav2vec2-group")
    for name, folder, cls in (
        ("whisper_encoder", whisper_dir, WhisperEncoderExtractor),
        ("ser_dim", ser_dim_dir, DimensionalEmotionExtractor),
        ("audio_classifier", classifier, AudioClassifierExtractor),
    ):
        extra = ["extractor.overlap_s=0.2"] if name == "whisper_encoder" else []
        cfg = compose_extract(
            [f"extractor={name}", f"extractor.model={folder}", "output_dir=x", *extra]
        )
        extractor = instantiate(cfg.extractor, _convert_="all")
        assert isinstance(extractor, cls) and extractor.name == name


def _run(make_cfg, name: str, folder: Path, *overrides: str):
    return extract(
        make_cfg(
            f"extractor={name}",
            f"extractor.model={folder}",
            "dataset.n_clips=6",
            *overrides,
            out=name,
        )
    )


def test_runner_whisper_encoder_frames(make_cfg, whisper_dir: Path) -> None:
    result = _run(
        make_cfg,
        "whisper_encoder",
        whisper_dir,
        "extractor.overlap_s=0.2",
        "extractor.pooling=none",
    )
    table = pd.read_parquet(result.output_dir / "features.parquet")
    assert len(table) == 6 and (table["frame_shift_s"] == 0.02).all()
    samples = (table["duration_s"] * 16000).round().astype(int)
    assert table["n_frames"].tolist() == [math.ceil(n / 320) for n in samples]
    assert max(samples) > 2 * 16000  # some recordings ran in chunks of the 1 s window
    assert len(result.tags["provenance.whisper_encoder.weights_sha256"]) == 64


def test_whisper_encoder_under_bf16_autocast(make_cfg, whisper_dir: Path) -> None:
    # The feature extractor's numpy step took the bf16 STFT autocast made: every item failed.
    small = "extractor.overlap_s=0.2"  # the tiny model's window is 1 s
    result = _run(make_cfg, "whisper_encoder", whisper_dir, small, "device.precision=bf16-mixed")
    assert result.metrics["n_failed"] == 0
    reference = make_cfg(
        "extractor=whisper_encoder",
        f"extractor.model={whisper_dir}",
        "dataset.n_clips=6",
        small,
        out="fp32",  # not the bf16 run's directory: it would resume, not recompute
    )
    fp32 = extract(reference).output_dir / "features.parquet"
    bf16 = pd.read_parquet(result.output_dir / "features.parquet").set_index("id")
    ref = pd.read_parquet(fp32).set_index("id")
    column = next(c for c in ref.columns if c.startswith("layer_"))
    for item in ref.index:
        np.testing.assert_allclose(
            np.asarray(bf16.loc[item, column]), np.asarray(ref.loc[item, column]), atol=0.1
        )


def test_runner_ser_dim(make_cfg, ser_dim_dir: Path) -> None:
    result = _run(make_cfg, "ser_dim", ser_dim_dir, "extractor.keep_embedding=true")
    table = pd.read_parquet(result.output_dir / "features.parquet")
    assert len(table) == 6
    assert [c for c in table.columns if c in DIMENSIONS] == list(DIMENSIONS)
    assert "embedding_31" in table.columns
    assert len(result.tags["provenance.ser_dim.weights_sha256"]) == 64


def test_runner_audio_classifier(make_cfg, tmp_path: Path) -> None:
    folder = make_tiny_classifier(tmp_path / "c", "hubert-group")
    result = _run(make_cfg, "audio_classifier", folder)
    table = pd.read_parquet(result.output_dir / "features.parquet")
    columns = [f"p_{TINY_LABELS[i]}" for i in range(3)]
    probabilities = table[columns].to_numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
    best = [TINY_LABELS[i] for i in probabilities.argmax(axis=1)]
    assert table["prediction"].tolist() == best
    assert result.tags["provenance.classifier.labels"] == "neutral,happy,sad"


def test_process_signal_returns_the_classifiers_output(tmp_path: Path) -> None:
    """The one-signal API path returns the label beside numpy probabilities."""
    extractor = loaded(
        AudioClassifierExtractor(
            name="c", model=str(make_tiny_classifier(tmp_path / "c", "hubert-group"))
        )
    )
    waveforms, _ = _batch([22050])
    out = extractor.process_signal(waveforms[0].numpy(), 22050)  # resampled to 16 kHz
    assert isinstance(out, Output) and isinstance(out.values, np.ndarray)
    assert out.values.shape == (3,) and out.extra["prediction"] in TINY_LABELS.values()
