"""fairseq HuBERT / wav2vec 2.0 checkpoints: safe loading, conversion, and fairseq's reference.

The synthetic checkpoints (tests/fairseq_checkpoints.py) use fairseq's key names and
``cfg``/``args`` layouts with the weights of a tiny transformers model, so a correct conversion
must give that model's numbers.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from audio_models.speech.ssl import FairseqCheckpointExtractor, SelfSupervisedExtractor
from audio_models.testing import loaded
from audio_models.utils.errors import UserError
from runners.extract import extract
from tests.fairseq_checkpoints import (
    argparse_finetuned_wav2vec2,
    hydra_hubert,
)


def _signals() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(4)
    lengths = [16000, 9000, 12345]
    waveforms = torch.zeros(3, 16000)
    for i, n in enumerate(lengths):
        waveforms[i, :n] = 0.2 * torch.randn(n, generator=generator)
    return waveforms, torch.tensor(lengths)


def _hidden(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.inference_mode():
        return list(model(x[None], output_hidden_states=True).hidden_states)


def test_hydra_hubert_checkpoint_gives_the_models_numbers(tmp_path: Path) -> None:
    path, reference = hydra_hubert(tmp_path)
    extractor = loaded(
        FairseqCheckpointExtractor(
            name="hubert_fairseq", checkpoint=str(path), layers="all", pooling="none"
        )
    )
    assert extractor.provenance()["ssl.fairseq_family"] == "hubert"
    assert not extractor.normalize and not extractor.use_mask  # task.normalize, group norm
    waveforms, lengths = _signals()
    with torch.inference_mode():
        ours = extractor.forward(waveforms, lengths)
    for row, n in enumerate(lengths.tolist()):
        expected = torch.cat(_hidden(reference, waveforms[row, :n]), dim=-1)[0]
        assert ours[row].shape == expected.shape
        assert (ours[row] - expected).abs().max() <= 1e-5


def test_argparse_finetuned_wav2vec2_checkpoint(tmp_path: Path) -> None:
    path, reference = argparse_finetuned_wav2vec2(tmp_path)
    extractor = loaded(
        FairseqCheckpointExtractor(
            name="hubert_fairseq", checkpoint=str(path), layers=[0, -1], pooling="mean"
        )
    )
    assert extractor.normalize and extractor.use_mask
    waveforms, lengths = _signals()
    with torch.inference_mode():
        ours = extractor.forward(waveforms, lengths)
    for row, n in enumerate(lengths.tolist()):
        x = waveforms[row, :n]
        states = _hidden(reference, (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7))
        expected = torch.cat([states[0][0].mean(0), states[-1][0].mean(0)])
        assert (ours[row] - expected).abs().max() <= 1e-4


class _Payload:
    def __reduce__(self):
        return (exec, ("open('/tmp/audio_models_fairseq_pwned', 'w').write('x')",))


def test_malicious_checkpoint_is_refused_without_running(tmp_path: Path) -> None:
    marker = Path("/tmp/audio_models_fairseq_pwned")
    marker.unlink(missing_ok=True)
    path = tmp_path / "evil.pt"
    torch.save({"args": _Payload(), "model": {}}, path)
    with pytest.raises(UserError, match="refusing to load"):
        loaded(FairseqCheckpointExtractor(name="x", checkpoint=str(path)))
    assert not marker.exists()


def test_unknown_weights_hash_mismatch_and_missing_file(tmp_path: Path) -> None:
    path, _ = hydra_hubert(tmp_path)
    with pytest.raises(UserError, match="does not match"):
        loaded(FairseqCheckpointExtractor(name="x", checkpoint=str(path), sha256="0" * 64))
    odd, _ = hydra_hubert(tmp_path / "odd", **{"encoder.extra_thing.weight": torch.zeros(2)})
    with pytest.raises(UserError, match="does not know"):
        loaded(FairseqCheckpointExtractor(name="x", checkpoint=str(odd)))
    with pytest.raises(UserError, match="not found"):
        loaded(FairseqCheckpointExtractor(name="x", checkpoint=str(tmp_path / "none.pt")))


def test_runner_with_a_fairseq_checkpoint(make_cfg, tmp_path: Path) -> None:
    path, _ = hydra_hubert(tmp_path)
    from audio_models.utils.provenance import sha256_file

    result = extract(
        make_cfg(
            "extractor=hubert_fairseq",
            f"extractor.checkpoint={path}",
            f"extractor.sha256={sha256_file(path)}",
            "extractor.layers=[2]",
        )
    )
    table = pd.read_parquet(result.output_dir / "features.parquet")
    assert np.stack(table["layer_2_mean"]).shape == (24, 32)
    assert result.tags["provenance.ssl.weights_sha256"] == sha256_file(path)


# -- fairseq's own reference features -------------------------------------------------------

REFERENCE = "librispeech-hubert"


def _reference(speech_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    folder = speech_dir / REFERENCE
    audio, rate = sf.read(folder / "6313-76958-0021.flac", dtype="float32")
    assert rate == 16000
    return audio, np.load(folder / "sample.base.L9.npy")


def _layer9(extractor: SelfSupervisedExtractor, audio: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(audio)[None]
    with torch.inference_mode():
        return extractor.forward(x, torch.tensor([len(audio)]))[0].numpy()


@pytest.mark.skipif(
    not os.environ.get("AUDIO_MODELS_HUBERT_BASE_CKPT"),
    reason="set AUDIO_MODELS_HUBERT_BASE_CKPT to the path of fairseq's hubert_base_ls960.pt "
    "(https://dl.fbaipublicfiles.com/hubert/hubert_base_ls960.pt) to check it against "
    "fairseq's reference layer-9 features",
)
def test_fairseq_reference_layer9_through_hubert_fairseq(speech_dir: Path) -> None:
    audio, expected = _reference(speech_dir)
    extractor = loaded(
        FairseqCheckpointExtractor(
            name="hubert_fairseq",
            checkpoint=os.environ["AUDIO_MODELS_HUBERT_BASE_CKPT"],
            layers=[9],
            pooling="none",
        )
    )
    ours = _layer9(extractor, audio)
    assert ours.shape == expected.shape == (596, 768)
    np.testing.assert_allclose(ours, expected, atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(
    not os.environ.get("AUDIO_MODELS_HUBERT_BASE_HF"),
    reason="set AUDIO_MODELS_HUBERT_BASE_HF to facebook/hubert-base-ls960 (in the local Hugging "
    "Face cache) or a local copy of it to check it against fairseq's reference features",
)
def test_fairseq_reference_layer9_through_hubert(speech_dir: Path) -> None:
    audio, expected = _reference(speech_dir)
    extractor = loaded(
        SelfSupervisedExtractor(
            name="hubert",
            model=os.environ["AUDIO_MODELS_HUBERT_BASE_HF"],
            layers=[9],
            pooling="none",
        )
    )
    ours = _layer9(extractor, audio)
    assert ours.shape == expected.shape == (596, 768)
    np.testing.assert_allclose(ours, expected, atol=1e-3, rtol=1e-3)
