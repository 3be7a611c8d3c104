"""Spread mode: one SAE per activation store (one per hook), the stores shared out among ranks.

``sae-kit train --activations STORE_A --activations STORE_B ... --out RUNS`` trains one SAE per
store into ``RUNS/<store folder name>/`` with the same settings. Under ``torchrun --nproc_per_node N``
rank r trains stores r, r+N, ... as ordinary single-process runs (no collectives: the SAEs are
independent), so N hooks train in the time of one; ``--resume`` resumes each run.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from sae_kit.config import ConfigError
from sae_kit.train.distributed import my_share
from sae_kit.train.trainer import TrainConfig, train


def spread_configs(cfg: TrainConfig, stores: list[str]) -> list[TrainConfig]:
    names = [Path(store).name for store in stores]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"stores {repeated} share a folder name, so their runs would share a folder under {cfg.out}; "
                          "rename them or train them separately")
    return [replace(cfg, activations=store, out=str(Path(cfg.out) / name)) for store, name in zip(stores, names)]


def train_spread(cfg: TrainConfig, stores: list[str], resume: bool = False) -> list[Path]:
    """Train this rank's share of the stores; returns the run folders it trained."""
    done = []
    for run in my_share(spread_configs(cfg, stores)):
        train(run, resume=resume, data_parallel=False)
        done.append(Path(run.out))
    return done
