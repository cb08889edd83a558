"""SpeechBrain ECAPA on a tiny model written in SpeechBrain's hyperparams format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from audio_models.speech.ecapa import EcapaExtractor
from audio_models.utils.errors import UserError
from benchmarks.ssl import HYPERPARAMS_TEMPLATE, TINY_ECAPA, save_random_ecapa
from runners.extract import extract


def make_tiny_ecapa(folder: Path) -> Path:
    return save_random_ecapa(folder, **TINY_ECAPA)


@pytest.fixture
def tiny_ecapa(tmp_path: Path) -> Path:
    return make_tiny_ecapa(tmp_path / "ecapa")


def _batch(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    waveforms = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        waveforms[i, :n] = 0.1 * torch.randn(n, generator=generator)
    return waveforms, torch.tensor(lengths)


def test_equals_speechbrain_encode_batch_and_batched_equals_alone(tiny_ecapa: Path) -> None:
    from speechbrain.inference.speaker import EncoderClassifier

    extractor = EcapaExtractor(name="ecapa", model=str(tiny_ecapa))
    reference = EncoderClassifier.from_hparams(
        source=str(tiny_ecapa),
        savedir=str(tiny_ecapa.parent / "sb"),
        overrides={"pretrained_path": str(tiny_ecapa)},
    )
    waveforms, lengths = _batch([16000, 7000, 16000, 12000])
    with torch.inference_mode():
        ours = extractor.forward(waveforms, lengths)
        for row, n in enumerate(lengths.tolist()):
            expected = reference.encode_batch(waveforms[row : row + 1, :n])[0, 0]
            assert ours[row].shape == (12,)
            assert (ours[row] - expected).abs().max() <= 1e-5
        # Why rows are grouped by length: zero padding changes ECAPA's embedding.
        padded = reference.encode_batch(waveforms[:2], lengths[:2] / lengths[:2].max())[1, 0]
    assert (padded - ours[1]).abs().max() > 1e-4
    normalized = EcapaExtractor(name="ecapa", model=str(tiny_ecapa), normalize=True)
    with torch.inference_mode():
        ours = normalized.forward(waveforms[:1], lengths[:1])[0]
        expected = reference.encode_batch(waveforms[:1], normalize=True)[0, 0]
    assert (ours - expected).abs().max() <= 1e-5 and (ours - expected).abs().max() < (
        ours - extractor.forward(waveforms[:1], lengths[:1])[0]
    ).abs().max()


def test_refuses_hyperparams_that_run_code(tmp_path: Path) -> None:
    folder = make_tiny_ecapa(tmp_path / "evil")
    marker = tmp_path / "pwned"
    text = (
        HYPERPARAMS_TEMPLATE.format(**TINY_ECAPA) + f"boom: !apply:os.system ['touch {marker}']\n"
    )
    (folder / "hyperparams.yaml").write_text(text)
    with pytest.raises(UserError, match="refusing a hyperparams file"):
        EcapaExtractor(name="ecapa", model=str(folder))
    assert not marker.exists()


@pytest.mark.usefixtures("offline_hub")
def test_missing_model_offline_is_one_clear_error() -> None:
    with pytest.raises(UserError, match=r"cannot load model 'speechbrain/no-such'.*download"):
        EcapaExtractor(name="ecapa", model="speechbrain/no-such")


def test_runner_writes_embeddings(make_cfg, tiny_ecapa: Path) -> None:
    result = extract(make_cfg("extractor=ecapa", f"extractor.model={tiny_ecapa}"))
    table = pd.read_parquet(result.output_dir / "features.parquet")
    assert np.stack(table["embedding"]).shape == (24, 12)
    assert result.tags["provenance.ecapa.padding"] == "equal-length groups"
    assert len(result.tags["provenance.ecapa.weights_sha256"]) == 64


def test_long_recordings_average_chunk_embeddings(tiny_ecapa: Path) -> None:
    extractor = EcapaExtractor(name="ecapa", model=str(tiny_ecapa), max_chunk_s=1.0)
    whole = EcapaExtractor(name="ecapa", model=str(tiny_ecapa), max_chunk_s=None)
    waveforms, lengths = _batch([40000, 12000])
    with torch.inference_mode():
        ours = extractor.forward(waveforms, lengths)
        # 2.5 s in three chunks of 13334/13333/13333 samples, weighted by length
        parts = [(0, 13333), (13333, 26667), (26667, 40000)]
        expected = (
            sum(
                whole.forward(waveforms[:1, a:b], torch.tensor([b - a]))[0] * (b - a)
                for a, b in parts
            )
            / 40000
        )
        short = whole.forward(waveforms[1:, :12000], lengths[1:])[0]
    assert (ours[0] - expected).abs().max() <= 1e-5
    assert torch.equal(ours[1], short)  # shorter than a chunk: untouched
