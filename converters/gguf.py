"""GGUF -> an HF safetensors folder, converted once through transformers' GGUF reader and cached.

The cache folder (default ~/.cache/energon_hf, or $ENERGON_HF_CACHE) holds config.json,
model.safetensors (dequantized), the tokenizer, the generation config, and gguf_blocks.json: which
checkpoint tensors the .gguf holds as 4-bit or 8-bit blocks, which `quantization="int4"` (Q4_0, Q4_1) and
`"int8"` (Q8_0) load as they are (`gguf_blocks.py`). Later loads reuse the folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from energon_hf.errors import CheckpointError, UnsupportedModelError

from .gguf_blocks import block_map, write_block_map

if TYPE_CHECKING:
    from gguf import GGUFReader


def gguf_architectures() -> tuple[str, ...]:
    """The GGUF `general.architecture` names we load: those that transformers' GGUF reader reads and that name a
    model_type of ours (llama.cpp's names are transformers' model types; Mistral files say "llama")."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    from energon_hf.models import SUPPORTED_MODEL_TYPES

    return tuple(arch for arch in SUPPORTED_MODEL_TYPES if arch in GGUF_CONFIG_MAPPING)

# Part of the cache key: a folder written by an older layout is converted again (2: gguf_blocks.json, 3: with
# the Q8_0 tensors).
CACHE_VERSION = 3


def cache_root() -> Path:
    return Path(os.environ.get("ENERGON_HF_CACHE", "~/.cache/energon_hf")).expanduser()


def open_gguf(path: Path) -> GGUFReader:
    """The file's header and tensor index (tensors are memory-mapped, read when touched)."""
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"cannot read GGUF file {path}: {e}") from e


def gguf_architecture(reader: GGUFReader) -> str:
    """`general.architecture` from the GGUF header."""
    try:
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except (KeyError, IndexError, ValueError) as e:
        raise CheckpointError(f"cannot read the architecture of GGUF file {reader.data.filename}: {e}") from e


def _cache_folder(path: Path) -> Path:
    stat = path.stat()
    source = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{CACHE_VERSION}"
    key = hashlib.sha256(source.encode()).hexdigest()[:16]
    return cache_root() / f"{path.stem}-{key}"


def convert_gguf(path: str | os.PathLike) -> Path:
    """The cached HF folder for a .gguf file, converting it on first use."""
    path = Path(path)
    folder = _cache_folder(path)
    if (folder / "config.json").is_file():
        return folder
    reader = open_gguf(path)
    arch = gguf_architecture(reader)
    if arch not in gguf_architectures():
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} in {path.name} is not supported; supported: {', '.join(gguf_architectures())}"
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
        heads = (config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads))
        write_block_map(staging, path, block_map(reader, state, heads))
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
