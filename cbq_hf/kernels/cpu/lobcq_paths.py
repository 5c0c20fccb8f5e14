"""The compiled CPU paths of LO-BCQ `CBQLinear`s (``format="lobcq"``) and their registration with dispatch.

- ``cpu_lobcq``: decode and small batches. The C++ op ``lobcq_gemm`` decodes each weight row once per call, exactly
  the reference's W_hat row (`lobcq_cpu.cpp`), and takes its dot product with every token; nothing of the size of
  the weight is materialised.
- ``cpu_lobcq_dequant``: from `LOBCQ_DEQUANT_MIN_M` rows on: W_hat into a reused float32 workspace
  (``lobcq_dequantize_into``, the same row decoder), then one dense GEMM.

Both take the activations as the reference does: divided by ``input_scale``, then with ``act_bits=4`` LO-BCQ
encoded per token at run time by the C++ op ``lobcq_encode_act`` (bit-identical to the format's vectorised PyTorch
encoder, 10-20x faster for one token; the last encoded input is remembered, so projections that read the same
tensor, q/k/v and gate/up, encode it once). They compute in float32 and equal the reference up to the summation
order of the products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...formats.input_memo import LastInputMemo
from ...formats.lobcq import e4m3_decode
from ...formats.lobcq_codebooks import build_lut
from .. import reference
from ..workspace import workspace
from . import build

#: Rows (tokens) from which `cpu_lobcq_dequant` is chosen over the row-decoding GEMM, measured with
#: `benchmarks/lobcq_speed.py` on the demo model's 576x1536 / 1536x576 shapes (see docs/lobcq.md "Speed").
LOBCQ_DEQUANT_MIN_M = 16

#: float32 value of every FP8 E4M3 bit pattern, the kernels' scale table (the format's own decoding).
_E4M3 = e4m3_decode(torch.arange(256, dtype=torch.uint8))


def _state(module) -> dict:
    """The module's kernel arguments (codebooks as float32, the E4M3 table, tensor scale), built once and kept in
    ``module._kernel_cache`` (cleared when the buffers change)."""
    st = module._kernel_cache.get("cpu_lobcq")
    if st is None:
        spec = module.fmt.spec
        st = {
            "codebooks": module.codebooks.float().contiguous(),
            "e4m3": _E4M3,
            "tensor_scale": float(module.tensor_scale.reshape(-1)[0]),
            "selectors": module.selectors if spec.selector_bits else None,
            "bias": None if module.bias is None else module.bias.detach().float().contiguous(),
            "geometry": (spec.block_len, spec.array_len, spec.selector_bits),
        }
        if module.fmt.act_bits is not None:
            lut = build_lut(module.act_codebooks, spec.cmax)
            st["act"] = (
                lut.values.float().contiguous(),
                lut.index.to(torch.uint8).contiguous(),
                module.act_codebooks.float().contiguous(),
                st["e4m3"],
                spec.block_len,
                spec.array_len,
                spec.cmax,
            )
            st["act_key"] = bytes(module.act_codebooks.to(torch.int8).numpy().tobytes())
        module._kernel_cache["cpu_lobcq"] = st
    return st


#: The last activation encoded (keyed by the activation codebooks), shared by all modules.
_last_act = LastInputMemo()


def prepare_input(module, x: torch.Tensor) -> torch.Tensor:
    """x as the reference's `prepare_input` makes it (``input_scale``, run-time LO-BCQ with act_bits=4), in float32."""
    x = reference.scale_input(module.input_scale, x)
    if module.fmt.act_bits is None:
        return x.float().contiguous()
    st = _state(module)
    remember = not (torch.is_grad_enabled() and x.requires_grad)
    out = _last_act.get(x, st["act_key"]) if remember else None
    if out is not None:
        return out
    out = build.load().lobcq_encode_act(x.float().contiguous(), *st["act"])
    if x.dtype != torch.float32:  # the reference rounds the encoded activations to x's dtype
        out = out.to(x.dtype).float()
    if remember:
        _last_act.put(x, st["act_key"], out)
    else:
        _last_act.clear()
    return out


def supports_lobcq(module, x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and getattr(module.fmt, "name", None) == "lobcq"
        and module.qweight.device.type == "cpu"
        and build.load() is not None
    )


def _rows(x: torch.Tensor) -> int:
    return x.numel() // max(x.shape[-1], 1)


def prefer_gemm(module, x: torch.Tensor) -> bool:
    return _rows(x) < LOBCQ_DEQUANT_MIN_M


def prefer_dequant(module, x: torch.Tensor) -> bool:
    return _rows(x) >= LOBCQ_DEQUANT_MIN_M


def linear_lobcq(module, x: torch.Tensor) -> torch.Tensor:
    st = _state(module)
    xq = prepare_input(module, x)
    y = build.load().lobcq_gemm(
        xq,
        module.qweight,
        st["selectors"],
        module.scales,
        st["tensor_scale"],
        st["codebooks"],
        st["e4m3"],
        st["bias"],
        *st["geometry"],
    )
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def linear_lobcq_dequant(module, x: torch.Tensor) -> torch.Tensor:
    st = _state(module)
    n, k = module.out_features, module.in_features
    w = workspace(n * k).view(n, k)
    build.load().lobcq_dequantize_into(
        module.qweight,
        st["selectors"],
        module.scales,
        st["tensor_scale"],
        st["codebooks"],
        st["e4m3"],
        *st["geometry"],
        w,
    )
    return F.linear(prepare_input(module, x), w, st["bias"]).to(x.dtype)


def register() -> None:
    """Register the LO-BCQ CPU paths with dispatch (nothing is compiled until a forward needs them)."""
    from ..dispatch import register_kernel

    register_kernel("cpu_lobcq_dequant", supports_lobcq, linear_lobcq_dequant, prefer=prefer_dequant)
    register_kernel("cpu_lobcq", supports_lobcq, linear_lobcq, prefer=prefer_gemm)
