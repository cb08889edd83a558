"""wav2vec2-family extractors on tiny random models saved locally: batched equals one by one."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import (
    AutoModel,
    HubertConfig,
    Wav2Vec2FeatureExtractor,
    WavLMConfig,
)

from audio_models.speech.ssl import SelfSupervisedExtractor
from audio_models.testing import FAMILIES, TINY, loaded, make_tiny
from audio_models.utils.errors import UserError
from runners.extract import extract


@pytest.fixture(params=sorted(FAMILIES))
def tiny(request, tmp_path: Path) -> tuple[str, Path]:
    return request.param, make_tiny(tmp_path / request.param, request.param)


def _batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    waveforms = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        waveforms[i, :n] = 0.1 * torch.randn(n, generator=generator)
    return waveforms, torch.tensor(lengths)


@pytest.mark.parametrize("pooling", ["mean", "mean_std", "none"])
def test_batched_equals_one_by_one(tiny, pooling: str) -> None:
    family, folder = tiny
    extractor = loaded(
        SelfSupervisedExtractor(name="x", model=str(folder), layers="all", pooling=pooling)
    )
    extractor.pad_on_cpu = True  # the masked, padded path a GPU takes
    waveforms, lengths = _batch([16000, 9000, 16000, 4321, 9000])
    with torch.inference_mode():
        batched = extractor.forward(waveforms, lengths)
        for row, n in enumerate(lengths.tolist()):
            alone = extractor.forward(waveforms[row : row + 1, :n], lengths[row : row + 1])[0]
            assert batched[row].shape == alone.shape
            assert (batched[row] - alone).abs().max() <= 1e-4, family


def test_equals_transformers_on_each_file(tiny) -> None:
    """The reference: the model's own feature extractor and model on one file, mean pooled."""
    family, folder = tiny
    extractor = loaded(
        SelfSupervisedExtractor(name="x", model=str(folder), layers=[0, -1], pooling="mean")
    )
    feature_extractor = Wav2Vec2FeatureExtractor.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    waveforms, lengths = _batch([12000, 7000], seed=3)
    with torch.inference_mode():
        ours = extractor.forward(waveforms, lengths)
        for row, n in enumerate(lengths.tolist()):
            inputs = feature_extractor(
                waveforms[row, :n].numpy(), sampling_rate=16000, return_tensors="pt"
            )
            states = model(**inputs, output_hidden_states=True).hidden_states
            expected = torch.cat([states[0][0].mean(0), states[-1][0].mean(0)])
            assert (ours[row] - expected).abs().max() <= 1e-5, family


STABLE = {"hubert-layer": HubertConfig, "wavlm-layer": WavLMConfig}


@pytest.mark.parametrize("family", sorted(FAMILIES) + sorted(STABLE))
def test_layers_above_the_deepest_requested_are_not_run(tmp_path: Path, family: str) -> None:
    """The model keeps the layers up to the deepest requested hidden state only, and every
    requested state still equals the full model's (a stable-layer-norm encoder's final norm
    goes with its last layer: the full model gives a middle layer raw)."""
    folder = tmp_path / family
    if family in STABLE:
        torch.manual_seed(0)
        config = STABLE[family](**TINY, feat_extract_norm="layer", do_stable_layer_norm=True)
        AutoModel.from_config(config).save_pretrained(folder)
        Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True).save_pretrained(
            folder
        )
    else:
        make_tiny(folder, family)
    model = AutoModel.from_pretrained(folder).eval()
    waveforms, lengths = _batch([12000, 7000], seed=5)
    for layers in ([0], [1], [2, 0], [1, 3]):
        extractor = loaded(
            SelfSupervisedExtractor(name="x", model=str(folder), layers=layers, pooling="none")
        )
        extractor.pad_on_cpu = True  # both rows in one forward where the model takes a mask
        assert len(extractor.network.encoder.layers) == max(layers), (family, layers)
        with torch.inference_mode():
            ours = extractor.forward(waveforms, lengths)
            for row, n in enumerate(lengths.tolist()):
                signal = waveforms[row, :n]
                signal = (signal - signal.mean()) / torch.sqrt(signal.var(unbiased=False) + 1e-7)
                states = model(signal[None], output_hidden_states=True).hidden_states
                expected = torch.cat([states[k][0] for k in layers], dim=1)
                assert (ours[row] - expected).abs().max() <= 1e-5, (family, layers)


def test_runner_writes_layer_columns(make_cfg, tmp_path: Path) -> None:
    folder = make_tiny(tmp_path / "m", "wav2vec2-layer")
    pooled = extract(
        make_cfg(
            "extractor=xlsr",
            f"extractor.model={folder}",
            "extractor.layers=[1,-1]",
            "extractor.pooling=mean_std",
            out="pooled",
        )
    )
    table = pd.read_parquet(pooled.output_dir / "features.parquet")
    for column in ("layer_1_mean", "layer_1_std", "layer_3_mean", "layer_3_std"):
        assert np.stack(table[column]).shape == (24, 32)
    assert pooled.tags["provenance.ssl.padding"] == "attention-mask"
    assert len(pooled.tags["provenance.ssl.weights_sha256"]) == 64
    frames = extract(
        make_cfg(
            "extractor=hubert",
            f"extractor.model={make_tiny(tmp_path / 'g', 'hubert-group')}",
            "extractor.pooling=none",
            out="frames",
        )
    )
    index = pd.read_parquet(frames.output_dir / "frames" / "index.parquet")
    assert (index["frame_shift_s"] == 80 / 16000).all()
    shard = pd.read_parquet(frames.output_dir / index["shard"].iloc[0])
    assert "layer_3_31" in shard.columns


@pytest.mark.usefixtures("offline_hub")
def test_missing_model_offline_is_one_clear_error() -> None:
    with pytest.raises(
        UserError, match=r"cannot load model 'facebook/no-such-model' \(revision abc123\).*download"
    ):
        loaded(
            SelfSupervisedExtractor(name="x", model="facebook/no-such-model", revision="abc123")
        ).load()


def test_bad_layers_and_pooling(tmp_path: Path) -> None:
    folder = make_tiny(tmp_path / "m", "wavlm-group")
    with pytest.raises(UserError, match="outside the model"):
        loaded(SelfSupervisedExtractor(name="x", model=str(folder), layers=[7])).load()
    with pytest.raises(UserError, match="pooling"):
        loaded(SelfSupervisedExtractor(name="x", model=str(folder), pooling="max"))


def test_group_norm_models_really_need_equal_lengths(tmp_path: Path) -> None:
    """Why the grouping exists: padding a group-norm encoder changes the valid frames."""
    extractor = loaded(
        SelfSupervisedExtractor(name="x", model=str(make_tiny(tmp_path / "g", "hubert-group")))
    )
    extractor.load()
    waveforms, lengths = _batch([16000, 6000])
    with torch.inference_mode():
        padded = extractor._forward_padded(waveforms, lengths)[1]
        alone = extractor.forward(waveforms[1:, :6000], lengths[1:])[0]
    assert (padded - alone).abs().max() > 1e-3


class _Payload:
    def __reduce__(self):
        return (exec, ("open('/tmp/audio_models_ckpt_pwned', 'w').write('x')",))


def test_malicious_checkpoint_is_refused_without_running(tmp_path: Path) -> None:
    folder = make_tiny(tmp_path / "m", "wav2vec2-layer")
    (folder / "model.safetensors").unlink()
    marker = Path("/tmp/audio_models_ckpt_pwned")
    marker.unlink(missing_ok=True)
    import pickle

    with (folder / "pytorch_model.bin").open("wb") as handle:
        pickle.dump({"wav2vec2.masked_spec_embed": _Payload()}, handle)
    with pytest.raises(UserError, match="cannot load model"):
        loaded(SelfSupervisedExtractor(name="x", model=str(folder)))
    assert not marker.exists()


def test_length_buckets_cut_padding_and_keep_numbers(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = make_tiny(tmp_path / "m", "wav2vec2-layer")
    base = ["extractor=xlsr", f"extractor.model={folder}", "loader.batch_size=6"]
    # On the CPU rows run unpadded (no padding processed); the padded path is a GPU's.
    unpadded = extract(make_cfg(*base, out="unpadded"))
    assert unpadded.metrics["padding_fraction"] == 0.0
    monkeypatch.setattr(SelfSupervisedExtractor, "pad_on_cpu", True)
    plain = extract(make_cfg(*base, out="plain"))
    bucketed = extract(make_cfg(*base, "loader.batch_audio_s=12", out="bucketed"))
    assert 0 < bucketed.metrics["padding_fraction"] < plain.metrics["padding_fraction"]
    a = pd.read_parquet(plain.output_dir / "features.parquet").set_index("id")
    for other in (bucketed, unpadded):
        b = pd.read_parquet(other.output_dir / "features.parquet").set_index("id").loc[a.index]
        np.testing.assert_allclose(
            np.stack(a["layer_3_mean"]), np.stack(b["layer_3_mean"]), atol=1e-4
        )


def test_length_bucket_sampler() -> None:
    from audio_models.data.loader import LengthBucketSampler

    durations = [5.0, 1.0, 2.0, 9.0, 1.5, 0.0, 3.0]
    batches = list(LengthBucketSampler(durations, batch_audio_s=6.0, max_items=3))
    assert sorted(i for b in batches for i in b) == list(range(7))
    for batch in batches:
        longest = max(durations[i] for i in batch)
        assert len(batch) <= 3 and (len(batch) == 1 or longest * len(batch) <= 6.0)


@pytest.mark.parametrize("n", [401, 8000, 8080, 8081, 12345, 40000, 40079])
def test_chunk_plan_covers_the_file_on_its_frame_grid(tmp_path: Path, n: int) -> None:
    extractor = loaded(
        SelfSupervisedExtractor(
            name="x",
            model=str(make_tiny(tmp_path / "m", "wav2vec2-layer")),
            max_chunk_s=0.5,
            overlap_s=0.1,
        )
    )
    starts = extractor.chunk_starts(n)
    assert starts[0] == 0 and all(s % extractor.stride == 0 for s in starts)
    assert starts == sorted(set(starts))
    assert all(b - a <= extractor.chunk - extractor.overlap for a, b in itertools.pairwise(starts))
    assert n - starts[-1] < extractor.chunk + extractor.stride  # the last chunk reaches the end


def _long_signal(n: int) -> torch.Tensor:
    t = torch.arange(n) / 16000
    generator = torch.Generator().manual_seed(5)
    return 0.3 * torch.sin(2 * torch.pi * 180 * t) + 0.05 * torch.randn(n, generator=generator)


def test_chunked_frames_are_the_files_frames(tmp_path: Path) -> None:
    """Layer 0 of a layer-norm encoder only sees a few frames of context, so with enough
    overlap the stitched chunks must reproduce the whole-file frames exactly; deeper layers
    (global attention) differ, but keep the whole file's frame count."""
    folder = make_tiny(tmp_path / "m", "wav2vec2-layer")
    n = 16000 * 3 + 123
    signal = _long_signal(n)[None]
    lengths = torch.tensor([n])
    whole = loaded(
        SelfSupervisedExtractor(
            name="x", model=str(folder), layers=[0, -1], pooling="none", max_chunk_s=None
        )
    )
    chunked = loaded(
        SelfSupervisedExtractor(
            name="x",
            model=str(folder),
            layers=[0, -1],
            pooling="none",
            max_chunk_s=0.5,
            overlap_s=0.2,
            chunk_batch=3,
        )
    )
    with torch.inference_mode():
        expected = whole.forward(signal, lengths)[0]
        ours = chunked.forward(signal, lengths)[0]
        pooled = loaded(
            SelfSupervisedExtractor(
                name="x",
                model=str(folder),
                layers=[0, -1],
                pooling="mean_std",
                max_chunk_s=0.5,
                overlap_s=0.2,
                chunk_batch=3,
            )
        ).forward(signal, lengths)[0]
    assert len(chunked.chunk_starts(n)) > 5
    assert ours.shape == expected.shape
    assert (ours[:, :32] - expected[:, :32]).abs().max() <= 1e-4
    # The pools accumulated chunk by chunk equal pooling the stitched frames.
    frames0, frames1 = ours[:, :32], ours[:, 32:]
    reference = torch.cat(
        [
            frames0.mean(0),
            frames0.std(0, unbiased=False),
            frames1.mean(0),
            frames1.std(0, unbiased=False),
        ]
    )
    assert (pooled - reference).abs().max() <= 1e-4


def test_chunked_group_norm_and_short_rows_in_one_batch(tmp_path: Path) -> None:
    folder = make_tiny(tmp_path / "m", "hubert-group")
    extractor = loaded(
        SelfSupervisedExtractor(
            name="x", model=str(folder), pooling="none", max_chunk_s=0.5, overlap_s=0.1
        )
    )
    whole = loaded(
        SelfSupervisedExtractor(name="x", model=str(folder), pooling="none", max_chunk_s=None)
    )
    waveforms, lengths = _batch([20000, 6000, 6000, 45000])
    with torch.inference_mode():
        ours = extractor.forward(waveforms, lengths)
        expected = whole.forward(waveforms, lengths)
    for row in (1, 2):  # short rows are untouched by chunking
        assert torch.equal(ours[row], expected[row])
    for row in (0, 3):
        assert ours[row].shape == expected[row].shape


def test_bad_chunk_settings(tmp_path: Path) -> None:
    folder = make_tiny(tmp_path / "m", "wavlm-group")
    with pytest.raises(UserError, match="overlap"):
        loaded(SelfSupervisedExtractor(name="x", model=str(folder), max_chunk_s=1.0, overlap_s=1.0))
    with pytest.raises(UserError, match="storage_dtype"):
        loaded(SelfSupervisedExtractor(name="x", model=str(folder), storage_dtype="int8"))


def test_runner_chunks_long_files_and_stores_float16(make_cfg, tmp_path: Path) -> None:
    import soundfile as sf

    root = tmp_path / "long"
    root.mkdir()
    sf.write(root / "a.wav", _long_signal(16000 * 4).numpy(), 16000, subtype="FLOAT")
    sf.write(root / "b.wav", _long_signal(16000 * 1).numpy(), 16000, subtype="FLOAT")
    folder = make_tiny(tmp_path / "m", "wav2vec2-layer")
    base = [
        "extractor=xlsr",
        f"extractor.model={folder}",
        "extractor.pooling=none",
        "dataset=folder",
        f"dataset.root={root}",
    ]
    whole = extract(make_cfg(*base, "extractor.max_chunk_s=null", out="whole"))
    half = extract(
        make_cfg(
            *base,
            "extractor.max_chunk_s=1.5",
            "extractor.overlap_s=0.5",
            "extractor.storage_dtype=float16",
            out="half",
        )
    )
    a = pd.read_parquet(whole.output_dir / "frames" / "index.parquet").set_index("id")
    b = pd.read_parquet(half.output_dir / "frames" / "index.parquet").set_index("id")
    assert a["n_frames"].to_dict() == b["n_frames"].to_dict()
    shard = pq_schema(half.output_dir / b["shard"].iloc[0])
    assert str(shard.field("layer_3_0").type) == "halffloat"
    frames = pd.read_parquet(half.output_dir / b["shard"].iloc[0])
    assert frames["layer_3_0"].dtype == np.float16 and np.isfinite(frames["layer_3_0"]).all()


def pq_schema(path: Path):
    import pyarrow.parquet as pq

    return pq.read_schema(path)


def test_onednn_linears_match_the_stock_model(tmp_path: Path) -> None:
    import copy

    from audio_models.pipeline.onednn import OneDnnLinear, use_onednn_linears

    model = AutoModel.from_pretrained(make_tiny(tmp_path / "m", "wav2vec2-layer")).eval()
    fast = copy.deepcopy(model)
    n = use_onednn_linears(fast)
    assert n == sum(isinstance(m, OneDnnLinear) for m in fast.modules()) > 0
    x = 0.1 * torch.randn(2, 16000, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model(x).last_hidden_state
        ours = fast(x).last_hidden_state
    assert (ours - expected).abs().max() <= 1e-5
    assert fast.state_dict().keys() == model.state_dict().keys()
    layer = next(m for m in fast.modules() if isinstance(m, OneDnnLinear))
    h = torch.randn(3, layer.in_features)
    # Gradients and autocast take the stock path, bit for bit.
    assert torch.equal(layer(h), torch.nn.functional.linear(h, layer.weight, layer.bias))


def test_runner_names_the_cpu_linear_backend(make_cfg, tmp_path: Path) -> None:
    folder = make_tiny(tmp_path / "m", "hubert-group")
    base = ["extractor=hubert", f"extractor.model={folder}"]
    fast = extract(make_cfg(*base, out="fast"))
    stock = extract(make_cfg(*base, "device.onednn_linear=false", out="stock"))
    assert fast.tags["cpu_linear_backend"] == "oneDNN"
    assert stock.tags["cpu_linear_backend"] == "default"
    a = pd.read_parquet(fast.output_dir / "features.parquet").set_index("id")
    b = pd.read_parquet(stock.output_dir / "features.parquet").set_index("id").loc[a.index]
    np.testing.assert_allclose(np.stack(a["layer_3_mean"]), np.stack(b["layer_3_mean"]), atol=1e-5)
