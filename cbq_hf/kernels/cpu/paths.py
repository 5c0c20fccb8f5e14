"""The compiled CPU kernel paths of `CBQLinear` and their registration with `cbq_hf.kernels.dispatch`.

Paths (automatic choice in this order; each can be forced by name):

- ``cpu_dequant``: prefill. Dequantize into a reused workspace and call one dense GEMM: float32 (the reference's
  numbers: same weight, same GEMM) for float32/float16 inputs, bfloat16 for bfloat16 inputs (the CPU's bf16 matrix
  units; weights rounded to bf16). Chosen from `DEQUANT_MIN_M` rows on.
- ``cpu_int``: ``act_bits`` set and 2/3/4-bit weights. Activations are quantized per token in C++ (codes identical to
  the reference's), then int8 x uint8 dot products (AVX2 ``maddubs``, VNNI ``dpbusd`` when built for it) with exact
  int32 sums per group.
- ``cpu_packed``: every other case (fp32/bf16/fp16 activations, 8-bit weights, act_bits with 8-bit weights on
  simulated-quantized inputs): float FMA straight from the packed codes, exact w.r.t. the dequantized weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import reference
from . import build
from .layout import Panels, repack

#: Rows (tokens) from which `cpu_dequant` (dequantize + dense fp32 GEMM) is chosen over the packed kernels.
#: Measured with `benchmarks/kernels.py --shapes 4096x4096 --ms 8 16 32 64 128 256 --paths cpu_packed cpu_int
#: cpu_dequant` (benchmarks/results/kernels_crossover.md, 2-core AMD EPYC Zen 3, AVX2, 1 thread, load average ~9):
#: the float packed kernel costs ~2 ms per token (W4A16: 127 ms at M=64, 229 ms at M=128) while dequantize (~24 ms)
#: + dense fp32 GEMM costs 155 + 24 ms at M=64 and 192 + 24 ms at M=128, so the float crossover is ~100-128 rows.
#: The integer kernel (~0.85 ms per token: 212 ms at M=256 vs 339 ms for dequantize + GEMM) was faster at every M
#: measured, up to 512 in the full table, so its crossover is set above that.
DEQUANT_MIN_M = 128
DEQUANT_MIN_M_INT = 1024

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_workspace: dict[str, torch.Tensor] = {}


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


def supports_int(module, x: torch.Tensor) -> bool:
    act = module.fmt.act_bits
    # _supports_common first: it checks the format is uniform before `spec` is read (LO-BCQ has none)
    return _supports_common(module, x) and act is not None and 2 <= act <= 8 and module.fmt.spec.slot_bits in (2, 4)


def prefer_packed(module, x: torch.Tensor) -> bool:
    return _rows(x) < DEQUANT_MIN_M


def prefer_int(module, x: torch.Tensor) -> bool:
    return _rows(x) < DEQUANT_MIN_M_INT


def prefer_dequant(module, x: torch.Tensor) -> bool:
    limit = DEQUANT_MIN_M_INT if module.fmt.act_bits is not None else DEQUANT_MIN_M
    return _rows(x) >= limit


# ---------------------------------------------------------------------------------------------- helpers
def panels(module) -> Panels:
    """The module's weights in the panel layout (repacked once, cached in ``module._kernel_cache``)."""
    pan = module._kernel_cache.get("cpu_panels")
    if pan is None:
        b = module.packed_buffers()
        pan = repack(build.load(), b["qweight"], b["scales"], b["zeros"], module.fmt.spec, module.in_features,
                     module.bias)
        module._kernel_cache["cpu_panels"] = pan
    return pan


def _act_clip(module) -> float:
    clip = module._kernel_cache.get("cpu_act_clip")
    if clip is None:
        clip = float(module.act_clip.reshape(-1)[0])
        module._kernel_cache["cpu_act_clip"] = clip
    return clip


def _scaled_2d(module, x: torch.Tensor) -> torch.Tensor:
    """x as [M, K] divided by `input_scale` exactly as the reference does (rounded back to x's dtype)."""
    x2 = x.reshape(-1, x.shape[-1])
    if module.input_scale is not None:
        x2 = (x2.float() / module.input_scale).to(x.dtype)
    return x2


def _kernel_input(x2: torch.Tensor) -> torch.Tensor:
    if x2.dtype == torch.float16:
        x2 = x2.float()
    return x2.contiguous()


def workspace(numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A buffer of at least `numel` elements of `dtype` shared by all layers (one layer runs at a time); reusing it
    avoids a fresh allocation, and its page faults, per call."""
    buf = _workspace.get(str(dtype))
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype)
        _workspace[str(dtype)] = buf
    return buf[:numel]


# ---------------------------------------------------------------------------------------------- paths
def linear_packed(module, x: torch.Tensor) -> torch.Tensor:
    ops = build.load()
    pan = panels(module)
    x2 = _scaled_2d(module, x)
    if module.fmt.act_bits is not None:
        x2 = module.fmt.quantize_activations(x2, module.packed_buffers())
    y = ops.gemm_float(_kernel_input(x2), pan.wpack, pan.scales, pan.zeros, pan.bias, pan.slot,
                       module.out_features, pan.glen, build.float_mode())
    return y.to(x.dtype).view(*x.shape[:-1], module.out_features)


def quantize_activations(module, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes int8 [M, K] and steps float32 [M] of x2 [M, K] (already divided by input_scale)."""
    return build.load().quantize_act(_kernel_input(x2), _act_clip(module), module.fmt.act_bits)


def linear_int(module, x: torch.Tensor) -> torch.Tensor:
    ops = build.load()
    pan = panels(module)
    codes, steps = quantize_activations(module, _scaled_2d(module, x))
    y = ops.gemm_int(codes, steps, pan.wpack, pan.scales, pan.zeros, pan.bias, pan.slot, module.out_features, pan.glen)
    return y.to(x.dtype).view(*x.shape[:-1], module.out_features)


def linear_dequant(module, x: torch.Tensor) -> torch.Tensor:
    """Dequantize, then one dense GEMM: in float32 (the reference's numbers) for float32/float16 inputs; for bfloat16
    inputs the weight is dequantized straight to bfloat16 and the GEMM runs in bfloat16 (fp32 accumulation), so
    prefill gets the CPU's bf16 matrix units (AMX / AVX512-BF16) like a dense bf16 model; the only extra rounding
    is that of each weight to bf16, the precision a bf16 model has anyway."""
    ops = build.load()
    n, k = module.out_features, module.in_features
    wdtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
    w = workspace(n * k, wdtype).view(n, k)
    ops.dequantize_into(module.qweight, module.scales, module.zeros, module.fmt.spec.slot_bits,
                        module.fmt.spec.group_len(k), w)
    xq = reference.prepare_input(module, x)
    bias = module.bias.to(wdtype) if module.bias is not None else None
    return F.linear(xq.to(wdtype), w, bias).to(x.dtype)


def register() -> None:
    """Register the CPU paths with dispatch (cheap: nothing is compiled until a forward needs them)."""
    from ..dispatch import register_kernel

    register_kernel("cpu_dequant", supports_packed, linear_dequant, prefer=prefer_dequant)
    register_kernel("cpu_int", supports_int, linear_int, prefer=prefer_int)
    register_kernel("cpu_packed", supports_packed, linear_packed, prefer=prefer_packed)
