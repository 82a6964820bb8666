"""Custom models on the engine, as EnergonAI launched them: a factory that builds the model from
Linear1D_Col / Linear1D_Row layers, run on tp*pp worker processes and called like a local module."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from .multiprocess import MultiProcessRunner


def _build(factory: Callable[[], nn.Module], device: torch.device) -> nn.Module:
    return factory().to(device).eval().requires_grad_(False)


class LaunchedModel:
    """`model(*args, **kwargs)` runs the factory's module on every rank and returns the output rank's result
    (on the CPU). Thread-safe; `close()` or a `with` block stops the workers."""

    def __init__(self, runner: MultiProcessRunner):
        self.runner = runner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.runner.call(*args, **kwargs)

    def close(self) -> None:
        self.runner.close()

    def __enter__(self) -> LaunchedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def launch(model_factory: Callable[[], nn.Module], tp: int = 1, pp: int = 1, device: str = "cpu",
           threads_per_rank: int | None = None) -> LaunchedModel:
    """Start tp*pp worker ranks; each calls `model_factory()` after joining the process groups, so the
    parallel layers it builds take their share (`energon_hf.parallel.state()` tells a factory its rank).

    With pp > 1 the factory builds its rank's pipeline stage (`state().pp_rank`): the first stage is called
    with the caller's arguments, each later stage with the previous stage's output tensor, and the last
    stage's output is returned.

    `model_factory` must be picklable: a module-level function (or a functools.partial of one). If it is
    defined in the script you run, guard the script with `if __name__ == "__main__":`, as for
    multiprocessing: the workers import it to find the factory.
    """
    return LaunchedModel(MultiProcessRunner(partial(_build, model_factory), tp, pp, device,
                                            threads_per_rank=threads_per_rank))
