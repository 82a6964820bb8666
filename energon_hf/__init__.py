"""energon_hf: a Hugging Face-compatible, padding-free, parallel inference layer."""

from .errors import CheckpointError, ModelNotFoundError, UnsupportedModelError
from .modeling import EnergonModel

__version__ = "0.1.0"

__all__ = ["CheckpointError", "EnergonModel", "ModelNotFoundError", "UnsupportedModelError", "__version__"]
