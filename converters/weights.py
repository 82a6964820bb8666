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
