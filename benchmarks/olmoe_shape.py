"""The OLMoE-1B-7B-shaped random-init bf16 model the GPU benchmarks time (16 layers, hidden 2048, 64 experts,
top-8): one definition, importable without duckdb (the GPU machine has none)."""
from __future__ import annotations

import torch


def build(layers: int = 16, device: str = "cuda", hidden: int = 2048):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    cfg = OlmoeConfig(vocab_size=50304, hidden_size=hidden, intermediate_size=hidden // 2, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                      max_position_embeddings=4096, pad_token_id=1, eos_token_id=0, bos_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):
        model = OlmoeForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    return model.eval()
