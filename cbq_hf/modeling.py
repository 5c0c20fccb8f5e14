"""Generic model surgery: find the decoder blocks, their linears, and swap linears for `CBQLinear`.

Nothing here is specific to one architecture: decoder blocks are the longest `nn.ModuleList` whose children all
have the same class and contain linears; a new architecture needs no entry unless it breaks that rule.
"""

from __future__ import annotations

import torch
from torch import nn

from .formats.registry import QuantFormat
from .nn.linear import CBQLinear

#: Modules never converted, whatever the config says (they are not inside decoder blocks anyway).
ALWAYS_SKIP = ("lm_head",)


class NoDecoderBlocksError(ValueError):
    pass


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Name and `nn.ModuleList` of the decoder blocks (e.g. ``model.layers`` for Llama).

    Raises `NoDecoderBlocksError` naming the model class when no list of identical blocks with linears exists.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(m) for m in module}
        if len(classes) != 1 or not any(isinstance(m, nn.Linear) for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise NoDecoderBlocksError(
            f"{type(model).__name__} has no recognisable decoder blocks (an nn.ModuleList of identical blocks that "
            f"contain nn.Linear layers); cbq_hf quantizes decoder-only transformer models such as Llama, Qwen2, "
            f"Mistral, OPT or GPT-2 style models."
        )
    return best[1], best[2]


def is_skipped(name: str, modules_to_not_convert: list[str] | None) -> bool:
    """True if module `name` matches an entry exactly or as a dotted suffix/prefix component path."""
    skip = list(ALWAYS_SKIP) + list(modules_to_not_convert or [])
    for s in skip:
        if name == s or name.endswith("." + s) or name.startswith(s + ".") or ("." + s + ".") in ("." + name + "."):
            return True
    return False


def quantizable_linears(model: nn.Module, modules_to_not_convert: list[str] | None = None) -> dict[str, nn.Module]:
    """Full names -> linear modules inside the decoder blocks that will be quantized (in model order).

    Includes already converted `CBQLinear` modules, so the same list describes a float and a quantized model.
    """
    prefix, blocks = find_decoder_blocks(model)
    out: dict[str, nn.Module] = {}
    for i, block in enumerate(blocks):
        for sub, mod in block.named_modules():
            if not isinstance(mod, (nn.Linear, CBQLinear)):
                continue
            full = f"{prefix}.{i}.{sub}"
            if not is_skipped(full, modules_to_not_convert):
                out[full] = mod
    return out


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Relative names -> `nn.Linear` of one block."""
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def empty_cbq_linear(
    linear: nn.Module,
    fmt: QuantFormat,
    has_input_scale: bool,
    device: torch.device | str | None = None,
    name: str = "layer",
) -> CBQLinear:
    """A `CBQLinear` with the shape of `linear` and zero buffers (filled later by `load_packed` or a checkpoint)."""
    fmt.check_shape(linear.out_features, linear.in_features, name)
    bias = getattr(linear, "bias", None)
    dtype = bias.dtype if bias is not None and bias.dtype.is_floating_point else None
    return CBQLinear(
        linear.in_features,
        linear.out_features,
        bias is not None,
        fmt,
        dtype=dtype,
        device=device,
        has_input_scale=has_input_scale,
    )
