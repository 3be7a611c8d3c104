"""Batch-level statistics over a data-parallel group: what the SAEs' batch rules see in torchrun.

In data-parallel training each rank encodes only its slice of the global batch, yet BatchTopK,
Mutual Choice, batch AbsTopK and Feature Choice select over the *global* batch, and dead-latent
counters, Zipf densities and GBA's frequency buffers count every rank's tokens. The SAE code asks
this module for those global quantities; outside ``use_group`` (one process, the default) every
function returns the local value untouched, so single-process training is unchanged bit for bit.

All ranks must hold slices of the same size (the trainer splits the global batch evenly) and must
call the same functions in the same order, as for any collective.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

_group: dist.ProcessGroup | None = None
_active = False


@contextmanager
def use_group(group: dist.ProcessGroup | None = None) -> Iterator[None]:
    """Make the SAEs' batch rules reduce over ``group`` (None: the default group) inside the block."""
    global _group, _active
    previous = (_group, _active)
    _group, _active = group, True
    try:
        yield
    finally:
        _group, _active = previous


def active() -> bool:
    return _active and dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size(_group) if active() else 1


def global_rows(local_rows: int) -> int:
    """Rows of the global batch (every rank holds ``local_rows``)."""
    return local_rows * world_size()


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    if active():
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=_group)
    return tensor


def all_max(tensor: torch.Tensor) -> torch.Tensor:
    if active():
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_group)
    return tensor


def all_min(tensor: torch.Tensor) -> torch.Tensor:
    if active():
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=_group)
    return tensor


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0 (same shape on every rank)."""
    if not active():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous(), group=_group)
    return torch.cat(parts, dim=0)


def global_kth_largest(score: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of the global batch's score matrix (each rank holds a [b, F] slice).

    A rank can contribute at most k entries to the global top k, so its own top k suffice.
    """
    flat = score.flatten()
    local_top = flat.topk(min(k, flat.numel())).values
    everything = all_gather_rows(local_top)
    return everything.topk(min(k, everything.numel())).values[-1]


def global_column_top(values: torch.Tensor, depth: int) -> torch.Tensor:
    """Each column's ``depth`` largest entries over the global batch, [min(depth, B), F], descending."""
    local_top = values.topk(min(depth, values.shape[0]), dim=0).values
    everything = all_gather_rows(local_top)
    return everything.topk(min(depth, everything.shape[0]), dim=0).values


def batch_variance(target: torch.Tensor) -> torch.Tensor:
    """E‖t − E t‖² over the global batch (two passes: the global mean, then the spread around it)."""
    if not active():
        # One fused pass (mse_loss against the broadcast mean) instead of sub, pow and sum's three
        # with two [B, d] temporaries: ~6x faster at [4096, 768] on CPU; the same sum of squares.
        return F.mse_loss(target, target.mean(0).expand_as(target), reduction="sum") / target.shape[0]
    n = global_rows(target.shape[0])
    mean = all_sum(target.sum(0)) / n
    return all_sum((target - mean).pow(2).sum()) / n


def global_fired(fired: torch.Tensor) -> torch.Tensor:
    """Which latents fired on any rank's slice (``fired`` is this rank's bool [d_sae])."""
    return all_sum(fired.to(torch.int32)) > 0 if active() else fired


def global_fire_counts(counts: torch.Tensor) -> torch.Tensor:
    return all_sum(counts)
