"""A tiny served folder for analysis, server and browser tests: a random 2-layer LLaMA with SmolLM2's
tokenizer (loaded through the same bridge path as SmolLM2) and a small TopK SAE on its residual stream.

Building it takes a few seconds; everything is seeded, so two builds are identical.
"""
from __future__ import annotations

from pathlib import Path

import torch

HOOK = "blocks.1.hook_resid_post"
D_MODEL = 32
D_SAE = 96


def write_tiny_model(directory: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sae_kit.models import ensure_smollm2_cache

    tokenizer = AutoTokenizer.from_pretrained(ensure_smollm2_cache(), local_files_only=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=D_MODEL, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_tiny_sae(directory: Path, model_name: str, seed: int = 0) -> Path:
    from sae_kit.config import SAEConfig
    from sae_kit.sae import create_sae

    torch.manual_seed(seed)
    sae = create_sae(SAEConfig(d_in=D_MODEL, d_sae=D_SAE, architecture="topk", k=4,
                               metadata={"hook_name": HOOK, "model_name": model_name, "context_size": 32}))
    with torch.no_grad():
        sae.b_enc.fill_(0.05)  # a positive bias: most features fire somewhere on a short text
    return sae.save(directory)


def build_served_root(root: Path, analysis_tokens: int = 512) -> Path:
    """``root/model`` (the tiny model), ``root/saes/main`` (analysed) and ``root/saes/fresh`` (not analysed)."""
    from sae_kit.analysis import AnalyzeConfig, analyze
    from sae_kit.models import load_model
    from sae_kit.sae import load_sae

    write_tiny_model(root / "model")
    write_tiny_sae(root / "saes" / "main", str(root / "model"))
    write_tiny_sae(root / "saes" / "fresh", str(root / "model"), seed=1)
    analyze(load_sae(root / "saes" / "main"), load_model(str(root / "model")),
            AnalyzeConfig(tokens=analysis_tokens, context=32, progress=False), sae_path=root / "saes" / "main")
    return root
