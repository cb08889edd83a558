"""emotion2vec: the port gives FunASR's numbers (reference computed once with FunASR, see
tests/data/emotion2vec/README.md), batched equals one by one, clear errors, the runner."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import audio_models.speech.emotion2vec  # noqa: F401  (registers the extractor)
from audio_models.speech.emotion2vec import Emotion2vecExtractor, frame_counts, parse_conv_spec
from audio_models.utils.errors import UserError
from audio_models.utils.provenance import sha256_file
from runners.extract import extract
from tests.emotion2vec_checkpoints import VARIANTS, make_checkpoint, signals

REFERENCE = Path(__file__).parent / "data" / "emotion2vec" / "reference.npz"
# FunASR and the port differ by float32 rounding only (observed: 2.2e-6 on frames of
# magnitude ~3, 6e-8 on probabilities).
ATOL = 1e-5


@pytest.fixture(params=VARIANTS)
def checkpoint(request, tmp_path: Path) -> tuple[str, Path]:
    return request.param, make_checkpoint(tmp_path / request.param, request.param)


def _batch(sigs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in sigs])
    waveforms = torch.zeros(len(sigs), int(lengths.max()))
    for row, s in enumerate(sigs):
        waveforms[row, : len(s)] = torch.from_numpy(s)
    return waveforms, lengths


def test_outputs_equal_funasr_reference(checkpoint) -> None:
    variant, folder = checkpoint
    reference = np.load(REFERENCE)
    frames = Emotion2vecExtractor(name="x", checkpoint=str(folder), pooling="none")
    pooled = Emotion2vecExtractor(name="x", checkpoint=str(folder / "model.pt"))
    labels = [str(t).rsplit("/", 1)[-1].strip("<>") for t in reference[f"{variant}_labels"]]
    assert [n for n in pooled.feature_names if n.startswith("p_")] == [f"p_{t}" for t in labels]
    for i, signal in enumerate(signals()):
        np.testing.assert_allclose(
            frames.process_signal(signal, 16000), reference[f"{variant}_frames_{i}"], atol=ATOL
        )
        values = pooled.process_signal(signal, 16000)
        dim = reference[f"{variant}_utterance_{i}"].shape[0]
        np.testing.assert_allclose(values[:dim], reference[f"{variant}_utterance_{i}"], atol=ATOL)
        np.testing.assert_allclose(values[dim:], reference[f"{variant}_scores_{i}"], atol=ATOL)


@pytest.mark.parametrize("pooling", ["mean", "none"])
def test_batched_equals_one_by_one(checkpoint, pooling: str) -> None:
    _, folder = checkpoint
    extractor = Emotion2vecExtractor(name="x", checkpoint=str(folder), pooling=pooling)
    sigs = signals()
    sigs = [sigs[1], sigs[0], sigs[2], sigs[1]]  # unequal lengths and a repeated one
    waveforms, lengths = _batch(sigs)
    with torch.inference_mode():
        batched = extractor.forward(waveforms, lengths)
    for signal, out in zip(sigs, batched, strict=True):
        np.testing.assert_allclose(
            out.numpy(), extractor.process_signal(signal, 16000), atol=ATOL, rtol=0
        )


def test_long_recordings_run_in_chunks(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "m", "plus")
    signal = np.concatenate(signals())  # 1.97 s
    whole = Emotion2vecExtractor(name="x", checkpoint=str(folder), pooling="none", max_chunk_s=None)
    chunked = Emotion2vecExtractor(
        name="x", checkpoint=str(folder), pooling="none", max_chunk_s=0.6, overlap_s=0.2
    )
    chunked.load()
    assert len(chunked.chunk_starts(len(signal))) == 5
    a, b = whole.process_signal(signal, 16000), chunked.process_signal(signal, 16000)
    assert (
        a.shape
        == b.shape
        == (int(frame_counts(chunked.settings, torch.tensor([len(signal)]))[0]), 16)
    )
    # Chunks see less context than the whole file (ALiBi attention over the chunk only):
    # close, not equal; a chunk longer than the file changes nothing.
    assert np.abs(a - b).mean() < 0.5 * np.abs(a).mean()
    roomy = Emotion2vecExtractor(name="x", checkpoint=str(folder), pooling="none", max_chunk_s=5)
    np.testing.assert_allclose(roomy.process_signal(signal, 16000), a, atol=ATOL)
    pooled = Emotion2vecExtractor(
        name="x", checkpoint=str(folder), max_chunk_s=0.6, overlap_s=0.2, chunk_batch=3
    )
    values = pooled.process_signal(signal, 16000)
    np.testing.assert_allclose(values[:16], b.mean(0), atol=ATOL)
    assert values[16:].sum() == pytest.approx(1.0, abs=1e-5)


def test_construction_is_cheap_and_import_has_no_torch(tmp_path: Path) -> None:
    lazy = Emotion2vecExtractor(name="x", checkpoint=str(tmp_path / "absent"))
    assert lazy.network is None  # nothing read yet
    with pytest.raises(UserError, match="not found"):
        lazy.load()
    code = "import sys, audio_models.speech.emotion2vec; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_errors(tmp_path: Path, offline_hub) -> None:
    folder = make_checkpoint(tmp_path / "m", "plus")
    with pytest.raises(UserError, match="pooling"):
        Emotion2vecExtractor(name="x", checkpoint=str(folder), pooling="max")
    with pytest.raises(UserError, match="sha256"):
        Emotion2vecExtractor(name="x", checkpoint=str(folder), sha256="0" * 64).load()
    ok = Emotion2vecExtractor(
        name="x", checkpoint=str(folder), sha256=sha256_file(folder / "model.pt")
    )
    ok.load()
    ok.load()  # idempotent
    assert ok.provenance()["emotion2vec.weights_sha256"] == sha256_file(folder / "model.pt")
    with pytest.raises(
        UserError, match=r"cannot load model 'emotion2vec/no-such-model'.*checkpoint"
    ):
        Emotion2vecExtractor(name="x", checkpoint="emotion2vec/no-such-model").load()
    # No model.pt beside the config.
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.yaml").write_text((folder / "config.yaml").read_text())
    with pytest.raises(UserError, match=r"model\.pt not found"):
        Emotion2vecExtractor(name="x", checkpoint=str(tmp_path / "empty")).load()
    # A pickle that would run code is refused before anything runs.
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.yaml").write_text((folder / "config.yaml").read_text())

    class Boom:
        def __reduce__(self):
            return (print, ("executed",))

    (evil / "model.pt").write_bytes(pickle.dumps({"model": Boom()}, protocol=2))
    with pytest.raises(UserError, match="refusing"):
        Emotion2vecExtractor(name="x", checkpoint=str(evil)).load()
    # Labels without a head, or weights that do not fit the config.
    state = torch.load(folder / "model.pt", weights_only=True)
    headless = tmp_path / "headless"
    headless.mkdir()
    (headless / "config.yaml").write_text((folder / "config.yaml").read_text())
    torch.save({k: v for k, v in state.items() if not k.startswith("proj.")}, headless / "model.pt")
    with pytest.raises(UserError, match="no head"):
        Emotion2vecExtractor(name="x", checkpoint=str(headless)).load()
    torch.save({**state, "blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, headless / "model.pt")
    (headless / "config.yaml").write_text((folder / "config.yaml").read_text())
    with pytest.raises(UserError, match=r"shape of blocks\.0\.attn\.qkv\.weight"):
        Emotion2vecExtractor(name="x", checkpoint=str(headless)).load()
    with pytest.raises(UserError, match="not understood"):
        parse_conv_spec("__import__('os').system('true')")
    assert parse_conv_spec("[(512, 10, 5)] + [(512, 3, 2)] * 2") == [
        (512, 10, 5),
        (512, 3, 2),
        (512, 3, 2),
    ]


def test_no_head_gives_embedding_only(tmp_path: Path) -> None:
    import yaml

    folder = make_checkpoint(tmp_path / "m", "plus")
    config = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
    del config["tokenizer"], config["tokenizer_conf"]  # emotion2vec_base: no tokenizer
    (folder / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    extractor = Emotion2vecExtractor(name="x", checkpoint=str(folder))
    assert extractor.feature_names == [f"embedding_{j}" for j in range(16)]
    assert extractor.provenance()["emotion2vec.labels"] == "none"
    reference = np.load(REFERENCE)  # the head does not change the embedding
    values = extractor.process_signal(signals()[0], 16000)
    np.testing.assert_allclose(values, reference["plus_utterance_0"], atol=ATOL)


def test_runner(make_cfg, tmp_path: Path) -> None:
    import soundfile as sf

    folder = make_checkpoint(tmp_path / "m", "plus")
    root = tmp_path / "audio"
    root.mkdir()
    for i, signal in enumerate(signals()):
        sf.write(root / f"s{i}.wav", signal, 16000, subtype="FLOAT")
    result = extract(
        make_cfg(
            "extractor=emotion2vec",
            f"extractor.checkpoint={folder}",
            "dataset=folder",
            f"dataset.root={root}",
        )
    )
    table = pd.read_parquet(result.output_dir / "features.parquet").set_index("id")
    assert len(table) == 3
    reference = np.load(REFERENCE)
    for i in range(3):
        row = table.loc[next(k for k in table.index if f"s{i}" in k)]
        embedding = row[[f"embedding_{j}" for j in range(16)]].to_numpy(dtype=np.float32)
        np.testing.assert_allclose(embedding, reference[f"plus_utterance_{i}"], atol=ATOL)
        probs = row[["p_angry", "p_happy", "p_unk"]].to_numpy(dtype=np.float32)
        np.testing.assert_allclose(probs, reference[f"plus_scores_{i}"][[0, 3, 8]], atol=ATOL)
    assert result.tags["provenance.emotion2vec.weights_sha256"] == sha256_file(folder / "model.pt")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu(checkpoint) -> None:
    _, folder = checkpoint
    extractor = Emotion2vecExtractor(name="x", checkpoint=str(folder))
    waveforms, lengths = _batch(signals())
    with torch.inference_mode():
        cpu = extractor.forward(waveforms, lengths)
        extractor.network.cuda()
        gpu = extractor.forward(waveforms.cuda(), lengths.cuda())
    for a, b in zip(cpu, gpu, strict=True):
        np.testing.assert_allclose(a.numpy(), b.cpu().numpy(), atol=1e-4)
