"""GGUF -> an HF safetensors folder, converted once through transformers' GGUF reader and cached.

The cache folder (default ~/.cache/energon_hf, or $ENERGON_HF_CACHE) holds config.json,
model.safetensors (dequantized), the tokenizer and the generation config; later loads reuse it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from energon_hf.errors import CheckpointError, UnsupportedModelError

# GGUF `general.architecture` -> the HF model_type we implement for it.
GGUF_ARCHITECTURES = {"llama": "llama", "gpt2": "gpt2", "bert": "bert"}


def cache_root() -> Path:
    return Path(os.environ.get("ENERGON_HF_CACHE", "~/.cache/energon_hf")).expanduser()


def gguf_architecture(path: Path) -> str:
    """Read `general.architecture` from the GGUF header (no tensor is read)."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except (KeyError, IndexError, ValueError, OSError) as e:
        raise CheckpointError(f"cannot read the architecture of GGUF file {path}: {e}") from e


def _cache_folder(path: Path) -> Path:
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / f"{path.stem}-{key}"


def convert_gguf(path: str | os.PathLike) -> Path:
    """The cached HF folder for a .gguf file, converting it on first use."""
    path = Path(path)
    folder = _cache_folder(path)
    if (folder / "config.json").is_file():
        return folder
    arch = gguf_architecture(path)
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} in {path.name} is not supported; supported: {', '.join(GGUF_ARCHITECTURES)}"
        )
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # The weights are dequantized: the saved folder is a plain float checkpoint (transformers refuses to
    # save_pretrained a GGUF-loaded model, so the pieces are written one by one).
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = {name: t.contiguous() for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".converting-"))
    try:
        save_file(state, staging / "model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(folder)  # atomic: a half-written folder is never mistaken for a finished one
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (folder / "config.json").is_file():  # not a concurrent conversion that won the race
            raise
    return folder
