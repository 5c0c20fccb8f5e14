"""One reusable scratch buffer per (dtype, device), shared by the dequantize-then-GEMM paths of every layer.

Both the CPU paths (`kernels/cpu`) and the CUDA paths (`kernels/gpu`) dequantize a whole weight before one dense
GEMM; a buffer kept from call to call saves an allocation, and on the CPU its page faults, per call. One layer runs
at a time, so a single buffer per (dtype, device) serves all of them.
"""

from __future__ import annotations

import torch

_buffers: dict[str, torch.Tensor] = {}


def workspace(numel: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """A 1-D view of at least `numel` elements of `dtype` on `device` (contents undefined), valid until the next
    call for the same dtype and device; the buffer grows to the largest request and is kept."""
    key = f"{dtype}@{torch.device(device)}"
    buf = _buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype, device=device)
        _buffers[key] = buf
    return buf[:numel]
