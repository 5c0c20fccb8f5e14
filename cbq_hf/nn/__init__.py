from .experts import CBQExperts
from .linear import CBQLinear

__all__ = ["CBQExperts", "CBQLinear"]
