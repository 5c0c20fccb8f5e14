"""Repack the on-disk uniform layout into the CPU kernels' panel layout (see the header of `cbq_cpu.cpp`), or for
2-bit codes into the table layout of the `cpu_lut2` path (`lut2_cpu.cpp`).

Done once per module at first use (the C++ op ``cbq_hf_cpu::repack``, linear in the weight size) and kept in
``module._kernel_cache``; the saved checkpoint layout never changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...formats.uniform import UniformSpec

ROWS = 8  # output rows per panel
CHUNK = 64  # codes per chunk; groups are padded to a multiple of this
META_GROUPS = 8  # groups whose scales and zeros precede them in the weight stream
META_BYTES = META_GROUPS * ROWS * 3  # fp16 scales + uint8 zeros of META_GROUPS groups


def panel_bytes(in_features: int, glen: int, slot: int) -> int:
    """Bytes of one 8-row panel: per run of META_GROUPS groups a meta block, then every group's codes padded to
    whole 64-code chunks."""
    groups = -(-in_features // glen)
    group_bytes = -(-glen // CHUNK) * CHUNK * ROWS * slot // 8
    return -(-groups // META_GROUPS) * META_BYTES + groups * group_bytes


@dataclass(frozen=True)
class Panels:
    """Weights of one linear in the panel layout, plus what the kernels need beside them."""

    wpack: torch.Tensor  # uint8 [Np/8 * panel_bytes]: codes with their scales and zeros, 8-row panels
    bias: torch.Tensor | None  # float32 [N]
    slot: int  # 2, 4 or 8 bits per stored code
    glen: int  # codes per group (the last group may be shorter)

    def nbytes(self) -> int:
        """Bytes held by the repacked copy (resident memory beside the module's own buffers)."""
        return self.wpack.numel() * self.wpack.element_size()


def repack(
    ops,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    spec: UniformSpec,
    in_features: int,
    bias: torch.Tensor | None = None,
) -> Panels:
    """Panel layout of one linear from its packed buffers (qweight [N, bytes], scales/zeros [N, G]); `ops` is the
    loaded ``torch.ops.cbq_hf_cpu`` namespace."""
    slot, glen = spec.slot_bits, spec.group_len(in_features)
    wpack = ops.repack(qweight.contiguous(), scales.contiguous(), zeros.contiguous(), slot, in_features, glen)
    return Panels(
        wpack=wpack,
        bias=None if bias is None else bias.detach().float().contiguous(),
        slot=slot,
        glen=glen,
    )


LUT2_ROWS = 16  # rows per block of the 2-bit table layout (one 512-bit register of 32-bit lanes)
LUT2_WORD_CODES = 16  # 2-bit codes per 32-bit word
LUT2_META_BYTES = 64  # fp16 scales + uint8 zeros of a block's group, padded


def lut2_bytes(out_features: int, in_features: int, glen: int) -> int:
    """Bytes of the 2-bit table layout (see the header of `lut2_cpu.cpp`): per block of 16 rows and group, a meta
    record and the group's codes padded to whole 16-code words."""
    groups = -(-in_features // glen)
    words = -(-glen // LUT2_WORD_CODES)
    return -(-out_features // LUT2_ROWS) * groups * (LUT2_META_BYTES + words * LUT2_ROWS * 4)


@dataclass(frozen=True)
class Lut2Weights:
    """Weights of one 2-bit linear in the table layout of the `cpu_lut2` path."""

    wlut: torch.Tensor  # uint8 [lut2_bytes]
    bias: torch.Tensor | None  # float32 [N]
    glen: int

    def nbytes(self) -> int:
        return self.wlut.numel() * self.wlut.element_size()


def repack_lut2(
    ops,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    spec: UniformSpec,
    in_features: int,
    bias: torch.Tensor | None = None,
) -> Lut2Weights:
    """Table layout of one 2-bit linear from its packed buffers (see `repack`)."""
    if spec.slot_bits != 2:
        raise ValueError(f"the table layout takes 2-bit codes, got {spec.slot_bits}-bit slots")
    glen = spec.group_len(in_features)
    wlut = ops.lut2_repack(qweight.contiguous(), scales.contiguous(), zeros.contiguous(), in_features, glen)
    return Lut2Weights(wlut=wlut, bias=None if bias is None else bias.detach().float().contiguous(), glen=glen)
