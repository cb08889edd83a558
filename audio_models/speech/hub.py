"""Loading transformers models by hub id or local directory, through one code path.

A hub id (with an optional pinned revision) and a local directory go through the same
``from_pretrained`` calls; a model that cannot be had (offline, not cached, no such
repository) is one clear error that says how to supply it. ``HF_HUB_OFFLINE=1`` is honoured by
huggingface-hub itself.

Offline without ``HF_HUB_OFFLINE``: the hub libraries would retry every file with back-off
(over a minute of warnings per model) before failing. So the first time a hub id is to be
loaded, one bounded TCP connect to the hub endpoint (``HF_ENDPOINT``, through the proxy when
one applies) tells whether the network is there; if not, this process runs as with
``HF_HUB_OFFLINE=1`` (huggingface-hub's and transformers' in-process switches, never the
environment), so a missing model is the same clear error at once. The answer is kept for the
process. ``AUDIO_MODELS_HUB_PROBE=0`` skips the probe (a network the probe would misjudge).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from audio_models.utils.errors import model_unavailable
from audio_models.utils.provenance import sha256_file

log = logging.getLogger(__name__)

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_TRUE = {"1", "true", "yes", "on"}
#: The environment variable that turns the reachability probe off (``0``/``false``/``no``/``off``).
HUB_PROBE_ENV = "AUDIO_MODELS_HUB_PROBE"
#: How long the probe's connect may take: a reachable hub answers a TCP connect in well under
#: a second; a dropped-packet network would otherwise hang each of the libraries' retries.
HUB_PROBE_TIMEOUT_S = 3.0
# The probe's answer for this process (None: not probed yet).
_reachable: bool | None = None


def _env_true(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in _TRUE


def hub_address() -> tuple[str, int]:
    """Host and port a connection to the hub endpoint goes to: the proxy's when one applies
    (a direct connect would fail behind a proxy that does reach the hub)."""
    from huggingface_hub import constants

    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    scheme = endpoint.scheme or "https"
    host = endpoint.hostname or "huggingface.co"
    proxy = urllib.request.getproxies().get(scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        parsed = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if parsed.hostname:
            return parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    return host, endpoint.port or (443 if scheme == "https" else 80)


def hub_reachable() -> bool:
    """Whether a TCP connection to the hub (or its proxy) opens within
    :data:`HUB_PROBE_TIMEOUT_S`; probed once per process, then remembered."""
    global _reachable
    if _reachable is None:
        host, port = hub_address()
        try:
            with socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S):
                _reachable = True
        except OSError:  # no route, refused, timed out, or the name does not resolve
            _reachable = False
    return _reachable


def _go_offline(*, unreachable: bool) -> None:
    """Switch this process's hub libraries to offline mode, as ``HF_HUB_OFFLINE=1`` at start-up
    would have: both read the variable once, at import, so a variable set later (in a notebook,
    by a test) or a network found missing would otherwise still meet a minute of retries. The
    environment is left alone, so nothing outlives the process."""
    from huggingface_hub import constants
    from huggingface_hub.utils import reset_sessions

    if not constants.HF_HUB_OFFLINE:
        constants.HF_HUB_OFFLINE = True
        reset_sessions()  # sessions made before this would still go to the network
        if unreachable:
            host, port = hub_address()
            log.warning(
                "the Hugging Face hub (%s:%d) cannot be reached: models load from the local "
                "caches only, as with HF_HUB_OFFLINE=1 (set %s=0 to skip this check)",
                host,
                port,
                HUB_PROBE_ENV,
            )
    hub = sys.modules.get("transformers.utils.hub")
    if hub is not None and hasattr(hub, "_is_offline_mode"):
        # transformers copies the flag at import; a later import reads the constant above.
        hub._is_offline_mode = True


def hub_offline(*, probe: bool = True) -> bool:
    """Whether downloads are off: ``HF_HUB_OFFLINE`` (read now, with huggingface-hub's truthy
    values), or, with ``probe``, no network (see the module notes; the probe runs once per
    process unless ``AUDIO_MODELS_HUB_PROBE=0``). Call it before reaching for the hub: when it
    answers True the hub libraries are in offline mode. Loaders that do not ask the hub library
    (faster-whisper's ``local_files_only``, torchaudio bundles, SpeechBrain) use the answer."""
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        _go_offline(unreachable=False)
        return True
    skipped = os.environ.get(HUB_PROBE_ENV, "1").strip().lower() in {"0", "false", "no", "off"}
    if not probe or skipped:
        return False
    if hub_reachable():
        return False
    _go_offline(unreachable=True)
    return True


def load_pretrained(
    model: str, revision: str | None, loaders: Sequence[Callable[..., Any]]
) -> tuple[list[Any], Path]:
    """Call each ``loader(source, revision=revision)`` (``from_pretrained`` methods) and find
    the folder the files came from.

    Raises:
        UserError: the model is not available (names it and how to supply it).
    """
    from transformers.utils import cached_file

    local = Path(model).expanduser()
    source = str(local) if local.is_dir() else model
    if not local.is_dir():
        hub_offline()  # without network: offline mode before the first request, no retries
    try:
        loaded = [load(source, revision=revision) for load in loaders]
        folder = (
            local
            if local.is_dir()
            else Path(cached_file(source, "config.json", revision=revision)).parent
        )
    except (OSError, ValueError) as exc:
        raise model_unavailable(model, revision, exc) from None
    return loaded, folder


def weights_sha256(folder: Path) -> str:
    """SHA-256 of the weights file the model was loaded from ('unknown' if none is found)."""
    for name in _WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            return sha256_file(path)
    return "unknown"


def hub_provenance(
    prefix: str, model: str, revision: str | None, network: Any, folder: Path
) -> dict[str, str]:
    """Model id, requested revision, resolved commit and weights hash, as provenance tags."""
    local = Path(model).expanduser().is_dir()
    return {
        f"{prefix}.model": model,
        f"{prefix}.revision": "local" if local else str(revision),
        f"{prefix}.resolved_commit": str(getattr(network.config, "_commit_hash", None) or "local"),
        f"{prefix}.weights_sha256": weights_sha256(folder),
    }
