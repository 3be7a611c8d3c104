"""Automatic explanations of SAE features, and honest scores for them (``sae-kit explain``).

examples (explanation and disjoint scoring sets from the feature store) → explainers (token rule,
language model) through backends (local transformers model, OpenAI-compatible endpoint) → scorers
(detection, fuzzing; LM or rule judge) → run (resumable, writes into the feature store).
"""
from sae_kit.explain.run import ExplainConfig, ExplainResult, format_summary, run_explain, summarize

__all__ = ["ExplainConfig", "ExplainResult", "format_summary", "run_explain", "summarize"]
