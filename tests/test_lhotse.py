"""dataset=lhotse: CutSet manifests read with lhotse, cuts as items, supervisions as labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from lhotse import CutSet, MonoCut, Recording, SupervisionSegment
from lhotse.audio import AudioSource

import audio_models as am
from audio_models.data.corpora import LhotseDataset
from audio_models.utils.errors import UserError
from runners.extract import extract

RATE = 16000


def _wav(path: Path, seconds: float, channels: int = 1, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    x = 0.3 * np.sin(2 * np.pi * (120 + 20 * seed) * t) + 0.01 * rng.standard_normal(t.size)
    sf.write(path, np.stack([x] * channels, axis=1).astype(np.float32), RATE)
    return path


def _cut(rec: Recording, cut_id: str, start: float, duration: float, sups: list) -> MonoCut:
    return MonoCut(
        id=cut_id,
        start=start,
        duration=duration,
        channel=0,
        recording=rec,
        supervisions=sups,
    )


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    audio = tmp_path / "audio"
    audio.mkdir()
    rec_a = Recording.from_file(_wav(audio / "a.wav", 3.0), recording_id="rec-a")
    rec_b = Recording.from_file(_wav(audio / "b.wav", 2.0, seed=1), recording_id="rec-b")
    cuts = CutSet.from_cuts(
        [
            _cut(
                rec_a,
                "a-1",
                0.5,
                1.5,
                [
                    SupervisionSegment(
                        "s1",
                        "rec-a",
                        0.5,
                        0.7,
                        text="hello",
                        speaker="09",
                        language="en",
                        custom={"emotion": "neutral", "arousal": 0.25},
                    ),
                    SupervisionSegment("s2", "rec-a", 1.3, 0.6, text="world", speaker="09"),
                ],
            ),
            _cut(
                rec_b,
                "b-1",
                0.0,
                2.0,
                [
                    SupervisionSegment("s3", "rec-b", 0.0, 1.0, text="one", speaker="007"),
                    SupervisionSegment("s4", "rec-b", 1.0, 1.0, text="two", speaker="12"),
                ],
            ),
        ]
    )
    path = tmp_path / "cuts.jsonl.gz"
    cuts.to_file(path)
    return path


def test_cuts_become_items_with_their_supervisions(manifest: Path) -> None:
    items = LhotseDataset(cuts=str(manifest)).items
    assert [(i.id, Path(i.path).name, i.start, i.end) for i in items] == [
        ("a-1", "a.wav", 0.5, 2.0),
        ("b-1", "b.wav", 0.0, 2.0),
    ]
    assert items[0].labels == {
        "speaker": "09",
        "transcript": "hello world",
        "language": "en",
        "emotion": "neutral",
        "arousal": 0.25,
    }
    # Two speakers in one cut: both, in time order; ids keep their characters.
    assert items[1].labels["speaker"] == "007,12"
    assert items[1].labels["language"] is None and items[1].labels["emotion"] is None


def test_each_row_is_the_cut_and_a_rerun_resumes(make_cfg, manifest: Path) -> None:
    cfg = make_cfg("extractor=egemaps", "dataset=lhotse", f"dataset.cuts={manifest}")
    first = extract(cfg)
    table = pd.read_parquet(first.output_dir / "features.parquet").set_index("id")
    assert list(table.index) == ["a-1", "b-1"]
    assert table.loc["a-1", "speaker"] == "09" and table.loc["b-1", "transcript"] == "one two"
    extractor = am.load_extractor("egemaps")
    direct = extractor.process_file(str(manifest.parent / "audio" / "a.wav"), start=0.5, end=2.0)
    np.testing.assert_allclose(table.loc["a-1", extractor.feature_names].to_numpy(float), direct)
    again = extract(cfg)
    assert again.metrics["n_skipped_resumed"] == 2


def test_a_cutset_in_python(manifest: Path) -> None:
    cuts = CutSet.from_file(manifest)
    df = am.extract(cuts, "egemaps", num_workers=0)
    assert len(df) == 2 and list(df["speaker"]) == ["09", "007,12"]
    starts = list(df.index.get_level_values("start"))
    assert starts == [pd.Timedelta(seconds=0.5), pd.Timedelta(0)]


def _write(cuts: list[MonoCut], path: Path) -> Path:
    CutSet.from_cuts(cuts).to_file(path)
    return path


def test_refused_cuts_name_the_cut_and_never_run(tmp_path: Path) -> None:
    wav = _wav(tmp_path / "a.wav", 1.0)
    rec = Recording.from_file(wav, recording_id="r")
    marker = tmp_path / "ran"
    piped = Recording(
        id="p",
        sources=[AudioSource(type="command", channels=[0], source=f"touch {marker}; cat {wav}")],
        sampling_rate=RATE,
        num_samples=RATE,
        duration=1.0,
    )
    stereo = Recording.from_file(_wav(tmp_path / "s.wav", 1.0, channels=2), recording_id="s")
    cases = {
        "command": (_cut(piped, "c", 0, 1, []), "type 'command' is refused"),
        "speed": (_cut(rec.perturb_speed(1.1), "sp", 0, 0.5, []), "has transforms"),
        "mixed": (_cut(rec, "m1", 0, 0.5, []).append(_cut(rec, "m2", 0, 0.5, [])), "MixedCut"),
        "channel": (_cut(stereo, "ch", 0, 1, []), r"selects channel\(s\) \[0\] of a 2-channel"),
    }
    for name, (cut, message) in cases.items():
        path = _write([cut], tmp_path / f"{name}.jsonl")
        with pytest.raises(UserError, match=message):
            _ = LhotseDataset(cuts=str(path)).items
    assert not marker.exists()
    with pytest.raises(UserError, match="does not exist"):
        _ = LhotseDataset(cuts=str(tmp_path / "none.jsonl")).items
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(UserError, match="cannot read lhotse manifest"):
        _ = LhotseDataset(cuts=str(broken)).items
