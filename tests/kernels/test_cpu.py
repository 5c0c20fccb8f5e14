"""Every compiled CPU path against the reference (random shapes, bits, groups, dtypes, activation settings)."""

import pytest
import torch
from kernel_helpers import assert_close, fp32_matmul_in_bf16, magnitude, make_linear

from cbq_hf.kernels import reference
from cbq_hf.kernels.cpu import build, paths
from cbq_hf.kernels.dispatch import force_kernel

pytestmark = pytest.mark.skipif(build.select_variant() is None, reason="CPU without AVX2/FMA")

# (24, 1100, 32): 35 groups, so five meta blocks in every panel (see layout.META_GROUPS), the last one partial
SHAPES = [(130, 200, 64), (3, 72, -1), (1, 576, 128), (64, 576, 48), (130, 576, 100), (24, 1100, 32)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _ids(s):
    return f"n{s[0]}k{s[1]}g{s[2]}"


def _run(lin, x, kernel):
    with torch.no_grad(), force_kernel(kernel):
        y = lin(x)
    assert lin.last_kernel == kernel
    return y


# M=300 runs on the small-N shapes only (keeps the suite fast); every other M on every shape.
_SHAPE_M = [(s, m) for s in SHAPES for m in (1, 3, 64, 300) if m != 300 or s[0] <= 3]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,m", _SHAPE_M, ids=lambda v: _ids(v) if isinstance(v, tuple) else f"m{v}")
@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"w{b}")
def test_weight_only_paths_match_reference(bits, shape, m, dtype):
    n, k, g = shape
    lin = make_linear(n, k, bits, g, sym=(bits + n) % 2 == 0, bias=m != 3)
    x = torch.randn(2, m, k).to(DTYPES[dtype]) if m == 3 else torch.randn(m, k).to(DTYPES[dtype])
    ref = reference.linear(lin, x)
    lut2 = ("cpu_lut2",) if bits == 2 and paths.lut2_available() else ()  # AVX-512 builds (see test_lut2_*)
    for kernel in ("cpu_packed", "cpu_dequant") + lut2:
        y = _run(lin, x, kernel)
        assert y.dtype == x.dtype and y.shape == ref.shape
        assert_close(y, ref, magnitude(lin, x), DTYPES[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 3, 64], ids=lambda m: f"m{m}")
@pytest.mark.parametrize("shape", SHAPES[:4], ids=_ids)
@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"w{b}")
@pytest.mark.parametrize("act_bits", [8, 4], ids=lambda a: f"a{a}")
def test_activation_quantized_paths_match_reference(act_bits, bits, shape, m, dtype):
    n, k, g = shape
    lin = make_linear(n, k, bits, g, act_bits=act_bits, sym=bits % 2 == 0)
    x = torch.randn(m, k).to(DTYPES[dtype])
    ref = reference.linear(lin, x)
    kernels = ["cpu_packed", "cpu_dequant"] + (["cpu_int"] if bits != 8 else [])
    kernels += ["cpu_amx"] if bits != 8 and paths.amx_available() else []  # bit for bit cpu_int: test_amx_*
    for kernel in kernels:
        assert_close(_run(lin, x, kernel), ref, magnitude(lin, x), DTYPES[dtype])


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.float16], ids=str)
def test_dequant_follows_the_bf16_fp32_matmul_setting(in_dtype, monkeypatch):
    """Default: float32 GEMM (the reference's numbers). Under torch's bf16 float32-matmul setting, on a CPU with bf16
    matrix units: the bf16 GEMM a dense layer gets, i.e. exactly F.linear of the bf16-rounded input, weight and bias,
    returned in the input's dtype."""
    monkeypatch.setitem(paths._capabilities, "bf16_native", True)
    lin = make_linear(24, 576, 4, 128, input_scale=False)
    x = torch.randn(64, 576).to(in_dtype)
    exact = _run(lin, x, "cpu_dequant")
    assert_close(exact, reference.linear(lin, x), magnitude(lin, x), in_dtype)  # (float16: bf16's looser bound)
    with fp32_matmul_in_bf16():
        y = _run(lin, x, "cpu_dequant")
        expected = torch.nn.functional.linear(x.bfloat16(), lin.dequantized_weight().bfloat16(), lin.bias.bfloat16())
    assert y.dtype == in_dtype
    torch.testing.assert_close(y, expected.to(in_dtype), rtol=0, atol=0)
    assert not torch.equal(y, exact)


def _amx_or_refused(lin, x) -> bool:
    """True where cpu_amx can run; elsewhere (no AMX-INT8, an AVX2 build, tile state not granted) checks that it is
    never chosen and that forcing it is refused, and returns False."""
    if paths.amx_available():
        return True
    assert not paths.supports_amx(lin, x)
    with pytest.raises(RuntimeError, match="cannot run"):
        _run(lin, x, "cpu_amx")
    return False


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 15, 16, 37, 130], ids=lambda m: f"m{m}")
@pytest.mark.parametrize(
    "shape", [(40, 200, 64), (24, 1100, 32), (130, 576, 128), (8, 72, -1), (300, 256, 100)], ids=_ids
)
@pytest.mark.parametrize("bits,act_bits", [(4, 8), (4, 4), (3, 8), (2, 8), (2, 4)], ids=lambda v: str(v))
def test_amx_equals_the_vnni_integer_kernel_bit_for_bit(bits, act_bits, shape, m, dtype):
    """The AMX tiles compute cpu_int's numbers exactly: same codes, same int32 group sums, same float folding; over
    row counts that are not multiples of 16 (partial weight and token tiles), K not a multiple of 64, odd panel
    counts (N = 8, 40, 130, 300 rows) and whole-row groups."""
    n, k, g = shape
    lin = make_linear(n, k, bits, g, act_bits=act_bits, sym=bits % 2 == 0)
    x = torch.randn(m, k).to(DTYPES[dtype])
    if _amx_or_refused(lin, x):
        assert torch.equal(_run(lin, x, "cpu_amx"), _run(lin, x, "cpu_int"))


def test_amx_keeps_leading_dims_and_bias():
    lin = make_linear(24, 200, 4, 64, act_bits=8)
    x = torch.randn(2, 17, 200)
    if not _amx_or_refused(lin, x):
        return
    y = _run(lin, x, "cpu_amx")
    assert y.shape == (2, 17, 24)
    assert torch.equal(y.reshape(34, 24), _run(lin, x.reshape(34, 200), "cpu_int"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act_bits", [8, 4], ids=lambda a: f"a{a}")
def test_integer_activation_codes_identical_to_reference(act_bits, dtype):
    lin = make_linear(4, 576, 4, 128, act_bits=act_bits)
    x = torch.randn(64, 576).to(DTYPES[dtype]) * torch.logspace(-3, 3, 64).unsqueeze(1).to(DTYPES[dtype])
    x[3] = 0  # an all-zero token: the step is clamped
    x[5, 7] = 1e4
    xs = reference.scale_input(lin.input_scale, x)
    codes, steps = paths.quantize_activations(lin, xs)
    xf = xs.float()
    qmax = 2 ** (act_bits - 1) - 1
    step = (xf.abs().amax(-1, keepdim=True) * lin.act_clip / qmax).clamp(min=1e-8)
    expected = torch.clamp(torch.round(xf / step), -qmax - 1, qmax)
    assert torch.equal(codes.float(), expected)
    assert torch.equal(steps, step.squeeze(1))
    if dtype == "fp32":  # the simulated activations are exactly codes * step
        assert torch.equal(codes.float() * steps[:, None], lin.fmt.quantize_activations(xs, lin.packed_buffers()))


def test_repack_is_cached_and_cleared_on_load():
    lin = make_linear(8, 64, 4, 32)
    _run(lin, torch.randn(1, 64), "cpu_packed")
    first = lin._kernel_cache["cpu_panels"]
    _run(lin, torch.randn(1, 64), "cpu_packed")
    assert lin._kernel_cache["cpu_panels"] is first
    lin.load_packed(lin.fmt.quantize_rtn(torch.randn(8, 64)))
    assert "cpu_panels" not in lin._kernel_cache
    assert_close(
        _run(lin, torch.ones(1, 64), "cpu_packed"),
        reference.linear(lin, torch.ones(1, 64)),
        magnitude(lin, torch.ones(1, 64)),
        torch.float32,
    )


@pytest.mark.parametrize(
    "n,k,glen,slot", [(8, 64, 32, 4), (9, 1100, 32, 2), (17, 576, 48, 4), (3, 72, 72, 8), (40, 4096, 128, 4)]
)
def test_repack_size_matches_the_layout_formula(n, k, glen, slot):
    """layout.panel_bytes (also the shape function under torch.compile) is the size the C++ repack writes."""
    from cbq_hf.kernels.cpu.layout import panel_bytes

    g = -(-k // glen)
    wpack = build.load().repack(
        torch.randint(0, 256, (n, -(-k * slot // 8)), dtype=torch.uint8),
        torch.rand(n, g).half(),
        torch.zeros(n, g, dtype=torch.uint8),
        slot,
        k,
        glen,
    )
    assert wpack.numel() == -(-n // 8) * panel_bytes(k, glen, slot)


@pytest.mark.parametrize("act_bits", [None, 8], ids=lambda a: f"a{a}")
def test_kernels_keep_the_leading_dims(act_bits):
    """The ops take x [..., K] as it is (no reshape per call) and give [..., N]: the same rows as a 2-D call."""
    lin = make_linear(24, 200, 4, 64, act_bits=act_bits)
    x = torch.randn(2, 3, 200)
    kernel = "cpu_int" if act_bits else "cpu_packed"
    y3 = _run(lin, x, kernel)
    assert y3.shape == (2, 3, 24)
    assert torch.equal(y3.reshape(6, 24), _run(lin, x.reshape(6, 200), kernel))
    assert _run(lin, x[0, 0], kernel).shape == (24,)


def test_ops_trace_under_torch_compile():
    """One graph, no break: the bound forward calls the traceable op while compiling, not the pybind binding."""
    lin = make_linear(16, 128, 4, 64, input_scale=False)
    x = torch.randn(2, 128)
    with force_kernel("cpu_packed"):
        eager = lin(x)
        compiled = torch.compile(lambda t: lin(t), backend="eager", fullgraph=True)(x)
    assert torch.allclose(eager, compiled)


def test_direct_bindings_equal_the_ops_and_are_what_eager_calls(monkeypatch):
    """The pybind entry points (no dispatcher) are the ops' functions: same numbers, bit for bit, and the bound eager
    forward goes through them (under torch.compile the op is traced instead: test_ops_trace_under_torch_compile)."""
    ops, direct = build.load(), build.direct()
    assert direct is not None
    lin = make_linear(40, 200, 4, 64)
    pan = paths.panels(lin)
    x = torch.randn(3, 200)
    for mode in (0, 2):
        args = (x, pan.wpack, pan.bias, pan.slot, 40, pan.glen, mode)
        assert torch.equal(direct.gemm_float(*args), ops.gemm_float(*args))
    args = (x, 0.9, 8, pan.wpack, pan.bias, pan.slot, 40, pan.glen)
    assert torch.equal(direct.gemm_int_act(*args), ops.gemm_int_act(*args))
    if paths.lut2_available():
        lin2 = make_linear(40, 200, 2, 64)
        lw = paths.lut2_weights(lin2)
        args = (x, lw.wlut, lw.bias, 40, lw.glen, 4)
        assert torch.equal(direct.gemm_lut2(*args), ops.gemm_lut2(*args))
    calls = []
    monkeypatch.setattr(direct, "gemm_float", lambda *a: calls.append(a) or ops.gemm_float(*a), raising=True)
    fresh = make_linear(8, 64, 4, 64)
    with torch.no_grad(), force_kernel("cpu_packed"):
        fresh(torch.randn(1, 64))
    assert len(calls) == 1


def test_without_bindings_the_paths_call_the_ops(monkeypatch):
    """A build without Python headers has no direct bindings (build.direct() is None): the bound forwards call the
    torch ops instead, with the same numbers."""
    torch.manual_seed(0)
    lin = make_linear(40, 200, 4, 64)
    x = torch.randn(3, 200)
    with torch.no_grad(), force_kernel("cpu_packed"):
        fast = lin(x)
    monkeypatch.setitem(build._state, "direct", None)
    assert build.direct() is None
    assert paths.eager_or_op("gemm_float") is build.load().gemm_float.default
    torch.manual_seed(0)
    slow = make_linear(40, 200, 4, 64)  # same buffers as lin, fresh kernel memo
    with torch.no_grad(), force_kernel("cpu_packed"):
        assert torch.equal(slow(x), fast)


@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"w{b}")
def test_float_modes_agree_with_reference(bits):
    """Every mode of the float kernel (vcvtdq2ps, denormal reinterpretation, fixed point) against the reference,
    over activations from 1e-4 to 1e4 (mode 2 runs as convert where the build has no fixed-point path)."""
    ops = build.load()
    lin = make_linear(37, 200, bits, 72, input_scale=False, bias=False)
    pan = paths.panels(lin)
    x = torch.randn(5, 200) * torch.logspace(-4, 4, 5).unsqueeze(1)
    ref = reference.linear(lin, x)
    for mode in (0, 1, 2):
        y = ops.gemm_float(x, pan.wpack, None, pan.slot, 37, pan.glen, mode)
        assert_close(y, ref, magnitude(lin, x), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [2, 4], ids=lambda b: f"w{b}")
def test_fixed_mode_with_outliers_tiny_groups_and_zeros(bits, dtype):
    """Fixed point scales every group by its own largest |x| and cancels the zero point exactly: a 1000x outlier
    inside a group, tokens of 1e-30 and 1e-37 values, an all-zero group and an all-zero token stay within fp32
    rounding of the reference (the convert and denormal modes do not with the outliers: their sum q x - z sum x
    cancels in fp32, ~1e-5 of the magnitude here)."""
    ops = build.load()
    lin = make_linear(29, 300, bits, 64, input_scale=False, bias=False)
    pan = paths.panels(lin)
    x = torch.randn(5, 300)
    x[0, 5], x[0, 250] = 1000.0, -3000.0
    x[1] *= 1e-30
    x[2, 64:128] = 0.0
    x[3] = 0.0
    x[4] *= 1e-37  # a step of max|x| / 2^31 is below float's range here
    x = x.to(DTYPES[dtype])
    y = ops.gemm_float(x, pan.wpack, pan.bias, pan.slot, 29, pan.glen, 2)
    if build.loaded_variant() not in build.FIXED_VARIANTS:  # no fixed point in this build: mode 2 is convert
        convert = ops.gemm_float(x, pan.wpack, pan.bias, pan.slot, 29, pan.glen, 0)
        assert torch.equal(y, convert)
        return
    assert_close(y.to(x.dtype), reference.linear(lin, x), magnitude(lin, x), DTYPES[dtype])


@pytest.mark.parametrize("bits", [2, 4], ids=lambda b: f"w{b}")
def test_fixed_mode_keeps_small_values_beside_an_outlier(bits):
    """A group holding a 1000x outlier takes four digits: its ordinary values keep ~2^-31 of the outlier, so the
    outputs stay within 3e-7 of their magnitude (three digits everywhere: ~2.5e-6; MKL's fp32 F.linear: ~4e-7),
    while the other groups of the same tokens take three."""
    ops = build.load()
    torch.manual_seed(0)
    lin = make_linear(64, 512, bits, 128, input_scale=False, bias=False)
    pan = paths.panels(lin)
    x = torch.randn(4, 512)
    x[:, 5] = 1000.0
    y = ops.gemm_float(x, pan.wpack, None, pan.slot, 64, pan.glen, 2).double()
    if build.loaded_variant() not in build.FIXED_VARIANTS:  # no fixed point in this build: mode 2 is convert
        assert torch.equal(y, ops.gemm_float(x, pan.wpack, None, pan.slot, 64, pan.glen, 0).double())
        return
    ref = x.double() @ lin.dequantized_weight().double().T
    mag = x.double().abs() @ lin.dequantized_weight().double().abs().T
    assert float(((y - ref).abs() / mag).max()) < 3e-7


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")], ids=str)
@pytest.mark.parametrize("where", [7, 99], ids=lambda k: f"k{k}")
def test_fixed_mode_non_finite_activations_run_as_convert(where, bad, dtype):
    """One non-finite activation anywhere (k=99: the ragged tail of a 100-wide row, 16 lanes per check) sends the
    whole call to the convert mode, whose output carries it like the reference's."""
    ops = build.load()
    lin = make_linear(16, 100, 4, 64, input_scale=False)
    pan = paths.panels(lin)
    x = torch.randn(3, 100)
    x[1, where] = bad
    x = x.to(DTYPES[dtype])
    fixed = ops.gemm_float(x, pan.wpack, pan.bias, pan.slot, 16, pan.glen, 2)
    convert = ops.gemm_float(x, pan.wpack, pan.bias, pan.slot, 16, pan.glen, 0)
    torch.testing.assert_close(fixed, convert, rtol=0, atol=0, equal_nan=True)
    assert not torch.isfinite(fixed[1]).any() and torch.isfinite(fixed[[0, 2]]).all()


def test_finite_activations_take_the_fixed_mode():
    """The non-finite check lets finite calls through: the fixed-point sums round differently from convert's (builds
    without the fixed-point mode run mode 2 as convert: the same numbers)."""
    ops = build.load()
    lin = make_linear(64, 576, 4, 128, input_scale=False)
    pan = paths.panels(lin)
    x = torch.randn(2, 576)
    fixed = ops.gemm_float(x, pan.wpack, pan.bias, pan.slot, 64, pan.glen, 2)
    convert = ops.gemm_float(x, pan.wpack, pan.bias, pan.slot, 64, pan.glen, 0)
    assert torch.equal(fixed, convert) == (build.loaded_variant() not in build.FIXED_VARIANTS)
    assert_close(fixed, reference.linear(lin, x), magnitude(lin, x), torch.float32)


@pytest.fixture
def float_mode_auto(monkeypatch):
    """The denormal-capable automatic mode, whatever this CPU's timing chose (Intel cores pick "convert")."""
    monkeypatch.setitem(build._state, "float_mode", dict.fromkeys((2, 4, 8), build.FLOAT_MODES["auto"]))


def test_huge_activations_take_the_convert_mode(float_mode_auto):
    lin = make_linear(16, 128, 4, 64, input_scale=False)
    x = torch.randn(2, 128)
    x[1, 3] = 1e20  # beyond the denormal mode's range: the automatic choice must convert
    assert_close(_run(lin, x, "cpu_packed"), reference.linear(lin, x), magnitude(lin, x), torch.float32)


@pytest.mark.parametrize("mode", ["auto", "convert", "fixed"])
def test_flush_denormal_mode_does_not_break_the_float_kernel(mode, monkeypatch):
    monkeypatch.setitem(build._state, "float_mode", dict.fromkeys((2, 4, 8), build.FLOAT_MODES[mode]))
    lin = make_linear(16, 128, 2, 64)
    x = torch.randn(3, 128)
    old = torch.set_flush_denormal(True)
    try:
        y = _run(lin, x, "cpu_packed")
    finally:
        torch.set_flush_denormal(False)
    assert old
    assert_close(y, reference.linear(lin, x), magnitude(lin, x), torch.float32)


def test_float_mode_is_timed_once_per_slot_and_can_be_forced(monkeypatch):
    saved = build._state.pop("float_mode", None)
    try:
        monkeypatch.delenv(build.FLOAT_MODE_ENV, raising=False)
        chosen = {slot: build.float_mode(slot) for slot in (2, 4, 8)}
        assert set(chosen.values()) <= set(build.FLOAT_MODES.values())
        if build.loaded_variant() not in build.FIXED_VARIANTS:
            assert build.FLOAT_MODES["fixed"] not in chosen.values()
        monkeypatch.setenv(build.FLOAT_MODE_ENV, "convert")
        assert {slot: build.float_mode(slot) for slot in (2, 4, 8)} == chosen  # measured once, not per call
        for name, mode in build.FLOAT_MODES.items():
            build._state.pop("float_mode")
            monkeypatch.setenv(build.FLOAT_MODE_ENV, name.upper())
            assert build.float_mode(2) == build.float_mode(4) == mode
        build._state.pop("float_mode")
        monkeypatch.setenv(build.FLOAT_MODE_ENV, "denormals")
        with pytest.raises(ValueError, match="CBQ_HF_CPU_FLOAT_MODE='denormals' is not one of"):
            build.float_mode()
    finally:
        build._state.pop("float_mode", None)
        if saved is not None:
            build._state["float_mode"] = saved


@pytest.mark.parametrize("vendor,fixed_slots", [("GenuineIntel", {2, 4}), ("AuthenticAMD", {4})])
def test_fixed_point_is_taken_per_vendor_without_timing(vendor, fixed_slots, monkeypatch):
    """On a VNNI build the fixed-point mode is taken for 2- and 4-bit codes on Intel, 4-bit only on AMD (2-bit codes
    are timed there); 8-bit codes are always timed."""
    monkeypatch.delenv(build.FLOAT_MODE_ENV, raising=False)
    monkeypatch.setattr(build, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(build, "loaded_variant", lambda: "avx512vnni")
    timed = []
    monkeypatch.setattr(
        build, "_time_float_mode", lambda ops, mode, slot, reps=5: timed.append(slot) or 1e-3 * (mode + 2)
    )
    saved = build._state.pop("float_mode", None)
    try:
        chosen = {slot: build.float_mode(slot) for slot in (2, 4, 8)}
    finally:
        build._state.pop("float_mode", None)
        if saved is not None:
            build._state["float_mode"] = saved
    assert {s for s, m in chosen.items() if m == build.FLOAT_MODES["fixed"]} == fixed_slots
    assert set(timed) == {2, 4, 8} - fixed_slots


@pytest.mark.parametrize("shape", [(19, 203), (2048, 2101)], ids=lambda s: f"n{s[0]}k{s[1]}")
@pytest.mark.parametrize("group", [64, 37, 100, -1], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"w{b}")
def test_dequantize_into_equals_the_reference_weight(bits, group, shape):
    """Exact in float32 (table lookups and vector steps inside groups, scalar steps at odd group starts such as 37
    for 2/4-bit codes), and the same values rounded to nearest-even in bfloat16. 2048 x 2101 outputs (8.6 / 17.2 MB,
    above kStreamMinBytes) are written with streaming stores where a row's address allows (odd K: some rows aligned,
    most not)."""
    n, k = shape
    lin = make_linear(n, k, bits, group, input_scale=False)
    ref = lin.dequantized_weight()
    spec = lin.fmt.spec
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.full((n, k), float("nan"), dtype=dtype)
        build.load().dequantize_into(lin.qweight, lin.scales, lin.zeros, spec.slot_bits, spec.group_len(k), out)
        assert torch.equal(out, ref.to(dtype))


@pytest.mark.parametrize("act_bits", [None, 8, 4], ids=lambda a: f"a{a}")
@pytest.mark.parametrize("n", [8, 24, 56, 200], ids=lambda n: f"n{n}")  # 1, 3, 7, 25 panels: every remainder
def test_weight_streams_change_no_number(act_bits, n):
    """The panels a thread streams at once (1, 2 or 4) change the speed only: the outputs are equal bit for bit."""
    ops = build.load()
    torch.manual_seed(n)
    lin = make_linear(n, 576, 4, 128, act_bits=act_bits)
    x = torch.randn(5, 576)
    kernel = "cpu_packed" if act_bits is None else "cpu_int"
    saved = ops.set_streams(4)
    try:
        outs = {}
        for s in build.STREAM_CHOICES:
            ops.set_streams(s)
            outs[s] = _run(lin, x, kernel)
    finally:
        ops.set_streams(saved)
    assert torch.equal(outs[1], outs[2]) and torch.equal(outs[1], outs[4])
    with torch.no_grad():
        assert_close(outs[1], reference.linear(lin, x), magnitude(lin, x), torch.float32)
    with pytest.raises(RuntimeError, match="streams must be 1, 2 or 4"):
        ops.set_streams(3)


def test_weight_streams_by_vendor_and_environment(monkeypatch):
    monkeypatch.delenv(build.STREAMS_ENV, raising=False)
    assert build.weight_streams("AuthenticAMD") == 2
    assert build.weight_streams("GenuineIntel") == 4 and build.weight_streams("") == 4
    monkeypatch.setenv(build.STREAMS_ENV, "1")
    assert build.weight_streams("AuthenticAMD") == 1
    monkeypatch.setenv(build.STREAMS_ENV, "3")
    with pytest.raises(ValueError, match="CBQ_HF_CPU_STREAMS='3' is not one of"):
        build.weight_streams()


def test_lut2_is_the_2bit_decode_path_of_avx512_builds():
    """The table-lookup path exists exactly in the AVX-512 build; there automatic selection takes it for 2-bit weights
    with float activations (not for 4-bit weights, nor with act_bits), elsewhere the float path runs."""
    assert paths.lut2_available() == (build.loaded_variant() == "avx512vnni")
    x = torch.randn(1, 576)
    w2, w4, w2a8 = make_linear(64, 576, 2, 64), make_linear(64, 576, 4, 128), make_linear(64, 576, 2, 64, act_bits=8)
    with torch.no_grad():
        w2(x), w4(x), w2a8(x)
    assert w2.last_kernel == ("cpu_lut2" if paths.lut2_available() else "cpu_packed")
    assert (w4.last_kernel, w2a8.last_kernel) == ("cpu_packed", "cpu_int")
    with pytest.raises(RuntimeError, match="'cpu_lut2' was forced but cannot run"):
        _run(w4, x, "cpu_lut2")


@pytest.mark.parametrize("n,k,glen", [(16, 64, 64), (17, 200, 64), (3, 72, 72), (40, 1100, 48), (5, 576, 100)])
def test_lut2_layout_size_and_streams(n, k, glen):
    """The table layout has the size `layout.lut2_bytes` gives (what the fake op reports under torch.compile), and
    the blocks a thread streams at once (1, 2 or 4) change no output bit."""
    if not paths.lut2_available():
        with pytest.raises(RuntimeError, match="needs an AVX-512 build"):
            build.load().gemm_lut2(torch.randn(1, 8), torch.zeros(64, dtype=torch.uint8), None, 1, 8, 1)
        return
    from cbq_hf.kernels.cpu.layout import lut2_bytes

    torch.manual_seed(n + k)
    lin = make_linear(n, k, 2, glen if glen != k else -1, input_scale=False)
    lw = paths.lut2_weights(lin)
    assert lw.wlut.numel() == lut2_bytes(n, k, lw.glen)
    x = torch.randn(7, k)
    ops = build.load()
    outs = [ops.gemm_lut2(x, lw.wlut, lw.bias, n, lw.glen, s) for s in (1, 2, 4)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    with torch.no_grad():
        assert_close(outs[0], reference.linear(lin, x), magnitude(lin, x), torch.float32)
    with pytest.raises(RuntimeError, match="does not match the 2-bit table layout"):
        ops.gemm_lut2(x, lw.wlut[:-1], lw.bias, n, lw.glen, 4)
    with pytest.raises(RuntimeError, match="streams must be 1, 2 or 4"):
        ops.gemm_lut2(x, lw.wlut, lw.bias, n, lw.glen, 3)


def test_lut2_non_finite_activations_propagate_like_the_reference():
    """A NaN or inf activation makes every output of its token non-finite, as in the reference (where an inf times a
    zero code difference gives NaN, the table's 0 * inf gives NaN too: the float path does the same)."""
    lin = make_linear(32, 128, 2, 64, bias=False, input_scale=False)
    x = torch.randn(2, 128)
    x[0, 5] = float("nan")
    x[1, 70] = float("inf")
    with torch.no_grad():
        ref = reference.linear(lin, x)
        y = lin(x)  # the automatic path (cpu_lut2 on AVX-512 builds)
    assert not bool(torch.isfinite(ref).any()) and not bool(torch.isfinite(y).any())
    assert torch.equal(torch.isnan(y[0]), torch.isnan(ref[0]))
