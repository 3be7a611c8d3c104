"""Shared pytest setup: offline Hugging Face, Triton's CPU interpreter, one torch thread.

The environment variables are set at import time, before any test module imports torch,
transformers or triton, so every later import sees them.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402  (after the environment is set)

torch.set_num_threads(1)
