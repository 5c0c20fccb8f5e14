"""Round-to-nearest calibration: min-max grid per group, no data. The baseline every method is compared with."""

from __future__ import annotations

import torch
from torch import nn

from ..formats.registry import QuantFormat
from ..modeling import (
    empty_cbq_experts,
    empty_cbq_linear,
    find_decoder_blocks,
    linear_weight,
    quantizable_experts,
    quantizable_linears,
    set_module,
)
from ..nn.experts import CBQExperts
from ..nn.linear import CBQLinear
from .pipeline import walk_blocks


@torch.no_grad()
def quantize_rtn(
    model: nn.Module,
    fmt: QuantFormat,
    modules_to_not_convert: list[str] | None = None,
    progress: bool = True,
) -> list[str]:
    """Replace every quantizable decoder linear (`nn.Linear`, `Conv1D`) of `model` by an RTN-packed `CBQLinear` and
    every fused experts module by an RTN-packed `CBQExperts`, in place, one decoder block at a time: with an
    accelerate device map the block's offloaded weights are loaded, converted and put back where accelerate runs
    them (`offload.OffloadPlan`); without one nothing moves.

    Returns the names of the converted modules.
    """
    prefix, _ = find_decoder_blocks(model)
    names = list(quantizable_linears(model, modules_to_not_convert))
    expert_names = list(quantizable_experts(model, modules_to_not_convert))
    done: list[str] = []

    def convert(i: int, block: nn.Module) -> None:
        block_prefix = f"{prefix}.{i}."
        for full in (n for n in names if n.startswith(block_prefix)):
            rel = full[len(block_prefix) :]
            lin = block.get_submodule(rel)
            if isinstance(lin, CBQLinear):
                continue
            q = empty_cbq_linear(lin, fmt, has_input_scale=False, device=lin.weight.device, name=full)
            q.load_packed(fmt.quantize_rtn(linear_weight(lin).detach()), bias=lin.bias)
            set_module(block, rel, q)
            done.append(full)
        for full in (n for n in expert_names if n.startswith(block_prefix)):
            rel = full[len(block_prefix) :]
            experts = block.get_submodule(rel)
            if isinstance(experts, CBQExperts):
                continue
            q = empty_cbq_experts(experts, fmt, device=next(experts.parameters()).device, name=full)
            q.load_rtn(experts)
            set_module(block, rel, q)
            done.append(full)

    walk_blocks(model, convert, progress, desc="RTN packing")
    return done
