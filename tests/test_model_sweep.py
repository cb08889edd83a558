"""The affective-computing models in one Hydra sweep, compared by ``runners.compare`` (issue
#17): each model is a user's own option (a YAML on ``hydra.searchpath`` naming a local model
directory), the way a researcher with downloaded checkpoints would sweep them."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

import audio_models as am
from audio_models.testing import make_tiny_classifier, make_tiny_ser_dim, make_tiny_whisper
from tests.emotion2vec_checkpoints import make_checkpoint
from tests.sweeps import FAST, run, runs_of

# option name → (registered extractor it extends, model key, width of its output)
MODELS = {
    "whisper_encoder": ("model", 32),  # the tiny encoder's d_model, mean-pooled last layer
    "ser_dim": ("model", 3),  # arousal, dominance, valence
    "audio_classifier": ("model", 3),  # p_<label> of the tiny head's three classes
    "emotion2vec": ("checkpoint", 16 + 9),  # embedding and the 9-class head's p_<label>
}


def _models(root: Path) -> dict[str, Path]:
    return {
        "whisper_encoder": make_tiny_whisper(root / "whisper"),
        "ser_dim": make_tiny_ser_dim(root / "ser_dim"),
        "audio_classifier": make_tiny_classifier(root / "classifier"),
        "emotion2vec": make_checkpoint(root / "emotion2vec", "plus"),
    }


def test_sweep_of_the_emotion_models_then_compare(tmp_path: Path) -> None:
    models = _models(tmp_path / "models")
    options = tmp_path / "my_conf" / "extractor"
    options.mkdir(parents=True)
    for name, path in models.items():
        key = MODELS[name][0]
        # The tiny Whisper's window is 1 s, so its chunks overlap less than the default 2 s.
        extra = "overlap_s: 0.2\n" if name == "whisper_encoder" else ""
        (options / f"my_{name}.yaml").write_text(
            f"defaults:\n  - {name}\n  - _self_\n{key}: {path}\n{extra}"
        )
    names = ["egemaps", *(f"my_{name}" for name in MODELS)]
    done = run(
        "runners.extract",
        "-m",
        f"extractor={','.join(names)}",
        f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]",
        *FAST,
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    parent, children = runs_of(tmp_path / "mlflow.db")
    assert sorted(c.data.tags["extractor"] for c in children) == sorted(["egemaps", *MODELS])
    assert all(c.info.status == "FINISHED" for c in children)
    assert parent.data.metrics["n_failed_jobs"] == 0

    compared = run("runners.compare", "hydra.run.dir=compare_out", cwd=tmp_path)
    assert compared.returncode == 0, compared.stderr[-3000:]
    table = pd.read_csv(tmp_path / "compare_out" / "comparison.csv")
    widths = dict(zip(table["extractor"], table["n_features"], strict=True))
    assert widths == {"egemaps": 88, **{name: width for name, (_, width) in MODELS.items()}}


def test_am_extract_runs_each_emotion_model(tmp_path: Path) -> None:
    """The Python API with each model: one row per file, the model's named columns."""
    import soundfile as sf

    from benchmarks.reliability import voice

    files = []
    for i, f0 in enumerate((120, 210)):
        path = tmp_path / f"{i}.wav"
        sf.write(path, voice(1.2, f0), 16000)
        files.append(str(path))
    for name, path in _models(tmp_path / "models").items():
        key, width = MODELS[name]
        options = {key: str(path)} | ({"overlap_s": 0.2} if name == "whisper_encoder" else {})
        df = am.extract(files, extractor=name, **options)
        assert len(df) == 2, name
        described = am.load_extractor(name, **options)
        if described.feature_groups:  # list columns, one per layer (and statistic)
            for column, size in described.feature_groups:
                assert df[column].map(len).eq(size).all(), (name, column)
            assert sum(size for _, size in described.feature_groups) == width, name
        else:
            assert list(df.columns[-width:]) == described.feature_names, name
            assert df[described.feature_names].notna().all().all(), name
