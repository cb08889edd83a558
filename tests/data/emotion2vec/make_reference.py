"""Compute ``reference.npz``: FunASR's own Emotion2vec outputs for the tiny checkpoints of
``tests/emotion2vec_checkpoints.py`` (see README.md here for the environment). Not a test and
not part of the package: it needs FunASR, which the project does not depend on.

Run from the repository root: ``python tests/data/emotion2vec/make_reference.py``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from funasr import AutoModel, __version__

from tests.emotion2vec_checkpoints import VARIANTS, make_checkpoint, signals


def main() -> None:
    arrays: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            folder = make_checkpoint(Path(tmp) / variant, variant)
            model = AutoModel(model=str(folder), device="cpu", disable_update=True)
            # The tiny checkpoint has exactly the keys FunASR's model has (plus, for "plus",
            # the pretraining decoder's, which FunASR builds too): nothing left at random init.
            state = torch.load(folder / "model.pt", weights_only=True)
            state = state.get("model", state)
            theirs = set(model.model.state_dict())
            assert theirs == set(state), (sorted(theirs - set(state)), sorted(set(state) - theirs))
            for i, signal in enumerate(signals()):
                frame = model.generate(input=signal, granularity="frame")[0]
                utterance = model.generate(input=signal, granularity="utterance")[0]
                arrays[f"{variant}_frames_{i}"] = np.asarray(frame["feats"], dtype=np.float32)
                arrays[f"{variant}_utterance_{i}"] = np.asarray(
                    utterance["feats"], dtype=np.float32
                )
                arrays[f"{variant}_scores_{i}"] = np.asarray(utterance["scores"], dtype=np.float32)
                arrays[f"{variant}_labels"] = np.asarray(utterance["labels"])
    arrays["funasr_version"] = np.asarray(__version__)
    arrays["torch_version"] = np.asarray(torch.__version__)
    out = Path(__file__).with_name("reference.npz")
    np.savez_compressed(out, **arrays)
    print(out, out.stat().st_size, "bytes;", {k: v.shape for k, v in arrays.items()})


if __name__ == "__main__":
    main()
