"""Container health probes (docker-compose.yml's healthcheck commands); exit status 0 = healthy.

    python -m sae_kit.healthcheck --url http://127.0.0.1:8000/api/health    # the server answers
    python -m sae_kit.healthcheck --train-config /configs/train.yaml         # the run makes progress

A training run is healthy while one of its files (metrics, checkpoint, final SAE) changed within
``--max-age`` seconds, and for good once the final SAE's ``eval.json`` exists; a run that has not
written anything yet is unhealthy (compose's ``start_period`` covers the set-up).
"""
from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

PROGRESS_FILES = ("metrics.jsonl", "checkpoint/state.json", "sae/cfg.json")


def server_healthy(url: str, timeout: float = 5.0) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200, f"{url} answered {response.status}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"{url} did not answer: {exc}"


def run_healthy(run_dir: Path, max_age: float, now: float | None = None) -> tuple[bool, str]:
    if (run_dir / "sae" / "eval.json").is_file():
        return True, f"{run_dir} finished"
    now = time.time() if now is None else now
    ages = [now - (run_dir / name).stat().st_mtime for name in PROGRESS_FILES if (run_dir / name).exists()]
    if not ages:
        return False, f"{run_dir} has no metrics or checkpoint yet"
    newest = min(ages)
    return newest <= max_age, f"{run_dir} last wrote {newest:.0f} s ago (limit {max_age:.0f} s)"


def run_dir_from_config(path: Path) -> Path:
    from sae_kit.config import load_config_file

    return Path(load_config_file(path, what="training config").get("out", "runs/sae"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sae_kit.healthcheck", description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="an HTTP endpoint that must answer 200")
    target.add_argument("--run", help="a training run folder")
    target.add_argument("--train-config", help="a training config file; its `out` is the run folder")
    parser.add_argument("--max-age", type=float, default=1800, help="seconds a run may go without writing")
    args = parser.parse_args(argv)
    if args.url:
        healthy, message = server_healthy(args.url)
    else:
        run = Path(args.run) if args.run else run_dir_from_config(Path(args.train_config))
        healthy, message = run_healthy(run, args.max_age)
    print(message)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
