"""Optional weight-only quantization of the output head (`lm_head`), `CBQConfig(lm_head_bits=8 | 4)`.

The head is not a decoder block, so it is outside CBQ's windows; it is quantized round-to-nearest (asymmetric
min-max, groups of `LM_HEAD_GROUP` input channels) after calibration. It is worth doing for decode speed: on small
models the vocabulary projection is a large share of the weights read per token (SmolLM2-135M: 28 M of 135 M
parameters). Models that tie the head to the input embedding are untied: the embedding stays in full precision
(it is a lookup, not a GEMV), the head gets its own packed weights, and the config says `tie_word_embeddings=False`
so the saved checkpoint reloads untied.
"""

from __future__ import annotations

import torch
from torch import nn

from .formats.uniform import UniformFormat
from .modeling import empty_cbq_linear, set_module
from .nn.linear import CBQLinear

#: Input channels per scale/zero of the quantized head (-1, one group per row, when the hidden size is smaller).
LM_HEAD_GROUP = 128


def lm_head_format(bits: int, in_features: int) -> UniformFormat:
    """The storage format of a quantized head with `in_features` inputs (weight-only, asymmetric)."""
    return UniformFormat(bits, LM_HEAD_GROUP if in_features >= LM_HEAD_GROUP else -1, False, None)


def output_head(model: nn.Module) -> tuple[str, nn.Module]:
    """Name and module of the model's output projection (`get_output_embeddings()`); clear error if it has none."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        for name, module in model.named_modules():
            if module is head:
                return name, head
    raise ValueError(
        f"CBQConfig(lm_head_bits=...): {type(model).__name__} has no output projection "
        f"(get_output_embeddings() is None); leave lm_head_bits=None for this model."
    )


def _untie(model: nn.Module, head_name: str) -> None:
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        for key in [k for k in tied if k == head_name or k.startswith(head_name + ".")]:
            tied.pop(key)


@torch.no_grad()
def quantize_lm_head(model: nn.Module, bits: int) -> str:
    """Replace the output head by an RTN-packed `CBQLinear` with `bits`-bit weights (untied); returns its name."""
    name, head = output_head(model)
    if isinstance(head, CBQLinear):
        return name
    weight = head.weight
    if weight.device.type == "meta":
        raise ValueError(
            f"cbq_hf: cannot quantize {name}: its weight is on the meta device (offloaded); load the "
            f"model with the head in memory or leave lm_head_bits=None."
        )
    fmt = lm_head_format(bits, head.in_features)
    q = empty_cbq_linear(head, fmt, has_input_scale=False, device=weight.device, name=name)
    q.load_packed(
        fmt.quantize_rtn(weight.data.float()),
        bias=head.bias.data.float() if getattr(head, "bias", None) is not None else None,
    )
    _untie(model, name)
    set_module(model, name, q)
    return name


def empty_lm_head(model: nn.Module, bits: int) -> dict[str, tuple[int, ...]]:
    """Before loading a checkpoint saved with `lm_head_bits`: put an empty `CBQLinear` (meta) in the head's place
    and return the shapes of the tensors the checkpoint must hold for it (name -> shape)."""
    name, head = output_head(model)
    fmt = lm_head_format(bits, head.in_features)
    q = empty_cbq_linear(head, fmt, has_input_scale=False, device="meta", name=name)
    _untie(model, name)
    set_module(model, name, q)
    return {f"{name}.{buf}": shape for buf, (shape, _) in fmt.buffer_specs(q.out_features, q.in_features).items()}
