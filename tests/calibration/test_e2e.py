"""The end-to-end stage: steps and clipping ratios of every packed linear trained on the KL to the float model."""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers import tiny_llama
from transformers import AutoModelForCausalLM

from cbq_hf.calibration import e2e, engine, rounding
from cbq_hf.calibration.engine import calibrate
from cbq_hf.config import CBQConfig
from cbq_hf.nn.experts import CBQExperts
from cbq_hf.nn.linear import CBQLinear


def _cfg(**kw) -> CBQConfig:
    base = dict(method="cbq", bits=3, group_size=32, epochs=1, batch_size=4, e2e_epochs=0)
    return CBQConfig(**{**base, **kw})


def _packed(model) -> dict[str, torch.Tensor]:
    return {n: m.scales.clone() for n, m in model.named_modules() if isinstance(m, CBQLinear)}


@pytest.mark.parametrize("act_bits", [None, 8], ids=["w3a16", "w3a8"])
def test_stage_lowers_the_kl_and_changes_only_steps_and_clipping(calib_ids, act_bits):
    without = tiny_llama(layers=2).eval()
    calibrate(without, _cfg(act_bits=act_bits), calib_ids, progress=False)
    model = tiny_llama(layers=2).eval()
    report = calibrate(model, _cfg(act_bits=act_bits, e2e_epochs=3, e2e_lr=1e-2), calib_ids, progress=False)
    stage = report["e2e"]
    assert stage["status"] == "ok" and stage["steps"] == 3 * 2 and stage["linears"] == 14
    assert stage["kl_end"] < stage["kl_start"]
    before, after = _packed(without), _packed(model)
    assert sorted(before) == sorted(after) and any(not torch.equal(before[k], after[k]) for k in before)
    ref = dict(without.named_modules())
    for name, m in model.named_modules():  # codes and zero points are the windows' own
        if isinstance(m, CBQLinear):
            assert torch.equal(m.qweight, ref[name].qweight) and torch.equal(m.zeros, ref[name].zeros)
    assert not any(isinstance(m, e2e.TrainableSteps) for m in model.modules())


def test_stage_that_raises_the_kl_is_reverted(calib_ids, monkeypatch):
    """With a huge learning rate the KL rises; the stage puts every step back as the windows left it."""
    without = tiny_llama(layers=2).eval()
    calibrate(without, _cfg(), calib_ids, progress=False)
    model = tiny_llama(layers=2).eval()
    report = calibrate(model, _cfg(e2e_epochs=2, e2e_lr=10.0), calib_ids, progress=False)
    assert report["e2e"]["status"] == "reverted"
    before, after = _packed(without), _packed(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def _norms(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "norm" in n}


def test_stage_with_e2e_lr_norm_trains_the_norm_weights_too(calib_ids):
    model = tiny_llama(layers=2).eval()
    before = _norms(model)
    report = calibrate(model, _cfg(e2e_epochs=3, e2e_lr=1e-2, e2e_lr_norm=1e-2), calib_ids, progress=False)
    assert report["e2e"]["status"] == "ok" and report["e2e"]["kl_end"] < report["e2e"]["kl_start"]
    after = _norms(model)
    assert len(after) == 5 and all(not torch.equal(before[k], after[k]) for k in before)  # 2 blocks x 2 + final
    assert not any(p.requires_grad for p in model.parameters())


def test_a_reverted_stage_puts_the_norm_weights_back(calib_ids):
    without = tiny_llama(layers=2).eval()
    calibrate(without, _cfg(), calib_ids, progress=False)
    model = tiny_llama(layers=2).eval()
    report = calibrate(model, _cfg(e2e_epochs=2, e2e_lr=10.0, e2e_lr_norm=10.0), calib_ids, progress=False)
    assert report["e2e"]["status"] == "reverted"
    assert all(torch.equal(v, _norms(model)[k]) for k, v in _norms(without).items())


def test_trainable_steps_compute_the_packed_linear(calib_ids):
    """Before training, the stand-in computes what the packed linear computes (reference path)."""
    from cbq_hf.kernels.reference import linear as reference_linear

    model = tiny_llama(layers=1).eval()
    calibrate(model, _cfg(act_bits=8), calib_ids, progress=False)
    q = next(m for m in model.modules() if isinstance(m, CBQLinear))
    x = torch.randn(5, q.in_features)
    with torch.no_grad():
        torch.testing.assert_close(e2e.TrainableSteps(q)(x), reference_linear(q, x), rtol=1e-5, atol=1e-5)


def _expert_state(model) -> dict[str, torch.Tensor]:
    return {
        f"{n}.{k}": v.clone()
        for n, m in model.named_modules()
        if isinstance(m, CBQExperts)
        for k, v in m.state_dict().items()
    }


def test_stage_on_a_mixture_of_experts_model_leaves_the_experts_as_the_windows_left_them(monkeypatch):
    """The packed experts' kernels read their buffers directly: the stage trains the other linears only."""
    cfg = transformers.MixtralConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    before: dict[str, torch.Tensor] = {}

    def stage_after_noting_the_experts(model_, input_ids, targets, config):
        before.update(_expert_state(model_))
        return e2e.train_end_to_end(model_, input_ids, targets, config)

    monkeypatch.setattr(engine, "train_end_to_end", stage_after_noting_the_experts)
    report = engine.calibrate(model, _cfg(nsamples=8, seqlen=32, e2e_epochs=2, e2e_lr=1e-2), ids, progress=False)
    stage = report["e2e"]
    assert stage["status"] in ("ok", "reverted") and stage["linears"] == 8 and stage["steps"] == 2 * 2
    after = _expert_state(model)
    assert before and sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.isfinite(model(torch.randint(0, 128, (1, 16))).logits).all()


def test_stage_without_uniform_linears_is_skipped(calib_ids):
    """LO-BCQ linears have no uniform steps: the stage says it skipped instead of failing."""
    model = tiny_llama(layers=1).eval()
    cfg = CBQConfig(method="cbq", format="lobcq", act_bits=4, epochs=1, batch_size=4, e2e_epochs=1)
    report = calibrate(model, cfg, calib_ids, progress=False)
    assert report["e2e"]["status"] == "skipped" and report["e2e"]["linears"] == 0


def test_kl_to_reference_matches_kl_div_of_the_log_softmaxes():
    """The written-out KL gives `F.kl_div` of the two log-softmaxes, value and gradient, within float rounding."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 7, 301, generator=gen)).requires_grad_()
    ref = 3 * torch.randn(2, 7, 301, generator=gen)
    expected = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref, -1), log_target=True, reduction="none")
    expected = expected.sum(-1).mean()
    (g_expected,) = torch.autograd.grad(expected, logits)
    got = e2e.kl_to_reference(logits, ref.clone())
    (g_got,) = torch.autograd.grad(got, logits)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_expected, rtol=1e-4, atol=1e-8)
    assert float(e2e.kl_to_reference(ref.clone(), ref.clone())) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=["float32", "bfloat16-autocast"])
def test_trainable_steps_cpu_kernels_match_torch_ops(calib_ids, autocast_dtype, monkeypatch):
    """The stand-in's weight through the CPU kernels equals the PyTorch ops' (in the autocast dtype), and so do the
    steps' gradients up to summation order."""
    from cbq_hf.kernels.cpu import build

    if build.load() is None:
        pytest.skip(f"the CPU kernels could not be built here: {build._state.get('error')}")
    model = tiny_llama(layers=1).eval()
    calibrate(model, _cfg(), calib_ids, progress=False)
    q = next(m for m in model.modules() if isinstance(m, CBQLinear))
    x = torch.randn(9, q.in_features)
    results = []
    for kernels in (False, True):
        monkeypatch.setattr(rounding, "USE_CPU_KERNELS", kernels)
        steps = e2e.TrainableSteps(q)
        with torch.no_grad():
            steps.log_delta.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_dtype is not None):
            y = steps(x)
        y.float().pow(2).sum().backward()
        results.append((y.detach(), steps.log_delta.grad))
    assert results[0][0].dtype == results[1][0].dtype == (autocast_dtype or torch.float32)
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-7)
