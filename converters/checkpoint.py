"""Read tensors from an HF checkpoint folder one at a time (safetensors, or pytorch_model.bin)."""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
import weakref
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from energon_hf.errors import CheckpointError

from .gguf_blocks import GGUFBlocks

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


class SafetensorsFile:
    """Tensors, or slices of them, read with positioned reads straight into their own memory instead of
    through a memory map: the file's pages never map into this process, so its resident memory is only
    what it keeps. (A mapped, strided slice touches nearly every page of the tensor: reading a quarter of
    gpt2-xl's columns that way left each tp=4 rank with 6.4 GB resident.)"""

    def __init__(self, path: Path):
        try:
            with safe_open(str(path), framework="pt", device="cpu"):  # validates header, offsets and size
                pass
            self.fd = os.open(path, os.O_RDONLY)
            (size,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
            header = json.loads(os.pread(self.fd, size, 8))
        except (SafetensorError, OSError, ValueError, struct.error) as e:
            raise CheckpointError(f"corrupt or truncated safetensors file {path}: {e}") from e
        weakref.finalize(self, os.close, self.fd)
        header.pop("__metadata__", None)
        self.path, self.base = path, 8 + size
        self.entries = {name: (_SAFETENSORS_DTYPES[e["dtype"]], tuple(e["shape"]), e["data_offsets"][0])
                        for name, e in header.items()}

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def _fill(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            got = os.preadv(self.fd, [view[done:done + (1 << 30)]], self.base + offset + done)
            if got <= 0:
                raise CheckpointError(f"{self.path} is truncated (reading at byte {self.base + offset + done})")
            done += got

    def read(self, name: str, dim: int, start: int, length: int, rows: range | None = None) -> torch.Tensor:
        """Entries start..start+length along `dim`; `rows` (dim >= 1) also limits dim 0."""
        dtype, shape, offset = self.entries[name]
        rows = rows if rows is not None and dim > 0 else range(shape[0] if dim > 0 else 1)
        lead = (len(rows), *shape[1:dim]) if dim > 0 else ()
        out = torch.empty(*lead, length, *shape[dim + 1:], dtype=dtype)
        if not out.numel():
            return out
        view = memoryview(out.view(torch.uint8).numpy()).cast("B")
        esize = out.element_size()
        outer = math.prod(shape[:dim])
        stride = math.prod(shape[dim:]) * esize  # bytes between consecutive outer rows
        per_row = outer // shape[0] if dim > 0 else 1  # outer rows per dim-0 row
        segment = len(view) // (len(rows) * per_row)  # bytes this slice takes from each outer row
        offset += start * (stride // shape[dim]) + rows.start * per_row * stride
        for row in range(len(rows) * per_row):  # one positioned read per row, straight into its place
            self._fill(view[row * segment:(row + 1) * segment], offset + row * stride)
        return out

    def get(self, name: str) -> torch.Tensor:
        dtype, shape, offset = self.entries[name]
        if shape:
            return self.read(name, 0, 0, shape[0])
        out = torch.empty((), dtype=dtype)  # a scalar
        self._fill(memoryview(out.view(torch.uint8).numpy()).cast("B"), offset)
        return out


class BinFile:
    """A pytorch_model.bin loaded with weights_only=True and mmap (tensors are paged in as they are read)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def read(self, name: str, dim: int, start: int, length: int, rows: range | None = None) -> torch.Tensor:
        tensor = self.tensors[name].narrow(dim, start, length)
        return tensor if rows is None or dim == 0 else tensor[rows.start:rows.stop]

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]


class CheckpointReader:
    """Maps tensor names to the file holding them and reads each tensor only when asked."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.blocks = GGUFBlocks.open(self.folder)  # a converted .gguf's 4-bit tensors, kept as they are
        self._handles: dict[Path, SafetensorsFile | BinFile] = {}
        self._where: dict[str, Path] = {}
        for path in find_weight_files(self.folder):
            for name in self._open(path).keys():
                self._where[name] = path

    def _open(self, path: Path) -> SafetensorsFile | BinFile:
        if path in self._handles:
            return self._handles[path]
        if not path.is_file():
            raise CheckpointError(f"weight file {path} listed in the index does not exist")
        if path.suffix == ".safetensors":
            handle = SafetensorsFile(path)
        else:
            handle = BinFile(self._load_bin(path))
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

    def _file(self, name: str) -> SafetensorsFile | BinFile:
        return self._open(self._where[name])

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self._file(name).dtype(name)

    def read(self, name: str, dim: int, start: int, length: int, rows: range | None = None) -> torch.Tensor:
        """Only `length` entries from `start` along `dim` of tensor `name` (only those bytes are read);
        `rows` (for dim >= 1) also limits dim 0."""
        return self._file(name).read(name, dim, start, length, rows)

    def get(self, name: str) -> torch.Tensor:
        return self._file(name).get(name)
