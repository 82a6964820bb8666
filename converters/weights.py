"""How a parameter of ours is made from tensors of an HF checkpoint, read lazily so that a tensor-parallel
rank reads only its own slices from disk."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .checkpoint import CheckpointReader

TRANSPOSE_BLOCK_ROWS = 256

# same: the checkpoint tensor as is. transposed: a GPT-2 Conv1D [in, out] -> our [out, in].
# concat: separate projections (q, k, v or gate, up) fused along dim 0.
Layout = Literal["same", "transposed", "concat"]


@dataclass(frozen=True)
class WeightSpec:
    """Our parameter = `layout` applied to the checkpoint tensors named in `sources`.

    `alternatives` lists other source tuples tried in order when a checkpoint lacks `sources`.
    """

    sources: str | tuple[str, ...]
    layout: Layout = "same"
    alternatives: tuple[tuple[str, ...], ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return (self.sources,) if isinstance(self.sources, str) else self.sources


class LazyWeight:
    """Our parameter as it would be built from the checkpoint, read only where `narrow` asks."""

    def __init__(self, reader: CheckpointReader, names: list[str], layout: Layout):
        self.reader, self.names, self.layout = reader, names, layout
        shapes = [reader.shape(n) for n in names]
        self.dtype = reader.dtype(names[0])
        if layout == "transposed":
            self.shape = torch.Size(reversed(shapes[0]))
        elif layout == "concat":
            self.shape = torch.Size([sum(s[0] for s in shapes), *shapes[0][1:]])
        else:
            self.shape = torch.Size(shapes[0])
        self._rows = [s[0] for s in shapes]

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        if self.layout == "transposed":
            return self._transposed(dim, start, length)
        if self.layout == "same":
            return self.reader.read(self.names[0], dim, start, length)
        if dim != 0:  # every fused source contributes the same columns
            return torch.cat([self.reader.read(n, dim, start, length) for n in self.names], dim=0)
        pieces, offset = [], 0
        for name, rows in zip(self.names, self._rows, strict=True):
            lo, hi = max(start, offset), min(start + length, offset + rows)
            if lo < hi:
                pieces.append(self.reader.read(name, 0, lo - offset, hi - lo))
            offset += rows
        return torch.cat(pieces, dim=0) if len(pieces) > 1 else pieces[0]

    def _transposed(self, dim: int, start: int, length: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """A Conv1D [in, out] slice written transposed into its [out, in] place, a block of source rows at a
        time: no full-size temporary (which, freed, would stay in the heap and double a rank's memory)."""
        name = self.names[0]
        source_rows = range(start, start + length) if dim == 1 else range(self.shape[1])
        if out is None:
            shape = list(self.shape)
            shape[dim] = length
            out = torch.empty(shape, dtype=self.dtype)
        into = out.t()  # [source rows, source columns] view
        for first in range(0, len(source_rows), TRANSPOSE_BLOCK_ROWS):
            begin = source_rows.start + first
            block = range(begin, min(source_rows.stop, begin + TRANSPOSE_BLOCK_ROWS))
            if dim == 1:  # whole source rows
                piece = self.reader.read(name, 0, block.start, len(block))
            else:  # a column range of every source row
                piece = self.reader.read(name, 1, start, length, rows=block)
            into[first:first + len(block)] = piece
        return out

    def narrow_into(self, dim: int, start: int, length: int, out: torch.Tensor) -> None:
        """narrow(), written into `out` (a part of a bigger shard: no temporary for transposed layouts)."""
        if self.layout == "transposed":
            self._transposed(dim, start, length, out)
        else:
            out.copy_(self.narrow(dim, start, length))

    def full(self) -> torch.Tensor:
        return self.narrow(0, 0, self.shape[0]) if self.shape else self.reader.get(self.names[0])


def params_of(bias: bool) -> tuple[str, ...]:
    return ("weight", "bias") if bias else ("weight",)


def renamed(ours: str, theirs: str, params: tuple[str, ...] = ("weight", "bias")) -> dict[str, WeightSpec]:
    """ours.{p} <- theirs.{p} for each parameter p of a module."""
    return {f"{ours}.{p}": WeightSpec(f"{theirs}.{p}") for p in params}


def fused(ours: str, theirs: tuple[str, ...], params: tuple[str, ...] = ("weight", "bias")) -> dict[str, WeightSpec]:
    """ours.{p} <- concat of theirs[i].{p}: separate projections (q, k, v or gate, up) fused into one."""
    return {f"{ours}.{p}": WeightSpec(tuple(f"{t}.{p}" for t in theirs), "concat") for p in params}
