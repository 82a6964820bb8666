"""Custom models for the engine tests. They live in an importable module because worker processes find a
model factory by its module and name (as multiprocessing does)."""

import os
import time

import torch
from torch import nn

from energon_hf import Linear1D_Col, Linear1D_Row
from energon_hf.parallel import state

HIDDEN = 16


def full_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"fc1.weight": torch.randn(4 * HIDDEN, HIDDEN, generator=gen) / HIDDEN**0.5,
            "fc1.bias": torch.randn(4 * HIDDEN, generator=gen),
            "fc2.weight": torch.randn(HIDDEN, 4 * HIDDEN, generator=gen) / (4 * HIDDEN) ** 0.5,
            "fc2.bias": torch.randn(HIDDEN, generator=gen)}


def unsplit_mlp(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    w = full_weights(seed)
    return torch.nn.functional.gelu(x @ w["fc1.weight"].T + w["fc1.bias"]) @ w["fc2.weight"].T + w["fc2.bias"]


class MLP(nn.Module):
    """Col then Row; `mode` lets a test make every rank fail, or block, on purpose."""

    def __init__(self):
        super().__init__()
        self.fc1 = Linear1D_Col(HIDDEN, 4 * HIDDEN, activation="gelu")
        self.fc2 = Linear1D_Row(4 * HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor, mode: str = "run", marker: str | None = None) -> torch.Tensor | int:
        if mode == "raise":
            raise KeyError(f"mode {mode!r} asked for an error")
        if mode == "pid":
            return os.getpid()
        if mode == "sleep":
            if marker is not None:  # tells the test that the call has reached the workers
                open(f"{marker}.{os.getpid()}", "w").close()
            time.sleep(60)
        return self.fc2(self.fc1(x))


def build_mlp(seed: int = 0) -> MLP:
    model = MLP()
    for name, tensor in full_weights(seed).items():
        module, param = name.split(".")
        getattr(model, module).load_full_(param, tensor)
    return model


def build_broken() -> MLP:
    raise RuntimeError("this factory cannot build its model")


def build_stage() -> MLP:
    """Pipeline stage s of a custom model: the MLP with seed s (the whole model is mlp_1(mlp_0(x)))."""
    return build_mlp(seed=state().pp_rank)
