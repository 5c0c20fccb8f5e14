"""Pure PyTorch reference of `CBQLinear`: unpack, dequantize, matmul. Every fast kernel is tested against it."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def scale_input(input_scale: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """x divided by a module's per-input-channel smoothing scale (in float32, rounded back to x's dtype); every
    kernel path applies it through this function, so all of them see the same input."""
    if input_scale is not None:
        x = (x.float() / input_scale).to(x.dtype)
    return x


def prepare_input(module, x: torch.Tensor) -> torch.Tensor:
    """Apply the per-channel smoothing scale and the run-time activation quantization (simulated)."""
    return module.fmt.quantize_activations(scale_input(module.input_scale, x), module.packed_buffers())


def bind_prepare_input(module) -> Callable[[torch.Tensor], torch.Tensor]:
    """`prepare_input` of this module as a function of x alone (scale and buffers looked up once), for kernels that
    multiply float activations: with `act_bits` these are the simulated quantized ones."""
    scale, fmt = module.input_scale, module.fmt
    bufs = module.packed_buffers() if fmt.act_bits is not None else None

    def prep(x: torch.Tensor) -> torch.Tensor:
        x = scale_input(scale, x)
        return fmt.quantize_activations(x, bufs) if bufs is not None else x

    return prep


def linear(module, x: torch.Tensor) -> torch.Tensor:
    """y = Q_act(x / input_scale) @ W_hat.T + bias, computed in float32 and returned in x's dtype."""
    xq = prepare_input(module, x)
    w = module.dequantized_weight()
    bias = module.bias.float() if module.bias is not None else None
    return F.linear(xq.float(), w, bias).to(x.dtype)
