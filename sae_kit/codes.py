"""The one currency between sae-kit's parts: a batch of sparse codes.

Every architecture's ``encode`` returns :class:`SparseCodes`; decoders, losses, metrics,
analysis and the server all take it.

Representation: *padded* (indices, values), both ``[B, K]``. Row ``b`` holds the latents active
on token ``b``; ``K`` is the largest number of active latents on any token of the batch. Fixed-k
selections (TopK, AbsTopK) have ``K == k`` and no padding; variable-k selections (BatchTopK,
Mutual/Feature Choice, top-AFA, GBA) pad short rows with ``value == 0`` (and index 0). A value of
exactly zero is never an active latent, so padding needs no mask. Padded form was chosen over CSR
because ``F.embedding_bag`` and the Triton kernels take it directly, and fixed-k codes (the common
case) carry no overhead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sae_kit.kernels import matrix_entries


@dataclass
class SparseCodes:
    indices: torch.Tensor  # [B, K] int64 latent ids
    values: torch.Tensor  # [B, K] activations; 0 marks padding / inactive
    d_sae: int

    def __post_init__(self) -> None:
        if self.indices.shape != self.values.shape or self.indices.dim() != 2:
            raise ValueError(
                f"SparseCodes needs indices and values of the same [B, K] shape, got "
                f"{tuple(self.indices.shape)} and {tuple(self.values.shape)}"
            )

    @property
    def batch_size(self) -> int:
        return self.indices.shape[0]

    @property
    def active(self) -> torch.Tensor:
        """Boolean [B, K]: which slots hold an active latent."""
        return self.values != 0

    def l0(self) -> torch.Tensor:
        """Number of active latents per token, [B] int64."""
        return self.active.sum(dim=1)

    def fired(self) -> torch.Tensor:
        """Boolean [d_sae]: latents active on at least one token of the batch."""
        return self.fire_counts() > 0

    def fire_counts(self) -> torch.Tensor:
        """Number of tokens each latent is active on, [d_sae] int64."""
        counts = torch.zeros(self.d_sae, dtype=torch.int64, device=self.indices.device)
        counts.index_add_(0, self.indices.flatten(), self.active.flatten().to(torch.int64))
        return counts

    def to_dense(self) -> torch.Tensor:
        """Dense [B, d_sae] view: for tests and small inputs only."""
        dense = torch.zeros(self.batch_size, self.d_sae, dtype=self.values.dtype, device=self.values.device)
        return dense.scatter_add(1, self.indices, self.values)

    def detach(self) -> "SparseCodes":
        return SparseCodes(self.indices, self.values.detach(), self.d_sae)

    @staticmethod
    def from_mask(source: torch.Tensor, mask: torch.Tensor) -> "SparseCodes":
        """Compact the entries of ``source`` [B, F] where ``mask`` is true into padded codes.

        Values keep their autograd link to ``source``. Rows are padded to the longest row.
        """
        if source.shape != mask.shape or source.dim() != 2:
            raise ValueError(f"from_mask needs matching [B, F] tensors, got {tuple(source.shape)} and {tuple(mask.shape)}")
        rows, cols = mask.nonzero(as_tuple=True)  # row-major: each row's columns in ascending order
        return SparseCodes.from_coordinates(source, rows, cols)

    @staticmethod
    def from_coordinates(source: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> "SparseCodes":
        """Padded codes holding ``source[rows, cols]`` [B, F]; (rows, cols) sorted row-major, no repeats.

        Values keep their autograd link to ``source``. Rows are padded to the longest row.
        """
        batch = source.shape[0]
        counts = torch.bincount(rows, minlength=batch)
        width = max(int(counts.max().item()) if counts.numel() else 0, 1)
        slots = torch.arange(rows.numel(), device=rows.device) - (counts.cumsum(0) - counts)[rows]
        indices = torch.zeros(batch, width, dtype=torch.int64, device=rows.device).index_put((rows, slots), cols)
        values = source.new_zeros(batch, width).index_put((rows, slots), matrix_entries(source, rows, cols))
        return SparseCodes(indices, values, source.shape[1])

    @staticmethod
    def from_dense(dense: torch.Tensor) -> "SparseCodes":
        return SparseCodes.from_mask(dense, dense != 0)
