"""Coarse-to-fine preprocessing: outlier detection, smoothing that keeps the float function, norm folding."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cbq_hf.calibration.preprocess import (
    ALPHA_CANDIDATES,
    SmoothingSettings,
    StatsCollector,
    outlier_counts,
    smooth_block,
    smoothing_error,
    smoothing_scales,
    smoothquant_scales,
    weight_truncation,
)
from cbq_hf.modeling import block_linears


def test_fine_split_stops_at_the_largest_gap():
    v = torch.ones(1, 100)
    v[0, :4] = torch.tensor([100.0, 90.0, 10.0, 9.0])  # two clear outliers, then two mild ones
    assert outlier_counts(v, 1.5, 1.0).tolist() == [2]


def test_detects_planted_outliers():
    g = torch.Generator().manual_seed(0)
    v = torch.rand(4, 200, generator=g) + 1.0
    v[0, [3, 50, 70]] = torch.tensor([30.0, 25.0, 28.0])
    v[1, 10] = 40.0
    counts = outlier_counts(v, 1.5, 1.0)
    assert counts.tolist()[:2] == [3, 1]
    assert counts.tolist()[2:] == [0, 0]  # uniform rows: the fine split keeps nothing or the coarse test fails


@pytest.mark.parametrize("m", [1, 2, 7, 576, 1537])
def test_quantiles_from_the_sorted_rows_equal_torch_quantile(m):
    """The coarse thresholds reuse one sort of each row: its quartiles equal `torch.quantile`'s bit for bit."""
    from cbq_hf.calibration.preprocess import _quantile_of_sorted

    v = torch.randn(33, m, generator=torch.Generator().manual_seed(m)).abs()
    v[0] = 1.0  # ties
    ascending = v.sort(dim=1).values
    for q in (0.25, 0.75):
        assert torch.equal(_quantile_of_sorted(ascending, q), torch.quantile(v, q, dim=1))


def test_smoothing_scales_only_touch_outliers():
    a = torch.ones(64)
    a[7], a[9] = 50.0, 45.0
    s = smoothing_scales(a, 1.5, 1.0, 0.5)
    assert s[7] == pytest.approx(50.0**0.5) and s[9] == pytest.approx(45.0**0.5)
    assert torch.all(s[[i for i in range(64) if i not in (7, 9)]] == 1)
    assert torch.all(smoothing_scales(a, 1.5, 1.0, 0.0) == 1)  # alpha 0: no smoothing


def test_smoothquant_scales_balance_the_two_ranges():
    a = torch.tensor([1.0, 50.0, 0.2, 0.0, 3.0])
    w = torch.tensor([0.5, 0.1, 2.0, 1.0, 0.0])
    s = smoothquant_scales(a, w, 0.5)
    # after x / s and w * s, both ranges are sqrt(max|x| max|w|) on every live channel
    live = torch.tensor([True, True, True, False, False])
    torch.testing.assert_close((a / s)[live], (w * s)[live])
    torch.testing.assert_close((a / s)[live], (a * w).sqrt()[live])
    assert s[3] == 1 and s[4] == 1  # never-active channel, all-zero weight column: left alone
    s8 = smoothquant_scales(a, w, 0.8)  # more of the range migrates into the weights: (a w)^0.2 vs (a w)^0.8
    torch.testing.assert_close((a / s8)[live], (a * w).pow(0.2)[live])
    torch.testing.assert_close((w * s8)[live], (a * w).pow(0.8)[live])


def test_weight_truncation_threshold():
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    w[2, 5] = 1.0
    thr, n = weight_truncation(w, 1.5, 1.0)
    assert n >= 1
    assert thr[2] < 1.0 and thr[2] >= w[2].abs().sort(descending=True).values[1] - 1e-9
    assert torch.all(thr <= w.abs().amax(1) + 1e-9)


class _Divide(nn.Module):
    """nn.Linear preceded by x / s: what CBQLinear's input_scale does."""

    def __init__(self, lin, s):
        super().__init__()
        self.lin, self.s = lin, s

    def forward(self, x):
        return self.lin(x / self.s)


def _block_with_outliers(family):
    model = family(layers=2)
    from cbq_hf.calibration.capture import capture_block_inputs
    from cbq_hf.modeling import find_decoder_blocks

    _, blocks = find_decoder_blocks(model)
    block = blocks[0]
    with torch.no_grad():  # plant outlier channels in the norm outputs feeding q/k/v and gate/up
        for m in block.modules():
            if "Norm" in type(m).__name__:
                m.weight[3] *= 40
                m.weight[11] *= 15
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    inp = capture_block_inputs(model, ids, 4)
    return block, inp


def _collect(block, inp, linears, keep_tokens=0):
    """Statistics of the block's linears on its captured input, and the block's float output."""
    with StatsCollector(block, list(linears), keep_tokens=keep_tokens) as col, torch.no_grad():
        ref = inp.call_block(block, 0, 0, inp.hidden)
        col.end_batch()
    return col, ref


def _unchanged(block, inp, ref):
    """The fold check smooth_block takes: does the block still compute `ref`?"""

    def check():
        with torch.no_grad():
            out = inp.call_block(block, 0, 0, inp.hidden)
        return bool((out - ref).norm() <= 1e-4 * ref.norm())

    return check


def _assert_float_function_kept(block, inp, linears, sm, ref):
    """With the explicit scales applied as CBQLinear would (x / s), the block computes what it did before."""
    for name in sm.explicit:
        parent, _, child = name.rpartition(".")
        setattr(block.get_submodule(parent), child, _Divide(linears[name], sm.input_scales[name]))
    with torch.no_grad():
        torch.testing.assert_close(inp.call_block(block, 0, 0, inp.hidden), ref, rtol=1e-4, atol=1e-4)


def test_smoothing_keeps_float_output_and_folds_into_norms(family):
    block, inp = _block_with_outliers(family)
    ref_block = copy.deepcopy(block)
    linears = block_linears(block)
    col, ref = _collect(block, inp, linears)
    assert col.stats.feeds["self_attn.q_proj"] == col.stats.feeds["self_attn.k_proj"] == "input_layernorm"
    assert col.stats.feeds["mlp.up_proj"] == "post_attention_layernorm"
    sm = smooth_block(block, linears, col.stats, SmoothingSettings(1.5, 1.0, 0.5), _unchanged(block, inp, ref))
    assert sm.outlier_channels >= 2
    assert {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"} <= set(
        sm.folded
    )
    assert not torch.equal(block.input_layernorm.weight, ref_block.input_layernorm.weight)
    _assert_float_function_kept(block, inp, linears, sm, ref)  # explicit scales stay in CBQLinear's input_scale


def test_fold_that_breaks_the_function_is_undone(family):
    """A norm whose output is not `normalised * weight` (e.g. Gemma's (1 + weight)) keeps an explicit scale."""
    block, inp = _block_with_outliers(family)
    linears = block_linears(block)
    col, ref = _collect(block, inp, linears)
    before = block.input_layernorm.weight.detach().clone()
    sm = smooth_block(block, linears, col.stats, SmoothingSettings(1.5, 1.0, 0.5), check=lambda: False)
    assert sm.folded == []
    assert torch.equal(block.input_layernorm.weight, before)
    _assert_float_function_kept(block, inp, linears, sm, ref)


def test_smoothquant_smoothing_touches_every_channel_and_keeps_float_output(family):
    block, inp = _block_with_outliers(family)
    linears = block_linears(block)
    col, ref = _collect(block, inp, linears)
    hidden = block.input_layernorm.weight.numel()
    sm = smooth_block(block, linears, col.stats, SmoothingSettings(1.5, 1.0, 0.5, 0.5), _unchanged(block, inp, ref))
    assert {"self_attn.q_proj", "mlp.gate_proj"} <= set(sm.folded)
    assert bool((sm.divisors["self_attn.q_proj"] != 1).all()) and sm.outlier_channels > 2 * hidden
    # the activations' range now equals the weights' on every channel of q/k/v's shared input
    q, k, v = (linears[f"self_attn.{n}_proj"].weight.abs().amax(0) for n in "qkv")
    a = col.stats.act_max["self_attn.q_proj"] / sm.divisors["self_attn.q_proj"]
    torch.testing.assert_close(a, torch.stack([q, k, v]).amax(0), rtol=1e-4, atol=1e-6)
    _assert_float_function_kept(block, inp, linears, sm, ref)


@pytest.mark.parametrize("fmt_name", ["uniform", "lobcq"])
def test_auto_alpha_picks_the_smallest_quantized_output_error(family, fmt_name):
    """smooth_alpha="auto": each group gets the candidate (CFP or an alpha) with the smallest `smoothing_error`
    on the sampled inputs, the float function is kept, and with planted outlier channels that beats CFP."""
    from cbq_hf.formats.lobcq import LOBCQFormat
    from cbq_hf.formats.uniform import UniformFormat

    fmt = LOBCQFormat(act_bits=4) if fmt_name == "lobcq" else UniformFormat(4, 32, act_bits=4)
    block, inp = _block_with_outliers(family)
    linears = block_linears(block)
    col, ref = _collect(block, inp, linears, keep_tokens=48)
    x = col.stats.samples["self_attn.q_proj"]
    assert x.shape[0] == 48
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    weights = [linears[n].weight.detach().clone() for n in names]
    amax = torch.stack([col.stats.act_max[n] for n in names]).amax(0)
    wmax = torch.stack([w.abs().amax(0) for w in weights]).amax(0)
    errs = {None: smoothing_error(weights, x, smoothing_scales(amax, 1.5, 1.0, 0.5), fmt)}
    errs.update({a: smoothing_error(weights, x, smoothquant_scales(amax, wmax, a), fmt) for a in ALPHA_CANDIDATES})
    sm = smooth_block(
        block, linears, col.stats, SmoothingSettings(1.5, 1.0, 0.5, "auto", fmt), _unchanged(block, inp, ref)
    )
    chosen = sm.alphas["input_layernorm"]
    assert errs[chosen] == min(errs.values())
    assert min(errs[a] for a in ALPHA_CANDIDATES) < errs[None]  # smoothing every channel beats CFP here
    assert set(sm.alphas) >= {"input_layernorm", "post_attention_layernorm"}
    _assert_float_function_kept(block, inp, linears, sm, ref)
