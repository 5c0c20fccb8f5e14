"""Repack the on-disk uniform layout into the CPU kernels' panel layout (see the header of `cbq_cpu.cpp`).

Done once per module at first use (the C++ op ``cbq_hf_cpu::repack``, linear in the weight size) and kept in
``module._kernel_cache``; the saved checkpoint layout never changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...formats.uniform import UniformSpec

ROWS = 8  # output rows per panel
CHUNK = 64  # codes per chunk; groups are padded to a multiple of this


@dataclass(frozen=True)
class Panels:
    """Weights of one linear in the panel layout, plus what the kernels need beside them."""

    wpack: torch.Tensor  # uint8 [Np/8 * Kp/64 * 8 * (8 * slot)]: codes, 8-row panels
    scales: torch.Tensor  # float16 [Np/8, G, 8]
    zeros: torch.Tensor  # uint8 [Np/8, G, 8]
    bias: torch.Tensor | None  # float32 [N]
    slot: int  # 2, 4 or 8 bits per stored code
    glen: int  # codes per group (the last group may be shorter)

    def nbytes(self) -> int:
        """Bytes held by the repacked copy (resident memory beside the module's own buffers)."""
        return sum(t.numel() * t.element_size() for t in (self.wpack, self.scales, self.zeros))


def repack(ops, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: UniformSpec,
           in_features: int, bias: torch.Tensor | None = None) -> Panels:
    """Panel layout of one linear from its packed buffers (qweight [N, bytes], scales/zeros [N, G]); `ops` is the
    loaded ``torch.ops.cbq_hf_cpu`` namespace."""
    slot, glen = spec.slot_bits, spec.group_len(in_features)
    wpack, s, z = ops.repack(qweight.contiguous(), scales.contiguous(), zeros.contiguous(), slot, in_features, glen)
    return Panels(
        wpack=wpack,
        scales=s,
        zeros=z,
        bias=None if bias is None else bias.detach().float().contiguous(),
        slot=slot,
        glen=glen,
    )
