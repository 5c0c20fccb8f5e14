"""cbq_hf: CBQ (Cross-Block Quantization) for Hugging Face Transformers.

``import cbq_hf`` registers the "cbq" quantization method with transformers, after which
``from_pretrained(..., quantization_config=CBQConfig(...))`` quantizes a model and ``from_pretrained(path)``
loads a saved cbq checkpoint.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .config import FORMAT_VERSION, CBQConfig
from .nn.linear import CBQLinear
from .quantizer import CBQHfQuantizer
from .registration import register

register()

__all__ = ["CBQConfig", "CBQHfQuantizer", "CBQLinear", "FORMAT_VERSION", "register", "__version__"]
