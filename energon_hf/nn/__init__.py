"""Building blocks shared by the models."""

from .attention import attend
from .linear import Linear

__all__ = ["Linear", "attend"]
