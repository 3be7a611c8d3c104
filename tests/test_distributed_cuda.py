"""On a CUDA machine: the data-parallel code path (NCCL collectives, CUDA tensors, device moves,
evaluation and checkpoints from the GPU) trains the same SAEs as one CPU process. One GPU suffices:
a one-rank NCCL group with the collectives forced on. Skipped where there is no CUDA."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist

from sae_kit.sae import load_sae
from sae_kit.train import distributed
from sae_kit.train.trainer import Trainer
from test_distributed import CONFIGS, assert_close_saes, store, tiny_config  # noqa: F401 (store is a fixture)

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and dist.is_nccl_available()),
                                reason="needs CUDA and NCCL")


class ForcedContext(distributed.DistributedContext):
    """A one-rank group that still runs every collective, as N ranks would."""

    @property
    def enabled(self) -> bool:
        return True


@pytest.fixture
def nccl_group(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("nccl", rank=0, world_size=1)
    device = torch.device("cuda", 0)
    monkeypatch.setattr(distributed, "setup", lambda: ForcedContext(0, 1, 0, device))
    yield device
    dist.destroy_process_group()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_nccl_on_cuda_trains_the_same_sae_as_one_cpu_process(nccl_group, store, tmp_path, name):  # noqa: F811
    trainer = Trainer(tiny_config(tmp_path / "gpu", **CONFIGS[name]), store)
    assert trainer.sae.W_dec.device.type == "cuda"
    trainer.run()
    reference = Trainer(tiny_config(tmp_path / "cpu", **CONFIGS[name]), store, data_parallel=False).run()
    assert_close_saes(load_sae(tmp_path / "gpu" / "sae"), reference, atol=1e-4)
