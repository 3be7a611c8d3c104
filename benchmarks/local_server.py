"""``sae-kit serve`` started on a free loopback port for a benchmark, and waited for until healthy."""
from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def healthy(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/api/health")
        return connection.getresponse().status == 200
    finally:
        connection.close()


def start_server(root: str | Path, extra_args: list[str] = (), log: Path | None = None,
                 env: dict[str, str] | None = None) -> tuple[subprocess.Popen, int]:
    """(the server process, its port). Its stderr goes to ``log`` (a pipe nobody reads could fill and
    stall the server), else to ours."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONSAFEPATH": "1", **(env or {})}
    process = subprocess.Popen([sys.executable, "-m", "sae_kit.cli", "serve", str(root), "--port", str(port), *extra_args],
                               env=env, stdout=subprocess.DEVNULL if log else None, stderr=open(log, "w") if log else None)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if healthy(port):
                return process, port
        except OSError:
            pass
        if process.poll() is not None:
            tail = log.read_text()[-2000:] if log else ""
            raise SystemExit(f"sae-kit serve {root} exited with {process.returncode} {tail}")
        time.sleep(0.25)
    process.terminate()
    raise SystemExit("the server did not come up within 5 minutes")
