"""EnergonAI's two-layer MLP example on energon_hf's engine: Linear1D_Col then Linear1D_Row over 2 ranks
give the output of the unsplit MLP.

    .venv/bin/python -P examples/parallel_mlp.py [--tp 2]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from energon_hf import Linear1D_Col, Linear1D_Row, launch

HIDDEN = 64


def full_weights() -> dict[str, torch.Tensor]:
    """The unsplit MLP's weights, the same on every rank (seeded)."""
    gen = torch.Generator().manual_seed(0)
    return {"fc1.weight": torch.randn(4 * HIDDEN, HIDDEN, generator=gen) / HIDDEN**0.5,
            "fc1.bias": torch.randn(4 * HIDDEN, generator=gen),
            "fc2.weight": torch.randn(HIDDEN, 4 * HIDDEN, generator=gen) / (4 * HIDDEN) ** 0.5,
            "fc2.bias": torch.randn(HIDDEN, generator=gen)}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = Linear1D_Col(HIDDEN, 4 * HIDDEN, activation="gelu")  # each rank: a slice of the 4H features
        self.fc2 = Linear1D_Row(4 * HIDDEN, HIDDEN)  # each rank: its slice in, all-reduce out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))


def build_mlp() -> MLP:
    """Runs on every rank: each layer loads its own shard of the full weights."""
    model = MLP()
    for name, tensor in full_weights().items():
        module, param = name.split(".")
        getattr(model, module).load_full_(param, tensor)
    return model


def reference(x: torch.Tensor) -> torch.Tensor:
    w = full_weights()
    hidden = torch.nn.functional.gelu(x @ w["fc1.weight"].T + w["fc1.bias"])
    return hidden @ w["fc2.weight"].T + w["fc2.bias"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=2)
    args = parser.parse_args()
    x = torch.randn(8, HIDDEN, generator=torch.Generator().manual_seed(1))
    with launch(build_mlp, tp=args.tp) as mlp:
        out = mlp(x)
    diff = (out - reference(x)).abs().max().item()
    print(f"tp={args.tp}: output {tuple(out.shape)}, max abs diff to the unsplit MLP {diff:.2e}")
    raise SystemExit(0 if diff < 1e-4 else 1)
