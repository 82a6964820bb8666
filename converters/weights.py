"""How a parameter of ours is made from tensors of an HF checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WeightSpec:
    """Our parameter = transform(*checkpoint tensors named in `sources`) (identity for one source).

    `alternatives` lists other source tuples tried in order when a checkpoint lacks `sources`.
    """

    sources: str | tuple[str, ...]
    transform: Callable[..., torch.Tensor] | None = None
    alternatives: tuple[tuple[str, ...], ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return (self.sources,) if isinstance(self.sources, str) else self.sources

    def build(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return self.transform(*tensors) if self.transform else tensors[0]


def transpose(weight: torch.Tensor) -> torch.Tensor:
    """Conv1D [in, out] -> nn.Linear [out, in]."""
    return weight.t().contiguous()


def concat(*tensors: torch.Tensor) -> torch.Tensor:
    """Fuse separate projections (q, k, v) into one along the output dimension."""
    return torch.cat(tensors, dim=0)


def params_of(bias: bool) -> tuple[str, ...]:
    return ("weight", "bias") if bias else ("weight",)


def renamed(ours: str, theirs: str, params: tuple[str, ...] = ("weight", "bias")) -> dict[str, WeightSpec]:
    """ours.{p} <- theirs.{p} for each parameter p of a module."""
    return {f"{ours}.{p}": WeightSpec(f"{theirs}.{p}") for p in params}


def fused(ours: str, theirs: tuple[str, ...], params: tuple[str, ...] = ("weight", "bias")) -> dict[str, WeightSpec]:
    """ours.{p} <- concat of theirs[i].{p}: separate projections (q, k, v or gate, up) fused into one."""
    return {f"{ours}.{p}": WeightSpec(tuple(f"{t}.{p}" for t in theirs), concat) for p in params}
