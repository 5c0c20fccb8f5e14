"""Registration of the "cbq" method with transformers; idempotent across double import and `importlib.reload`."""

from __future__ import annotations

from transformers.quantizers import auto as _auto

METHOD = "cbq"


def register() -> None:
    """Map "cbq" to the current `CBQConfig` / `CBQHfQuantizer` classes (replacing stale ones after a reload)."""
    from .config import CBQConfig
    from .quantizer import CBQHfQuantizer

    # transformers' decorators refuse a second registration, so a reload updates the mapping directly.
    if _auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(METHOD) is None:
        _auto.register_quantization_config(METHOD)(CBQConfig)
    else:
        _auto.AUTO_QUANTIZATION_CONFIG_MAPPING[METHOD] = CBQConfig
    if _auto.AUTO_QUANTIZER_MAPPING.get(METHOD) is None:
        _auto.register_quantizer(METHOD)(CBQHfQuantizer)
    else:
        _auto.AUTO_QUANTIZER_MAPPING[METHOD] = CBQHfQuantizer
