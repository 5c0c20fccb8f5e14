"""`CBQExperts` against the float experts module of transformers it replaces (same weights, dequantized)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GptOssConfig, MixtralConfig, Qwen3MoeConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
from transformers.models.mixtral.modeling_mixtral import MixtralExperts
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from cbq_hf import CBQConfig
from cbq_hf.formats import get_format
from cbq_hf.modeling import empty_cbq_experts
from cbq_hf.nn.experts import CBQExperts, expert_weight

E, H, INTER = 4, 64, 32

CASES = {
    "mixtral": (MixtralExperts, MixtralConfig(hidden_size=H, intermediate_size=INTER, num_local_experts=E)),
    "qwen3_moe": (Qwen3MoeExperts, Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=INTER, num_experts=E)),
    # transposed [E, H, 2I] layout, per-expert biases, interleaved clamped SwiGLU (its own `_apply_gate`)
    "gpt_oss": (GptOssExperts, GptOssConfig(hidden_size=H, intermediate_size=INTER, num_local_experts=E)),
}


def _float_experts(name: str) -> nn.Module:
    cls, cfg = CASES[name]
    cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    m = cls(cfg)
    for p in m.parameters():
        nn.init.normal_(p, std=0.1)
    return m


def _routing(tokens: int, k: int = 2, skip_expert: int | None = 3):
    """Random top-k routing; `skip_expert` receives no token."""
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(tokens, E, generator=g)
    if skip_expert is not None:
        scores[:, skip_expert] = -1
    weights, index = scores.topk(k, dim=-1)
    return index, weights.softmax(-1)


def _dequantized_copy(float_experts: nn.Module, q: CBQExperts) -> nn.Module:
    """The float module with every expert matrix replaced by what the packed buffers encode."""
    ref = _float_experts_like(float_experts)
    up = "gate_up_proj" if q.has_gate else "up_proj"
    with torch.no_grad():
        for e in range(q.num_experts):
            for param, lin in ((up, getattr(q, q.up_name)[e]), ("down_proj", q.down[e])):
                w = lin.dequantized_weight()
                getattr(ref, param)[e].copy_(w.t() if ref.is_transposed else w)
    return ref


def _float_experts_like(m: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(m)


@pytest.fixture(params=list(CASES), ids=list(CASES))
def family(request) -> str:
    return request.param


def test_reference_matches_float_experts_on_dequantized_weights(family):
    fe = _float_experts(family)
    q = empty_cbq_experts(fe, get_format(CBQConfig(method="rtn", bits=4, group_size=32)))
    q.load_rtn(fe)
    x = torch.randn(10, H)
    index, weights = _routing(10)
    with torch.no_grad():
        want = _dequantized_copy(fe, q)(x, index, weights)
        got = q.forward_reference(x, index, weights)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 7, 64], ids=["decode-1tok", "prefill-7tok", "prefill-64tok"])
def test_fast_path_matches_reference(family, tokens):
    fe = _float_experts(family)
    q = empty_cbq_experts(fe, get_format(CBQConfig(method="rtn", bits=4, group_size=32)))
    q.load_rtn(fe)
    x = torch.randn(tokens, H)
    index, weights = _routing(tokens)
    with torch.no_grad():
        fast, ref = q(x, index, weights), q.forward_reference(x, index, weights)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
    assert q.down[0].last_kernel is not None  # went through the kernel dispatch
    assert q.down[3].last_kernel is None  # the expert without tokens ran nothing


def test_rtn_is_close_to_float(family):
    fe = _float_experts(family)
    q = empty_cbq_experts(fe, get_format(CBQConfig(method="rtn", bits=8, group_size=32)))
    q.load_rtn(fe)
    x = torch.randn(16, H)
    index, weights = _routing(16, skip_expert=None)
    with torch.no_grad():
        want, got = fe(x, index, weights), q(x, index, weights)
    err = (got - want).norm() / want.norm()
    assert err < 0.02, err


def test_sentinel_expert_index_is_skipped():
    fe = _float_experts("mixtral")
    q = empty_cbq_experts(fe, get_format(CBQConfig(method="rtn", bits=4, group_size=32)))
    q.load_rtn(fe)
    x = torch.randn(3, H)
    index = torch.tensor([[0, E], [1, 2], [E, E]])  # E: a slot another expert-parallel rank owns
    weights = torch.full((3, 2), 0.5)
    with torch.no_grad():
        out = q(x, index, weights)
    assert torch.equal(out[2], torch.zeros(H))
    torch.testing.assert_close(out, q.forward_reference(x, index, weights))


def test_packed_matrices_are_out_by_in_whatever_the_float_layout():
    fe = _float_experts("gpt_oss")  # gate_up_proj [E, H, 2I]
    q = empty_cbq_experts(fe, get_format(CBQConfig(method="rtn", bits=8, group_size=32)))
    q.load_rtn(fe)
    lin = q.gate_up[1]
    assert (lin.out_features, lin.in_features) == (2 * INTER, H)
    w = expert_weight(fe, "gate_up_proj", 1)
    assert (lin.dequantized_weight() - w).abs().max() < 0.01


def test_undecorated_fused_experts_are_refused_with_the_way_out():
    class HomeMadeExperts(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.zeros(E, 2 * INTER, H))
            self.down_proj = nn.Parameter(torch.zeros(E, H, INTER))

    fmt = get_format(CBQConfig(method="rtn", group_size=32))
    with pytest.raises(NotImplementedError, match="use_experts_implementation.*modules_to_not_convert"):
        empty_cbq_experts(HomeMadeExperts(), fmt, name="model.layers.0.mlp.experts")


def test_group_size_that_does_not_divide_the_expert_is_refused():
    fe = _float_experts("mixtral")
    with pytest.raises(ValueError, match="expert"):
        empty_cbq_experts(fe, get_format(CBQConfig(method="rtn", group_size=128)), name="model.layers.0.mlp.experts")
