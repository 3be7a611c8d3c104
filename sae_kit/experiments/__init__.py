"""Experiments: runs that train and compare SAEs (``sae-kit ablate``, ``sae-kit bench``) and render their results."""
