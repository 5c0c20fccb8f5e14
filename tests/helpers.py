"""Test helpers: tiny models and a numerical-closeness measure."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig


def tiny_llama(layers: int = 2, hidden: int = 64, intermediate: int = 96, vocab: int = 128, seed: int = 0):
    """A tiny random Llama causal LM."""
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def tiny_model_dir(path: Path, model) -> str:
    model.save_pretrained(path)
    return str(path)


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of `test` against `ref`, in dB."""
    noise = (ref.float() - test.float()).pow(2).mean()
    return float(10 * torch.log10(ref.float().pow(2).mean() / noise.clamp(min=1e-30)))
