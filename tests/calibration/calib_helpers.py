"""Helpers of the calibration tests: a tiny Qwen2 model and a stub tokenizer."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, Qwen2Config


def tiny_qwen2(layers: int = 2, hidden: int = 64, intermediate: int = 96, vocab: int = 128, seed: int = 0):
    """A tiny random Qwen2 causal LM (q/k/v carry biases, another family than Llama)."""
    cfg = Qwen2Config(
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
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


class CharTokenizer:
    """Character-level stub tokenizer (vocab 128, BOS 1), enough for `cbq_hf.data` and the quantizer."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        return {"input_ids": [2 + (ord(c) % 126) for c in text]}
