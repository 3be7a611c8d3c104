"""Experiments: runs that train and compare SAEs (``sae-kit ablate``, ``sae-kit bench``: synthetic,
reproduce, pareto) and render their results."""
