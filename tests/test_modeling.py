"""Model surgery on tiny models: decoder blocks, linears, experts and routers found on float and quantized models."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, MixtralConfig, Qwen2MoeConfig

from cbq_hf.calibration.rtn import quantize_rtn
from cbq_hf.config import CBQConfig
from cbq_hf.formats import get_format
from cbq_hf.modeling import (
    NoDecoderBlocksError,
    conv1d_to_linear,
    find_decoder_blocks,
    quantizable_experts,
    quantizable_linears,
)
from cbq_hf.nn.experts import CBQExperts
from cbq_hf.nn.linear import CBQLinear

SMALL = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)


def _model(cfg) -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def _mixtral():
    return _model(MixtralConfig(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, **SMALL))


FMT = get_format(CBQConfig(method="rtn", group_size=16))


def test_quantized_model_is_described_like_the_float_one():
    m = _mixtral()
    before = (find_decoder_blocks(m)[0], list(quantizable_linears(m)), list(quantizable_experts(m)))
    quantize_rtn(m, FMT, progress=False)
    assert all(isinstance(x, CBQLinear) for x in quantizable_linears(m).values())
    assert all(isinstance(x, CBQExperts) for x in quantizable_experts(m).values())
    assert (find_decoder_blocks(m)[0], list(quantizable_linears(m)), list(quantizable_experts(m))) == before


def test_experts_are_listed_once_and_their_matrices_are_not_linears():
    m = _mixtral()
    quantize_rtn(m, FMT, progress=False)
    assert list(quantizable_experts(m)) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert not [n for n in quantizable_linears(m) if ".experts." in n]


def test_router_linear_stays_float_and_shared_expert_is_quantized():
    m = _model(
        Qwen2MoeConfig(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=64,
            intermediate_size=128,
            num_key_value_heads=2,
            **SMALL,
        )
    )
    names = list(quantizable_linears(m))
    assert "model.layers.0.mlp.shared_expert.down_proj" in names
    assert not [n for n in names if n.endswith("shared_expert_gate") or n.endswith(".gate")]
    quantize_rtn(m, FMT, progress=False)
    assert isinstance(m.model.layers[0].mlp.shared_expert_gate, nn.Linear)


def test_modules_to_not_convert_keeps_experts_float():
    m = _mixtral()
    quantize_rtn(m, FMT, modules_to_not_convert=["experts"], progress=False)
    assert not any(isinstance(x, CBQExperts) for x in m.modules())
    assert isinstance(m.model.layers[0].self_attn.q_proj, CBQLinear)


def test_gpt2_conv1d_layers_are_found_and_become_linears_with_the_same_output():
    m = _model(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64))
    names = list(quantizable_linears(m))
    assert "transformer.h.0.attn.c_attn" in names and "transformer.h.1.mlp.c_proj" in names
    x = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        want = m(x).logits
        conv1d_to_linear(m, names)
        assert isinstance(m.transformer.h[0].attn.c_attn, nn.Linear)
        torch.testing.assert_close(m(x).logits, want, rtol=1e-5, atol=1e-5)


def test_error_for_a_model_without_blocks_names_no_family_as_supported():
    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(NoDecoderBlocksError) as e:
        find_decoder_blocks(NoBlocks())
    assert "docs/architectures.md" in str(e.value) and "GPT-2" not in str(e.value)
