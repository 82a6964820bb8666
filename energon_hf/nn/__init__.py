"""Building blocks shared by the models."""

from .attention import attend

__all__ = ["attend"]
