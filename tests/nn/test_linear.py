import pytest
import torch
import torch.nn.functional as F

from cbq_hf.formats.uniform import UniformFormat, fake_quantize_activations, fake_quantize_rtn
from cbq_hf.nn.linear import CBQLinear


def _make(n, k, bits, group, act_bits=None, bias=True, input_scale=False):
    fmt = UniformFormat(bits, group, act_bits=act_bits)
    w = torch.randn(n, k)
    b = torch.randn(n) if bias else None
    lin = CBQLinear(k, n, bias, fmt, has_input_scale=input_scale)
    lin.load_packed(fmt.quantize_rtn(w), bias=b, input_scale=torch.rand(k) + 0.5 if input_scale else None)
    return lin, w, b


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(1, 16), (7, 33), (64, 130)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_dequantized_weight_equals_simulated_quantization_bit_for_bit(bits, shape):
    n, k = shape
    lin, w, _ = _make(n, k, bits, 16)
    assert torch.equal(lin.dequantized_weight(), fake_quantize_rtn(w, lin.fmt.spec))


def test_forward_matches_simulated_reference_with_activation_quant_and_input_scale():
    lin, w, b = _make(10, 48, 4, 16, act_bits=8, input_scale=True)
    x = torch.randn(2, 3, 48)
    xs = x / lin.input_scale
    expected = F.linear(fake_quantize_activations(xs, 8), lin.dequantized_weight(), b)
    with torch.no_grad():
        out = lin(x)
    assert torch.allclose(out, expected, atol=1e-5)
    assert lin.last_kernel is not None


def test_load_packed_rejects_wrong_shapes():
    fmt = UniformFormat(4, 16)
    lin = CBQLinear(32, 8, False, fmt)
    bad = fmt.quantize_rtn(torch.randn(8, 48))
    with pytest.raises(ValueError, match="qweight"):
        lin.load_packed(bad)


def test_state_dict_holds_only_packed_tensors():
    lin, _, _ = _make(8, 32, 4, 16, act_bits=4)
    assert set(lin.state_dict()) == {"qweight", "scales", "zeros", "act_clip", "bias"}
