"""SpeechBrain ECAPA on a tiny model written in SpeechBrain's hyperparams format."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from audio_models.speech.ecapa import EcapaExtractor, check_hyperparams
from audio_models.testing import (
    FULL_ECAPA,
    HYPERPARAMS_TEMPLATE,
    TINY_ECAPA,
    loaded,
    make_tiny_ecapa,
)
from audio_models.utils.errors import UserError
from runners.extract import extract


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

    extractor = loaded(EcapaExtractor(name="ecapa", model=str(tiny_ecapa)))
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
    normalized = loaded(EcapaExtractor(name="ecapa", model=str(tiny_ecapa), normalize=True))
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
        loaded(EcapaExtractor(name="ecapa", model=str(folder)))
    assert not marker.exists()


@pytest.mark.usefixtures("offline_hub")
def test_missing_model_offline_is_one_clear_error() -> None:
    with pytest.raises(UserError, match=r"cannot load model 'speechbrain/no-such'.*download"):
        loaded(EcapaExtractor(name="ecapa", model="speechbrain/no-such"))


def test_runner_writes_embeddings(make_cfg, tiny_ecapa: Path) -> None:
    result = extract(make_cfg("extractor=ecapa", f"extractor.model={tiny_ecapa}"))
    table = pd.read_parquet(result.output_dir / "features.parquet")
    assert np.stack(table["embedding"]).shape == (24, 12)
    assert result.tags["provenance.ecapa.padding"] == "equal-length groups"
    assert len(result.tags["provenance.ecapa.weights_sha256"]) == 64


def test_long_recordings_average_chunk_embeddings(tiny_ecapa: Path) -> None:
    extractor = loaded(EcapaExtractor(name="ecapa", model=str(tiny_ecapa), max_chunk_s=1.0))
    whole = loaded(EcapaExtractor(name="ecapa", model=str(tiny_ecapa), max_chunk_s=None))
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


# -- hyperparams that run code ---------------------------------------------------------------
# Each payload is appended to a working tiny model's hyperparams (or wraps it, for a directive)
# and, if HyperPyYAML ever read it, would create the marker file: by a command, or by
# importing a module whose import creates it.


@dataclass
class Bait:
    folder: Path
    marker: Path
    module: str  # importing it creates the marker (it also defines C and x)

    @property
    def touch(self) -> str:
        return f'["touch {self.marker}"]'

    def write(self, text: str) -> None:
        (self.folder / "hyperparams.yaml").write_text(text)


@pytest.fixture
def bait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Bait]:
    found = Bait(
        folder=make_tiny_ecapa(tmp_path / "evil"),
        marker=tmp_path / "pwned",
        module=f"pwned_{uuid.uuid4().hex[:12]}",
    )
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / f"{found.module}.py").write_text(
        f"open({str(found.marker)!r}, 'w').close()\nclass C:\n    pass\nx = print\n"
    )
    monkeypatch.syspath_prepend(str(modules))
    yield found
    sys.modules.pop(found.module, None)


TEMPLATE = HYPERPARAMS_TEMPLATE.format(**TINY_ECAPA)
BASE = len(TEMPLATE.splitlines())  # appended payloads start on line BASE + 1

# name -> (payload, line of the refused node within the payload, what the message names)
PAYLOADS: dict[str, tuple[Callable[[Bait], str], int, str]] = {
    "flow-mapping-hash": (
        lambda b: f'boom: {{a: "#", b: !apply:os.system {b.touch}}}\n',
        1,
        "'!apply:os.system'",
    ),
    "multi-line-string-hash": (
        lambda b: f'boom: {{a: "one\n  # two", b: !apply:os.system {b.touch}}}\n',
        2,
        "'!apply:os.system'",
    ),
    "hash-in-key": (lambda b: f'"#x": !apply:os.system {b.touch}\n', 1, "'!apply:os.system'"),
    "python-object-apply": (
        lambda b: f"boom: !!python/object/apply:os.system {b.touch}\n",
        1,
        "'tag:yaml.org,2002:python/object/apply:os.system'",
    ),
    "long-form-python-tag": (
        lambda b: f"boom: !<tag:yaml.org,2002:python/object/apply:os.system> {b.touch}\n",
        1,
        "'tag:yaml.org,2002:python/object/apply:os.system'",
    ),
    "python-name": (
        lambda b: f"boom: !!python/name:{b.module}.x\n",
        1,
        "python/name:",
    ),
    "python-module": (
        lambda b: f"boom: !!python/module:{b.module}\n",
        1,
        "python/module:",
    ),
    "python-object-new": (
        lambda b: f"boom: !!python/object/new:{b.module}.C []\n",
        1,
        "python/object/new:",
    ),
    "verbatim-tag": (
        lambda b: f"boom: !<!apply:os.system> {b.touch}\n",
        1,
        "'!apply:os.system'",
    ),
    "percent-encoded-tag": (
        lambda b: f"boom: !apply:os%2Esystem {b.touch}\n",
        1,
        "'!apply:os.system'",
    ),
    "tab-after-tag": (  # PyYAML cannot read it: refused, whatever ruamel.yaml makes of it
        lambda b: f"boom:\t!apply:os.system\t{b.touch}\n",
        1,
        "PyYAML cannot read",
    ),
    "upper-case-tag": (lambda b: f"boom: !APPLY:os.system {b.touch}\n", 1, "'!APPLY:os.system'"),
    "anchor-and-aliases": (
        lambda b: f"cmd: &cmd !apply:os.system {b.touch}\nboom: [*cmd, *cmd]\n",
        1,
        "'!apply:os.system'",
    ),
    "tuple-string": (
        lambda b: f'boom: "(!!python/object/apply:os.system [touch {b.marker}])"\n',
        1,
        "'!' inside the value",
    ),
    "reference-splice": (
        lambda b: (
            f'p: "(!!python/object/apply:os.system [touch {b.marker}]"\nq: ")"\nboom: !ref <p><q>\n'
        ),
        1,
        "'!' inside the value",
    ),
    "allowed-prefix-getattr-chain": (
        lambda b: f"boom: !apply:torch.nn.functional.importlib.import_module [{b.module}]\n",
        1,
        "'!apply:torch.nn.functional.importlib.import_module'",
    ),
    "applyref": (
        lambda b: f"boom: !applyref:os.system {b.touch}\n",
        1,
        "'!applyref:os.system'",
    ),
    "new-behind-hash": (
        lambda b: f'boom: {{a: "#", b: !new:subprocess.Popen [["touch", "{b.marker}"]]}}\n',
        1,
        "'!new:subprocess.Popen'",
    ),
    "name-behind-hash": (
        lambda b: f'boom: {{a: "#", b: !name:{b.module}.x }}\n',
        1,
        "'!name:{}.x'",
    ),
    "module-behind-hash": (
        lambda b: f'boom: {{a: "#", b: !module:{b.module} }}\n',
        1,
        "'!module:",
    ),
    "include-behind-hash": (
        lambda b: 'boom: {a: "#", b: !include:included.yaml }\n',
        1,
        "'!include:included.yaml'",
    ),
}


def _spy_on_hyperpyyaml(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Record every HyperPyYAML load SpeechBrain starts (and let it run)."""
    import speechbrain.inference.interfaces as interfaces

    calls: list[object] = []
    real = interfaces.load_hyperpyyaml

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(interfaces, "load_hyperpyyaml", spy)
    return calls


@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_code_running_hyperparams_are_refused_before_hyperpyyaml(
    bait: Bait, payload: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    build, line, named = PAYLOADS[payload]
    bait.write(TEMPLATE + build(bait))
    # What !include would read: code of its own, never checked by a line-based check.
    (bait.folder / "included.yaml").write_text(f"boom: !apply:os.system {bait.touch}\n")
    calls = _spy_on_hyperpyyaml(monkeypatch)
    with pytest.raises(UserError) as refused:
        loaded(EcapaExtractor(name="ecapa", model=str(bait.folder)))
    message = str(refused.value)
    assert f"line {BASE + line}: refusing a hyperparams file" in message
    assert named.format(bait.module) in message
    assert "download" not in message
    assert calls == []
    time.sleep(0.2 if "Popen" in payload else 0)  # a started process would touch late
    assert not bait.marker.exists()


def test_tag_directive_is_refused(bait: Bait, monkeypatch: pytest.MonkeyPatch) -> None:
    # %TAG !e! !apply: turns !e!os.system into !apply:os.system.
    bait.write(f"%TAG !e! !apply:\n---\n{TEMPLATE}boom: !e!os.system {bait.touch}\n")
    calls = _spy_on_hyperpyyaml(monkeypatch)
    with pytest.raises(UserError, match=r"line 1: .*directive.*%TAG !e! !apply:") as refused:
        loaded(EcapaExtractor(name="ecapa", model=str(bait.folder)))
    assert "download" not in str(refused.value)
    assert calls == []
    assert not bait.marker.exists()


def test_runner_refuses_code_running_hyperparams(bait: Bait, make_cfg) -> None:
    bait.write(TEMPLATE + f"boom: !!python/object/apply:os.system {bait.touch}\n")
    with pytest.raises(UserError, match=r"line \d+: refusing a hyperparams file.*python/object"):
        extract(make_cfg("extractor=ecapa", f"extractor.model={bait.folder}"))
    assert not bait.marker.exists()


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("boom: !ref <embedding_model.__class__>\n", "reference <embedding_model.__class__>"),
        ("boom: !ref <n_mels>/<compute_features>\n", "<compute_features> inside a string"),
        ("boom: !copy <n_mels>\n", "'!copy'"),
        ("boom: !PLACEHOLDER\n", "'!PLACEHOLDER'"),
        ("boom: !tuple [1, 2]\n", "'!tuple'"),
        ("boom: !new:speechbrain.lobes.features.Fbank 3\n", "with a scalar argument"),
        ("boom: !new:speechbrain.lobes.features.Fbank2\n", "'!new:speechbrain.lobes.features"),
        ("boom: !new:speechbrain.lobes.features.fbank\n", "'!new:speechbrain.lobes.features"),
        ("? !new:speechbrain.lobes.features.Fbank\n: 1\n", "on a key"),
        ("boom: 2001-12-14\n", "'tag:yaml.org,2002:timestamp'"),
    ],
)
def test_only_plain_data_refs_and_the_models_classes_pass(text: str, named: str) -> None:
    with pytest.raises(UserError, match=rf"line {BASE + 1}: .*{re.escape(named)}"):
        check_hyperparams(TEMPLATE + text, "hyperparams.yaml")


def test_published_hyperparams_and_harmless_yaml_pass(tiny_ecapa: Path) -> None:
    # The published speechbrain/spkrec-ecapa-voxceleb file has this shape and these classes.
    keys = check_hyperparams(HYPERPARAMS_TEMPLATE.format(**FULL_ECAPA), "hyperparams.yaml")
    assert {"pretrained_path", "embedding_model", "pretrainer"} <= keys
    # Flow mappings, strings with '#', multi-line strings, anchors/aliases, tuples and
    # interpolated references are plain data: such a file still loads.
    extra = (
        'notes: {a: "#", b: "x # y"}\n'
        "description: |\n  multi-line\n  # not a comment\n"
        "sizes: &sizes [1, 2]\nagain: *sizes\n"
        "pair: (1, 2)\n"
        "where: !ref <pretrained_path>/embedding_model.ckpt\n"
    )
    (tiny_ecapa / "hyperparams.yaml").write_text(TEMPLATE + extra)
    extractor = loaded(EcapaExtractor(name="ecapa", model=str(tiny_ecapa)))
    hparams = extractor.classifier.hparams
    assert hparams.pair == (1, 2) and hparams.again == [1, 2]
    assert hparams.notes == {"a": "#", "b": "x # y"}
    assert hparams.where == f"{tiny_ecapa}/embedding_model.ckpt"


def test_local_model_that_fails_to_load_does_not_say_download(tiny_ecapa: Path) -> None:
    (tiny_ecapa / "embedding_model.ckpt").unlink()
    with pytest.raises(UserError, match="cannot load SpeechBrain model from") as failed:
        loaded(EcapaExtractor(name="ecapa", model=str(tiny_ecapa)))
    assert "download" not in str(failed.value)


@pytest.mark.parametrize("payload", ["tuple-string", "reference-splice"])
def test_tuple_payloads_are_refused_in_a_fresh_process(bait: Bait, payload: str) -> None:
    # HyperPyYAML re-reads a "(...)" string as a tuple with PyYAML's unsafe loader, but only
    # in the first load of a process (later ones resolve it differently): a real run's case.
    build, line, named = PAYLOADS[payload]
    bait.write(TEMPLATE + build(bait))
    code = (
        "import sys\n"
        "from audio_models.speech.ecapa import EcapaExtractor\n"
        "from audio_models.utils.errors import UserError\n"
        "try:\n"
        "    EcapaExtractor(name='ecapa', model=sys.argv[1]).load()\n"
        "except UserError as exc:\n"
        "    print(exc)\n"
        "    sys.exit(3)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(bait.folder)],
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "AUDIO_MODELS_CACHE": str(bait.folder.parent / "cache")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 3, run.stderr[-2000:]
    assert f"line {BASE + line}: refusing a hyperparams file" in run.stdout
    assert named in run.stdout
    assert not bait.marker.exists()
