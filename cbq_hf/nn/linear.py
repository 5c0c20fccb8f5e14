"""`CBQLinear`: the inference module that replaces an `nn.Linear` after quantization.

It holds only what is saved: the format's packed buffers, an optional bias, an optional per-input-channel
scale (CFP smoothing that could not be folded into a preceding op) and an optional `input_hadamard` flag (the
online Hadamard rotation of the input, `CBQConfig(rotation="hadamard")`, see `cbq_hf.rotation`). It has no
training state; calibration works on float weights elsewhere and packs its result into this module (quantize /
freeze split).
"""

from __future__ import annotations

import torch
from torch import nn

from ..formats.registry import QuantFormat
from ..kernels import dispatch
from ..rotation import hadamard_transform


class CBQLinear(nn.Module):
    """Quantized linear layer: y = Q_act(x' / input_scale) @ W_hat.T + bias, x' = x @ H (the orthonormal Hadamard
    matrix of size K, `cbq_hf.rotation.hadamard_transform`) with `input_hadamard`, else x.

    Args:
        in_features: input size K.
        out_features: output size N.
        bias: whether the layer has a bias (kept in float).
        fmt: the storage format (decides the packed buffers and the activation quantizer).
        dtype: dtype of the bias and of the computation's output when the input has no float dtype.
        device: where buffers are allocated ("meta" when transformers builds the model before loading).
        has_input_scale: allocate the per-input-channel smoothing scale `input_scale` [K].
        input_hadamard: rotate the input by the Hadamard matrix of size K before anything else; recorded as the
            int32 buffer `input_hadamard` = [K], saved with the checkpoint.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        fmt: QuantFormat,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        has_input_scale: bool = False,
        input_hadamard: bool = False,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.fmt = fmt
        for name, (shape, buf_dtype) in fmt.buffer_specs(out_features, in_features).items():
            self.register_buffer(name, torch.zeros(shape, dtype=buf_dtype, device=device))
        if has_input_scale:
            self.register_buffer("input_scale", torch.ones(in_features, dtype=torch.float32, device=device))
        else:
            self.input_scale = None
        if input_hadamard:
            self.register_buffer("input_hadamard", torch.tensor([in_features], dtype=torch.int32, device=device))
        else:
            self.input_hadamard = None
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(out_features, dtype=dtype or torch.float32, device=device), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)
        #: Name of the kernel path that ran in the last forward (see `cbq_hf.kernels.dispatch`).
        self.last_kernel: str | None = None
        #: Kernel-private state (repacked weights, workspaces); never saved.
        self._kernel_cache: dict = {}

    # The format's buffers, by name, as a plain dict (what kernels and the reference read).
    def packed_buffers(self) -> dict[str, torch.Tensor]:
        names = self.fmt.buffer_specs(self.out_features, self.in_features)
        return {n: getattr(self, n) for n in names}

    def load_packed(
        self,
        buffers: dict[str, torch.Tensor],
        bias: torch.Tensor | None = None,
        input_scale: torch.Tensor | None = None,
    ) -> None:
        """Copy packed buffers (as produced by the format) into this module, checking names, shapes and dtypes."""
        expected = self.fmt.buffer_specs(self.out_features, self.in_features)
        if set(buffers) != set(expected):
            raise ValueError(f"packed buffers {sorted(buffers)} do not match the format's {sorted(expected)}")
        for name, (shape, dtype) in expected.items():
            t = buffers[name]
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"buffer {name}: got {tuple(t.shape)} {t.dtype}, expected {tuple(shape)} {dtype}")
            setattr(self, name, t.detach().clone().contiguous())
        if bias is not None:
            if self.bias is None:
                raise ValueError("this CBQLinear was built without a bias")
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        if input_scale is not None:
            if self.input_scale is None:
                raise ValueError("this CBQLinear was built without an input_scale")
            self.input_scale = input_scale.detach().float().clone()
        self._kernel_cache.clear()

    def _apply(self, fn, recurse=True):  # moving or casting invalidates repacked kernel state
        self._kernel_cache = {}
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):  # load_state_dict copies in place: drop repacked state too
        self._kernel_cache.clear()
        return super()._load_from_state_dict(*args, **kwargs)

    def dequantized_weight(self) -> torch.Tensor:
        """Float32 [out_features, in_features] weight exactly as the packed buffers encode it."""
        return self.fmt.dequantize(self.packed_buffers(), self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_hadamard is not None:  # before dispatch: the reference and every kernel see the rotated x
            x = hadamard_transform(x)
        return dispatch.linear(self, x)

    def extra_repr(self) -> str:
        act = f", act_bits={self.fmt.act_bits}" if self.fmt.act_bits else ""
        act += ", input_hadamard=True" if self.input_hadamard is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"format={self.fmt.name}{act}"
        )
