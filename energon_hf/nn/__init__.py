"""Building blocks shared by the models."""

from .attention import attend
from .linear import Linear
from .parallel import Linear1D_Col, Linear1D_Row, VocabParallelEmbedding

__all__ = ["Linear", "Linear1D_Col", "Linear1D_Row", "VocabParallelEmbedding", "attend"]
