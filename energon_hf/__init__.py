"""energon_hf: a Hugging Face-compatible, padding-free, parallel inference layer.

The public names are imported on first use (PEP 562), so that `import energon_hf.<submodule>` costs only
that submodule: engine worker processes and CLIs then skip transformers' pipelines and modeling code,
which they never use.
"""

import importlib
from typing import TYPE_CHECKING

from .errors import CheckpointError, EngineDeadError, ModelNotFoundError, UnsupportedModelError

if TYPE_CHECKING:
    from .engine.launch import launch
    from .modeling import EnergonModel
    from .nn.parallel import Linear1D_Col, Linear1D_Row, VocabParallelEmbedding
    from .pipelines import pipeline
    from .sentence_transformer import SentenceTransformer

__version__ = "0.1.0"

# public name -> the submodule that defines it
_LAZY = {
    "EnergonModel": ".modeling",
    "Linear1D_Col": ".nn.parallel",
    "Linear1D_Row": ".nn.parallel",
    "VocabParallelEmbedding": ".nn.parallel",
    "launch": ".engine.launch",
    "pipeline": ".pipelines",
    "SentenceTransformer": ".sentence_transformer",
}

__all__ = [
    "CheckpointError",
    "EnergonModel",
    "EngineDeadError",
    "Linear1D_Col",
    "Linear1D_Row",
    "ModelNotFoundError",
    "SentenceTransformer",
    "UnsupportedModelError",
    "VocabParallelEmbedding",
    "__version__",
    "launch",
    "pipeline",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
