"""Triton kernels of the uniform format, reading the on-disk packed layout directly (no repack).

Three kernels, launched by the functions at the end of this module:

- `packed_gemm`: y = x @ W_hat.T + b with the codes unpacked and dequantized inside the GEMM tile loop. float32
  inputs multiply in IEEE float32 (no TF32): the reference's numbers up to the order of the sum. float16 / bfloat16
  inputs multiply on TF32 tensor cores: the input values are exact in TF32, the dequantized weight is rounded to
  TF32's 10-bit mantissa (finer than the half dtype's own), with float32 accumulation. (A bf16 x bf16 dot would
  round the weight to 8 bits; it is also what Triton's CPU interpreter, our CI, cannot run correctly.)
- `int_gemm`: integer activations (``act_bits``). Per-token codes (int8, computed by the format's own PyTorch
  quantizer, so identical to the simulated ones) times (q - z) as int8, exact int32 sums per weight group, then
  group scale, token step and bias in float32.
  Both GEMMs return float32; the caller casts to the input's dtype exactly as the reference does.
- `dequantize`: W_hat into a caller's buffer, for prefill through one dense GEMM.

Importing this module imports Triton; `cbq_hf.kernels.gpu.paths` imports it only when a CUDA forward needs it. With
``TRITON_INTERPRET=1`` set before the import, the same kernels run on CPU tensors in Triton's interpreter, which is
how CI (no GPU) tests them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dequant_tile(q_ptr, s_ptr, z_ptr, rk, rn, N, K, G, glen, row_bytes, SLOT: tl.constexpr):
    """W_hat[rn, rk] transposed to a [BK, BN] float32 tile ((q - z) * s; 0 outside the matrix)."""
    PER: tl.constexpr = 8 // SLOT
    CODE_MASK: tl.constexpr = (1 << SLOT) - 1
    inside = (rk < K)[:, None] & (rn < N)[None, :]
    byte = tl.load(q_ptr + rn[None, :] * row_bytes + (rk // PER)[:, None], mask=inside, other=0).to(tl.int32)
    code = (byte >> ((rk % PER) * SLOT)[:, None]) & CODE_MASK
    g = rk // glen
    meta = rn[None, :] * G + g[:, None]
    s = tl.load(s_ptr + meta, mask=inside, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + meta, mask=inside, other=0).to(tl.float32)
    return (code.to(tl.float32) - z) * s


@triton.jit
def _packed_gemm_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    G,
    glen,
    row_bytes,
    stride_xm,
    SLOT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm < M)[:, None] & (rk < K)[None, :], other=0.0
        )
        w = _dequant_tile(q_ptr, s_ptr, z_ptr, rk, rn, N, K, G, glen, row_bytes, SLOT)
        acc += tl.dot(x.to(tl.float32), w, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    out = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=out)


@triton.jit
def _int_gemm_kernel(
    a_ptr,
    step_ptr,
    q_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    G,
    glen,
    row_bytes,
    SLOT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """Requires BK to divide glen (or G == 1), so that every K tile lies inside one weight group."""
    PER: tl.constexpr = 8 // SLOT
    CODE_MASK: tl.constexpr = (1 << SLOT) - 1
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for g in range(0, G):
        isum = tl.zeros((BM, BN), dtype=tl.int32)
        z = tl.load(z_ptr + rn * G + g, mask=rn < N, other=0).to(tl.int32)
        g_end = tl.minimum(g * glen + glen, K)
        for k0 in range(g * glen, g_end, BK):
            rk = k0 + tl.arange(0, BK)
            kin = rk < g_end
            a = tl.load(a_ptr + rm[:, None] * K + rk[None, :], mask=(rm < M)[:, None] & kin[None, :], other=0)
            inside = kin[:, None] & (rn < N)[None, :]
            byte = tl.load(q_ptr + rn[None, :] * row_bytes + (rk // PER)[:, None], mask=inside, other=0)
            code = (byte.to(tl.int32) >> ((rk % PER) * SLOT)[:, None]) & CODE_MASK
            w = tl.where(inside, code - z[None, :], 0).to(tl.int8)
            isum += tl.dot(a, w, out_dtype=tl.int32)
        s = tl.load(s_ptr + rn * G + g, mask=rn < N, other=0.0).to(tl.float32)
        acc += isum.to(tl.float32) * s[None, :]
    acc = acc * tl.load(step_ptr + rm, mask=rm < M, other=0.0)[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    out = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=out)


@triton.jit
def _dequantize_kernel(
    q_ptr, s_ptr, z_ptr, w_ptr, N, K, G, glen, row_bytes, SLOT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr
):
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rk = tl.program_id(1) * BK + tl.arange(0, BK)
    w = _dequant_tile(q_ptr, s_ptr, z_ptr, rk, rn, N, K, G, glen, row_bytes, SLOT)
    inside = (rk < K)[:, None] & (rn < N)[None, :]
    tl.store(w_ptr + rn[None, :] * K + rk[:, None], w.to(w_ptr.dtype.element_ty), mask=inside)


# ---------------------------------------------------------------------------------------------- launchers
def _block_m(m: int) -> int:
    """Rows per tile: 16 (the smallest tensor-core tile) for decode, up to 64 for prefill."""
    return 16 if m <= 16 else 32 if m <= 32 else 64


def packed_gemm(
    x2: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: torch.Tensor | None,
    slot: int,
    glen: int,
    n: int,
) -> torch.Tensor:
    """y [M, N] float32 from x2 [M, K] (float32/float16/bfloat16, last dim contiguous) and the packed buffers
    (qweight uint8 [N, ceil(K*slot/8)], scales float16 [N, G], zeros uint8 [N, G]); `glen` = inputs per group."""
    m, k = x2.shape
    y = torch.empty(m, n, dtype=torch.float32, device=x2.device)
    bm, bn, bk = _block_m(m), 64, 64
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _packed_gemm_kernel[grid](
        x2,
        qweight,
        scales,
        zeros,
        bias if bias is not None else y,
        y,
        m,
        n,
        k,
        scales.shape[1],
        glen,
        qweight.shape[1],
        x2.stride(0),
        SLOT=slot,
        HAS_BIAS=bias is not None,
        PRECISION="ieee" if x2.dtype == torch.float32 else "tf32",
        BM=bm,
        BN=bn,
        BK=bk,
    )
    return y


def int_tile_k(glen: int, groups: int) -> int | None:
    """K tile of `int_gemm` for this grouping: one that divides the group length (>= 32, the K of an int8
    tensor-core instruction), or 64 when there is one group; None if there is none (the caller takes another
    path)."""
    if groups == 1:
        return 64
    for bk in (64, 32):
        if glen % bk == 0:
            return bk
    return None


def int_gemm(
    codes: torch.Tensor,
    steps: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: torch.Tensor | None,
    slot: int,
    glen: int,
    n: int,
) -> torch.Tensor:
    """y [M, N] float32 from per-token integer activations: codes int8 [M, K] (contiguous), steps float32 [M]."""
    m, k = codes.shape
    groups = scales.shape[1]
    bk = int_tile_k(glen, groups)
    if bk is None:
        raise ValueError(f"int_gemm needs a group length divisible by 32 (got {glen}); use packed_gemm")
    y = torch.empty(m, n, dtype=torch.float32, device=codes.device)
    bm, bn = _block_m(m), 64
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _int_gemm_kernel[grid](
        codes,
        steps,
        qweight,
        scales,
        zeros,
        bias if bias is not None else y,
        y,
        m,
        n,
        k,
        groups,
        glen,
        qweight.shape[1],
        SLOT=slot,
        HAS_BIAS=bias is not None,
        BM=bm,
        BN=bn,
        BK=bk,
    )
    return y


def dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, slot: int, glen: int, out: torch.Tensor
) -> torch.Tensor:
    """Write W_hat [N, K] into `out` (contiguous, float32/float16/bfloat16, on the buffers' device)."""
    n, k = out.shape
    bn, bk = 32, 64
    grid = (triton.cdiv(n, bn), triton.cdiv(k, bk))
    _dequantize_kernel[grid](
        qweight, scales, zeros, out, n, k, scales.shape[1], glen, qweight.shape[1], SLOT=slot, BN=bn, BK=bk
    )
    return out
