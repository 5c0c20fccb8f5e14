"""The one place where a `CBQLinear` forward chooses its kernel.

Paths are registered with `register_kernel(name, supports, fn)`; `linear()` takes the first registered path whose
`supports(module, x)` is true, in registration order (fastest first), and falls back to the reference.
Force a path with the environment variable ``CBQ_KERNEL=<name>`` or `force_kernel(name)`; the path that ran is
recorded on the module as `module.last_kernel`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from . import reference


@dataclass
class KernelPath:
    name: str
    supports: Callable[[object, torch.Tensor], bool]
    fn: Callable[[object, torch.Tensor], torch.Tensor]


_PATHS: list[KernelPath] = []
_forced: str | None = None


def register_kernel(name: str, supports: Callable, fn: Callable, first: bool = False) -> None:
    """Add (or replace) a kernel path. `supports(module, x)` says whether it can run this call."""
    global _PATHS
    _PATHS = [p for p in _PATHS if p.name != name]
    path = KernelPath(name, supports, fn)
    if first:
        _PATHS.insert(0, path)
    else:
        _PATHS.append(path)


def available_kernels() -> list[str]:
    return [p.name for p in _PATHS] + ["reference"]


@contextlib.contextmanager
def force_kernel(name: str | None) -> Iterator[None]:
    """Within the block, every `CBQLinear` uses kernel `name` (error if it cannot run the call)."""
    global _forced
    old, _forced = _forced, name
    try:
        yield
    finally:
        _forced = old


def _select(module, x: torch.Tensor) -> tuple[str, Callable]:
    forced = _forced or os.environ.get("CBQ_KERNEL") or None
    if forced == "reference":
        return "reference", reference.linear
    for path in _PATHS:
        if forced is not None and path.name != forced:
            continue
        if path.supports(module, x):
            return path.name, path.fn
        if forced is not None:
            raise RuntimeError(f"kernel {forced!r} was forced but cannot run this call "
                               f"(format={module.fmt.name}, act_bits={module.fmt.act_bits}, dtype={x.dtype}, "
                               f"device={x.device})")
    if forced is not None:
        raise ValueError(f"CBQ_KERNEL={forced!r} is not a kernel; available: {available_kernels()}")
    return "reference", reference.linear


def linear(module, x: torch.Tensor) -> torch.Tensor:
    """Forward of a `CBQLinear` through the selected kernel path."""
    name, fn = _select(module, x)
    module.last_kernel = name
    return fn(module, x)
