"""Storage formats of quantized linears, registered by name (see `registry`)."""

from . import uniform  # noqa: F401  (registers "uniform")
from .registry import QuantFormat, get_format, register_format, registered_formats

try:  # LO-BCQ registers itself when its module is present.
    from . import lobcq  # noqa: F401
except ImportError as _e:  # pragma: no cover - only while the module does not exist
    if "lobcq" not in str(_e):
        raise

__all__ = ["QuantFormat", "get_format", "register_format", "registered_formats"]
