"""EnergonAI's server config files for `python -m energon_hf.serve --config FILE`.

The file is Python, as EnergonAI's were; its module-level names set the server:

    model_class   a checkpoint (folder, hub id or .gguf) as a string, or a function building a custom
                  model from Linear1D_Col / Linear1D_Row (run on tp x pp ranks by energon_hf.launch)
    checkpoint    a checkpoint for model_class: the model itself when model_class is not set, else passed
                  to the function as checkpoint=...
    model_type    EnergonAI's "gpt" / "bert"; for a custom model, the task /v1/models reports
    half          True: float16
    backend       "nccl" (CUDA) or "gloo" (CPU)
    tp_init_size, pp_init_size      tensor- and pipeline-parallel sizes
    server_host, server_port        where the HTTP server listens
    host, port    EnergonAI's engine rendezvous; accepted, but a one-machine engine picks a free port itself
    rm_padding    accepted; energon_hf always removes padding (results are the same either way)

Flags given on the command line win over the file. The file's folder goes on sys.path (and PYTHONPATH,
for the engine's workers) and the file is imported under its own name, so a model function defined in it
or in a module beside it can be pickled to the workers.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

KEYS = ("model_class", "checkpoint", "model_type", "half", "backend", "tp_init_size", "pp_init_size",
        "server_host", "server_port", "host", "port", "rm_padding")
BACKEND_DEVICE = {"nccl": "cuda", "gloo": "cpu"}


class ConfigError(ValueError):
    pass


def _import_file(path: Path) -> ModuleType:
    if not path.is_file() or path.suffix != ".py":
        raise ConfigError(f"--config {path}: not a Python file")
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (folder, os.environ.get("PYTHONPATH")) if p)
    try:
        return importlib.import_module(path.stem)
    except Exception as e:
        raise ConfigError(f"--config {path} failed to run: {type(e).__name__}: {e}") from e


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The serve settings the file asks for, under the CLI's names (model or factory, tp, pp, dtype, device,
    host, port, task)."""
    module = _import_file(Path(path))
    values = {name: value for name, value in vars(module).items() if not name.startswith("_")
              and not (inspect.ismodule(value) or inspect.isfunction(value) or inspect.isclass(value))}
    values.update({k: getattr(module, k) for k in ("model_class",) if hasattr(module, k)})
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise ConfigError(f"--config {path}: unknown keys {unknown}; known: {', '.join(KEYS)}")
    out: dict[str, Any] = {}
    model_class, checkpoint = values.get("model_class"), values.get("checkpoint")
    if callable(model_class):
        out["factory"] = partial(model_class, checkpoint=checkpoint) if checkpoint else model_class
    elif model_class is not None or checkpoint is not None:
        if model_class is not None and not isinstance(model_class, str | os.PathLike):
            raise ConfigError(f"--config {path}: model_class must be a checkpoint or a function, got "
                              f"{type(model_class).__name__}")
        out["model"] = str(model_class or checkpoint)
    if "model_type" in values:
        out["task"] = str(values["model_type"])
    if values.get("half"):
        out["dtype"] = "float16"
    if "backend" in values:
        if values["backend"] not in BACKEND_DEVICE:
            raise ConfigError(f"--config {path}: backend must be one of {sorted(BACKEND_DEVICE)}, "
                              f"got {values['backend']!r}")
        out["device"] = BACKEND_DEVICE[values["backend"]]
    for key, name in (("tp_init_size", "tp"), ("pp_init_size", "pp"), ("server_port", "port")):
        if key in values:
            if not isinstance(values[key], int) or values[key] < 1:
                raise ConfigError(f"--config {path}: {key} must be a positive integer, got {values[key]!r}")
            out[name] = values[key]
    if "server_host" in values:
        out["host"] = str(values["server_host"])
    return out

