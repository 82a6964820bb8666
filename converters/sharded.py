"""Pre-sharded checkpoints: one safetensors file per (tp, pp) rank, in our parameter names, plus a manifest.

Written by `python -m energon_hf.convert`; `EnergonModel.from_pretrained(folder)` loads each rank's file
directly, so a rank reads exactly its own bytes and nothing is re-sliced at load time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from torch import nn

from energon_hf.errors import CheckpointError
from energon_hf.nn.formats import FormatPlan

from .loader import finish_loading

MANIFEST = "energon_manifest.json"
FORMAT = "energon_hf-sharded"


def rank_file(rank: int) -> str:
    return f"rank-{rank:03d}.safetensors"


def write_manifest(folder: Path, tp: int, pp: int, dtype: torch.dtype, architecture: str, source: str) -> None:
    manifest = {"format": FORMAT, "version": 1, "tp": tp, "pp": pp, "dtype": str(dtype).removeprefix("torch."),
                "architecture": architecture, "source": source,
                "ranks": {str(rank): rank_file(rank) for rank in range(tp * pp)}}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(folder: Path) -> dict | None:
    """The manifest of a pre-sharded folder, or None for an ordinary HF checkpoint."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format is {manifest.get('format')!r}, not {FORMAT!r}")
        manifest["tp"], manifest["pp"] = int(manifest["tp"]), int(manifest["pp"])
        return manifest
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a valid energon_hf manifest: {e}") from e


def save_rank(model: nn.Module, folder: Path, rank: int) -> None:
    """This rank's loaded parameters (meta ones belong to other pipeline stages)."""
    from safetensors.torch import save_file

    tensors = {name: p.detach().contiguous() for name, p in model.named_parameters() if not p.is_meta}
    save_file(tensors, str(folder / rank_file(rank)), metadata={"format": "pt", "rank": str(rank)})


def load_rank(model: nn.Module, folder: Path, manifest: dict, rank: int, dtype: torch.dtype,
              device: torch.device, wanted=None, plan: FormatPlan | None = None) -> None:
    path = folder / manifest["ranks"][str(rank)]
    if not path.is_file():
        raise CheckpointError(f"{path} (rank {rank} of the sharded checkpoint) is missing")
    params = dict(model.named_parameters())
    expected = {name for name in params if wanted is None or wanted(name)}
    with safe_open(str(path), framework="pt", device="cpu") as shard:
        names = set(shard.keys())
        if names != expected:
            raise CheckpointError(f"{path} does not hold rank {rank}'s parameters (differs in "
                                  f"{sorted(names ^ expected)[:5]}); was the folder converted for another model?")
        for name in sorted(names):
            tensor = shard.get_tensor(name)
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise CheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects "
                                      f"{tuple(params[name].shape)}")
            set_module_tensor_to_device(model, name, device, value=tensor, dtype=dtype)
            finish_loading(model, name, plan)
