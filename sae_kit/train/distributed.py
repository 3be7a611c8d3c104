"""Multi-process training under torchrun: process group, batch sharding, gradient averaging.

Data-parallel (one SAE, ``torchrun --nproc_per_node N sae-kit train ...``): every rank builds the
same SAE (same seed, then a broadcast from rank 0 makes sure), reads global batch n — a pure
function of (seed, n) — and keeps its contiguous slice of B/N rows. The SAEs' batch-level rules and
running statistics reduce over the group through sae_kit.data_parallel, and after the backward pass
one all-reduce averages the flattened gradients (the loss is a mean over equal slices, so the
average is the global batch's gradient). Rank 0 alone writes metrics, checkpoints and the final SAE;
every rank resumes from the same checkpoint. CUDA machines use NCCL with one GPU per rank, CPUs gloo.

We average gradients by hand rather than wrapping the SAE in DistributedDataParallel because the
trainer calls ``training_forward`` and the decoder-constraint hooks, not ``forward``, and one
flat all-reduce per step is all DDP would do for these few large tensors.

Spread mode (several stores, ``--activations A --activations B ...``): each rank trains its share
of the SAEs (rank r takes stores r, r+N, ...) as independent single-process runs.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from sae_kit.config import ConfigError


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) outside torchrun."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def setup() -> DistributedContext:
    """Join torchrun's process group (env:// rendezvous) if there is more than one rank."""
    rank, world, local_rank = launched_ranks()
    if world <= 1:
        return DistributedContext()
    device = torch.device("cpu")
    backend = "gloo"
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                              "use --nproc_per_node <= the number of GPUs")
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
        # Left to interpreter shutdown, the group's gloo threads can abort the process ("terminate
        # called without an active exception"), seen under load: tear it down first.
        atexit.register(_destroy_group)
    return DistributedContext(rank, world, local_rank, device)


def _destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def check_batch_size(batch_size: int, ctx: DistributedContext) -> None:
    if batch_size % ctx.world_size:
        raise ConfigError(f"batch_size {batch_size} is not divisible by the {ctx.world_size} ranks; "
                          "every rank needs the same number of rows")


def shard(batch: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    """This rank's contiguous slice of the global batch."""
    if not ctx.enabled:
        return batch
    rows = batch.shape[0] // ctx.world_size
    return batch[ctx.rank * rows:(ctx.rank + 1) * rows]


def broadcast_state(module: torch.nn.Module, ctx: DistributedContext) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    if ctx.enabled:
        for tensor in module.state_dict().values():
            # NCCL sends only contiguous tensors; W_enc keeps the decoder-major layout of the tied init.
            sent = tensor if tensor.is_contiguous() else tensor.contiguous()
            dist.broadcast(sent, src=0)
            if sent is not tensor:
                tensor.copy_(sent)


def average_gradients(parameters: list[torch.nn.Parameter], ctx: DistributedContext) -> None:
    """One all-reduce of every gradient, flattened, divided by the number of ranks."""
    if not ctx.enabled:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= ctx.world_size
    offset = 0
    for p, g in zip(parameters, grads):
        n = g.numel()
        # In the parameter's own layout (W_enc is column-major): fused Adam walks parameter, gradient
        # and moments in one flat memory order, so a row-major gradient would be applied scrambled.
        p.grad = torch.empty_like(p).copy_(flat[offset:offset + n].view_as(p))
        offset += n


def all_finite(value: torch.Tensor, ctx: DistributedContext) -> bool:
    """Whether ``value`` is finite on every rank (all ranks must agree to stop together)."""
    ok = torch.isfinite(value.detach()).all().to(torch.int32).reshape(1)
    if ctx.enabled:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def mean_over_ranks(record: dict[str, float], ctx: DistributedContext) -> dict[str, float]:
    """Average per-rank metrics (loss, L0...) so the log describes the global batch."""
    if not ctx.enabled:
        return record
    keys = sorted(record)
    values = torch.tensor([float(record[k]) for k in keys], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return {k: v / ctx.world_size for k, v in zip(keys, values.tolist())}


def barrier(ctx: DistributedContext) -> None:
    if ctx.enabled:
        dist.barrier()


def my_share(items: list, ctx: DistributedContext | None = None) -> list:
    """Spread mode: the items this rank handles (rank r takes r, r+N, ...)."""
    rank, world, _ = launched_ranks() if ctx is None else (ctx.rank, ctx.world_size, ctx.local_rank)
    return items[rank::world]
