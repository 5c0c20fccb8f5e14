"""Calibration of models dispatched by accelerate (`device_map=`, `max_memory=`, `offload_folder=`).

When transformers loads a model with a device map that spans several devices or contains "disk", accelerate
attaches `AlignDevicesHook`s: blocks on a device keep their weights there; blocks offloaded to "cpu" (with a GPU
main device) or "disk" have their parameters on the *meta* device and a hook that loads them from a weights map
(CPU tensors or the safetensors/offload files) for each forward. Calibration needs real weights it can train, so:

- **Entering the window** (`OffloadPlan.onload`): every meta tensor of the block is loaded from its hook's weights
  map (cast to the dtype the model was loaded in) and the block's hooks are removed. The engine then moves the
  block to the calibration device in float32, exactly as for a model loaded without a device map.
- **Leaving the window** (`OffloadPlan.home` + `OffloadPlan.offload`): the frozen, packed block goes back to where
  accelerate ran it: a block that lived on a device returns there; an offloaded block stays materialised on the
  CPU (quantized blocks are small: about bits/16 of the float block). A hook is attached again so the block still
  runs on accelerate's execution device: a plain `AlignDevicesHook` when the weights are already there, otherwise
  `OnloadHook`, which moves the block to the execution device for the forward and back afterwards (the same
  traffic as accelerate's CPU offload, but no meta tensor ever stays in the model).
- **After calibration** (`finish`): modules outside the blocks that accelerate offloaded (embeddings, final norm,
  lm head on "disk") are materialised on the CPU the same way, tied weights are re-tied and `hf_device_map` says
  "cpu" instead of "disk": the model then has no meta tensor, so `save_pretrained` writes real weights and
  `generate()` runs through the hooks as before.

A meta tensor with no accelerate hook to load it from (a model offloaded by some other mechanism) is refused with
an error naming the tensor. Nothing here is used for a model loaded without a device map (no hooks, no meta).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.hooks import AlignDevicesHook, ModelHook, add_hook_to_module, remove_hook_from_module
from accelerate.utils import find_device, send_to_device, set_module_tensor_to_device
from torch import nn

logger = logging.getLogger(__name__)

_OFFLOAD_HELP = (
    "Load the model with transformers' `device_map=` / `max_memory=` / `offload_folder=` (accelerate "
    "offload hooks) or without offload."
)


# ------------------------------------------------------------------------------------------------ inspection
def _hooks(module: nn.Module) -> list[Any]:
    """The accelerate hooks attached to `module` (a `SequentialHook` is flattened)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def _align_hooks(module: nn.Module) -> list[Any]:
    return [h for h in _hooks(module) if isinstance(h, AlignDevicesHook)]


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate hooks are attached anywhere in `model` (a device map with several devices or "disk")."""
    return any(hasattr(m, "_hf_hook") for m in model.modules())


def has_meta_tensors(module: nn.Module) -> bool:
    """Whether any parameter or buffer of `module` is on the meta device (i.e. offloaded, not in memory)."""
    return any(t.device.type == "meta" for t in _tensors(module))


def _tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from (b for b in module.buffers() if b is not None)


def meta_tensor_names(module: nn.Module) -> list[str]:
    """Names of the parameters and buffers of `module` that are on the meta device."""
    named = list(module.named_parameters()) + [(n, b) for n, b in module.named_buffers() if b is not None]
    return [n for n, t in named if t.device.type == "meta"]


def execution_device(module: nn.Module) -> torch.device | None:
    """The device accelerate runs `module` on: the execution device of the first hook found on it or inside it."""
    for m in module.modules():
        for h in _align_hooks(m):
            if h.execution_device is not None:
                return torch.device(h.execution_device)
    return None


def _real_device(module: nn.Module) -> torch.device | None:
    for t in _tensors(module):
        if t.device.type != "meta":
            return t.device
    return None


def input_device(model: nn.Module) -> torch.device:
    """Device to put calibration `input_ids` on before calling `model`: the execution device of the input
    embeddings when accelerate dispatched the model, else the device of the first parameter in memory, else CPU."""
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        emb = None
    if emb is not None:
        dev = execution_device(emb)
        if dev is not None:
            return dev
    return _real_device(model) or torch.device("cpu")


# ------------------------------------------------------------------------------------------------ materialising
@torch.no_grad()
def materialize(module: nn.Module, name: str = "module", device: torch.device | str = "cpu") -> None:
    """Load every meta tensor of `module` (and its submodules) from its accelerate hook's weights map onto `device`,
    then remove all accelerate hooks inside `module`. Tensors already in memory are not moved.

    Raises:
        ValueError: a meta tensor has no accelerate hook whose weights map holds it (offload support missing).
    """
    for sub in module.modules():
        for hook in _align_hooks(sub):
            wmap: Mapping[str, torch.Tensor] | None = getattr(hook, "weights_map", None)
            if wmap is None:
                continue
            recurse = bool(getattr(hook, "place_submodules", False))
            named = list(sub.named_parameters(recurse=recurse)) + [
                (n, b) for n, b in sub.named_buffers(recurse=recurse) if b is not None
            ]
            for tname, t in named:
                if t.device.type != "meta" or tname not in wmap:
                    continue
                value = wmap[tname]
                set_module_tensor_to_device(sub, tname, device, value=value.to(t.dtype))
    missing = meta_tensor_names(module)
    if missing:
        raise ValueError(
            f"cbq_hf: {name}.{missing[0]} (and {len(missing) - 1} more) is on the meta device with no accelerate "
            f"offload hook to load it from, so calibration cannot read its weights. {_OFFLOAD_HELP}"
        )
    remove_hook_from_module(module, recurse=True)


class OnloadHook(ModelHook):
    """Accelerate hook for a frozen block kept on `home` (CPU) but executed on `execution_device`: the block moves
    to the execution device for its forward and back afterwards; its tensors are always real (never meta)."""

    def __init__(
        self, execution_device: torch.device, home: torch.device, io_same_device: bool = False, skip_keys: Any = None
    ) -> None:
        self.execution_device = torch.device(execution_device)
        self.home = torch.device(home)
        self.io_same_device = io_same_device
        self.skip_keys = skip_keys
        self.input_device: torch.device | None = None

    def init_hook(self, module: nn.Module) -> nn.Module:
        return module.to(self.home)

    def detach_hook(self, module: nn.Module) -> nn.Module:
        return module

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        if self.io_same_device:
            self.input_device = find_device([args, kwargs])
        module.to(self.execution_device)
        return (
            send_to_device(args, self.execution_device),
            send_to_device(kwargs, self.execution_device, skip_keys=self.skip_keys),
        )

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        module.to(self.home)
        if self.io_same_device and self.input_device is not None:
            output = send_to_device(output, self.input_device, skip_keys=self.skip_keys)
        return output


# ------------------------------------------------------------------------------------------------ the plan
@dataclass
class BlockHome:
    """Where accelerate had decoder block `index`: its execution device (None: no hook), the device its weights
    return to after freezing, whether it was offloaded (meta weights), and its hook's I/O settings."""

    execution_device: torch.device | None
    device: torch.device
    offloaded: bool
    io_same_device: bool = False
    skip_keys: Any = None


class OffloadPlan:
    """Records where accelerate placed each decoder block, so the engine can bring a block into the calibration
    window (`onload`) and put its frozen version back (`home`, `offload`). For a model without accelerate hooks
    every call is a no-op and every block's home is `model_device` (the device of the model's first parameter),
    which is the engine's behaviour for a model loaded without a device map.
    """

    def __init__(self, model: nn.Module, prefix: str, blocks: nn.ModuleList) -> None:
        self.prefix = prefix
        self.dispatched = is_dispatched(model)
        self.model_device = _real_device(model) or torch.device("cpu")
        self.homes: list[BlockHome] = []
        for block in blocks:
            exec_dev = execution_device(block) if self.dispatched else None
            offloaded = has_meta_tensors(block)
            top = _align_hooks(block)
            if exec_dev is None:
                dev = _real_device(block) if not offloaded else torch.device("cpu")
                self.homes.append(BlockHome(None, dev or self.model_device, offloaded))
                continue
            dev = torch.device("cpu") if offloaded else (_real_device(block) or exec_dev)
            self.homes.append(
                BlockHome(
                    exec_dev,
                    dev,
                    offloaded,
                    io_same_device=bool(top and top[0].io_same_device),
                    skip_keys=top[0].skip_keys if top else None,
                )
            )
        if self.dispatched:
            n_off = sum(h.offloaded for h in self.homes)
            logger.info(
                "accelerate-dispatched model: %d of %d decoder blocks offloaded (meta weights) are loaded "
                "one window at a time",
                n_off,
                len(self.homes),
            )

    def home(self, index: int) -> torch.device:
        """Device the frozen block `index` is moved to when it leaves the window."""
        return self.homes[index].device

    def onload(self, index: int, block: nn.Module) -> None:
        """Make block `index` an ordinary in-memory module: load offloaded weights, remove accelerate hooks."""
        if self.dispatched:
            materialize(block, f"{self.prefix}.{index}")
        elif has_meta_tensors(block):
            raise ValueError(
                f"cbq_hf: decoder block {self.prefix}.{index} has weights on the meta device "
                f"({meta_tensor_names(block)[0]}) and no accelerate offload hook; calibration cannot read them. "
                f"{_OFFLOAD_HELP}"
            )

    def offload(self, index: int, block: nn.Module) -> None:
        """Attach an accelerate hook to the frozen block `index` (already on `home(index)`) so it runs on the
        execution device accelerate chose for it; no-op for a model without hooks."""
        h = self.homes[index]
        if h.execution_device is None:
            return
        remove_hook_from_module(block, recurse=True)
        if h.execution_device == h.device:
            hook: Any = AlignDevicesHook(
                execution_device=h.execution_device,
                io_same_device=h.io_same_device,
                place_submodules=True,
                skip_keys=h.skip_keys,
            )
        else:
            hook = OnloadHook(h.execution_device, h.device, io_same_device=h.io_same_device, skip_keys=h.skip_keys)
        add_hook_to_module(block, hook)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def finish(model: nn.Module, plan: OffloadPlan | None = None) -> None:
    """After calibration of a dispatched model: give every block that still lacks its hook one (blocks restored
    from a checkpoint), materialise offloaded modules outside the blocks on the CPU with a hook that runs them on
    their execution device, re-tie tied weights and replace "disk" by "cpu" in `hf_device_map`.

    Raises:
        ValueError: a meta tensor remains that no accelerate hook can load.
    """
    if not is_dispatched(model) and not has_meta_tensors(model):
        return
    if plan is not None:
        _hook_blocks(model, plan)
    for name, module in list(model.named_modules()):
        own = list(module.parameters(recurse=False)) + [b for b in module.buffers(recurse=False) if b is not None]
        if any(t.device.type == "meta" for t in own):
            _materialize_on_cpu(module, name or "model")
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        try:
            tie()
        except TypeError:  # pragma: no cover - signature differs across transformers versions
            logger.debug("tie_weights() signature not supported; tied weights left as loaded")
    dmap = getattr(model, "hf_device_map", None)
    if isinstance(dmap, dict):
        model.hf_device_map = {k: ("cpu" if v == "disk" else v) for k, v in dmap.items()}
    missing = meta_tensor_names(model)
    if missing:
        raise ValueError(
            f"cbq_hf: {missing[0]} is still on the meta device after calibration; refusing to leave "
            f"a model that would save placeholder weights. {_OFFLOAD_HELP}"
        )


def _hook_blocks(model: nn.Module, plan: OffloadPlan) -> None:
    """Give every in-memory decoder block without an accelerate hook the hook of its home (`plan`)."""
    blocks = model.get_submodule(plan.prefix)  # blocks hold CBQLinear now: not found by find_decoder_blocks
    for i, block in enumerate(blocks):
        h = plan.homes[i]
        if h.execution_device is not None and not hasattr(block, "_hf_hook") and not has_meta_tensors(block):
            dev = _real_device(block)
            if dev is None or not _same_device(dev, h.device):
                block.to(h.device)
            plan.offload(i, block)


def _materialize_on_cpu(module: nn.Module, name: str) -> None:
    """Load the offloaded tensors `module` owns onto the CPU and hook it to run on its execution device."""
    hooks = _align_hooks(module)
    exec_dev = torch.device("cpu")
    if hooks and hooks[0].execution_device is not None:
        exec_dev = torch.device(hooks[0].execution_device)
    io_same = bool(hooks and hooks[0].io_same_device)
    skip = hooks[0].skip_keys if hooks else None
    _materialize_own(module, name)  # only its own tensors: children were handled on their own
    remove_hook_from_module(module)
    if exec_dev.type == "cpu":
        hook: Any = AlignDevicesHook(execution_device=exec_dev, io_same_device=io_same, skip_keys=skip)
    else:
        hook = OnloadHook(exec_dev, torch.device("cpu"), io_same_device=io_same, skip_keys=skip)
    add_hook_to_module(module, hook)
    logger.info("materialised offloaded module %s on the CPU (runs on %s)", name, exec_dev)


@torch.no_grad()
def _materialize_own(module: nn.Module, name: str) -> None:
    """Load the meta tensors owned directly by `module` from its hook's weights map onto the CPU."""
    own = list(module.named_parameters(recurse=False)) + [
        (n, b) for n, b in module.named_buffers(recurse=False) if b is not None
    ]
    for hook in _align_hooks(module):
        wmap = getattr(hook, "weights_map", None)
        if wmap is None:
            continue
        for tname, t in own:
            if t.device.type == "meta" and tname in wmap:
                set_module_tensor_to_device(module, tname, "cpu", value=wmap[tname].to(t.dtype))
    missing = [
        n
        for n, t in list(module.named_parameters(recurse=False))
        + [(n, b) for n, b in module.named_buffers(recurse=False) if b is not None]
        if t.device.type == "meta"
    ]
    if missing:
        raise ValueError(
            f"cbq_hf: {name}.{missing[0]} is on the meta device with no accelerate offload hook to "
            f"load it from. {_OFFLOAD_HELP}"
        )
