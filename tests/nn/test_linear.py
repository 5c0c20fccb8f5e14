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


# ---------------------------------------------------------------------------------------------- input_hadamard
def _rotated_pair(k: int, act_bits):
    """A CBQLinear with the online Hadamard and the same layer without it (same packed buffers and bias)."""
    fmt = UniformFormat(4, 32, act_bits=act_bits)
    packed, b = fmt.quantize_rtn(torch.randn(24, k)), torch.randn(24)
    rot, plain = CBQLinear(k, 24, True, fmt, input_hadamard=True), CBQLinear(k, 24, True, fmt)
    rot.load_packed(packed, bias=b)
    plain.load_packed(packed, bias=b)
    return rot, plain


@pytest.mark.parametrize("act_bits", [None, 8, 4], ids=["a16", "a8", "a4"])
@pytest.mark.parametrize("k", [64, 96, 192], ids=lambda k: f"k{k}")
def test_input_hadamard_every_kernel_sees_the_rotated_input(k, act_bits):
    from cbq_hf.kernels import dispatch
    from cbq_hf.rotation import hadamard_matrix, hadamard_transform

    rot, plain = _rotated_pair(k, act_bits)
    x = torch.randn(3, 5, k)
    assert torch.allclose(hadamard_transform(x).double(), x.double() @ hadamard_matrix(k), atol=1e-5)
    ran = []
    for name in dispatch.available_kernels():
        try:
            with dispatch.force_kernel(name), torch.no_grad():
                got, want = rot(x), plain(hadamard_transform(x))
        except RuntimeError as e:  # a path that cannot run this call (device, dtype) says so
            if "cannot run this call" in str(e):
                continue
            raise
        ran.append(name)
        assert torch.equal(got, want), name
    assert "reference" in ran


def test_input_hadamard_is_a_saved_buffer_and_reloads():
    rot, _ = _rotated_pair(96, 8)
    sd = rot.state_dict()
    assert sd["input_hadamard"].tolist() == [96] and sd["input_hadamard"].dtype == torch.int32
    fresh = CBQLinear(96, 24, True, rot.fmt, input_hadamard=True)
    fresh.load_state_dict(sd)
    x = torch.randn(4, 96)
    with torch.no_grad():
        assert torch.equal(fresh(x), rot(x))
    assert "input_hadamard" not in CBQLinear(96, 24, True, rot.fmt).state_dict()  # older layout unchanged
    assert "input_hadamard=True" in repr(rot)
