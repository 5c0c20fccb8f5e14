import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import make_linear

from cbq_hf.formats.uniform import fake_quantize_activations
from cbq_hf.kernels import reference


@pytest.mark.parametrize("act_bits", [None, 8, 4], ids=lambda a: f"a{a}")
def test_reference_is_the_simulated_quantization(act_bits):
    lin = make_linear(10, 72, 4, 32, act_bits=act_bits)
    x = torch.randn(3, 72)
    xs = x / lin.input_scale
    if act_bits:
        xs = fake_quantize_activations(xs, act_bits, lin.act_clip)
    expected = F.linear(xs, lin.dequantized_weight(), lin.bias)
    assert torch.allclose(reference.linear(lin, x), expected, atol=1e-5)
