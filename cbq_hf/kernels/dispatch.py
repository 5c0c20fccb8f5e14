"""The one place where a `CBQLinear` forward chooses its kernel.

Paths are registered with `register_kernel(name, supports, fn, prefer)`; `linear()` takes the first registered path
whose `supports(module, x)` (can it run this call?) and `prefer(module, x)` (is it the fast choice here, e.g. decode
vs prefill?) are both true, in registration order, and falls back to the reference.
A path may also give `bind(module, x)`: a function of x alone with the module's kernel state looked up once (or
None where it has no such shortcut); `linear()` remembers it with the choice, so a decode step pays no per-call
lookups beyond the memo (~9 us of Python per call otherwise, about 2 ms per generated token on a 30-layer model).
Choose a path for every forward with `set_kernel(name)` (None: automatic again) or, for a block, `with
force_kernel(name):`; only `supports` is asked then, and a chosen path that cannot run is an error. The environment
variable ``CBQ_KERNEL=<name>`` gives the initial choice, read once at import (for a process started with it, e.g. a
benchmark's subprocess); nothing reads the environment per call. The path that ran is recorded on the module as
`module.last_kernel`.
The compiled CPU paths and the Triton CUDA paths are registered at the end of this module; nothing is built or
imported before a forward asks for them.
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
    prefer: Callable[[object, torch.Tensor], bool] | None = None
    bind: Callable[[object, torch.Tensor], Callable[[torch.Tensor], torch.Tensor] | None] | None = None


_PATHS: list[KernelPath] = []
#: Name of the environment variable holding the initial kernel choice (read once, at import).
ENV = "CBQ_KERNEL"
_forced: str | None = os.environ.get(ENV) or None
#: Bumped whenever the choice or the set of paths changes; part of every memo key, so a change takes effect on the
#: next forward of every module.
_generation = 0


def register_kernel(
    name: str,
    supports: Callable,
    fn: Callable,
    first: bool = False,
    prefer: Callable | None = None,
    bind: Callable | None = None,
) -> None:
    """Add (or replace) a kernel path. `supports(module, x)` says whether it can run this call; `prefer(module, x)`
    (default: always) whether automatic selection should take it when it can; `bind(module, x)` (optional) a
    function of x alone that computes what `fn(module, x)` does, valid until the module's kernel cache is cleared."""
    global _PATHS, _generation
    _PATHS = [p for p in _PATHS if p.name != name]
    _generation += 1
    path = KernelPath(name, supports, fn, prefer, bind)
    if first:
        _PATHS.insert(0, path)
    else:
        _PATHS.append(path)


def available_kernels() -> list[str]:
    return [p.name for p in _PATHS] + ["reference"]


def kernel_choice() -> str | None:
    """The kernel every `CBQLinear` forward is made to use, or None for the automatic choice."""
    return _forced


def set_kernel(name: str | None) -> None:
    """Make every `CBQLinear` forward from now on use kernel `name` (one of `available_kernels()`; an error at the
    forward if it cannot run that call), or choose automatically again with None. Takes effect on the next forward.

    Raises:
        ValueError: `name` is not a registered kernel.
    """
    global _forced, _generation
    if name is not None and name not in available_kernels():
        raise ValueError(f"{name!r} is not a kernel; available: {available_kernels()}")
    _forced = name
    _generation += 1


@contextlib.contextmanager
def force_kernel(name: str | None) -> Iterator[None]:
    """Within the block every `CBQLinear` uses kernel `name` (see `set_kernel`; None: the automatic choice); the
    choice it replaced comes back after it."""
    old = _forced
    set_kernel(name)
    try:
        yield
    finally:
        set_kernel(old)


def _select(module, x: torch.Tensor) -> tuple[str, Callable, Callable | None]:
    """(name, fn(module, x), bound fn(x) or None) of the path for this call."""
    forced = _forced
    if forced == "reference":
        return "reference", reference.linear, None
    for path in _PATHS:
        if forced is not None and path.name != forced:
            continue
        if forced is None and path.prefer is not None and not path.prefer(module, x):
            continue
        if path.supports(module, x):
            return path.name, path.fn, (path.bind(module, x) if path.bind is not None else None)
        if forced is not None:
            raise RuntimeError(
                f"kernel {forced!r} was forced but cannot run this call "
                f"(format={module.fmt.name}, act_bits={module.fmt.act_bits}, dtype={x.dtype}, "
                f"device={x.device})"
            )
    if forced is not None:
        raise ValueError(
            f"kernel {forced!r} (chosen by {ENV} or set_kernel) is not a kernel; available: {available_kernels()}"
        )
    return "reference", reference.linear, None


#: Distinct (choice generation, dtype, device, shape) selections remembered per module; prefill with many prompt
#: lengths would otherwise grow the memo without bound.
_MEMO_SIZE = 32


def linear(module, x: torch.Tensor) -> torch.Tensor:
    """Forward of a `CBQLinear` through the selected kernel path.

    The choice depends only on the chosen kernel (`set_kernel`), x's dtype, device and row count (the memo keys on
    x's shape, which fixes the rows and is cheaper to read), and on the module's format and buffers; it is remembered
    per module in
    ``module._kernel_cache`` (cleared whenever the buffers are replaced or moved), because asking every path's
    `supports`/`prefer` costs more than a small decode GEMV (~20 us per call).
    """
    key = (_generation, x.dtype, x.device, x.shape)
    cache = module._kernel_cache
    memo = cache.get("dispatch")
    if memo is None:
        memo = cache["dispatch"] = {}
    hit = memo.get(key)
    if hit is None:
        if len(memo) >= _MEMO_SIZE:
            memo.clear()
        hit = memo[key] = _select(module, x)
    name, fn, bound = hit
    # plain attribute write: nn.Module.__setattr__ costs more than the check it would do here
    module.__dict__["last_kernel"] = name
    return bound(x) if bound is not None else fn(module, x)


def _register_builtin() -> None:
    from .cpu import lobcq_paths
    from .cpu import paths as cpu_paths
    from .gpu import paths as gpu_paths

    cpu_paths.register()
    lobcq_paths.register()
    gpu_paths.register()


_register_builtin()
