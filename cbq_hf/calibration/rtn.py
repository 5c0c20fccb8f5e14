"""Round-to-nearest calibration: min-max grid per group, no data. The baseline every method is compared with."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..formats.registry import QuantFormat
from ..modeling import empty_cbq_linear, quantizable_linears, set_module


@torch.no_grad()
def quantize_rtn(model: nn.Module, fmt: QuantFormat, modules_to_not_convert: list[str] | None = None,
                 progress: bool = True) -> list[str]:
    """Replace every quantizable decoder linear of `model` by an RTN-packed `CBQLinear`, in place.

    Returns the names of the converted modules.
    """
    linears = quantizable_linears(model, modules_to_not_convert)
    for name, lin in tqdm(linears.items(), desc="RTN packing", disable=not progress, unit="linear"):
        q = empty_cbq_linear(lin, fmt, has_input_scale=False, device=lin.weight.device, name=name)
        q.load_packed(fmt.quantize_rtn(lin.weight.data), bias=lin.bias)
        set_module(model, name, q)
    return list(linears)
