"""Storage formats of quantized linears, registered by name (see `registry`)."""

from . import lobcq, uniform  # noqa: F401  (importing a format module registers it)
from .registry import QuantFormat, format_class, get_format, register_format, registered_formats

__all__ = ["QuantFormat", "format_class", "get_format", "register_format", "registered_formats"]
