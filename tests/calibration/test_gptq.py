"""GPTQ starting point of the stand-ins (`calibration/gptq.py`, `CBQConfig.rounding_init="gptq"`): the pure
function lowers the output error against RTN on the same grid, the uniform stand-in starts exactly from GPTQ's
codes and the LO-BCQ one from GPTQ on its starting encoding, the Hessian is collected and rescaled for smoothing,
calibration runs and resumes bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_llama
from test_checkpoint import _bits, _cfg, _interrupt_at, _Interrupted
from torch import nn

from cbq_hf.calibration.cbq import _smoothed_hessian
from cbq_hf.calibration.checkpoint import run_identity
from cbq_hf.calibration.engine import calibrate
from cbq_hf.calibration.gptq import gptq_quantize, gptq_quantize_with, gptq_start
from cbq_hf.calibration.lobcq_sim import LOBCQLinearSim
from cbq_hf.calibration.preprocess import StatsCollector
from cbq_hf.calibration.rounding import QuantLinearSim, init_qparams
from cbq_hf.config import CBQConfig
from cbq_hf.formats.lobcq import LOBCQFormat, LOBCQSpec
from cbq_hf.formats.uniform import UniformSpec, expand_groups, round_scale

SPECS = {
    "w3_g64": UniformSpec(3, 64, False),
    "w4_g64": UniformSpec(4, 64, False),
    "w2_sym_g32": UniformSpec(2, 32, True),
}


def _correlated(t: int, k: int, seed: int = 0) -> torch.Tensor:
    """Inputs x [t, k] with strongly correlated channels and uneven channel scales."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    return (torch.randn(t, k, generator=g) @ mix) * torch.rand(k, generator=g).add(0.2)


def _linear(n: int, k: int, seed: int = 1) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=False)


def _dequant(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: UniformSpec) -> torch.Tensor:
    k = codes.shape[1]
    return (codes - expand_groups(zero, k, spec)) * expand_groups(round_scale(scale), k, spec)


def _codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: UniformSpec) -> torch.Tensor:
    """Round-to-nearest codes of w on the grid (scale, zero)."""
    k = w.shape[1]
    return torch.clamp(torch.round(w / expand_groups(scale, k, spec)) + expand_groups(zero, k, spec), 0, spec.qmax)


def _rel_out_err(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    return float((x @ w.T - x @ wq.T).norm() / (x @ w.T).norm())


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_gptq_lowers_output_error_against_rtn_on_the_same_grid(spec):
    x, w = _correlated(2048, 256), _linear(48, 256).weight.detach()
    scale, zero = init_qparams(w, spec)
    h = 2 * x.T @ x / x.shape[0]
    w_start, codes = gptq_quantize(w, h, scale, zero, spec, 0.01, round_scale(scale))
    rtn_codes = _codes(w, scale, zero, spec)
    err_rtn = _rel_out_err(x, w, _dequant(rtn_codes, scale, zero, spec))
    err_gptq = _rel_out_err(x, w, _dequant(codes, scale, zero, spec))
    assert err_gptq < 0.9 * err_rtn, (err_gptq, err_rtn)
    # W' holds each column as it was quantized: rounding it on the grid gives the codes back
    again = _codes(w_start, scale, zero, spec)
    assert torch.equal(again, codes)


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_cpu_kernel_column_loop_is_bit_identical_to_the_torch_loop(spec, monkeypatch):
    """The CPU kernel of GPTQ's column loop (`gptq_columns`) gives the torch loop's W' and codes bit for bit, over a
    ragged last lazy batch (K = 200: batches of 128 and 72 columns) and a stored step unlike the grid's."""
    from cbq_hf.calibration import rounding
    from cbq_hf.kernels.cpu import build

    if build.load() is None:
        pytest.skip(f"the CPU kernels could not be built here: {build.build_error()}")
    x, w = _correlated(400, 200), _linear(48, 200).weight.detach()
    scale, zero = init_qparams(w, spec)
    results = []
    for on in (False, True):
        monkeypatch.setattr(rounding, "USE_CPU_KERNELS", on)
        results.append(gptq_quantize(w, 2 * x.T @ x / 400, scale, zero, spec, 0.01, round_scale(scale) * 1.01))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_gptq_with_a_dead_input_channel_stays_finite():
    spec = SPECS["w3_g64"]
    x, w = _correlated(512, 128), _linear(16, 128).weight.detach()
    x[:, 5] = 0.0
    scale, zero = init_qparams(w, spec)
    w_start, codes = gptq_quantize(w, 2 * x.T @ x / 512, scale, zero, spec)
    assert torch.isfinite(w_start).all() and torch.isfinite(codes).all()
    assert bool((w_start[:, 5] == 0).all())


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_stand_in_starts_from_gptq_dequantized_weight(spec):
    lin = _linear(40, 192)
    float_weight = lin.weight.detach().clone()
    x = _correlated(1024, 192)
    h = 2 * x.T @ x / x.shape[0]
    sim = QuantLinearSim(lin, spec)
    scale0, zero = sim.scale0.clone(), sim.zero.clone()
    _, codes = gptq_quantize(float_weight, h, scale0, zero, spec, 0.01, round_scale(scale0))
    gptq_start(sim, h)
    assert torch.equal(sim.scale0, scale0) and torch.equal(sim.zero, zero)  # the same starting grid
    assert torch.equal(sim.quantized_weight().detach(), _dequant(codes, scale0, zero, spec))
    assert torch.equal(sim.freeze_codes()[0].float(), codes)
    assert torch.equal(lin.weight.detach(), float_weight)  # the float linear is untouched


def test_gptq_with_a_uniform_column_quantizer_is_gptq_on_that_grid():
    """The generic column loop with round-to-nearest on a fixed uniform grid gives the weight `gptq_quantize` gives."""
    spec = SPECS["w4_g64"]
    lin = _linear(24, 320)  # 320 columns: two full lazy batches and a ragged third
    w = lin.weight.detach()
    x = _correlated(1024, 320)
    h = 2 * x.T @ x / x.shape[0]
    scale, zero = init_qparams(w, spec)
    ref, _ = gptq_quantize(w, h, scale, zero, spec)
    s_k, z_k = expand_groups(scale, 320, spec), expand_groups(zero, 320, spec)

    def rtn(i: int, col: torch.Tensor) -> torch.Tensor:
        return (torch.clamp(torch.round(col / s_k[:, i]) + z_k[:, i], 0, spec.qmax) - z_k[:, i]) * s_k[:, i]

    torch.testing.assert_close(gptq_quantize_with(w, h, rtn), ref, rtol=1e-5, atol=1e-6)


def _lobcq_sims(lin: nn.Linear, lora: bool) -> tuple[LOBCQLinearSim, LOBCQLinearSim]:
    fmt = LOBCQFormat(LOBCQSpec(), act_bits=None)
    return tuple(
        LOBCQLinearSim(lin, fmt, use_lora_rounding=lora, generator=torch.Generator().manual_seed(0)) for _ in range(2)
    )


@pytest.mark.parametrize("lora", [True, False], ids=["lora-rounding", "nearest"])
def test_lobcq_stand_in_starts_from_gptq_on_its_starting_encoding(lora):
    """LO-BCQ: GPTQ keeps the starting array scales and codebook selectors, starts every value at the nearest entry
    of its codebook for the error-compensated weight, and lowers the output error against the nearest start."""
    lin = _linear(32, 256)
    float_weight = lin.weight.detach().clone()
    x = _correlated(2048, 256)
    h = 2 * x.T @ x / x.shape[0]
    nearest, sim = _lobcq_sims(lin, lora)
    quantize = sim.column_quantizer()
    gptq_start(sim, h)
    assert torch.equal(sim.scale0, nearest.scale0) and torch.equal(sim.selector, nearest.selector)
    with torch.no_grad():
        start = torch.stack([quantize(i, sim.weight[:, i]) for i in range(256)], 1)
        assert torch.equal(sim.quantized_weight(), start)  # the hard choice is the nearest entry of W'
        errs = [_rel_out_err(x, float_weight, s.quantized_weight()) for s in (nearest, sim)]
    assert errs[1] < 0.9 * errs[0], errs
    assert torch.equal(lin.weight.detach(), float_weight)  # the float linear is untouched
    assert torch.equal(sim.codes().selector, nearest.codes().selector)


def test_lobcq_gptq_start_with_uncorrelated_inputs_is_the_nearest_start():
    """A diagonal Hessian leaves no error to compensate: the GPTQ start is the nearest-entry start, value for value."""
    lin = _linear(16, 128)
    nearest, sim = _lobcq_sims(lin, lora=False)
    gptq_start(sim, torch.diag(torch.rand(128) + 0.5))
    with torch.no_grad():
        assert torch.equal(sim.quantized_weight(), nearest.quantized_weight())


def test_calibrate_lobcq_from_gptq_start_runs_and_starts_lower(calib_ids):
    """format="lobcq" with rounding_init="gptq": the windows start below the RTN start's (W4A16, where the weight
    error is all there is; the tiny model's measured ordering, as in the uniform test above)."""
    starts = {}
    for init in ("rtn", "gptq"):
        cfg = _cfg(format="lobcq", bits=4, group_size=-1, act_bits=None, epochs=2, rounding_init=init)
        model = tiny_llama(layers=3).eval()
        rep = calibrate(model, cfg, calib_ids, progress=False)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert all(w["status"] in ("ok", "reverted") and w["loss_end"] <= w["loss_start"] for w in rep["windows"])
        starts[init] = [w["loss_start"] for w in rep["windows"]]
    assert starts["gptq"][0] < starts["rtn"][0], starts
    assert sum(starts["gptq"]) < sum(starts["rtn"]), starts


def test_collector_hessian_is_of_the_float_input_and_rescaled_by_smoothing():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))
    xs = [torch.randn(3, 5, 8), torch.randn(2, 7, 8)]
    with StatsCollector(block, ["0", "2"], hessian=True) as col:
        for x in xs:
            block(x)
            col.end_batch()
    x0 = torch.cat([x.reshape(-1, 8) for x in xs])
    x2 = torch.relu(block[0](x0))
    torch.testing.assert_close(col.hessian("0"), 2 * x0.T @ x0 / x0.shape[0])
    torch.testing.assert_close(col.hessian("2"), 2 * x2.T @ x2 / x2.shape[0])
    d = torch.rand(12) + 0.5
    xd = x2 / d
    torch.testing.assert_close(_smoothed_hessian(col, "2", {"2": d}), 2 * xd.T @ xd / xd.shape[0])
    assert torch.equal(_smoothed_hessian(col, "0", {}), col.hessian("0"))  # not smoothed: unchanged
    with StatsCollector(block, ["0"]) as plain:
        block(xs[0])
    assert plain.hessian("0") is None  # collected only when asked for


def test_collector_hessian_is_of_the_input_after_pre_hooks():
    """A linear whose input a forward pre-hook changes (the online Hadamard of `CBQConfig(rotation=...)`) gets the
    Hessian of the input its forward multiplies."""
    lin = nn.Linear(6, 3)
    lin.register_forward_pre_hook(lambda mod, args: (args[0] * 3.0,))
    x = torch.randn(10, 6)
    with StatsCollector(nn.Sequential(lin), ["0"], hessian=True) as col:
        lin(x)
    torch.testing.assert_close(col.hessian("0"), 2 * (3 * x).T @ (3 * x) / 10)


@pytest.mark.parametrize("bits", [3, 4], ids=["w3", "w4"])
def test_calibrate_from_gptq_start_runs_and_starts_lower(calib_ids, bits):
    """On the tiny model the window losses at the GPTQ start are below the RTN start's. Not a theorem: GPTQ lowers
    each linear's output error on its float input, not the window loss through the nonlinearities (on X_q from the
    second window on); a margin would hide nothing, so the test asserts the ordering it measures."""
    starts = {}
    for init in ("rtn", "gptq"):
        cfg = _cfg(bits=bits, group_size=32, rounding_init=init)
        model = tiny_llama(layers=3).eval()
        rep = calibrate(model, cfg, calib_ids, progress=False)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        starts[init] = [w["loss_start"] for w in rep["windows"]]
        assert all(w["status"] in ("ok", "reverted") and w["loss_end"] <= w["loss_start"] for w in rep["windows"])
    assert starts["gptq"][0] < starts["rtn"][0], starts
    assert sum(starts["gptq"]) < sum(starts["rtn"]), starts


def test_resume_bit_identical_with_gptq_start(monkeypatch, tmp_path, calib_ids):
    kw = dict(bits=3, group_size=32, rounding_init="gptq")
    full = tiny_llama(layers=3).eval()
    calibrate(full, _cfg(**kw), calib_ids, progress=False)
    ckpt = tmp_path / "ckpt"
    with monkeypatch.context() as m:
        _interrupt_at(m, 1)
        with pytest.raises(_Interrupted):
            calibrate(tiny_llama(layers=3).eval(), _cfg(checkpoint_dir=str(ckpt), **kw), calib_ids, progress=False)
    resumed = tiny_llama(layers=3).eval()
    rep = calibrate(resumed, _cfg(checkpoint_dir=str(ckpt), **kw), calib_ids, progress=False)
    assert rep["resumed_from_window"] == 1
    ref, got = _bits(full.state_dict()), _bits(resumed.state_dict())
    assert sorted(got) == sorted(ref) and [k for k in ref if ref[k] != got[k]] == []


def test_rounding_init_field_validates_and_round_trips(calib_ids):
    cfg = CBQConfig(bits=3, rounding_init="gptq")
    back = CBQConfig(**json.loads(json.dumps(cfg.to_dict())))
    assert back.rounding_init == "gptq" and back.to_dict() == cfg.to_dict()
    assert CBQConfig().rounding_init == "gptq" and CBQConfig(method="rtn").rounding_init == "rtn"
    with pytest.raises(ValueError, match="`rounding_init`"):
        CBQConfig(rounding_init="nearest")
    with pytest.raises(ValueError, match="rounding_init='gptq'.*method='rtn'"):
        CBQConfig(method="rtn", rounding_init="gptq")
    assert CBQConfig(format="lobcq", bits=4, rounding_init="gptq").rounding_init == "gptq"
    assert CBQConfig(format="lobcq", bits=4).rounding_init == "rtn"  # LO-BCQ's default start stays RTN's
    # a checkpoint written before the field existed (an RTN start) still matches an RTN-start run, not a gptq run
    model = tiny_llama(layers=2)
    plain = run_identity(CBQConfig(rounding_init="rtn"), calib_ids, model, 2)
    assert "rounding_init" not in plain["config"]
    assert run_identity(CBQConfig(), calib_ids, model, 2) != plain
