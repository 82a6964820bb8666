"""GGUF's 4-bit and 8-bit blocks read as int4 and int8 groups of 32, straight from the .gguf file (no float
detour).

A Q4_1 block of 32 weights holds d, m (float16) and 32 nibbles: w = d * q + m. Q4_0 holds d and the nibbles:
w = d * (q - 8). Both are exactly the int4 format of `energon_hf.kernels.quantized` (w = (q - 8) * scale +
zero) with scale = d and zero = m + 8 d (Q4_1) or 0 (Q4_0). A Q8_0 block holds d and 32 int8 values: w = d * q,
exactly the int8 format with one scale per group of 32 (the embedded SmolLM2 stores its tied vocabulary head
so).

At conversion time (`converters/gguf.py`) `block_map` records which checkpoint tensor each such GGUF tensor
is, by checking its decoded values against the tensor transformers dequantized (rows included: llama.cpp
stores q and k rows permuted for its rotary layout, transformers un-permutes them); the map goes into the
cache folder as gguf_blocks.json, and `GGUFBlocks` reads it back at load time.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from energon_hf.kernels.quantized import dequantize_int4, dequantize_int8

if TYPE_CHECKING:
    from gguf import GGUFReader

BLOCKS_FILE = "gguf_blocks.json"
GROUP_SIZE = 32
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}  # per 32 weights
INT4_KINDS = ("Q4_0", "Q4_1")


def decode(data: np.ndarray, kind: str) -> tuple[torch.Tensor, ...]:
    """Raw blocks [rows, bytes] -> Q4_*: (q, scale, zero) as decode_q4; Q8_0: (q [rows, in] int8, scale
    [rows, in / 32] float32)."""
    if kind in INT4_KINDS:
        return decode_q4(data, kind)
    rows = data.shape[0]
    blocks = torch.from_numpy(np.array(data)).view(rows, -1, _BLOCK_BYTES[kind])
    d = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0].float()
    return blocks[..., 2:].contiguous().view(torch.int8).reshape(rows, -1), d


def dequantize(parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The float32 weights of `decode`'s parts."""
    return dequantize_int4(*parts) if len(parts) == 3 else dequantize_int8(*parts)


def decode_q4(data: np.ndarray, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw blocks [rows, bytes] -> q [rows, in] uint8 (0..15), scale and zero [rows, in / 32] float32."""
    rows = data.shape[0]
    blocks = torch.from_numpy(np.array(data)).view(rows, -1, _BLOCK_BYTES[kind])  # a copy: the file is read-only
    d = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0].float()
    if kind == "Q4_1":
        zero = blocks[..., 2:4].contiguous().view(torch.float16)[..., 0].float() + 8 * d
        nibbles = blocks[..., 4:]
    else:
        zero = torch.zeros_like(d)
        nibbles = blocks[..., 2:]
    # element j of a block is the low nibble of byte j for j < 16, the high nibble of byte j - 16 after
    q = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=-1).reshape(rows, -1)
    return q, d, zero


def unpermute_rows(t: torch.Tensor, heads: int | None) -> torch.Tensor:
    """llama.cpp's rotary row order -> HF's (transformers' reverse_permute_weights), on any row-wise tensor."""
    if heads is None or t.shape[0] % (2 * heads):
        return t
    return t.reshape(heads, t.shape[0] // heads // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def _layer_index(name: str) -> int | None:
    """The layer number in a tensor name (HF's `layers.7.`, GGUF's `blk.7.`), None outside the layers."""
    match = re.search(r"\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def block_map(reader: GGUFReader, state: dict[str, torch.Tensor], head_counts: tuple[int, ...]) -> dict[str, dict]:
    """{checkpoint name: {"type": "Q4_0" | "Q4_1" | "Q8_0", "offset", "rows", "row_bytes": where its blocks lie
    in the file, "heads": rows permuted by, or None}} for each 4-bit or 8-bit GGUF tensor whose decoded values
    equal a tensor of `state` (transformers' dequantization)."""
    by_key: dict[tuple, list[str]] = {}  # (shape, layer index) -> names: few candidates per GGUF tensor
    for name, tensor in state.items():
        by_key.setdefault((tuple(tensor.shape), _layer_index(name)), []).append(name)
    found = {}
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        if kind not in _BLOCK_BYTES:
            continue
        weights = dequantize(decode(tensor.data, kind))
        match = next(((name, heads) for name in by_key.get((tuple(weights.shape), _layer_index(tensor.name)), [])
                      if name not in found for heads in (None, *head_counts)
                      if _equal(unpermute_rows(weights, heads), state[name])), None)
        if match is not None:
            found[match[0]] = {"type": kind, "offset": int(tensor.data_offset), "rows": tensor.data.shape[0],
                               "row_bytes": tensor.data.shape[1], "heads": match[1]}
    return found


def _equal(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Equal up to float32 rounding (the same formula evaluated in another order)."""
    return (ours - theirs.float()).abs().max().item() <= 1e-5 * theirs.abs().max().item()


def write_block_map(folder: Path, gguf_path: Path, blocks: dict[str, dict]) -> None:
    (folder / BLOCKS_FILE).write_text(json.dumps({"file": str(gguf_path.resolve()), "tensors": blocks}, indent=1))


class GGUFBlocks:
    """The 4-bit and 8-bit tensors of the .gguf file a cache folder was converted from, by checkpoint name, read from
    their recorded offsets (parsing the file's header again would cost seconds: SmolLM2's vocabulary alone
    is 49152 strings)."""

    def __init__(self, gguf_path: Path, tensors: dict[str, dict]):
        self.path, self.tensors = gguf_path, tensors

    @classmethod
    def open(cls, folder: Path) -> GGUFBlocks | None:
        path = folder / BLOCKS_FILE
        if not path.is_file():
            return None
        info = json.loads(path.read_text())
        gguf_path = Path(info["file"])
        return cls(gguf_path, info["tensors"]) if gguf_path.is_file() else None

    def covers(self, names: list[str], kinds: tuple[str, ...]) -> bool:
        """Whether all the named tensors are held as blocks of one of `kinds`."""
        return all(name in self.tensors and self.tensors[name]["type"] in kinds for name in names)

    def read(self, names: list[str]) -> tuple[torch.Tensor, ...]:
        """`decode`'s parts of the named tensors (one kind of block), concatenated along rows (fused
        projections)."""
        parts = []
        for name in names:
            entry = self.tensors[name]
            data = np.memmap(self.path, dtype=np.uint8, mode="r", offset=entry["offset"],
                             shape=(entry["rows"], entry["row_bytes"]))
            parts.append(tuple(unpermute_rows(t, entry["heads"]) for t in decode(data, entry["type"])))
        return tuple(torch.cat(column) if len(parts) > 1 else column[0] for column in zip(*parts, strict=True))
