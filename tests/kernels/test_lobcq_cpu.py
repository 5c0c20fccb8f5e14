"""LO-BCQ CPU kernels (`lobcq_cpu.cpp`, `lobcq_paths.py`) against the reference: decoded rows bit-identical, the
GEMM within float tolerance, over geometries that take the vectorised and the scalar decoders."""

import pytest
import torch
from kernel_helpers import assert_close, magnitude

from cbq_hf.formats.lobcq import LOBCQFormat, LOBCQSpec
from cbq_hf.kernels import reference
from cbq_hf.kernels.cpu import build, lobcq_paths
from cbq_hf.kernels.dispatch import force_kernel
from cbq_hf.nn.linear import CBQLinear

pytestmark = pytest.mark.skipif(build.select_variant() is None, reason="CPU without AVX2/FMA")

# (block_len, array_len, num_codebooks): the default (16-value vectorised decoder), 3-bit selectors that straddle
# bytes, one codebook (no selectors), arrays of 24 and blocks of 4 (scalar decoder).
SPECS = [(8, 64, 16), (8, 32, 8), (8, 64, 1), (4, 24, 4)]


def _random_lobcq(
    n: int,
    k: int,
    spec: LOBCQSpec,
    act_bits: int | None = None,
    bias: bool = True,
    input_scale: bool = False,
    seed: int = 0,
) -> CBQLinear:
    """A LO-BCQ CBQLinear with random codes, selectors, E4M3 scales and codebooks (no design step needed)."""
    g = torch.Generator().manual_seed(seed)
    fmt = LOBCQFormat(spec, act_bits=act_bits)
    specs = fmt.buffer_specs(n, k)
    bufs = {}
    for name, (shape, _dtype) in specs.items():
        if name == "scales":
            bufs[name] = torch.randint(40, 72, shape, dtype=torch.uint8, generator=g)  # E4M3 ~0.06 .. 1.1
        elif name == "tensor_scale":
            bufs[name] = torch.tensor([0.0123], dtype=torch.float32)
        elif name == "codebooks":
            bufs[name] = torch.randint(-31, 32, shape, generator=g).sort(-1).values.to(torch.int8)
        elif name == "act_codebooks":
            bufs[name] = fmt.universal()
        else:
            bufs[name] = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    lin = CBQLinear(k, n, bias, fmt, has_input_scale=input_scale)
    lin.load_packed(
        bufs,
        bias=torch.randn(n, generator=g) if bias else None,
        input_scale=torch.rand(k, generator=g) + 0.5 if input_scale else None,
    )
    return lin


def _run(lin, x, kernel):
    with torch.no_grad(), force_kernel(kernel):
        y = lin(x)
    assert lin.last_kernel == kernel
    return y


@pytest.mark.parametrize(
    ("geometry", "k", "n"),
    [(g, k, 13) for g in SPECS for k in (64, 100, 37, 576)] + [(g, 2100, 2048) for g in SPECS[::3]],
    ids=lambda v: f"b{v[0]}a{v[1]}n{v[2]}" if isinstance(v, tuple) else str(v),
)
def test_dequantize_into_is_the_reference_weight_bit_for_bit(geometry, k, n):
    """2048 x 2100 outputs (8.6 / 17.2 MB, above kStreamMinBytes) are written with streaming stores where aligned."""
    lin = _random_lobcq(n, k, LOBCQSpec(*geometry))
    st = lobcq_paths._state(lin)
    ops = build.load()
    out = torch.empty(n, k)
    ops.lobcq_dequantize_into(
        lin.qweight, st["selectors"], lin.scales, st["tensor_scale"], st["codebooks"], st["e4m3"], *st["geometry"], out
    )
    ref = lin.dequantized_weight()
    assert torch.equal(out, ref)
    bf = torch.empty(n, k, dtype=torch.bfloat16)
    ops.lobcq_dequantize_into(
        lin.qweight, st["selectors"], lin.scales, st["tensor_scale"], st["codebooks"], st["e4m3"], *st["geometry"], bf
    )
    assert torch.equal(bf, ref.to(torch.bfloat16))


@pytest.mark.parametrize("geometry", SPECS, ids=lambda s: f"b{s[0]}a{s[1]}n{s[2]}")
@pytest.mark.parametrize("m", [1, 3, 20], ids=lambda m: f"m{m}")
@pytest.mark.parametrize("k", [100, 576], ids=lambda k: f"k{k}")
@pytest.mark.parametrize("kernel", ["cpu_lobcq", "cpu_lobcq_dequant"])
def test_weight_only_paths_match_reference(kernel, k, m, geometry):
    lin = _random_lobcq(40, k, LOBCQSpec(*geometry), input_scale=True)
    x = torch.randn(2, m, k)
    y = _run(lin, x, kernel)
    assert y.shape == (2, m, 40)
    assert_close(y, reference.linear(lin, x), magnitude(lin, x), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kernel", ["cpu_lobcq", "cpu_lobcq_dequant"])
def test_w4a4_paths_match_reference(kernel, dtype):
    """Run-time activation encoding goes through the same encoder as the reference; the products are the same."""
    lin = _random_lobcq(48, 576, LOBCQSpec(), act_bits=4, input_scale=True, seed=1)
    x = torch.randn(5, 576).to(dtype)
    y = _run(lin, x, kernel)
    ref = reference.linear(lin, x)
    assert y.dtype == dtype
    assert_close(y, ref, magnitude(lin, x), dtype)


def test_dispatch_picks_the_row_gemm_for_decode_and_dequantize_for_prefill():
    lin = _random_lobcq(16, 128, LOBCQSpec())
    with torch.no_grad():
        lin(torch.randn(1, 128))
        assert lin.last_kernel == "cpu_lobcq"
        lin(torch.randn(lobcq_paths.LOBCQ_DEQUANT_MIN_M, 128))
        assert lin.last_kernel == "cpu_lobcq_dequant"
        # new buffers: the cached kernel state (codebooks, tensor scale) must follow them
        other = _random_lobcq(16, 128, LOBCQSpec(), seed=5)
        lin.load_state_dict(other.state_dict())
        x = torch.randn(1, 128)
        assert_close(lin(x), reference.linear(other, x), magnitude(other, x), torch.float32)


def _sorted_codebooks(nc: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-31, 32, (nc, 16), generator=g).sort(-1).values.to(torch.int8)


@pytest.mark.parametrize("geometry", SPECS, ids=lambda s: f"b{s[0]}a{s[1]}n{s[2]}")
@pytest.mark.parametrize("k", [576, 100, 37], ids=lambda k: f"k{k}")
def test_activation_encoder_is_bit_identical_to_the_formats(geometry, k):
    """The C++ run-time encoder against lobcq.fake_quantize_activations: tokens over 7 decades, an all-zero token, a
    large outlier, and integer-valued tokens (values on table-slot boundaries, ties between entries/codebooks)."""
    from cbq_hf.formats.lobcq import e4m3_decode, fake_quantize_activations
    from cbq_hf.formats.lobcq_codebooks import build_lut

    spec = LOBCQSpec(*geometry)
    cb = LOBCQFormat().universal() if geometry == (8, 64, 16) else _sorted_codebooks(geometry[2], k)
    lut = build_lut(cb, spec.cmax)
    x = torch.randn(200, k) * torch.logspace(-4, 3, 200).unsqueeze(1)
    x[5] = 0
    x[7, 3] = 5e3
    x[9] = torch.randn(k).mul(8).round()
    e4m3 = e4m3_decode(torch.arange(256, dtype=torch.uint8))
    got = build.load().lobcq_encode_act(
        x,
        lut.values.float().contiguous(),
        lut.index.to(torch.uint8).contiguous(),
        cb.float().contiguous(),
        e4m3,
        spec.block_len,
        spec.array_len,
        spec.cmax,
    )
    assert torch.equal(got, fake_quantize_activations(x, cb, spec))


def test_shared_inputs_are_encoded_once_and_in_place_changes_are_seen():
    q = _random_lobcq(8, 128, LOBCQSpec(), act_bits=4, seed=2)
    k = _random_lobcq(8, 128, LOBCQSpec(), act_bits=4, seed=3)
    x = torch.randn(1, 128)
    with torch.no_grad():
        a = lobcq_paths.prepare_input(q, x)
        assert lobcq_paths.prepare_input(k, x) is a  # same tensor, same activation codebooks: encoded once
        x.mul_(2)
        b = lobcq_paths.prepare_input(k, x)
        assert b is not a and torch.allclose(b, 2 * a)
    with torch.inference_mode():  # no version counter: encoded every time, and it works
        xi = torch.randn(1, 128)
        assert torch.equal(lobcq_paths.prepare_input(q, xi), reference.prepare_input(q, xi))


# One block array of a real down_proj input of SmolLM2-135M (WikiText-2 test, layer 9, token 408 of window 2) where
# two codebooks' squared errors for block 4 differ by a rounding: summed in another order they pick different
# codebooks. The token's largest value (another array) fixes the tensor scale.
_NEAR_TIE_ARRAY = [
    -0.266615629,
    -0.156886905,
    -0.0224702861,
    -0.114742413,
    0.497671455,
    0.0512244478,
    -0.0371828973,
    -0.361242205,
    -0.0422159992,
    0.0197481886,
    -0.155538946,
    -0.00989568606,
    -0.0416565835,
    0.146892622,
    0.0393923521,
    0.093243964,
    -0.105600044,
    0.120281585,
    -0.0107987029,
    -0.100686103,
    0.0214201584,
    -0.144136474,
    -0.0107488865,
    0.00206716382,
    -0.00193630229,
    0.00973045174,
    0.0396688804,
    -0.0347794853,
    -0.0623170622,
    0.0219922867,
    0.0034908629,
    0.885654807,
    -0.16218403,
    0.215670824,
    0.0412396826,
    0.0595115572,
    0.0796199217,
    0.00553857349,
    -0.207907543,
    0.0521641448,
    -0.0436961129,
    0.00807869621,
    0.0375279151,
    0.0407509506,
    0.00813001394,
    -0.1415115,
    0.00551724155,
    -0.0545137562,
    0.134239227,
    0.187884912,
    -0.314323515,
    -0.155376181,
    -0.0242062956,
    0.662857115,
    0.189114317,
    -0.114800297,
    -0.0930747688,
    0.339967519,
    -0.00798560306,
    -0.174584821,
    -0.0919822529,
    0.00305164768,
    -0.0647314638,
    -0.162118629,
]
_NEAR_TIE_TOKEN_MAX = 1.75079048


def test_encoders_agree_on_a_near_tie_between_codebooks():
    """The C++ encoder and the format's PyTorch encoder sum each block's squared errors value by value in the same
    order, so a near-tie picks the same codebook in both (before: the PyTorch reduction's order picked another one
    for this block, and a prefill through the kernels differed from the reference path)."""
    from cbq_hf.formats.lobcq import e4m3_decode, fake_quantize_activations
    from cbq_hf.formats.lobcq_codebooks import build_lut

    spec = LOBCQSpec()
    cb = LOBCQFormat().universal()
    lut = build_lut(cb, spec.cmax)
    x = torch.zeros(1, 128)
    x[0, :64] = torch.tensor(_NEAR_TIE_ARRAY)
    x[0, 64] = _NEAR_TIE_TOKEN_MAX
    e4m3 = e4m3_decode(torch.arange(256, dtype=torch.uint8))
    got = build.load().lobcq_encode_act(
        x,
        lut.values.float().contiguous(),
        lut.index.to(torch.uint8).contiguous(),
        cb.float().contiguous(),
        e4m3,
        spec.block_len,
        spec.array_len,
        spec.cmax,
    )
    ref = fake_quantize_activations(x, cb, spec)
    assert torch.equal(got, ref)
