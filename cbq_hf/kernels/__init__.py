"""Kernels of `CBQLinear`: the reference, the compiled CPU paths, the Triton CUDA paths, and the one dispatch point.

`set_kernel`, `force_kernel`, `kernel_choice` and `available_kernels` (from `cbq_hf.kernels.dispatch`) choose the
path every forward takes; they are loaded on first use, so importing this package registers and builds nothing.
"""

from __future__ import annotations

_DISPATCH_API = ("available_kernels", "force_kernel", "kernel_choice", "set_kernel")
__all__ = list(_DISPATCH_API)


def __getattr__(name: str):
    if name in _DISPATCH_API:
        from . import dispatch

        return getattr(dispatch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
