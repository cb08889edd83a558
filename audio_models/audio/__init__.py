"""Signal-level feature extractors: openSMILE, librosa, torchaudio Kaldi filterbanks."""

from __future__ import annotations

from typing import Literal

# Here rather than in ``io`` (which imports torch) so a configuration can be checked first.
ChannelPolicy = Literal["mean", "first"]
CHANNEL_POLICIES: tuple[str, ...] = ("mean", "first")
