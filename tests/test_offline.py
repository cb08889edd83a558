"""Offline without ``HF_HUB_OFFLINE``: one bounded probe, then the hub libraries run offline.

Without the probe every hub file was retried with back-off (a minute of warnings per model)
before the clear error. These tests make the network unreachable by replacing the socket
functions (no test reaches a hub): the probe's connect fails, and any other connection
attempt (a request that still went out) is counted.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from audio_models.speech import hub
from audio_models.testing import loaded
from audio_models.utils.errors import UserError

# Hub ids that no cache holds: the error must come from the missing model, not a cached copy.
NOT_CACHED = "audio-models-tests/not-cached-anywhere"


class _Network:
    """What the code under test tried: connects (the probe's) and name lookups (requests)."""

    def __init__(self, reachable: bool) -> None:
        self.reachable = reachable
        self.connects: list[tuple[str, int]] = []
        self.timeouts: list[Any] = []
        self.lookups: list[str] = []


@pytest.fixture
def network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[_Network]:
    """No offline switch set, empty caches, nothing probed yet, and an unreachable network."""
    import huggingface_hub.constants as constants
    import transformers.utils.hub as transformers_hub
    from huggingface_hub.utils import reset_sessions

    proxies = [f"{s}_proxy" for s in ("http", "https", "all", "no")]
    probe_env = getattr(hub, "HUB_PROBE_ENV", "AUDIO_MODELS_HUB_PROBE")  # also before the probe
    for name in ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", probe_env]:
        # setenv first: undo then restores the user's value (or its absence).
        monkeypatch.setenv(name, "0")
        monkeypatch.delenv(name)
    for name in proxies + [p.upper() for p in proxies]:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # raising=False: on code without a probe the test still runs (and fails on what it sees).
    monkeypatch.setattr(hub, "_reachable", None, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(transformers_hub, "_is_offline_mode", False)
    state = _Network(reachable=False)
    real_lookup = socket.getaddrinfo

    def connect(address: tuple[str, int], timeout: float | None = None, *args: Any) -> Any:
        state.connects.append(address)
        state.timeouts.append(timeout)
        if not state.reachable:
            raise OSError(101, "Network is unreachable")
        return socket.socket()  # a context manager; never connected

    def lookup(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host in ("localhost", "127.0.0.1", "::1"):
            return real_lookup(host, *args, **kwargs)
        state.lookups.append(str(host))
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", connect)
    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    yield state
    monkeypatch.undo()
    reset_sessions()  # sessions made offline must not outlive the test


def test_unreachable_hub_is_probed_once_and_models_fail_offline_at_once(
    network: _Network,
) -> None:
    import huggingface_hub.constants as constants

    from audio_models.speech.ecapa import EcapaExtractor
    from audio_models.speech.s2t import Speech2TextExtractor
    from audio_models.speech.ssl import SelfSupervisedExtractor

    message = rf"cannot load model '{NOT_CACHED}' .*Without network access, download it first"
    with pytest.raises(UserError, match=message):
        loaded(SelfSupervisedExtractor(name="xlsr", model=NOT_CACHED))
    with pytest.raises(UserError, match=message):
        loaded(Speech2TextExtractor(model=NOT_CACHED))
    with pytest.raises(UserError, match=rf"cannot load model '{NOT_CACHED}'"):
        loaded(EcapaExtractor(name="ecapa", model=NOT_CACHED))
    # One probe for the process, to the hub's own address; then no request left at all (the
    # retry storm was requests, each retried with back-off).
    assert network.connects == [("huggingface.co", 443)]
    assert network.timeouts == [hub.HUB_PROBE_TIMEOUT_S] and hub.HUB_PROBE_TIMEOUT_S <= 5
    assert network.lookups == []
    assert constants.HF_HUB_OFFLINE is True and hub.hub_offline()
    assert "HF_HUB_OFFLINE" not in os.environ  # the process's libraries, not the environment


def test_reachable_hub_stays_online_and_is_probed_once(network: _Network) -> None:
    import huggingface_hub.constants as constants

    network.reachable = True
    assert not hub.hub_offline() and not hub.hub_offline()
    assert network.connects == [("huggingface.co", 443)]
    assert constants.HF_HUB_OFFLINE is False


def test_hf_hub_offline_set_after_import_switches_the_libraries(
    network: _Network, monkeypatch: pytest.MonkeyPatch
) -> None:
    """huggingface-hub and transformers read HF_HUB_OFFLINE once, at import: set later (in a
    notebook, by a test), it used to leave them online, retrying each file for a minute."""
    import huggingface_hub.constants as constants
    import transformers.utils.hub as transformers_hub

    from audio_models.speech.ssl import SelfSupervisedExtractor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=rf"cannot load model '{NOT_CACHED}'"):
        loaded(SelfSupervisedExtractor(name="xlsr", model=NOT_CACHED))
    assert network.connects == [] and network.lookups == []  # no probe, no request
    assert constants.HF_HUB_OFFLINE is True and transformers_hub.is_offline_mode()


def test_probe_can_be_turned_off(network: _Network, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as constants

    monkeypatch.setenv(hub.HUB_PROBE_ENV, "0")
    assert not hub.hub_offline()
    assert network.connects == [] and constants.HF_HUB_OFFLINE is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the user's own switch still wins
    assert hub.hub_offline() and network.connects == []


def test_probe_goes_where_hub_traffic_goes(
    network: _Network, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert hub.hub_address() == ("huggingface.co", 443)
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.example.org:8080/")
    assert hub.hub_address() == ("hub.example.org", 8080)
    # Behind a proxy the direct connect would fail although the hub is reachable.
    monkeypatch.setenv("http_proxy", "http://proxy.example.org:3128")
    assert hub.hub_address() == ("proxy.example.org", 3128)
    monkeypatch.setenv("no_proxy", "hub.example.org")
    assert hub.hub_address() == ("hub.example.org", 8080)


@pytest.fixture(scope="module")
def tiny_ct2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from benchmarks.asr_models import save_random_whisper_ct2

    return save_random_whisper_ct2(tmp_path_factory.mktemp("whisper") / "ct2")


def test_whisperx_aligner_offline_names_align_model_and_align_false(
    network: _Network, tiny_ct2: Path
) -> None:
    """English alignment defaults to a torchaudio bundle, downloaded on first use: offline that
    was a bare 'urlopen error [Errno -2]'."""
    from audio_models.speech.whisper import WhisperXExtractor

    with pytest.raises(UserError) as caught:
        loaded(WhisperXExtractor(model=str(tiny_ct2), language="en"))
    message = str(caught.value)
    assert "WAV2VEC2_ASR_BASE_960H" in message and "not downloaded" in message
    assert "extractor.align_model" in message and "extractor.align=false" in message
    with pytest.raises(UserError, match=r"not in the hub cache.*extractor\.align=false"):
        loaded(WhisperXExtractor(model=str(tiny_ct2), language="nl"))
    assert network.connects == [("huggingface.co", 443)] and network.lookups == []
    # A Whisper model by hub id: the same clear error, no request.
    with pytest.raises(UserError, match=r"cannot load Whisper model 'tiny'.*local CTranslate2"):
        loaded(WhisperXExtractor(model="tiny", align=False))
    assert network.lookups == []
