"""Feature absorption on planted hierarchical data (the case Matryoshka SAEs are built for).

Data: P parent directions, each with C children; a child fires on its own (probability
``child_probability``) and its parent is then always active too, and a parent also fires alone
(``parent_probability``). All directions are random unit vectors, coefficients U(lo, hi].

Absorption (Chanin et al. 2024, "A is for Absorption"): an SAE that folds the parent direction into
each child's latent no longer fires its parent latent when a child fires. We match each parent to
the latent whose decoder direction is closest to it (cosine) and report, over parents, the fraction
of child-active tokens on which that latent stays silent, next to how often it fires when the parent
is alone (recall: a latent that never fires is not "unabsorbed").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sae_kit.eval.synthetic import PlantedDataset, random_unit_features


@dataclass(frozen=True)
class HierarchicalSparsity:
    n_parents: int
    children_per_parent: int
    child_probability: float
    parent_probability: float

    @property
    def n_features(self) -> int:
        return self.n_parents * (1 + self.children_per_parent)

    def children_of(self, parent: int) -> range:
        start = self.n_parents + parent * self.children_per_parent
        return range(start, start + self.children_per_parent)

    def sample_active(self, n: int, generator: torch.Generator) -> torch.Tensor:
        P, C = self.n_parents, self.children_per_parent
        device = generator.device
        children = torch.rand(n, P * C, generator=generator, device=device) < self.child_probability
        alone = torch.rand(n, P, generator=generator, device=device) < self.parent_probability
        parents = alone | children.view(n, P, C).any(dim=2)
        return torch.cat([parents, children], dim=1)

    def expected_active(self) -> float:
        P, C, p, q = self.n_parents, self.children_per_parent, self.child_probability, self.parent_probability
        parent_on = 1 - (1 - q) * (1 - p) ** C
        return P * parent_on + P * C * p


def hierarchical_dataset(*, seed: int = 0, d: int = 64, n_parents: int = 16, children_per_parent: int = 4,
                         child_probability: float = 0.04, parent_probability: float = 0.05,
                         magnitude_range: tuple[float, float] = (0.5, 1.5)) -> PlantedDataset:
    sparsity = HierarchicalSparsity(n_parents, children_per_parent, child_probability, parent_probability)
    features = random_unit_features(sparsity.n_features, d, torch.Generator().manual_seed(seed))
    return PlantedDataset("hierarchical", features, sparsity, magnitude_range, signed=False)


@torch.no_grad()
def absorption(sae, dataset: PlantedDataset, n: int = 20_000, seed: int = 1) -> dict[str, float]:
    """Mean over parents of: absorption rate, parent-alone recall, matched cosine (see module doc)."""
    sparsity: HierarchicalSparsity = dataset.sparsity
    x, codes = dataset.sample(n, torch.Generator().manual_seed(seed))
    was_training = sae.training
    sae.eval()
    fired = sae.encode(x).to_dense() != 0  # [n, d_sae]: small planted sizes only
    sae.train(was_training)
    cosine = dataset.features[: sparsity.n_parents] @ sae.decoder_directions().T  # [P, d_sae]
    best_cosine, latent = cosine.max(dim=1)
    absorbed, recall = [], []
    for parent in range(sparsity.n_parents):
        child_on = (codes[:, list(sparsity.children_of(parent))] != 0).any(dim=1)
        alone = (codes[:, parent] != 0) & ~child_on
        silent = ~fired[:, latent[parent]]
        if child_on.any():
            absorbed.append(silent[child_on].float().mean())
        if alone.any():
            recall.append((~silent[alone]).float().mean())
    return {"absorption": float(torch.stack(absorbed).mean()), "parent_recall": float(torch.stack(recall).mean()),
            "parent_cosine": float(best_cosine.mean())}
