"""Shared builders, the closeness check and the float32-matmul setting of the kernel tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from cbq_hf.formats.uniform import UniformFormat
from cbq_hf.nn.linear import CBQLinear


def make_linear(
    n: int,
    k: int,
    bits: int,
    group: int,
    act_bits: int | None = None,
    sym: bool = False,
    bias: bool = True,
    input_scale: bool = True,
) -> CBQLinear:
    fmt = UniformFormat(bits, group, sym, act_bits)
    lin = CBQLinear(k, n, bias, fmt, has_input_scale=input_scale)
    lin.load_packed(
        fmt.quantize_rtn(torch.randn(n, k)),
        bias=torch.randn(n) if bias else None,
        input_scale=torch.rand(k) + 0.5 if input_scale else None,
    )
    if act_bits is not None:
        lin.act_clip.fill_(0.9)
    return lin


def assert_close(test: torch.Tensor, ref: torch.Tensor, magnitude: torch.Tensor, dtype: torch.dtype) -> None:
    """|test - ref| <= rtol * |ref| + atol * magnitude, magnitude = |x| @ |W|^T + |b| (the scale of the sum).

    fp32: float-rounding tolerance of a reordered sum; bf16: both outputs are rounded to bf16 (and the reference
    rounds quantized activations to bf16), so a few bf16 ulps.
    """
    rtol, atol = (1e-5, 2e-6) if dtype == torch.float32 else (2**-7, 2**-8)
    err = (test.float() - ref.float()).abs()
    bound = rtol * ref.float().abs() + atol * magnitude
    assert bool((err <= bound).all()), f"max excess {float((err - bound).max())}"


def magnitude(lin: CBQLinear, x: torch.Tensor) -> torch.Tensor:
    xs = x.float() / lin.input_scale if lin.input_scale is not None else x.float()
    m = xs.abs() @ lin.dequantized_weight().abs().T
    return m + (lin.bias.abs() if lin.bias is not None else 0)


@contextlib.contextmanager
def fp32_matmul_in_bf16() -> Iterator[None]:
    """Within the block torch runs float32 matmuls on the CPU in bf16 (as after
    ``torch.set_float32_matmul_precision("medium")``); the previous setting is restored after it."""
    old = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = old
