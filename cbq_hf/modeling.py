"""Generic model surgery: find the decoder blocks, their linears and experts, and swap them for quantized modules.

Nothing here is specific to one architecture: decoder blocks are the longest `nn.ModuleList` whose children all
have the same class and contain linears; a new architecture needs no entry unless it breaks that rule. Inside a
block, three kinds of module are quantized:

- `nn.Linear`, and transformers' `Conv1D` (GPT-2 family; weight stored transposed, [in, out]) -> `CBQLinear`;
- fused experts (3-D ``gate_up_proj``/``down_proj`` parameters, `nn.experts.is_fused_experts`) -> `CBQExperts`;
- per-expert `nn.Linear` in a `ModuleList` are ordinary linears.

The router of a MoE block stays in float (a linear named ``gate``, ``router`` or ``shared_expert_gate`` in a block that
holds experts; most families keep it as a bare parameter, which is never converted anyway).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .formats.registry import QuantFormat
from .nn.experts import CBQExperts, is_fused_experts
from .nn.linear import CBQLinear

#: Modules never converted, whatever the config says (they are not inside decoder blocks anyway).
ALWAYS_SKIP = ("lm_head",)
#: Module types that `quantizable_linears` lists (float or already quantized).
LINEAR_TYPES = (nn.Linear, Conv1D, CBQLinear)
#: Name components of MoE routers (kept in float).
ROUTER_NAMES = frozenset({"gate", "router", "shared_expert_gate"})


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
        if len(classes) != 1 or not any(_is_weight_module(m) for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise NoDecoderBlocksError(
            f"{type(model).__name__} has no recognisable decoder blocks (an nn.ModuleList of identical blocks that "
            f"contain nn.Linear or Conv1D layers or fused experts); cbq_hf quantizes decoder-only transformer "
            f"language models (docs/architectures.md lists the families it is tested on)."
        )
    return best[1], best[2]


def _is_weight_module(m: nn.Module) -> bool:
    return isinstance(m, (*LINEAR_TYPES, CBQExperts)) or is_fused_experts(m)


def is_skipped(name: str, modules_to_not_convert: list[str] | None) -> bool:
    """True if module `name` matches an entry exactly or as a dotted suffix/prefix component path."""
    skip = list(ALWAYS_SKIP) + list(modules_to_not_convert or [])
    for s in skip:
        if name == s or name.endswith("." + s) or name.startswith(s + ".") or ("." + s + ".") in ("." + name + "."):
            return True
    return False


def _is_experts(m: nn.Module) -> bool:
    """Fused float experts, `CBQExperts`, or calibration's `UnfusedExperts` (marked `is_unfused_experts`)."""
    return isinstance(m, CBQExperts) or is_fused_experts(m) or getattr(m, "is_unfused_experts", False)


def _block_members(block: nn.Module) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """(linears, experts) of one block by relative name: linears outside fused experts and not routers."""
    experts = {n: m for n, m in block.named_modules() if _is_experts(m)}
    linears = {}
    for n, m in block.named_modules():
        if not isinstance(m, LINEAR_TYPES) or any(n.startswith(e + ".") for e in experts):
            continue
        if experts and ROUTER_NAMES.intersection(n.split(".")):
            continue
        linears[n] = m
    return linears, experts


def quantizable_linears(model: nn.Module, modules_to_not_convert: list[str] | None = None) -> dict[str, nn.Module]:
    """Full names -> linear modules (`nn.Linear`, `Conv1D`) inside the decoder blocks that will be quantized (in
    model order). MoE routers and the matrices inside fused experts are not listed (see `quantizable_experts`).

    Includes already converted `CBQLinear` modules, so the same list describes a float and a quantized model.
    """
    prefix, blocks = find_decoder_blocks(model)
    out: dict[str, nn.Module] = {}
    for i, block in enumerate(blocks):
        for sub, mod in _block_members(block)[0].items():
            full = f"{prefix}.{i}.{sub}"
            if not is_skipped(full, modules_to_not_convert):
                out[full] = mod
    return out


def quantizable_experts(model: nn.Module, modules_to_not_convert: list[str] | None = None) -> dict[str, nn.Module]:
    """Full names -> fused experts modules inside the decoder blocks that will be quantized (float ones and
    already converted `CBQExperts`), in model order."""
    prefix, blocks = find_decoder_blocks(model)
    out: dict[str, nn.Module] = {}
    for i, block in enumerate(blocks):
        for sub, mod in _block_members(block)[1].items():
            full = f"{prefix}.{i}.{sub}"
            if not is_skipped(full, modules_to_not_convert):
                out[full] = mod
    return out


def linear_shape(linear: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an `nn.Linear`, `Conv1D` or `CBQLinear`."""
    if isinstance(linear, Conv1D):
        return linear.nf, linear.nx
    return linear.out_features, linear.in_features


def linear_weight(linear: nn.Module) -> torch.Tensor:
    """The float weight of an `nn.Linear` or `Conv1D` as [out_features, in_features] (a view, not a copy)."""
    return linear.weight.t() if isinstance(linear, Conv1D) else linear.weight


def conv1d_to_linear(model: nn.Module, names: list[str]) -> None:
    """Replace the `Conv1D` modules among `names` by equivalent `nn.Linear` modules (weight transposed), in place, so
    that calibration sees only [out, in] weights."""
    for name in names:
        mod = model.get_submodule(name)
        if not isinstance(mod, Conv1D):
            continue
        if mod.weight.device.type == "meta":
            raise ValueError(
                f"cbq_hf: {name} (Conv1D) is offloaded (its weight is on the meta device); calibrating GPT-2 style "
                f"models with an offloading device_map is not supported. Load the model without offloading."
            )
        lin = nn.Linear(mod.nx, mod.nf, bias=mod.bias is not None, device=mod.weight.device, dtype=mod.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(mod.weight.t())
            if mod.bias is not None:
                lin.bias.copy_(mod.bias)
        set_module(model, name, lin)


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Relative names -> `nn.Linear` of one block (routers and matrices inside fused experts excluded)."""
    return {n: m for n, m in _block_members(block)[0].items() if isinstance(m, nn.Linear)}


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
    """A `CBQLinear` with the shape of `linear` (`nn.Linear` or `Conv1D`) and zero buffers (filled later by
    `load_packed` or a checkpoint). It rotates its input online (`input_hadamard`) where `linear` does (a float linear
    or stand-in marked `online_hadamard` by `cbq_hf.rotation`, or a `CBQLinear` with the buffer)."""
    out_features, in_features = linear_shape(linear)
    fmt.check_shape(out_features, in_features, name)
    bias = getattr(linear, "bias", None)
    dtype = bias.dtype if bias is not None and bias.dtype.is_floating_point else None
    return CBQLinear(
        in_features,
        out_features,
        bias is not None,
        fmt,
        dtype=dtype,
        device=device,
        has_input_scale=has_input_scale,
        input_hadamard=bool(
            getattr(linear, "online_hadamard", False) or getattr(linear, "input_hadamard", None) is not None
        ),
    )


def empty_cbq_experts(
    experts: nn.Module, fmt: QuantFormat, device: torch.device | str | None = None, name: str = "experts"
) -> CBQExperts:
    """A `CBQExperts` with the layout of the float fused `experts` and zero buffers (filled by `load_rtn` or a
    checkpoint). Experts never carry a smoothing `input_scale`: calibration never smooths them (calibration/moe.py)."""
    try:
        return CBQExperts.like(experts, fmt, device=device, name=name)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from e


def add_init_stub(q: CBQLinear) -> None:
    """Give `q` a `weight` attribute that transformers' weight initialisation skips (an empty meta tensor marked
    `_is_hf_initialized`). Some families' `_init_weights` reach into a submodule's weight by name (GPT-2:
    ``init.normal_(module.c_proj.weight)``), which a `CBQLinear` does not have. The stub is a plain attribute (not
    saved, not moved) and `remove_init_stubs` takes it away once loading has finished."""
    stub = torch.empty(0, device="meta")
    stub._is_hf_initialized = True
    q.__dict__["weight"] = stub


def remove_init_stubs(model: nn.Module) -> None:
    """Undo `add_init_stub` on every `CBQLinear` of `model`."""
    for m in model.modules():
        if isinstance(m, CBQLinear):
            m.__dict__.pop("weight", None)
