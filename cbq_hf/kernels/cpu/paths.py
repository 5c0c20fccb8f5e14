"""The compiled CPU kernel paths of `CBQLinear` and their registration with `cbq_hf.kernels.dispatch`.

Paths (automatic choice in this order; each can be forced by name):

- ``cpu_dequant``: prefill. Dequantize into a reused workspace and call one dense GEMM: float32 (the reference's
  numbers: same weight, same GEMM) for float32/float16 inputs, bfloat16 for bfloat16 inputs where the CPU has bf16
  matrix units (weights rounded to bf16), and for float32/float16 inputs too where the user let torch run float32
  matmuls in bf16 (``torch.set_float32_matmul_precision("medium")``, `fp32_matmul_in_bf16`). Chosen from
  `dequant_min_rows` rows on.
- ``cpu_amx``: prefill of the same formats as ``cpu_int`` (from `AMX_MIN_M` rows) on CPUs with AMX-INT8 tile units:
  ``cpu_int``'s numbers, bit for bit, 3-4x faster at 64-512 rows (amx_cpu.cpp).
- ``cpu_int``: ``act_bits`` set and 2/3/4-bit weights. Activations are quantized per token in C++ (codes identical to
  the reference's), then int8 x uint8 dot products (AVX2 ``maddubs``, VNNI ``dpbusd`` when built for it) with exact
  int32 sums per group.
- ``cpu_lut2``: 2-bit weights with float activations (no ``act_bits``) on AVX-512 builds: per token a table of the
  16 partial sums of every pair of activations, looked up for 16 rows at once by the codes (`lut2_cpu.cpp`);
  1.6-1.8x faster than ``cpu_packed`` on a 2-bit decode GEMV (docs/benchmarks_kernels.md, "2-bit weights"). Exact
  w.r.t. the dequantized weights up to float rounding.
- ``cpu_packed``: every other case (fp32/bf16/fp16 activations, 8-bit weights, act_bits with 8-bit weights on
  simulated-quantized inputs): float FMA straight from the packed codes, exact w.r.t. the dequantized weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .. import reference
from ..workspace import workspace
from . import build
from .layout import Lut2Weights, Panels, repack, repack_lut2

# Rows (tokens) from which a path takes over. Dequantizing a whole weight costs a fixed few ms per call, which the
# dense GEMM after it wins back per row over the packed kernels; where the two cross is measured with forced paths in
# docs/benchmarks_kernels.md, "Prefill crossovers" (AMX: "Integer prefill on AMX tiles").
#: float inputs, float32 GEMM: `cpu_packed` below, dequantize + fp32 GEMM from here.
DEQUANT_MIN_M = 48
#: bf16 GEMM (bf16 inputs, or the bf16 float32-matmul setting) on bf16 matrix units: a cheaper GEMM, fewer rows.
DEQUANT_MIN_M_BF16 = 16
#: 2-bit weights on `cpu_lut2` (faster per row than `cpu_packed`, so it holds out longer), float32 GEMM.
DEQUANT_MIN_M_LUT2 = 72
#: 2-bit weights on `cpu_lut2` against the bf16 GEMM.
DEQUANT_MIN_M_LUT2_BF16 = 24
#: `cpu_int` by slot bits: 4-bit stays ahead of dequantize + fp32 GEMM through 1024 rows (the most measured), 2-bit
#: draws even at 256-512.
DEQUANT_MIN_M_INT = {4: 2048, 2: 512}
#: `cpu_int` against dequantize + bf16 GEMM (between the crossing at 64 and 128 rows).
DEQUANT_MIN_M_INT_BF16 = 96
#: `cpu_amx` over `cpu_int` from here: below it the per-call unpacking of every weight outweighs the tile products.
AMX_MIN_M = 8
#: A row count no input reaches: the path is never taken automatically.
NEVER = 1 << 62
_BF16_MATRIX_FLAGS = {"amx_bf16", "avx512_bf16"}

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_capabilities: dict[str, bool] = {}


def _rows(x: torch.Tensor) -> int:
    return x.numel() // max(x.shape[-1], 1)


def _supports_common(module, x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype in _FLOAT_DTYPES
        and getattr(module.fmt, "name", None) == "uniform"
        and module.qweight.device.type == "cpu"
        and build.load() is not None
    )


def supports_packed(module, x: torch.Tensor) -> bool:
    return _supports_common(module, x)


def _build_reports(key: str, op_name: str) -> bool:
    """The loaded kernels' answer to the no-argument op `op_name` (False where none are loaded), asked once and kept
    in ``_capabilities[key]``."""
    if key not in _capabilities:
        ops = build.load()
        _capabilities[key] = ops is not None and bool(getattr(ops, op_name)())
    return _capabilities[key]


def lut2_available() -> bool:
    """Whether the loaded CPU kernels have the 2-bit table-lookup path (AVX-512 builds)."""
    return _build_reports("lut2", "lut2_available")


def supports_lut2(module, x: torch.Tensor) -> bool:
    # act_bits None only: simulated activation quantization with 2-bit weights goes to cpu_int
    return (
        _supports_common(module, x)
        and module.fmt.act_bits is None
        and module.fmt.spec.slot_bits == 2
        and lut2_available()
    )


def supports_int(module, x: torch.Tensor) -> bool:
    act = module.fmt.act_bits
    # _supports_common first: it checks the format is uniform before `spec` is read (LO-BCQ has none)
    return _supports_common(module, x) and act is not None and 2 <= act <= 8 and module.fmt.spec.slot_bits in (2, 4)


def amx_available() -> bool:
    """Whether the loaded CPU kernels can use the AMX tile units (AMX-INT8 CPU, AVX-512 build, Linux granted the
    tile state): the `cpu_amx` path."""
    return _build_reports("amx", "amx_available")


def supports_amx(module, x: torch.Tensor) -> bool:
    return supports_int(module, x) and amx_available()


def bf16_gemm_is_native() -> bool:
    """Whether this CPU has bf16 matrix instructions (AMX or AVX512-BF16); without them torch emulates the bf16
    GEMM (several times slower than fp32 on AVX2-only CPUs), so `cpu_dequant` keeps fp32 for bf16 inputs."""
    if "bf16_native" not in _capabilities:
        _capabilities["bf16_native"] = bool(_BF16_MATRIX_FLAGS & build.cpu_flags())
    return _capabilities["bf16_native"]


def fp32_matmul_in_bf16() -> bool:
    """Whether torch runs float32 matrix products on the CPU in bfloat16: the user opted in with
    ``torch.set_float32_matmul_precision("medium")`` or ``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``
    (the default, "highest" / "none", keeps float32). A dense float32 `F.linear` then rounds its operands to bf16
    (about 2x faster at M = 512, relative error 4e-7 -> 3e-3: docs/benchmarks_kernels.md, "Float32 inputs"), and
    `cpu_dequant` follows the same setting for float32 and float16 inputs. Read at every prefill call (~2 us), never
    on the decode paths."""
    mkldnn_matmul = getattr(torch.backends.mkldnn, "matmul", None)
    precision = getattr(mkldnn_matmul, "fp32_precision", None)
    if precision is not None:
        return precision == "bf16"
    return torch.get_float32_matmul_precision() == "medium"  # torch without the per-backend setting


def _bf16_gemm(x: torch.Tensor) -> bool:
    """Whether `cpu_dequant` runs its GEMM in bfloat16 for x: bf16 inputs, or float32/float16 inputs under the
    bf16 float32-matmul setting (`fp32_matmul_in_bf16`), and only where the CPU has bf16 matrix units."""
    if x.dtype == torch.bfloat16:
        return bf16_gemm_is_native()
    return x.dtype in (torch.float32, torch.float16) and bf16_gemm_is_native() and fp32_matmul_in_bf16()


def dequant_min_rows(module, x: torch.Tensor) -> int:
    """Rows from which `cpu_dequant` beats the packed kernels for this module and input (see DEQUANT_MIN_M)."""
    bf16 = _bf16_gemm(x)
    slot = getattr(getattr(module.fmt, "spec", None), "slot_bits", None)  # LO-BCQ formats have no slots
    if supports_amx(module, x):
        # cpu_amx gives exact integer sums, 4-5x faster than dequantize + fp32 GEMM at M = 64-512; dequantize + bf16
        # GEMM would round the weights to bf16 and is not reliably faster (docs/benchmarks_kernels.md, "Integer
        # prefill on AMX tiles")
        return NEVER
    if module.fmt.act_bits is not None:
        if bf16:
            return DEQUANT_MIN_M_INT_BF16
        return DEQUANT_MIN_M_INT.get(slot, 512)
    if slot == 2 and lut2_available():
        return DEQUANT_MIN_M_LUT2_BF16 if bf16 else DEQUANT_MIN_M_LUT2
    return DEQUANT_MIN_M_BF16 if bf16 else DEQUANT_MIN_M


def prefer_packed(module, x: torch.Tensor) -> bool:
    return _rows(x) < dequant_min_rows(module, x)


def prefer_int(module, x: torch.Tensor) -> bool:
    return _rows(x) < dequant_min_rows(module, x)


def prefer_amx(module, x: torch.Tensor) -> bool:
    return _rows(x) >= AMX_MIN_M


def prefer_dequant(module, x: torch.Tensor) -> bool:
    return _rows(x) >= dequant_min_rows(module, x)


# ---------------------------------------------------------------------------------------------- helpers
def _repacked(module, key: str, repack_fn):
    """The module's weights in a kernel layout, built by `repack_fn` from its packed buffers once and cached in
    ``module._kernel_cache[key]`` (cleared whenever the buffers are replaced or moved)."""
    cached = module._kernel_cache.get(key)
    if cached is None:
        b = module.packed_buffers()
        cached = repack_fn(
            build.load(), b["qweight"], b["scales"], b["zeros"], module.fmt.spec, module.in_features, module.bias
        )
        module._kernel_cache[key] = cached
    return cached


def panels(module) -> Panels:
    """The module's weights in the panel layout (repacked once)."""
    return _repacked(module, "cpu_panels", repack)


def lut2_weights(module) -> Lut2Weights:
    """The module's 2-bit weights in the table layout of `cpu_lut2` (repacked once)."""
    return _repacked(module, "cpu_lut2", repack_lut2)


def repacked_bytes(module) -> int:
    """Bytes of the module's repacked kernel copies (panel and table layouts) held beside its own buffers."""
    cache = module._kernel_cache
    return sum(cache[key].nbytes() for key in ("cpu_panels", "cpu_lut2") if key in cache)


def _act_clip(module) -> float:
    clip = module._kernel_cache.get("cpu_act_clip")
    if clip is None:
        clip = float(module.act_clip.reshape(-1)[0])
        module._kernel_cache["cpu_act_clip"] = clip
    return clip


def _kernel_input(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as the ops take it: float32 or bfloat16, contiguous (leading dims are kept: the ops flatten them)."""
    if x.dtype == torch.float16:
        x = x.float()
    return x.contiguous()


def _output(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The op's float32 result in x's dtype (the ops already give it x's leading dims)."""
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def eager_or_op(name: str) -> Callable:
    """A function calling the GEMM `name` (``gemm_float``, ``gemm_int_act``, ``gemm_lut2``): the Python binding
    outside torch.compile (no dispatcher: ~5 us less per call, a third of a small decode GEMV), the torch op while
    tracing (the binding is opaque to Dynamo; the op has a shape function)."""
    op = getattr(build.load(), name).default
    fast = getattr(build.direct(), name, None)
    if fast is None:
        return op
    is_compiling = torch.compiler.is_compiling

    def call(*args):
        return op(*args) if is_compiling() else fast(*args)

    return call


# ---------------------------------------------------------------------------------------------- paths
def bind_packed(module, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The `cpu_packed` forward of this module as a function of x alone: panels, op, float mode and buffers looked up
    once (dispatch remembers it with the kernel choice; see dispatch.KernelPath.bind). It holds the module's tensors,
    not the module."""
    pan = panels(module)
    op = eager_or_op("gemm_float")
    wpack, bias, slot, n, glen, mode = (
        pan.wpack,
        pan.bias,
        pan.slot,
        module.out_features,
        pan.glen,
        build.float_mode(pan.slot),
    )
    prep = reference.bind_prepare_input(module)  # act_bits here: weights the integer path does not take

    def run(x: torch.Tensor) -> torch.Tensor:
        return _output(op(_kernel_input(prep(x)), wpack, bias, slot, n, glen, mode), x)

    return run


def linear_packed(module, x: torch.Tensor) -> torch.Tensor:
    return bind_packed(module, x)(x)


def bind_lut2(module, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The `cpu_lut2` forward of this module as a function of x alone (see `bind_packed`)."""
    lw = lut2_weights(module)
    op = eager_or_op("gemm_lut2")
    wlut, bias, n, glen, streams = lw.wlut, lw.bias, module.out_features, lw.glen, build.weight_streams()
    prep = reference.bind_prepare_input(module)  # divides by input_scale

    def run(x: torch.Tensor) -> torch.Tensor:
        return _output(op(_kernel_input(prep(x)), wlut, bias, n, glen, streams), x)

    return run


def linear_lut2(module, x: torch.Tensor) -> torch.Tensor:
    return bind_lut2(module, x)(x)


def bind_int(module, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The `cpu_int` forward of this module as a function of x alone (see `bind_packed`)."""
    pan = panels(module)
    op = eager_or_op("gemm_int_act")
    clip, act_bits, scale = _act_clip(module), module.fmt.act_bits, module.input_scale
    wpack, bias, slot, n, glen = pan.wpack, pan.bias, pan.slot, module.out_features, pan.glen

    def run(x: torch.Tensor) -> torch.Tensor:
        xs = _kernel_input(reference.scale_input(scale, x))
        return _output(op(xs, clip, act_bits, wpack, bias, slot, n, glen), x)

    return run


def linear_int(module, x: torch.Tensor) -> torch.Tensor:
    return bind_int(module, x)(x)


def linear_amx(module, x: torch.Tensor) -> torch.Tensor:
    """`cpu_int`'s numbers (bit for bit) from the AMX tile units: activations quantized per token by the same C++
    quantizer, then one TDPBUSD per 16 weight rows x 16 tokens x 64 codes (amx_cpu.cpp)."""
    pan = panels(module)
    ops = build.load()
    xs = _kernel_input(reference.scale_input(module.input_scale, x))
    codes, steps = ops.quantize_act(xs.reshape(-1, xs.shape[-1]), _act_clip(module), module.fmt.act_bits)
    return _output(ops.gemm_int_amx(codes, steps, xs, pan.wpack, pan.bias, pan.slot, module.out_features, pan.glen), x)


def quantize_activations(module, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes int8 [M, K] and steps float32 [M] of x2 [M, K] (already divided by input_scale)."""
    return build.load().quantize_act(
        _kernel_input(x2).reshape(-1, x2.shape[-1]), _act_clip(module), module.fmt.act_bits
    )


def linear_dequant(module, x: torch.Tensor) -> torch.Tensor:
    """Dequantize, then one dense GEMM: in float32 (the reference's numbers) for float32/float16 inputs; for bfloat16
    inputs on a CPU with bf16 matrix units (AMX / AVX512-BF16) the weight is dequantized straight to bfloat16 and
    the GEMM runs in bfloat16 (fp32 accumulation), like a dense bf16 model; the only extra rounding is that of each
    weight to bf16, the precision a bf16 model has anyway. Float32/float16 inputs take the bf16 GEMM too where the
    user let torch run float32 matmuls in bf16 (`fp32_matmul_in_bf16`): the rounding a dense float32 layer gets
    under that setting, and the result is returned in the input's dtype."""
    ops = build.load()
    n, k = module.out_features, module.in_features
    wdtype = torch.bfloat16 if _bf16_gemm(x) else torch.float32
    w = workspace(n * k, wdtype).view(n, k)
    ops.dequantize_into(
        module.qweight, module.scales, module.zeros, module.fmt.spec.slot_bits, module.fmt.spec.group_len(k), w
    )
    xq = reference.prepare_input(module, x)
    bias = module.bias.to(wdtype) if module.bias is not None else None
    return F.linear(xq.to(wdtype), w, bias).to(x.dtype)


def register() -> None:
    """Register the CPU paths with dispatch (cheap: nothing is compiled until a forward needs them)."""
    from ..dispatch import register_kernel

    register_kernel("cpu_dequant", supports_packed, linear_dequant, prefer=prefer_dequant)
    register_kernel("cpu_amx", supports_amx, linear_amx, prefer=prefer_amx)
    register_kernel("cpu_int", supports_int, linear_int, prefer=prefer_int, bind=bind_int)
    register_kernel("cpu_lut2", supports_lut2, linear_lut2, prefer=prefer_packed, bind=bind_lut2)
    register_kernel("cpu_packed", supports_packed, linear_packed, prefer=prefer_packed, bind=bind_packed)
