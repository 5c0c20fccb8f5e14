"""Repack the on-disk uniform layout into the CPU kernels' panel layout (see the header of `cbq_cpu.cpp`).

Done once per module at first use, in plain torch, and kept in ``module._kernel_cache``; the saved checkpoint layout
never changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...formats.uniform import UniformSpec, unpack_codes

ROWS = 4  # output rows per panel
PAD = 64  # groups are padded to a multiple of this many codes


@dataclass(frozen=True)
class Panels:
    """Weights of one linear in the panel layout, plus what the kernels need beside them."""

    wpack: torch.Tensor  # uint8 [Np/4 * Kp/C * 4 * word_bytes]
    scales: torch.Tensor  # float32 [Np/4, G, 4]
    szs: torch.Tensor  # float32 [Np, G]: scale * zero
    bias: torch.Tensor | None  # float32 [N]
    slot: int  # 2, 4 or 8
    glen: int  # codes per group (last group may be shorter)


def codes_per_lane(slot: int) -> int:
    return 4 if slot == 8 else 8


def repack(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: UniformSpec, in_features: int,
           bias: torch.Tensor | None = None) -> Panels:
    """Panel layout of one linear from its packed buffers (qweight [N, bytes], scales/zeros [N, G])."""
    slot = spec.slot_bits
    n, k = qweight.shape[0], in_features
    glen = spec.group_len(k)
    groups = spec.num_groups(k)
    gp = -(-glen // PAD) * PAD
    np_ = -(-n // ROWS) * ROWS
    p = codes_per_lane(slot)
    c = 8 * p

    codes = unpack_codes(qweight, slot, k)
    codes = F.pad(codes, (0, groups * glen - k)).view(n, groups, glen)
    codes = F.pad(codes, (0, gp - glen)).reshape(n, groups * gp)
    codes = F.pad(codes, (0, 0, 0, np_ - n))
    # [panel, row, chunk, j, lane] -> [panel, chunk, row, lane, j]; code j*8 + lane of a chunk sits in lane `lane`
    codes = codes.view(np_ // ROWS, ROWS, groups * gp // c, p, 8).permute(0, 2, 1, 4, 3)
    shifts = torch.arange(p, dtype=torch.int64) * slot
    words = (codes.to(torch.int64) << shifts).sum(-1)
    lane_bits = 16 if slot == 2 else 32
    words = torch.where(words >= 2 ** (lane_bits - 1), words - 2**lane_bits, words)
    words = words.to(torch.int16 if lane_bits == 16 else torch.int32).contiguous()
    wpack = words.view(torch.uint8).reshape(-1)

    s = F.pad(scales.float(), (0, 0, 0, np_ - n))
    z = F.pad(zeros.float(), (0, 0, 0, np_ - n))
    return Panels(
        wpack=wpack,
        scales=s.view(np_ // ROWS, ROWS, groups).transpose(1, 2).contiguous(),
        szs=(s * z).contiguous(),
        bias=None if bias is None else bias.detach().float().contiguous(),
        slot=slot,
        glen=glen,
    )
