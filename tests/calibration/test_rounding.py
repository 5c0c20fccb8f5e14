"""LoRA-Rounding, learnable step sizes and activation clipping of one linear (`QuantLinearSim`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cbq_hf.calibration import rounding
from cbq_hf.calibration.rounding import (
    QuantLinearSim,
    init_qparams,
    inverse_rectified_sigmoid,
    rectified_sigmoid,
    rounding_regularizer,
)
from cbq_hf.formats.uniform import (
    UniformFormat,
    UniformSpec,
    dequantize_codes,
    expand_groups,
    minmax_qparams,
    quantize_codes,
    round_scale,
)
from cbq_hf.kernels.cpu import build
from cbq_hf.nn.linear import CBQLinear

SPECS = [UniformSpec(4, 32), UniformSpec(2, 16), UniformSpec(3, 48), UniformSpec(4, 32, sym=True)]
SPEC_IDS = ["w4-g32", "w2-g16", "w3-g48-ragged", "w4-g32-sym"]


def _linear(n=24, k=80, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    lin.weight.data[:, 5] *= 8  # a heavy column
    return lin


def test_rectified_sigmoid_range_and_inverse():
    v = torch.linspace(-30, 30, 1001)
    h = rectified_sigmoid(v)
    assert h.min() >= 0 and h.max() <= 1
    assert h[0] == 0 and h[-1] == 1  # saturates: exact 0/1 reachable
    r = torch.rand(1000) * 0.999
    assert torch.allclose(rectified_sigmoid(inverse_rectified_sigmoid(r)), r, atol=1e-5)


def test_regularizer():
    assert float(rounding_regularizer(torch.tensor([0.0, 1.0, 1.0, 0.0]), 2.0)) == pytest.approx(0.0)
    h = torch.tensor([0.3, 0.6, 0.9])
    r_hi, r_lo = float(rounding_regularizer(h, 20.0)), float(rounding_regularizer(h, 2.0))
    assert 0 < r_lo < r_hi <= 1  # annealing beta from high to low tightens the pull towards 0/1


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_init_never_worse_than_minmax(spec):
    w = _linear().weight.detach()
    s0, z0 = minmax_qparams(w, spec)
    s, z = init_qparams(w, spec)
    err = lambda s, z: (dequantize_codes(quantize_codes(w, s, z, spec), s, z, spec) - w).pow(2).sum()  # noqa: E731
    assert float(err(s, z)) <= float(err(s0, z0)) + 1e-7
    assert torch.equal(s, round_scale(s))  # stored-exact


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_starts_at_round_to_nearest(spec):
    lin = _linear()
    sim = QuantLinearSim(lin, spec, generator=torch.Generator().manual_seed(0))
    codes, scales, zeros, _ = sim.freeze_codes()
    assert torch.equal(codes, quantize_codes(lin.weight.detach(), scales, zeros, spec))


@pytest.mark.parametrize("act_bits", [None, 8, 4])
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_packed_linear_matches_simulation(spec, act_bits):
    """What trained is what is stored: the packed CBQLinear computes exactly the simulated forward."""
    lin = _linear()
    in_scale = torch.rand(lin.in_features) + 0.5
    sim = QuantLinearSim(lin, spec, act_bits, input_scale=in_scale, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # move away from the initial point: random LoRA factors, steps and clip
        sim.a2.normal_(0, 1.0)
        sim.log_delta.normal_(0, 0.05)
        if act_bits:
            sim.act_clip.fill_(0.8)
    codes, scales, zeros, clip = sim.freeze_codes()
    fmt = UniformFormat(spec.bits, spec.group_size, spec.sym, act_bits)
    q = CBQLinear(lin.in_features, lin.out_features, True, fmt, has_input_scale=True)
    q.load_packed(fmt.pack(codes, scales, zeros, clip), bias=lin.bias.detach(), input_scale=in_scale)
    x = torch.randn(3, 7, lin.in_features)
    with torch.no_grad():
        torch.testing.assert_close(q(x), sim(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(q.dequantized_weight(), sim.quantized_weight(), rtol=0, atol=0)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_hard_rounding_at_freeze(spec):
    lin = _linear(bias=False)
    sim = QuantLinearSim(lin, spec, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sim.a2.normal_(0, 2.0)
    h = sim.offsets().detach()
    assert h.min() >= 0 and h.max() <= 1
    codes, scales, zeros, _ = sim.freeze_codes()
    k = lin.in_features
    s, z = expand_groups(scales, k, spec), expand_groups(zeros, k, spec)
    expected = torch.clamp(torch.floor(lin.weight.detach() / s) + (h >= 0.5).float() + z, 0, spec.qmax)
    assert torch.equal(codes.float(), expected)
    assert codes.max() <= spec.qmax


def test_gradients_reach_every_learnable_part():
    lin = _linear()
    sim = QuantLinearSim(lin, UniformSpec(3, 16), 8, generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 9, lin.in_features)
    target = lin(x).detach()
    loss = (sim(x) - target).pow(2).mean() + sim.regularizer(10.0)
    loss.backward()
    for name in ("a1", "log_delta", "act_clip"):
        assert getattr(sim, name).grad is not None, name
    assert sim.a2.grad.abs().sum() > 0
    assert sim.log_delta.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "switch,absent",
    [
        ("use_lora_rounding", ["a1", "a2"]),
        ("learn_weight_scales", ["log_delta"]),
        ("learn_act_clipping", ["act_clip"]),
    ],
)
def test_ablation_switches_remove_parameters(switch, absent):
    sim = QuantLinearSim(_linear(), UniformSpec(4, 32), 8, **{switch: False})
    names = {n for n, _ in sim.named_parameters()}
    assert not names & set(absent)


def test_few_steps_lower_reconstruction_error():
    """On correlated inputs (as real activations are) learned rounding beats round-to-nearest quickly."""
    torch.manual_seed(0)
    lin = _linear(n=32, k=64)
    sim = QuantLinearSim(lin, UniformSpec(2, 16), generator=torch.Generator().manual_seed(0))
    x = torch.randn(512, 8) @ torch.randn(8, lin.in_features) + 0.3 * torch.randn(512, lin.in_features)
    target = lin(x).detach()
    opt = torch.optim.Adam(
        [{"params": sim.rounding_parameters(), "lr": 1e-2}, {"params": sim.scale_parameters(), "lr": 1e-3}]
    )
    with torch.no_grad():
        start = float((sim(x) - target).pow(2).mean())
    for _ in range(60):
        loss = (sim(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = float((sim(x) - target).pow(2).mean())
    assert end < 0.7 * start


@pytest.mark.parametrize("spec", SPECS[:3], ids=SPEC_IDS[:3])
def test_step_change_keeps_the_learned_rounding_choice(spec):
    """With LoRA-Rounding the codes are floor(W / s0) + h: a small change of the learned step rescales them but must
    not move any weight to another code (flooring on the moving grid did, a whole-step error per crossing weight)."""
    sim = QuantLinearSim(_linear(), spec)
    codes0, _, zero, _ = sim.freeze_codes()
    with torch.no_grad():
        sim.log_delta.uniform_(-0.03, 0.03)
    codes1, scale1, _, _ = sim.freeze_codes()
    assert torch.equal(codes0, codes1)
    # and the weight follows the new step exactly: (q - z) * s
    expected = (codes1.float() - expand_groups(zero, sim.in_features, spec)) * expand_groups(
        scale1, sim.in_features, spec
    )
    assert torch.allclose(sim.quantized_weight().detach(), expected)


def _use_cpu_kernels(on: bool, monkeypatch) -> None:
    """Routes LoRA-Rounding through the CPU extension's kernels (skips where they cannot be built) or through the
    PyTorch ops."""
    monkeypatch.setattr(rounding, "USE_CPU_KERNELS", on)
    if on and build.load() is None:
        pytest.skip(f"the CPU kernels could not be built here: {build._state.get('error')}")


def _composed_weight(sim: QuantLinearSim) -> torch.Tensor:
    """The quantized weight through the composed ops (the definition `_LoRARoundedWeight` writes out)."""
    k = sim.in_features
    scale = sim.scale()
    return (sim._codes(scale) - expand_groups(sim.zero, k, sim.spec)) * expand_groups(scale, k, sim.spec)


@pytest.mark.parametrize(
    "n,k,group,bits",
    [(96, 200, 64, 4), (64, 128, 32, 2), (48, 576, 128, 3), (40, 100, -1, 4)],
    ids=["w4-g64-ragged", "w2-g32", "w3-g128-ragged", "w4-row"],
)
@pytest.mark.parametrize("cpu_kernels", [False, True], ids=["torch", "cpu-kernels"])
def test_fused_weight_equals_composed_ops(n, k, group, bits, cpu_kernels, monkeypatch):
    """The written-out forward (in PyTorch ops, or in the CPU extension's kernels) gives the composed ops' weight
    bit for bit and their gradients up to summation order; the regulariser reuses the forward's offsets with the
    same value and gradient."""
    _use_cpu_kernels(cpu_kernels, monkeypatch)
    torch.manual_seed(0)
    sim = QuantLinearSim(nn.Linear(k, n), UniformSpec(bits, group), None, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sim.a2.normal_()
        sim.log_delta.normal_(0, 0.05)
    x = torch.randn(33, k)

    def run(weight_fn):
        for p in sim.parameters():
            p.grad = None
        sim.regularizer_beta = 3.0
        w = weight_fn()
        loss = F.linear(x, w).pow(2).mean() + 0.3 * sim.regularizer(3.0)
        loss.backward()
        return w.detach(), [p.grad.clone() for p in (sim.a1, sim.a2, sim.log_delta)]

    w_fused, g_fused = run(sim.quantized_weight)
    w_ref, g_ref = run(lambda: _composed_weight(sim))
    assert torch.equal(w_fused, w_ref)
    for a, b in zip(g_fused, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=["float32", "bfloat16-autocast"])
def test_cpu_kernels_match_torch_ops(autocast_dtype, monkeypatch):
    """A calibration step through the CPU kernels gives the PyTorch ops' output and gradients (float32, and under
    bfloat16 autocast, where the weight comes out in bfloat16 and the offsets stay float32), codes clamped at both
    ends of the grid included."""
    spec = UniformSpec(4, 64)
    lin = _linear(n=72, k=200, seed=3)
    x = torch.randn(17, 200)
    results = {}
    for on in (False, True):
        _use_cpu_kernels(on, monkeypatch)
        sim = QuantLinearSim(lin, spec, None, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            sim.a2.normal_(0, 2.0, generator=torch.Generator().manual_seed(2))  # flips many offsets
            sim.log_delta.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
        sim.regularizer_beta = 3.0
        with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            w = sim.quantized_weight()
            assert sim._last_forward[0] == ("regularizer" if on else "offsets")  # kernels: computed with the weight
            loss = F.linear(x, w).float().pow(2).mean() + 0.3 * sim.regularizer(3.0)
        loss.backward()
        assert (sim._constants[2] is not None) == on  # the int16 codes base exists only for the kernels
        results[on] = (w.detach(), *(p.grad.clone() for p in (sim.a1, sim.a2, sim.log_delta)))
    w_ref, w_cpu = results[False][0], results[True][0]
    assert w_cpu.dtype == w_ref.dtype == (autocast_dtype or torch.float32)
    assert torch.equal(w_cpu, w_ref)
    codes = sim.freeze_codes()[0]
    assert (codes == 0).any() and (codes == spec.qmax).any()
    for a, b in zip(results[True][1:], results[False][1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


@pytest.mark.parametrize("beta", [2.0, 7.5, 20.0])
def test_cpu_regularizer_matches_torch_ops(beta, monkeypatch):
    """The regulariser the CPU kernels compute in the weight's pass (float32 exp/log approximations) gives
    `rounding_regularizer`'s value and gradient within float noise, offsets at 0, 1/2 and 1 included; asked for
    another beta than the forward's, it is computed anew."""
    spec = UniformSpec(4, 64)
    lin = _linear(n=37, k=300, seed=5)
    results = {}
    for on in (False, True):
        _use_cpu_kernels(on, monkeypatch)
        sim = QuantLinearSim(lin, spec, None, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            sim.a2.normal_(0, 1.0, generator=torch.Generator().manual_seed(2))
            sim.a1[0].zero_()  # row 0: h = h(v0) exactly
            sim.v0[0, :3] = torch.tensor([-30.0, 0.0, 30.0])  # h = 0, 1/2, 1
        sim.regularizer_beta = beta
        sim.quantized_weight()
        reg = sim.regularizer(beta)
        reg.backward()
        results[on] = (reg.detach(), sim.a1.grad.clone(), sim.a2.grad.clone())
        assert float(sim.offsets().detach()[0, 1]) == 0.5
        sim.regularizer_beta = beta
        sim.quantized_weight()
        other = sim.regularizer(beta + 1.0)  # not the forward's beta: from the offsets
        torch.testing.assert_close(other, rounding_regularizer(sim.offsets(), beta + 1.0))
    for a, b in zip(results[True], results[False]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()))
