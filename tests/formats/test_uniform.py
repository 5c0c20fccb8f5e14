import pytest
import torch

from cbq_hf.formats.uniform import (
    UniformFormat,
    UniformSpec,
    dequantize_codes,
    fake_quantize_activations,
    fake_quantize_rtn,
    minmax_qparams,
    pack_codes,
    packed_row_bytes,
    quantize_codes,
    unpack_codes,
)

SHAPES = [(1, 1), (3, 7), (5, 64), (7, 130), (16, 576)]


@pytest.mark.parametrize("slot", [2, 4, 8], ids=lambda s: f"slot{s}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_pack_unpack_round_trip(slot, shape):
    codes = torch.randint(0, 2**slot, shape, dtype=torch.uint8)
    packed = pack_codes(codes, slot)
    assert packed.shape == (shape[0], packed_row_bytes(shape[1], slot))
    assert torch.equal(unpack_codes(packed, slot, shape[1]), codes)


def test_pack_rejects_codes_that_do_not_fit():
    with pytest.raises(ValueError, match="fit"):
        pack_codes(torch.tensor([[4]], dtype=torch.uint8), 2)


@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"w{b}")
@pytest.mark.parametrize("group", [-1, 32, 128], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
def test_rtn_grid_properties(bits, group, sym):
    spec = UniformSpec(bits, group, sym)
    w = torch.randn(6, 200)
    scales, zeros = minmax_qparams(w, spec)
    assert scales.shape == zeros.shape == (6, spec.num_groups(200))
    assert torch.equal(scales, scales.half().float())  # exactly what is stored
    codes = quantize_codes(w, scales, zeros, spec)
    assert int(codes.max()) <= 2**bits - 1
    wq = dequantize_codes(codes, scales, zeros, spec)
    # every value within half a step of the grid where it was not clipped (asym min-max never clips)
    from cbq_hf.formats.uniform import expand_groups

    step = expand_groups(scales, 200, spec)
    err = (w - wq).abs()
    if not sym:
        assert bool((err <= step / 2 + 1e-6).all())
    assert torch.equal(fake_quantize_rtn(w, spec), wq)


def test_last_group_is_shorter_when_group_does_not_divide():
    spec = UniformSpec(4, 128)
    assert spec.num_groups(576) == 5
    w = torch.zeros(1, 576)
    w[0, 512:] = torch.linspace(-1, 1, 64)  # only the 64-wide last group has range
    scales, _ = minmax_qparams(w, spec)
    assert float(scales[0, -1]) > float(scales[0, 0])


def test_group_larger_than_layer_is_a_clear_error():
    fmt = UniformFormat(4, 128)
    with pytest.raises(ValueError, match="group_size=128 is larger than the input size 64"):
        fmt.check_shape(10, 64, "mlp.up_proj")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_format_buffers_match_specs_and_dequantize_equals_simulation(bits):
    fmt = UniformFormat(bits, 32, act_bits=8)
    w = torch.randn(9, 100)
    bufs = fmt.quantize_rtn(w)
    specs = fmt.buffer_specs(9, 100)
    assert set(bufs) == set(specs)
    for k, (shape, dtype) in specs.items():
        assert bufs[k].shape == shape and bufs[k].dtype == dtype
    assert torch.equal(fmt.dequantize(bufs, 100), fake_quantize_rtn(w, fmt.spec))


def test_bits_per_weight_counts_stored_bytes():
    fmt = UniformFormat(4, 128)
    bufs = fmt.quantize_rtn(torch.randn(64, 512))
    stored_bits = sum(t.numel() * t.element_size() * 8 for t in bufs.values())
    assert fmt.bits_per_weight(64, 512) == pytest.approx(stored_bits / (64 * 512))


@pytest.mark.parametrize("act_bits", [4, 8])
def test_activation_quantization_is_per_token_symmetric(act_bits):
    x = torch.randn(3, 5, 40)
    xq = fake_quantize_activations(x, act_bits)
    qmax = 2 ** (act_bits - 1) - 1
    step = x.abs().amax(-1, keepdim=True) / qmax
    codes = xq / step
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert float(codes.abs().max()) <= qmax + 1e-4
    assert (x - xq).abs().le(step / 2 + 1e-6).all()
