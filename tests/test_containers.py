"""The container files: docker-compose.yml's structure and every path it and the Dockerfile name,
and the health probes its healthchecks run. (No Docker engine here: parsed, not built.)"""
from __future__ import annotations

import http.server
import os
import re
import shlex
import threading
import time
from pathlib import Path

import pytest
import yaml

from sae_kit.cli import build_parser
from sae_kit.healthcheck import main as healthcheck_main
from sae_kit.healthcheck import run_healthy, server_healthy
from sae_kit.train.trainer import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def host_path(spec: str) -> Path | None:
    """The host side of a bind mount ('./configs:/configs:ro'), None for a named volume."""
    source = spec.split(":")[0]
    return ROOT / source if source.startswith((".", "/")) else None


def test_compose_has_the_server_and_a_gpu_trainer(compose):
    services = compose["services"]
    assert {"server", "trainer", "trainer-cpu"} <= set(services)
    devices = services["trainer"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "deploy" not in services["trainer-cpu"] and "deploy" not in services["server"]
    assert services["server"]["ports"] == ["8000:8000"]
    for name, service in services.items():
        assert service["healthcheck"]["test"][0] == "CMD", name
        assert "build" in service and service["image"], name


def test_every_volume_and_path_the_compose_file_names_exists(compose):
    declared = set(compose["volumes"])
    mounted = {}
    for name, service in compose["services"].items():
        build = service["build"]
        assert (ROOT / build["context"]).is_dir() and (ROOT / build["context"] / build["dockerfile"]).is_file()
        for spec in service["volumes"]:
            path = host_path(spec)
            if path is None:
                assert spec.split(":")[0] in declared, f"{name}: volume {spec} is not declared"
            else:
                assert path.exists(), f"{name}: bind mount {spec} names a missing path"
            mounted[spec.split(":")[1]] = path
    assert {"activations", "saes"} <= declared
    # /configs/train.yaml inside the trainer is configs/train.yaml here, and a valid training config
    config = mounted["/configs"] / "train.yaml"
    cfg = TrainConfig.from_dict(yaml.safe_load(config.read_text()))
    assert cfg.activations.startswith("/stores/") and cfg.out.startswith("/runs/")


def test_the_services_commands_parse(compose):
    services = compose["services"]
    trainer = services["trainer"]
    assert trainer["entrypoint"][0] == "torchrun" and trainer["entrypoint"][-2:] == ["-m", "sae_kit.cli"]
    args = build_parser().parse_args(trainer["command"])
    assert args.command == "train" and args.config == "/configs/train.yaml"
    server = services["server"]["command"]
    assert server[0] == "serve" and "0.0.0.0" in server
    known = build_parser()._subparsers._group_actions[0].choices  # the registered sub-commands
    if "serve" in known:  # `sae-kit serve` comes with the feature browser (issue 5)
        assert build_parser().parse_args(server).command == "serve"
    for name, service in services.items():
        probe = service["healthcheck"]["test"]
        assert probe[1:4] == ["python", "-m", "sae_kit.healthcheck"], name
        with pytest.raises(SystemExit) as exit_info:  # the probe's own arguments parse
            healthcheck_main(probe[4:] + ["--help"])
        assert exit_info.value.code == 0


def test_every_path_the_dockerfile_copies_exists_and_cpu_is_the_default():
    text = (ROOT / "Dockerfile").read_text()
    copies = re.findall(r"^COPY\s+(.+)$", text, flags=re.M)
    assert copies
    for line in copies:
        *sources, _target = shlex.split(line)
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
    assert re.search(r"^ARG BASE_IMAGE=python:3\.\d+-slim$", text, flags=re.M)
    assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cpu$", text, flags=re.M)
    assert 'ENTRYPOINT ["sae-kit"]' in text and "EXPOSE 8000" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_a_run_is_healthy_while_it_writes_and_once_it_finished(tmp_path):
    run = tmp_path / "run"
    assert not run_healthy(run, max_age=60)[0]
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    assert run_healthy(run, max_age=60)[0]
    stale = time.time() - 120
    os.utime(run / "metrics.jsonl", (stale, stale))
    healthy, message = run_healthy(run, max_age=60)
    assert not healthy and "limit 60" in message
    (run / "sae").mkdir()
    (run / "sae" / "eval.json").write_text("{}")
    assert run_healthy(run, max_age=60)[0]
    config = tmp_path / "train.yaml"
    config.write_text(f"out: {run}\n")
    assert healthcheck_main(["--train-config", str(config)]) == 0


def test_the_server_probe_needs_a_200(tmp_path):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/api/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert server_healthy(f"{base}/api/health")[0]
        assert not server_healthy(f"{base}/nothing")[0]
    finally:
        server.shutdown()
        server.server_close()
    assert not server_healthy(f"{base}/api/health", timeout=1)[0]  # nobody listens any more
