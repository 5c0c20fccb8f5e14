"""Registry of storage formats, keyed by the name used in `CBQConfig.format`.

A format knows the buffers a quantized linear holds, how to turn them back into a float weight (the reference
every kernel is checked against), how activations are quantized at run time, and which trainable stand-in CBQ
calibration trains in its place (`stand_in`). Adding a format is one module and one `@register_format` line.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn

from .stand_in import QuantStandIn, StandInOptions

_FORMATS: dict[str, type[QuantFormat]] = {}


class QuantFormat(ABC):
    """One way of storing a quantized linear. Instances carry the settings (bits, group size, ...)."""

    name: str = ""
    act_bits: int | None = None
    #: `CBQConfig` fields besides bits/group_size/sym/act_bits that decide the shapes of the saved buffers (checked
    #: against a checkpoint's metadata on load).
    layout_fields: tuple[str, ...] = ()
    #: Whether a quantized linear of this format applies a per-input-channel smoothing scale before its matmul.
    supports_input_scale: bool = True

    @classmethod
    @abstractmethod
    def from_config(cls, config) -> QuantFormat:
        """Build from a `CBQConfig`."""

    @abstractmethod
    def buffer_specs(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every buffer a linear of this size holds (what is saved)."""

    @abstractmethod
    def dequantize(self, buffers: dict[str, torch.Tensor], in_features: int) -> torch.Tensor:
        """Float32 weight [out_features, in_features] that the buffers encode."""

    @abstractmethod
    def quantize_activations(self, x: torch.Tensor, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run-time (simulated) activation quantization; identity for weight-only settings."""

    @abstractmethod
    def quantize_rtn(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Buffers of `weight` [N, K] quantized without calibration data (round to nearest)."""

    @abstractmethod
    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        """Stored bits per weight value, metadata included."""

    def stand_in(self, linear: nn.Module, options: StandInOptions) -> QuantStandIn:
        """The trainable calibration stand-in of `linear` [N, K] in this format (see `stand_in`). A format without
        one can still be used with method="rtn"."""
        raise NotImplementedError(
            f"format {self.name!r} has no trainable calibration stand-in; use method='rtn' with it, or give the "
            f"format a `stand_in` method."
        )

    def check_shape(self, out_features: int, in_features: int, name: str = "layer") -> None:
        """Raise a clear `ValueError` when a layer of this shape cannot be stored in this format (every shape fits
        unless a format says otherwise)."""
        return None


def register_format(name: str) -> Callable[[type[QuantFormat]], type[QuantFormat]]:
    """Class decorator: make a `QuantFormat` available as `CBQConfig(format=name)`. Re-registering the same
    class (module reload) is allowed; a different class under a taken name is an error."""

    def deco(cls: type[QuantFormat]) -> type[QuantFormat]:
        old = _FORMATS.get(name)
        if old is not None and old.__qualname__ != cls.__qualname__:
            raise ValueError(f"format {name!r} is already registered by {old.__qualname__}")
        cls.name = name
        _FORMATS[name] = cls
        return cls

    return deco


def format_class(name: str) -> type[QuantFormat]:
    """The registered format class called `name`."""
    try:
        return _FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; registered: {sorted(_FORMATS)}") from None


def get_format(config) -> QuantFormat:
    """The format instance described by a `CBQConfig`."""
    return format_class(config.format).from_config(config)


def registered_formats() -> list[str]:
    """Names of every registered format, sorted."""
    return sorted(_FORMATS)
