"""The CUDA kernel paths of `CBQLinear` (uniform format, Triton) and their registration with dispatch.

Paths (automatic choice for CUDA inputs, in this order; each can be forced by name):

- ``gpu_dequant``: prefill (from `DEQUANT_MIN_M` rows). The weight dequantized by a Triton kernel into a reused
  workspace of the input's dtype, then one cuBLAS GEMM (float32 inputs: the reference's weight and GEMM).
- ``gpu_int``: ``act_bits`` set, 2/3/4-bit weights, groups a multiple of 32 long (or one group per row). Integer
  activation codes from the format's quantizer (identical to the simulated ones), int8 tensor-core dot products with
  exact int32 sums per group.
- ``gpu_packed``: every other call. Codes unpacked and dequantized inside a Triton GEMM; act_bits with weights the
  integer path does not take run on the simulated activations.

All of them read the checkpoint's packed buffers as they are (no repack), so a model loaded on CPU and moved with
``.to("cuda")`` needs nothing else. Without Triton (or on a machine where its import fails) CUDA calls take the
reference path, with one warning. Nothing here imports Triton before a CUDA forward asks for it.

Their speed has not been measured on a GPU, so `DEQUANT_MIN_M` is an estimate; ``benchmarks/kernels.py --device
cuda`` measures it (docs/benchmarks_kernels.md, "CUDA paths"). Correctness is tested in CI by running the same
kernels in Triton's CPU interpreter (``tests/kernels/test_gpu.py``).
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .. import reference
from ..workspace import workspace

logger = logging.getLogger(__name__)

#: Rows from which ``gpu_dequant`` is chosen: an unmeasured estimate of where a fused-dequant Triton GEMM falls behind
#: cuBLAS on a pre-dequantized weight (docs/benchmarks_kernels.md, "CUDA paths").
DEQUANT_MIN_M = 128

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_state: dict[str, object] = {}


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``): the GPU paths then also accept CPU
    tensors when forced (never chosen automatically for them). This is how the kernels are tested without a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def load():
    """The Triton kernels module, or None (with one warning) when Triton cannot be imported."""
    if "mod" not in _state:
        try:
            triton_uniform = importlib.import_module(f"{__package__}.triton_uniform")
        except Exception as e:  # ImportError, or a broken Triton install
            logger.warning(
                "Triton is not available (%s: %s); CBQLinear on CUDA uses the slow PyTorch reference path. "
                "Install it with `pip install triton`.",
                type(e).__name__,
                e,
            )
            triton_uniform = None
        _state["mod"] = triton_uniform
    return _state["mod"]


def _rows(x: torch.Tensor) -> int:
    return x.numel() // max(x.shape[-1], 1)


def supports_packed(module, x: torch.Tensor) -> bool:
    dev = x.device.type
    return (
        (dev == "cuda" or (dev == "cpu" and interpreting()))
        and module.qweight.device == x.device
        and x.dtype in _FLOAT_DTYPES
        and getattr(module.fmt, "name", None) == "uniform"
        and load() is not None
    )


def _int_tile(module) -> int | None:
    spec = module.fmt.spec
    k = module.in_features
    return load().int_tile_k(spec.group_len(k), spec.num_groups(k))


def supports_int(module, x: torch.Tensor) -> bool:
    act = module.fmt.act_bits
    return (
        supports_packed(module, x)
        and act is not None
        and 2 <= act <= 8
        and module.fmt.spec.slot_bits in (2, 4)
        and _int_tile(module) is not None
    )


def _on_cuda(x: torch.Tensor) -> bool:
    return x.device.type == "cuda"


def prefer_dequant(module, x: torch.Tensor) -> bool:
    return _on_cuda(x) and _rows(x) >= DEQUANT_MIN_M


def prefer_kernel(module, x: torch.Tensor) -> bool:
    return _on_cuda(x) and _rows(x) < DEQUANT_MIN_M


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def _bias(module) -> torch.Tensor | None:
    return module.bias.float().contiguous() if module.bias is not None else None


# ---------------------------------------------------------------------------------------------- paths
def bind_packed(module, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ``gpu_packed`` forward as a function of x alone (see dispatch.KernelPath.bind)."""
    mod = load()
    spec, n, k = module.fmt.spec, module.out_features, module.in_features
    q, s, z, bias = module.qweight, module.scales, module.zeros, _bias(module)
    slot, glen = spec.slot_bits, spec.group_len(k)
    prep = reference.bind_prepare_input(module)  # act_bits here: weights the integer path does not take

    def run(x: torch.Tensor) -> torch.Tensor:
        y = mod.packed_gemm(_flat(prep(x)), q, s, z, bias, slot, glen, n)
        return y.reshape(*x.shape[:-1], n).to(x.dtype)

    return run


def linear_packed(module, x: torch.Tensor) -> torch.Tensor:
    return bind_packed(module, x)(x)


def bind_int(module, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ``gpu_int`` forward as a function of x alone."""
    from ...formats.uniform import activation_codes

    mod = load()
    spec, n, k = module.fmt.spec, module.out_features, module.in_features
    q, s, z, bias = module.qweight, module.scales, module.zeros, _bias(module)
    slot, glen = spec.slot_bits, spec.group_len(k)
    scale, act_bits, clip = module.input_scale, module.fmt.act_bits, module.act_clip

    def run(x: torch.Tensor) -> torch.Tensor:
        codes, steps = activation_codes(_flat(reference.scale_input(scale, x)), act_bits, clip)
        y = mod.int_gemm(codes.to(torch.int8), steps.reshape(-1).contiguous(), q, s, z, bias, slot, glen, n)
        return y.reshape(*x.shape[:-1], n).to(x.dtype)

    return run


def linear_int(module, x: torch.Tensor) -> torch.Tensor:
    return bind_int(module, x)(x)


def linear_dequant(module, x: torch.Tensor) -> torch.Tensor:
    """Dequantize into a workspace of x's dtype (float32 for float32 inputs: exactly the reference's weight), then
    one dense GEMM."""
    spec, n, k = module.fmt.spec, module.out_features, module.in_features
    w = workspace(n * k, x.dtype, x.device).view(n, k)
    load().dequantize(module.qweight, module.scales, module.zeros, spec.slot_bits, spec.group_len(k), w)
    xq = reference.prepare_input(module, x)
    bias = module.bias.to(x.dtype) if module.bias is not None else None
    return F.linear(xq, w, bias)


def register() -> None:
    """Register the CUDA paths with dispatch (cheap: Triton is imported when a CUDA forward first needs it)."""
    from ..dispatch import register_kernel

    register_kernel("gpu_dequant", supports_packed, linear_dequant, prefer=prefer_dequant)
    register_kernel("gpu_int", supports_int, linear_int, prefer=prefer_kernel, bind=bind_int)
    register_kernel("gpu_packed", supports_packed, linear_packed, prefer=prefer_kernel, bind=bind_packed)
