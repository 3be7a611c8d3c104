"""Experiments apart from plugins: reproduction claims, Pareto tables."""
