"""A tiny random Llama with SmolLM2's tokenizer in a local Hugging Face folder (d_model 32), for the
plugins that need a language model in the loop; loads offline in a few seconds."""
from __future__ import annotations

from pathlib import Path

import torch


def write_tiny_llama(folder: Path, d_model: int = 32, layers: int = 2) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sae_kit.models import ensure_smollm2_cache

    tokenizer = AutoTokenizer.from_pretrained(ensure_smollm2_cache(), local_files_only=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=2 * d_model,
                                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
                                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
