"""CBQ calibration of mixture-of-experts blocks (`cbq_hf.calibration.moe`): the unfused calibration module computes
the float experts' function, experts train with their window, an expert no token reaches is packed by RTN, and
the result saves and reloads."""

from __future__ import annotations

import pytest
import torch
from calib_helpers import CharTokenizer
from test_architectures import ARCHITECTURES, VOCAB, float_leftovers
from torch import nn
from transformers import AutoModelForCausalLM, GptOssConfig, MixtralConfig, Qwen3MoeConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
from transformers.models.mixtral.modeling_mixtral import MixtralExperts
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from cbq_hf import CBQConfig
from cbq_hf.calibration.moe import UnfusedExperts
from cbq_hf.formats import get_format
from cbq_hf.nn.experts import CBQExperts, expert_weight
from cbq_hf.nn.linear import CBQLinear

E, H, INTER = 4, 64, 32
EXPERTS = {
    "mixtral": (MixtralExperts, MixtralConfig(hidden_size=H, intermediate_size=INTER, num_local_experts=E)),
    "qwen3_moe": (Qwen3MoeExperts, Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=INTER, num_experts=E)),
    "gpt_oss": (GptOssExperts, GptOssConfig(hidden_size=H, intermediate_size=INTER, num_local_experts=E)),
}
ARCH = {a.family: a for a in ARCHITECTURES}


def _float_experts(name: str) -> nn.Module:
    cls, cfg = EXPERTS[name]
    cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    m = cls(cfg)
    for p in m.parameters():
        nn.init.normal_(p, std=0.1)
    return m


def _routing(tokens: int, skip_expert: int | None = 3):
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(tokens, E, generator=g)
    if skip_expert is not None:
        scores[:, skip_expert] = -1
    weights, index = scores.topk(2, dim=-1)
    return index, weights.softmax(-1)


@pytest.mark.parametrize("all_experts", [True, False], ids=["all-experts", "routed"])
@pytest.mark.parametrize("family", list(EXPERTS))
def test_unfused_experts_compute_the_float_function_on_views(family, all_experts):
    fe = _float_experts(family)
    un = UnfusedExperts(fe, all_experts)
    x = torch.randn(12, H)
    index, weights = _routing(12)
    with torch.no_grad():
        torch.testing.assert_close(un(x, index, weights), fe(x, index, weights), rtol=1e-5, atol=1e-6)
    # views of the fused parameters, not copies: unfusing a block costs no memory
    up = "gate_up_proj" if fe.has_gate else "up_proj"
    assert un.gate_up[2].weight.untyped_storage().data_ptr() == getattr(fe, up).untyped_storage().data_ptr()
    assert torch.equal(un.down[1].weight, expert_weight(fe, "down_proj", 1))


def test_counts_routed_tokens_only_while_counting():
    un = UnfusedExperts(_float_experts("mixtral"), all_experts=True)
    index, weights = _routing(10)
    un(torch.randn(10, H), index, weights)
    assert un.routed.tolist() == [0, 0, 0, 0]
    un.counting = True
    un(torch.randn(10, H), index, weights)
    assert un.routed.tolist() == torch.bincount(index.reshape(-1), minlength=E).tolist()
    assert un.routed[3] == 0


def _cbq_config(**kw) -> CBQConfig:
    base = dict(
        method="cbq",
        bits=4,
        group_size=16,
        dataset=["The quick brown fox jumps over the lazy dog. " * 20],
        tokenizer=CharTokenizer(),
        nsamples=4,
        seqlen=16,
        epochs=2,
        batch_size=2,
    )
    return CBQConfig(**{**base, **kw})


def _quantized_experts(model: nn.Module) -> list[CBQExperts]:
    return [m for m in model.modules() if isinstance(m, CBQExperts)]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_cbq_calibrates_experts_with_their_window_and_reloads(family, tmp_path):
    arch = ARCH[family]
    arch.build().save_pretrained(tmp_path / "fp")
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=_cbq_config())
    assert all(float_leftovers(q).values())  # only routers stay float
    experts = _quantized_experts(q)
    assert len(experts) == 2 and all(isinstance(m, CBQLinear) for e in experts for m in e.expert_linears().values())
    report = q.hf_quantizer.calibration_report
    assert report["windows"] and all(w["loss_end"] < w["loss_start"] for w in report["windows"])
    info = q.config.quantization_config.run_info["cbq_calibration"]["experts"]
    assert info["routing"] == "all_experts"
    assert sorted(info["tokens"]) == [f"model.layers.{i}.mlp.experts" for i in range(2)]
    assert all(sum(c) == 4 * 16 * 2 for c in info["tokens"].values())  # tokens x top-2

    x = torch.randint(0, VOCAB, (2, 8))
    q.save_pretrained(tmp_path / "q")
    r = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(r(x).logits, q(x).logits)


def test_window_training_moves_the_experts(tmp_path):
    """The experts are among the window's trained parameters: training (epochs=2) packs other expert codes than
    the same run's starting point (epochs=0)."""
    ARCH["mixtral"].build().save_pretrained(tmp_path / "fp")

    def down_codes(epochs: int) -> list[torch.Tensor]:
        q = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=_cbq_config(epochs=epochs))
        return [lin.qweight for e in _quantized_experts(q) for lin in e.down]

    trained, start = down_codes(2), down_codes(0)
    assert sum(not torch.equal(a, b) for a, b in zip(trained, start)) >= len(start) // 2


@pytest.mark.parametrize("all_experts", [True, False], ids=["all-experts", "routed"])
def test_expert_without_tokens_gets_rtn_and_is_reported(all_experts, tmp_path):
    """gpt-oss's router has a bias: -1e4 on expert 3 means no calibration token is routed to it."""
    fp = ARCH["gpt_oss"].build()
    with torch.no_grad():
        for layer in fp.model.layers:
            layer.mlp.router.bias[3] = -1e4
    fp.save_pretrained(tmp_path / "fp")
    cfg = _cbq_config(moe_calibrate_all_experts=all_experts)
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=cfg)
    info = q.config.quantization_config.run_info["cbq_calibration"]["experts"]
    assert all(counts[3] == 0 and min(counts[:3]) > 0 for counts in info["tokens"].values())
    assert info["rtn_experts"] == [f"model.layers.{i}.mlp.experts.3" for i in range(2)]
    fmt = get_format(q.config.quantization_config)
    for layer_fp, layer_q in zip(fp.model.layers, q.model.layers):
        fe, qe = layer_fp.mlp.experts, layer_q.mlp.experts
        for proj, param in (("gate_up", "gate_up_proj"), ("down", "down_proj")):
            lin = getattr(qe, proj)[3]
            rtn = fmt.quantize_rtn(expert_weight(fe, param, 3))
            assert all(torch.equal(lin.packed_buffers()[k], v) for k, v in rtn.items())
            assert torch.isfinite(lin.dequantized_weight()).all()
    x = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        assert torch.isfinite(q(x).logits).all()


def _gpt_oss_without_expert_3(layers: int) -> nn.Module:
    import transformers
    from test_architectures import COMMON

    arch = ARCH["gpt_oss"]
    cfg = getattr(transformers, arch.config)(**{**COMMON, **arch.kwargs, "num_hidden_layers": layers})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.router.bias[3] = -1e4
    return model


def test_resume_with_experts_is_bit_identical(monkeypatch, tmp_path):
    """Interrupted in its third window and resumed: frozen MoE blocks are unfused, restored and fused again, and the
    block still in its window gets its expert stand-ins back; W4A8 so the other linears carry input scales."""
    from test_checkpoint import _bits, _interrupt_at, _Interrupted

    from cbq_hf.calibration.engine import calibrate

    ids = torch.randint(2, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    kw = dict(method="cbq", bits=4, act_bits=8, group_size=16, epochs=1, batch_size=2)
    full = _gpt_oss_without_expert_3(4)
    want = calibrate(full, CBQConfig(**kw), ids, progress=False)
    ckpt = str(tmp_path / "ckpt")
    with monkeypatch.context() as m:
        _interrupt_at(m, 2)
        with pytest.raises(_Interrupted):
            calibrate(_gpt_oss_without_expert_3(4), CBQConfig(checkpoint_dir=ckpt, **kw), ids, progress=False)
    resumed = _gpt_oss_without_expert_3(4)
    got = calibrate(resumed, CBQConfig(checkpoint_dir=ckpt, **kw), ids, progress=False)
    assert got["resumed_from_window"] == 2
    assert got["experts"] == want["experts"] and len(want["experts"]["rtn_experts"]) == 4
    ref, new = _bits(full.state_dict()), _bits(resumed.state_dict())
    assert sorted(new) == sorted(ref) and [k for k in ref if ref[k] != new[k]] == []
    assert len(_quantized_experts(resumed)) == 4
