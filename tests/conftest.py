"""Shared pytest setup: offline Hugging Face, Triton's CPU interpreter, one torch thread.

The environment variables are set at import time, before any test module imports transformers
or triton, so every later import sees them. Without a GPU, Triton runs in its CPU interpreter;
with one, the kernel tests run Triton natively on CUDA tensors.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402  (importing torch does not import triton)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _restore_threads():
    # TrainConfig(threads=1) sets torch's process-wide thread count; leave it as we found it.
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
