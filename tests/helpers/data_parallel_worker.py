"""Run under ``torchrun``: train the tiny configs of test_distributed.py data-parallel.

Usage: torchrun --standalone --nproc_per_node N data_parallel_worker.py STORE OUT_ROOT
Writes OUT_ROOT/<name>/ for every config (rank 0), including one run interrupted and resumed.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from test_distributed import CONFIGS, InterruptingSource, tiny_config  # noqa: E402

from sae_kit.store import ActivationStore  # noqa: E402
from sae_kit.train.trainer import Trainer  # noqa: E402


def main(store_dir: str, out_root: str) -> None:
    store = ActivationStore(store_dir)
    for name, overrides in CONFIGS.items():
        Trainer(tiny_config(Path(out_root) / name, **overrides), store).run()
    resumed = tiny_config(Path(out_root) / "resumed", **CONFIGS["batchtopk"])
    try:
        Trainer(resumed, InterruptingSource(store, after=13)).run()
    except InterruptingSource.Interrupted:
        pass
    Trainer(resumed, store, resume=True).run()


if __name__ == "__main__":
    main(*sys.argv[1:])
