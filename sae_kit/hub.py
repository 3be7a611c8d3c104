"""Is the Hugging Face Hub usable right now? Asked before any hub load, so a machine without it
fails in seconds with a useful message instead of after 30+ s of the libraries' retries."""
from __future__ import annotations

import os
import socket
import threading
import urllib.parse

HUB_PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "true", "yes", "on"}


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def hub_offline() -> bool:
    """Offline mode as the libraries will see it (they read the variables once, at import)."""
    from huggingface_hub import constants

    flags = (os.environ.get(name, "") for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(flag.strip().lower() in _TRUE for flag in flags) or bool(constants.HF_HUB_OFFLINE)


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S, endpoint: str | None = None) -> bool:
    """Whether a TCP connection to the Hub (or the HTTPS proxy) opens within ``timeout`` seconds."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urllib.parse.urlsplit(proxy or endpoint or hub_endpoint())
    if not url.hostname:
        return False
    port = url.port or (443 if url.scheme == "https" else 80)
    reachable: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            reachable.append(True)
        except OSError:
            reachable.append(False)

    # A daemon thread bounds the whole probe: name resolution itself has no timeout.
    probe = threading.Thread(target=connect, daemon=True, name="sae-kit-hub-probe")
    probe.start()
    probe.join(timeout)
    return bool(reachable and reachable[0])
