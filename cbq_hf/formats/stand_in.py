"""What a format gives calibration: a trainable stand-in for one linear, and the options it is built with.

A stand-in replaces an `nn.Linear` while its calibration window trains. It computes the quantized linear of its
format (simulated in float, differentiable), exposes its trainable parameters in two groups (rounding, steps) and,
once trained, `freeze()` returns the packed buffers that `CBQLinear.load_packed` takes: the same dict, of the same
shapes, that `QuantFormat.buffer_specs` announces and `QuantFormat.quantize_rtn` returns. The calibration engine and
the checkpoint code only use this interface, so a new format plugs in without touching them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class StandInOptions:
    """How a stand-in is built (from the `CBQConfig` fields of the same names, plus per-linear facts).

    lora_rank: rank of the learned rounding factors. use_lora_rounding: learn rounding choices (else nearest).
    learn_weight_scales / learn_act_clipping: train the weight steps / the activation clipping ratio.
    input_scale: optional [K] smoothing divisor of the input (x / input_scale enters the matmul).
    channel_weight: optional [K] mean square of each input channel (weights the starting grid search).
    truncation: optional [N] per-row weight magnitude threshold (CFP), one more starting candidate.
    generator: random generator of the factor initialisation (determinism).
    """

    lora_rank: int = 5
    use_lora_rounding: bool = True
    learn_weight_scales: bool = True
    learn_act_clipping: bool = True
    input_scale: torch.Tensor | None = None
    channel_weight: torch.Tensor | None = None
    truncation: torch.Tensor | None = None
    generator: torch.Generator | None = None

    @classmethod
    def from_config(cls, config, **per_linear) -> StandInOptions:
        """Options from a `CBQConfig`'s calibration fields; `per_linear` sets input_scale, channel_weight, ..."""
        return cls(
            lora_rank=config.lora_rank,
            use_lora_rounding=config.use_lora_rounding,
            learn_weight_scales=config.learn_weight_scales,
            learn_act_clipping=config.learn_act_clipping,
            **per_linear,
        )


class QuantStandIn(nn.Module):
    """Base of every format's calibration stand-in.

    A subclass holds `in_features`, `out_features`, the float `bias` (or None) and `input_scale` (or None) as
    attributes, computes the quantized linear in `forward`, and implements `freeze`. A window's starting point is a
    `snapshot` of its trainable parameters, put back with `restore` when the window falls back.
    """

    in_features: int
    out_features: int
    #: Exponent of the rounding regulariser the training step will ask for after the next forward (set by the window
    #: loop before each step), so that a stand-in able to compute it in the same pass as its weight does; None:
    #: not known, `regularizer` computes it on its own.
    regularizer_beta: float | None = None

    def rounding_parameters(self) -> list[nn.Parameter]:
        """Parameters of the rounding choices (trained with `CBQConfig.lr`)."""
        return []

    def scale_parameters(self) -> list[nn.Parameter]:
        """Parameters of the steps and clipping ratios (trained with `CBQConfig.lr_scale`)."""
        rounding = {id(p) for p in self.rounding_parameters()}
        return [p for p in self.parameters() if id(p) not in rounding]

    def regularizer(self, beta: float) -> torch.Tensor:
        """Rounding regulariser at annealing exponent `beta` (zero for a stand-in without rounding choices)."""
        return torch.zeros(())

    def freeze(self) -> dict[str, torch.Tensor]:
        """Packed buffers (CPU tensors, by `buffer_specs` name) of the hard-rounded, trained quantized linear."""
        raise NotImplementedError

    @torch.no_grad()
    def snapshot(self) -> dict[str, torch.Tensor]:
        """Copies of every trainable parameter, by name."""
        return {k: v.detach().clone() for k, v in self.named_parameters()}

    @torch.no_grad()
    def restore(self, snap: dict[str, torch.Tensor]) -> None:
        """Put back the parameters of a `snapshot`, in place."""
        for k, p in self.named_parameters():
            p.copy_(snap[k])
