"""energon_hf: a Hugging Face-compatible, padding-free, parallel inference layer."""

from .engine.launch import launch
from .errors import CheckpointError, EngineDeadError, ModelNotFoundError, UnsupportedModelError
from .modeling import EnergonModel
from .nn.parallel import Linear1D_Col, Linear1D_Row, VocabParallelEmbedding
from .pipelines import pipeline

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "EnergonModel",
    "EngineDeadError",
    "Linear1D_Col",
    "Linear1D_Row",
    "ModelNotFoundError",
    "UnsupportedModelError",
    "VocabParallelEmbedding",
    "__version__",
    "launch",
    "pipeline",
]
