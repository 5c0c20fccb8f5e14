"""Round-to-nearest calibration: min-max grid per group, no data. The baseline every method is compared with."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..formats.registry import QuantFormat
from ..modeling import empty_cbq_linear, find_decoder_blocks, quantizable_linears, set_module
from .offload import OffloadPlan, finish


@torch.no_grad()
def quantize_rtn(
    model: nn.Module, fmt: QuantFormat, modules_to_not_convert: list[str] | None = None, progress: bool = True
) -> list[str]:
    """Replace every quantizable decoder linear of `model` by an RTN-packed `CBQLinear`, in place, one decoder block
    at a time: with an accelerate device map the block's offloaded weights are loaded, converted and put back where
    accelerate runs them (`offload.OffloadPlan`); without one nothing moves.

    Returns the names of the converted modules.
    """
    prefix, blocks = find_decoder_blocks(model)
    names = list(quantizable_linears(model, modules_to_not_convert))
    plan = OffloadPlan(model, prefix, blocks)
    done: list[str] = []
    for i in tqdm(range(len(blocks)), desc="RTN packing", disable=not progress, unit="block"):
        block, block_prefix = blocks[i], f"{prefix}.{i}."
        plan.onload(i, block)
        for full in (n for n in names if n.startswith(block_prefix)):
            rel = full[len(block_prefix) :]
            lin = block.get_submodule(rel)
            q = empty_cbq_linear(lin, fmt, has_input_scale=False, device=lin.weight.device, name=full)
            q.load_packed(fmt.quantize_rtn(lin.weight.data), bias=lin.bias)
            set_module(block, rel, q)
            done.append(full)
        block.to(plan.home(i))
        plan.offload(i, block)
    finish(model, plan)
    return done
