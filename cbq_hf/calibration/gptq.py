"""Error-compensated starting point of the uniform stand-in (`CBQConfig.rounding_init="gptq"`).

`gptq_quantize` is GPTQ (Frantar et al. 2023) as a pure function on tensors, on a *fixed* grid: given W [N, K], the
Hessian H = 2 X^T X / n [K, K] of the linear's input and the per-group (scale, zero) of the stand-in's starting
grid, it quantizes the columns left to right, each from its value after the error feedback of the columns before
it (inverse-Hessian updates, lazy batches of BLOCK columns, dampening `damp * mean(diag(H))`, no activation
ordering). Unlike the baseline in benchmarks/baselines/gptq.py, the grid is not recomputed from the updated
weights when a group starts: it is the clip-searched grid of `rounding.init_qparams`, so that LoRA-Rounding trains
on the grid GPTQ quantized on.

`gptq_start` gives a `QuantLinearSim` the error-compensated weight W' (each column as GPTQ quantized it) as the
weight its offsets round, so that its initial hard rounding (round-to-nearest of W' / scale0) equals GPTQ's codes.
The LO-BCQ stand-in (`lobcq_sim.LOBCQLinearSim`) gets the same on its fixed starting encoding (array scales and
codebook selectors kept, each value the nearest entry of its block's codebook): `gptq_quantize_with` runs GPTQ's
column loop for any per-column quantizer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..formats.uniform import UniformSpec, group_index, round_scale
from .lobcq_sim import LOBCQLinearSim
from .rounding import cpu_calibration_ops

#: Columns per lazy batch update (the reference implementation's block size).
BLOCK = 128
#: Times the dampening is multiplied by 10 when the dampened Hessian is still not positive definite.
DAMP_RETRIES = 3


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of the inverse of the dampened H [K, K] (float32); dead channels (zero diagonal)
    count as independent unit channels.

    Raises:
        torch.linalg.LinAlgError: H + damp * mean(diag(H)) * I is not positive definite, even with 1000x the
            dampening.
    """
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    eye = torch.eye(h.shape[0], device=h.device)
    mean_diag = torch.mean(torch.diag(h))
    for attempt in range(DAMP_RETRIES + 1):
        factor, info = torch.linalg.cholesky_ex(h + eye * (damp * 10**attempt) * mean_diag)
        if int(info) == 0:
            break
    else:
        raise torch.linalg.LinAlgError("cbq_hf: the dampened Hessian is not positive definite")
    return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    spec: UniformSpec,
    damp: float = 0.01,
    step: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of W [N, K] on the fixed grid (scale, zero) [N, G].

    Args:
        weight: W [N, K].
        hessian: H [K, K] of the linear's input (any positive multiple of X^T X gives the same result).
        scale, zero: the grid: codes q = clamp(round(w / scale) + zero, 0, qmax).
        spec: groups and code range of the grid.
        damp: dampening relative to the mean diagonal of H.
        step: the step the dequantized weight (q - zero) * step uses in the error feedback (the stored step, e.g.
            `round_scale(scale)`); `scale` when None.

    Returns:
        (W' [N, K] float32: each column as it was when quantized, so that clamp(round(W' / scale) + zero) are the
        codes; codes [N, K] float32, integer-valued). Columns of dead input channels (zero diagonal) are set to 0.
    """
    k = weight.shape[1]
    gi = group_index(k, spec, weight.device)
    scale_k, zero_k = scale.float()[:, gi], zero.float()[:, gi]
    step_k = scale_k if step is None else step.float()[:, gi]
    w_start, codes = torch.empty_like(weight, dtype=torch.float32), torch.empty_like(weight, dtype=torch.float32)
    ops = cpu_calibration_ops() if weight.device.type == "cpu" else None

    def batch(i1: int, i2: int, w1: torch.Tensor, hinv1: torch.Tensor) -> torch.Tensor:
        block = (w1, hinv1, scale_k[:, i1:i2], zero_k[:, i1:i2], step_k[:, i1:i2])
        if ops is not None:
            start1, codes1, err1 = ops.gptq_columns(*(t.contiguous() for t in block), spec.qmax)
        else:
            start1, codes1, err1 = _columns(*block, spec.qmax)
        w_start[:, i1:i2], codes[:, i1:i2] = start1, codes1
        return err1

    _lazy_batches(weight, hessian, damp, batch)
    return w_start, codes


def _lazy_batches(weight: torch.Tensor, hessian: torch.Tensor, damp: float, batch) -> None:
    """GPTQ's outer loop over W [N, K] (float32 copy, dead input channels zeroed): for each lazy batch of BLOCK
    columns, `batch(i1, i2, w1, hinv1)` quantizes the columns i1:i2 (w1 [N, B], as the batches before left them;
    hinv1 the batch's block of the upper inverse-Hessian factor) and returns their scaled errors [N, B], which are
    then fed forward to the columns after the batch."""
    w = weight.detach().float().clone()
    w[:, torch.diag(hessian) == 0] = 0.0
    hinv = inverse_hessian_factor(hessian.to(w.device), damp)
    for i1 in range(0, w.shape[1], BLOCK):
        i2 = min(i1 + BLOCK, w.shape[1])
        err1 = batch(i1, i2, w[:, i1:i2], hinv[i1:i2, i1:i2])
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]


def _columns(w1, hinv1, scale1, zero1, step1, qmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ's column loop inside one lazy batch (the CPU kernel ``gptq_columns`` computes the same, bit for bit):
    (each column as quantized, its codes, its scaled error), all [N, B]."""
    w1 = w1.clone()
    w_start, codes, err1 = torch.empty_like(w1), torch.empty_like(w1), torch.empty_like(w1)
    for i in range(w1.shape[1]):
        wc = w1[:, i]
        q = torch.clamp(torch.round(wc / scale1[:, i]) + zero1[:, i], 0, qmax)
        w_start[:, i], codes[:, i] = wc, q
        e = (wc - (q - zero1[:, i]) * step1[:, i]) / hinv1[i, i]
        w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
        err1[:, i] = e
    return w_start, codes, err1


@torch.no_grad()
def gptq_quantize_with(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    quantize_column: Callable[[int, torch.Tensor], torch.Tensor],
    damp: float = 0.01,
) -> torch.Tensor:
    """GPTQ of W [N, K] for any fixed per-column quantizer (the same column order, lazy batches and dampening as
    `gptq_quantize`).

    Args:
        weight: W [N, K].
        hessian: H [K, K] of the linear's input.
        quantize_column: (column index i, its current values [N] float32) -> their dequantized values [N].
        damp: dampening relative to the mean diagonal of H.

    Returns:
        W' [N, K] float32: each column as it was when quantized (quantize_column of it is what GPTQ chose). Columns
        of dead input channels (zero diagonal) are set to 0.
    """
    w_start = torch.empty_like(weight, dtype=torch.float32)

    def batch(i1: int, i2: int, w1: torch.Tensor, hinv1: torch.Tensor) -> torch.Tensor:
        err1 = torch.empty_like(w1)
        for j in range(i2 - i1):
            col = w1[:, j].clone()
            w_start[:, i1 + j] = col
            e = (col - quantize_column(i1 + j, col)) / hinv1[j, j]
            w1[:, j:] -= e[:, None] * hinv1[j, j:][None, :]
            err1[:, j] = e
        return err1

    _lazy_batches(weight, hessian, damp, batch)
    return w_start


@torch.no_grad()
def gptq_start(sim, hessian: torch.Tensor, damp: float = 0.01) -> None:
    """Start the stand-in `sim` from GPTQ's error-compensated weight on its own starting grid, in place; `hessian`
    [K, K] is of the input its matmul sees.

    Uniform (`rounding.QuantLinearSim`): the grid (sim.scale0, sim.zero); the codes use the grid the stand-in rounds
    on (scale0 with LoRA-Rounding, else the stored step), the error feedback the stored step. LO-BCQ
    (`LOBCQLinearSim`): its starting array scales and codebook selectors, each value to the nearest entry of its
    block's codebook."""
    if isinstance(sim, LOBCQLinearSim):
        sim.start_from(gptq_quantize_with(sim.weight, hessian, sim.column_quantizer(), damp))
        return
    stored = round_scale(sim.scale0)
    codes_on = sim.scale0 if sim.use_lora_rounding else stored
    w_start, _ = gptq_quantize(sim.weight, hessian, codes_on, sim.zero, sim.spec, damp, stored)
    sim.start_from(w_start)
