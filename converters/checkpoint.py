"""Read tensors from an HF checkpoint folder one at a time (safetensors, or pytorch_model.bin)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from energon_hf.errors import CheckpointError

SAFETENSORS_INDEX = "model.safetensors.index.json"
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
BIN_INDEX = "pytorch_model.bin.index.json"


def _index_files(folder: Path, index_name: str) -> list[Path]:
    try:
        weight_map = json.loads((folder / index_name).read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder / index_name} is not a valid index file: {e}") from e
    return [folder / name for name in sorted(set(weight_map.values()))]


def find_weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder: safetensors preferred, as transformers does."""
    if (folder / SAFETENSORS_INDEX).is_file():
        return _index_files(folder, SAFETENSORS_INDEX)
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    loose = sorted(folder.glob("*.safetensors"))
    if loose:
        return loose
    if (folder / BIN_INDEX).is_file():
        return _index_files(folder, BIN_INDEX)
    if (folder / "pytorch_model.bin").is_file():
        return [folder / "pytorch_model.bin"]
    raise CheckpointError(
        f"no weights in {folder}: expected model.safetensors, {SAFETENSORS_INDEX}, pytorch_model.bin or {BIN_INDEX}"
    )


class CheckpointReader:
    """Maps tensor names to the file holding them and reads each tensor only when asked."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._handles: dict[Path, object] = {}
        self._where: dict[str, Path] = {}
        for path in find_weight_files(self.folder):
            for name in self._open(path).keys():
                self._where[name] = path

    def _open(self, path: Path):
        if path in self._handles:
            return self._handles[path]
        if not path.is_file():
            raise CheckpointError(f"weight file {path} listed in the index does not exist")
        if path.suffix == ".safetensors":
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"corrupt or truncated safetensors file {path}: {e}") from e
        else:
            handle = self._load_bin(path)
        self._handles[path] = handle
        return handle

    @staticmethod
    def _load_bin(path: Path) -> dict[str, torch.Tensor]:
        # weights_only: a checkpoint never runs code. mmap keeps the file on disk, so tensors are
        # paged in one at a time as they are read.
        try:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)  # legacy, non-zip format
        except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as e:
            raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint: {e}") from e

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        handle = self._open(self._where[name])
        if isinstance(handle, dict):
            return tuple(handle[name].shape)
        return tuple(handle.get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        handle = self._open(self._where[name])
        if isinstance(handle, dict):
            return handle[name].dtype
        return _SAFETENSORS_DTYPES.get(handle.get_slice(name).get_dtype(), torch.float32)

    def read(self, name: str, dim: int, start: int, length: int) -> torch.Tensor:
        """Only `length` entries from `start` along `dim` of tensor `name` (safetensors reads just those bytes)."""
        path = self._where[name]
        handle = self._open(path)
        if isinstance(handle, dict):
            return handle[name].narrow(dim, start, length)
        index = (slice(None),) * dim + (slice(start, start + length),)
        try:
            return handle.get_slice(name)[index]
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read tensor {name!r} from {path}: {e}") from e

    def get(self, name: str) -> torch.Tensor:
        path = self._where[name]
        handle = self._open(path)
        if isinstance(handle, dict):
            return handle[name]
        try:
            return handle.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read tensor {name!r} from {path}: {e}") from e
