from .linear import CBQLinear

__all__ = ["CBQLinear"]
