"""CBQ calibration on the LO-BCQ format: the trainable `LOBCQLinearSim` and the engine with format="lobcq"."""

from __future__ import annotations

import pytest
import torch
from calib_helpers import CharTokenizer
from torch import nn
from transformers import AutoModelForCausalLM

import cbq_hf  # noqa: F401  (registers "cbq" with transformers)
from cbq_hf.calibration.engine import calibrate
from cbq_hf.calibration.lobcq_sim import LOBCQLinearSim
from cbq_hf.config import CBQConfig
from cbq_hf.formats import get_format
from cbq_hf.formats.lobcq import LOBCQFormat, LOBCQSpec, fake_quantize_activations
from cbq_hf.modeling import quantizable_linears
from cbq_hf.nn.linear import CBQLinear


def _linear(n: int, k: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    lin.weight.data = torch.distributions.StudentT(5.0).sample((n, k)) * 0.05
    return lin


@pytest.mark.parametrize("k", [64, 100], ids=["k64", "k100-padded"])
@pytest.mark.parametrize("mode", ["universal", "per_layer"])
def test_start_is_the_rtn_encoding(k, mode):
    fmt = LOBCQFormat(LOBCQSpec(), act_bits=None, codebooks=mode, iters=3)
    lin = _linear(24, k)
    rtn = fmt.dequantize(fmt.quantize_rtn(lin.weight), k)
    nearest = LOBCQLinearSim(lin, fmt, use_lora_rounding=False, scale_search=0)
    assert torch.equal(nearest.quantized_weight(), rtn)
    lora = LOBCQLinearSim(lin, fmt, use_lora_rounding=True, scale_search=0, generator=torch.Generator().manual_seed(0))
    # h(V0) reproduces the nearest entry except (at most) for values within float noise of a midpoint
    assert (lora.quantized_weight() != rtn).float().mean() < 1e-3


def test_weighted_scale_search_start_lowers_the_output_error():
    """The starting search (neighbouring E4M3 scale codes, error weighted by the input channels' mean square)
    never raises the channel-weighted weight error of RTN's start, and here lowers the output error."""
    fmt = LOBCQFormat(LOBCQSpec(), act_bits=None)
    lin = _linear(32, 128, seed=1)
    x = torch.randn(256, 128)
    x[:, :4] *= 8
    ms = x.pow(2).mean(0)
    rtn = LOBCQLinearSim(lin, fmt, use_lora_rounding=False, scale_search=0)
    searched = LOBCQLinearSim(lin, fmt, use_lora_rounding=False, scale_search=2, channel_weight=ms)
    with torch.no_grad():
        werr = [float(((s.quantized_weight() - lin.weight).pow(2) * ms).sum()) for s in (rtn, searched)]
        oerr = [float((s(x) - lin(x)).pow(2).mean()) for s in (rtn, searched)]
    assert werr[1] <= werr[0]
    assert oerr[1] < 0.9 * oerr[0]


@pytest.mark.parametrize("act_bits", [None, 4], ids=["w4a16", "w4a4"])
def test_freeze_packs_exactly_what_the_forward_used(act_bits):
    fmt = LOBCQFormat(LOBCQSpec(), act_bits=act_bits)
    lin = _linear(16, 100)
    sim = LOBCQLinearSim(lin, fmt, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # move away from the start: other scales and codeword choices
        sim.log_delta.add_(torch.randn_like(sim.log_delta) * 0.2)
        sim.a2.add_(torch.randn_like(sim.a2))
    packed = sim.freeze()
    assert set(packed) == set(fmt.buffer_specs(16, 100))
    assert torch.equal(fmt.dequantize(packed, 100), sim.quantized_weight().detach())
    q = CBQLinear(100, 16, True, fmt)
    q.load_packed(packed, bias=sim.bias)
    x = torch.randn(3, 100)
    with torch.no_grad():
        torch.testing.assert_close(q(x), sim(x), rtol=1e-5, atol=1e-6)
    if act_bits:  # run-time activation encoding in the sim is the format's
        xq = sim.quantize_input(x)
        assert torch.equal(xq, fake_quantize_activations(x, fmt.universal(), fmt.spec))


def test_shared_input_is_encoded_once_and_only_reused_when_equal(monkeypatch):
    import cbq_hf.calibration.lobcq_sim as mod

    calls = []
    real = mod.fake_quantize_activations
    monkeypatch.setattr(mod, "fake_quantize_activations", lambda *a: calls.append(1) or real(*a))
    fmt = LOBCQFormat(LOBCQSpec(), act_bits=4)
    scale = torch.rand(64) + 0.5
    a = LOBCQLinearSim(_linear(8, 64, 0), fmt, input_scale=scale)
    b = LOBCQLinearSim(_linear(8, 64, 1), fmt, input_scale=scale.clone())
    c = LOBCQLinearSim(_linear(8, 64, 2), fmt, input_scale=scale * 2)
    x = torch.randn(5, 64)
    xa = a.quantize_input(x)
    assert len(calls) == 1
    assert torch.equal(b.quantize_input(x), xa) and len(calls) == 1  # memo hit: same input, equal smoothing
    ref = real(x / (scale * 2), fmt.universal(), fmt.spec)
    assert torch.equal(c.quantize_input(x), ref) and len(calls) == 2  # other smoothing: encoded afresh
    x.mul_(3)  # an in-place change of the input is seen
    assert torch.equal(a.quantize_input(x), real(x / scale, fmt.universal(), fmt.spec)) and len(calls) == 3


def test_gradients_reach_scales_and_choices_and_snapshot_restores_exactly():
    torch.manual_seed(0)
    fmt = LOBCQFormat(LOBCQSpec(), act_bits=4)
    lin = _linear(32, 128, seed=1)
    sim = LOBCQLinearSim(lin, fmt, generator=torch.Generator().manual_seed(0))
    x = torch.randn(64, 128)
    target = lin(x).detach()

    def loss():
        return (sim(x) - target).pow(2).mean()

    snap = sim.snapshot()
    with torch.no_grad():
        start = float(loss())
    loss().backward()
    assert sim.log_delta.grad.abs().sum() > 0 and sim.a2.grad.abs().sum() > 0
    assert sim.a1.grad is not None
    with torch.no_grad():  # large moves change the weight ...
        sim.log_delta.add_(0.3)
        sim.a2.add_(1.0)
        assert float(loss()) != start
    sim.restore(snap)  # ... and restore() brings the exact start back
    with torch.no_grad():
        assert float(loss()) == start


def test_clipped_values_do_not_pass_the_scale_gradient_through():
    """Values beyond the block codebook's ends are clipped to the end entry: their W_hat = entry * s, so
    d W_hat / d s = entry (LSQ), not entry - W / s."""
    fmt = LOBCQFormat(LOBCQSpec(), act_bits=None)
    lin = _linear(4, 64)
    sim = LOBCQLinearSim(lin, fmt, use_lora_rounding=False, scale_search=0)
    with torch.no_grad():
        sim.log_delta.fill_(-0.3)  # shrink the scales: array maxima land beyond cmax and clip
        real, _ = sim._scales()
        y, lo, hi, _, _ = sim._neighbours(real)
    clipped = (lo == hi) & (y != lo)
    assert clipped.any()
    w = sim.quantized_weight()
    g = torch.zeros_like(w)
    r, c = clipped.nonzero()[0].tolist()
    g[r, c] = 1.0
    w.backward(g)
    a = c // fmt.spec.array_len
    # d W_hat[r, c] / d log_delta[r, a] = entry * d s / d log_delta = entry * s0 * exp(log_delta) * s_t (the E4M3
    # rounding of the scale is straight-through); with the value's own term it would be (entry - y) * ...
    ds = float(sim.scale0[r, a] * torch.exp(torch.tensor(-0.3)) * sim.tensor_scale)
    torch.testing.assert_close(sim.log_delta.grad[r, a], lo[r, c] * ds, rtol=1e-5, atol=1e-9)


def _cfg(**kw) -> CBQConfig:
    base = dict(
        method="cbq", format="lobcq", bits=4, act_bits=4, group_size=-1, epochs=3, batch_size=4, lr=1e-2, lr_scale=1e-3
    )
    return CBQConfig(**{**base, **kw})


@pytest.mark.parametrize("mode", ["universal", "per_layer"])
def test_engine_calibrates_lobcq_and_window_loss_does_not_rise(family, calib_ids, mode):
    model = family(layers=3)
    names = list(quantizable_linears(model))
    rep = calibrate(model, _cfg(lobcq_codebooks=mode, lobcq_iters=3), calib_ids, progress=False)
    mods = dict(model.named_modules())
    assert all(isinstance(mods[n], CBQLinear) and mods[n].fmt.name == "lobcq" for n in names)
    assert all(mods[n].input_scale is not None for n in names)  # use_cfp: explicit scale buffer everywhere
    for w in rep["windows"]:  # calibrated (end) vs uncalibrated RTN encoding of the same window (start)
        assert w["status"] in ("ok", "reverted") and w["loss_end"] <= w["loss_start"]
    assert any(w["status"] == "ok" and w["loss_end"] < w["loss_start"] for w in rep["windows"])
    with torch.no_grad():
        assert torch.isfinite(model(calib_ids).logits).all()


TEXT = "The quick brown fox jumps over the lazy dog. " * 40


@pytest.mark.parametrize("act_bits", [4, None], ids=["w4a4", "w4a16"])
def test_calibrated_lobcq_saves_and_reloads_with_identical_logits(tmp_path, llama_dir, act_bits):
    cfg = _cfg(
        act_bits=act_bits, dataset=[TEXT], tokenizer=CharTokenizer(), nsamples=4, seqlen=32, epochs=1, batch_size=2
    )
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=cfg)
    q = [m for m in model.modules() if isinstance(m, CBQLinear)]
    assert q and all(m.fmt.name == "lobcq" and m.input_scale is not None for m in q)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, before, rtol=0, atol=0)
    assert again.config.quantization_config.format == "lobcq"
    assert again.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)
    assert isinstance(get_format(again.config.quantization_config), LOBCQFormat)


@pytest.mark.parametrize("act_bits", [4, None], ids=["w4a4", "w4a16"])
def test_calibrated_model_output_not_worse_than_rtn_lobcq(calib_ids, act_bits):
    """On the model output (not only per window): CBQ-calibrated LO-BCQ is at least as close to the float model as
    the RTN LO-BCQ encoding of the same model."""
    from helpers import tiny_llama

    from cbq_hf.calibration.rtn import quantize_rtn

    def rel_err(model, ref):
        with torch.no_grad():
            out = model(calib_ids).logits
        return float((out - ref).pow(2).mean() / ref.pow(2).mean())

    with torch.no_grad():
        ref = tiny_llama(layers=2).eval()(calib_ids).logits
    rtn = tiny_llama(layers=2).eval()
    quantize_rtn(rtn, get_format(_cfg(method="rtn", act_bits=act_bits)), progress=False)
    cbq = tiny_llama(layers=2).eval()
    calibrate(cbq, _cfg(act_bits=act_bits), calib_ids, progress=False)
    assert rel_err(cbq, ref) <= rel_err(rtn, ref)
