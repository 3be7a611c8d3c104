"""Plain dense torch references for the sparse kernels: slow, obvious, always available.

They build the dense [B, F] code matrix on purpose, so tests can check the sparse paths against
them. Never use them in training.
"""
from __future__ import annotations

import torch


def densify(indices: torch.Tensor, values: torch.Tensor, d_sae: int) -> torch.Tensor:
    """Dense [B, F] from padded [B, K] codes (repeated indices add up)."""
    return values.new_zeros(indices.shape[0], d_sae).scatter_add(1, indices, values)


def sparse_decode_reference(indices: torch.Tensor, values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``densify(indices, values) @ weight``: [B, K] x [F, d] -> [B, d], differentiable in values and weight."""
    return densify(indices, values.to(weight.dtype), weight.shape[0]) @ weight


def topk_encode_reference(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``topk((x - b_dec) @ W_enc + b_enc, k)`` -> (values [B, k], indices [B, k]), through dense autograd."""
    pre = (x - b_dec) @ W_enc + b_enc
    values, indices = pre.topk(k, dim=1)
    return values, indices


def gather_pre_activations_reference(
    x_c: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor:
    """``(x_c @ W_enc + b_enc).gather(1, indices)`` through dense autograd."""
    return (x_c @ W_enc + b_enc).gather(1, indices)


def topk_encode_grads_reference(
    x: torch.Tensor, W_enc: torch.Tensor, b_dec: torch.Tensor, indices: torch.Tensor, grad_values: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Gradients of ``sum(grad_values * pre.gather(1, indices))`` from a dense [B, F] gradient.

    Returns ``x``, ``W_enc``, ``b_enc`` and ``b_dec`` gradients (the encoder weight gradient is
    ``(x - b_dec)^T @ G`` with G the densified sparse gradient).
    """
    G = densify(indices, grad_values.to(W_enc.dtype), W_enc.shape[1])
    x_c = x.to(W_enc.dtype) - b_dec
    grad_x = G @ W_enc.T
    return {"x": grad_x, "W_enc": x_c.T @ G, "b_enc": G.sum(0), "b_dec": -grad_x.sum(0)}
