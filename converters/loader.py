"""Fill a model built on the meta device with weights read from a checkpoint, tensor by tensor."""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate.utils import set_module_tensor_to_device
from torch import nn
from tqdm.auto import tqdm

from energon_hf.errors import CheckpointError

from .checkpoint import CheckpointReader
from .weights import LazyWeight, WeightSpec

# Old BERT checkpoints (TF conversions) name LayerNorm parameters gamma/beta.
_LEGACY_SUFFIXES = {".weight": ".gamma", ".bias": ".beta"}


def _candidates(name: str, base_prefix: str) -> list[str]:
    """Names under which a checkpoint may hold `name`: with or without the base-model prefix
    (a GPT2LMHeadModel checkpoint may store the body as `h.0...` or `transformer.h.0...`)."""
    names = [name]
    if base_prefix and name.startswith(base_prefix):
        names.append(name[len(base_prefix):])
    elif base_prefix:
        names.append(base_prefix + name)
    for suffix, legacy in _LEGACY_SUFFIXES.items():
        names += [n[: -len(suffix)] + legacy for n in list(names) if "LayerNorm" in n and n.endswith(suffix)]
    return names


def _find_sources(reader: CheckpointReader, spec: WeightSpec, base_prefix: str) -> list[str] | None:
    """The checkpoint names of the first source tuple the checkpoint holds completely."""
    for sources in (spec.names, *spec.alternatives):
        found = [next((c for c in _candidates(source, base_prefix) if c in reader), None) for source in sources]
        if None not in found:
            return found
    return None


def load_weights(model: nn.Module, specs: dict[str, WeightSpec], reader: CheckpointReader,
                 dtype: torch.dtype, device: torch.device, base_prefix: str = "",
                 wanted: Callable[[str], bool] | None = None) -> None:
    """Materialize `model`'s parameters (built on the meta device) from the checkpoint.

    A tensor-parallel layer's `shard_for(param)` says which part of the full tensor it holds; only that
    part is read. Parameters for which `wanted(name)` is False (other pipeline stages') stay on meta.
    """
    params = dict(model.named_parameters())
    if set(params) != set(specs):  # a bug in a converter, not in the user's checkpoint
        raise RuntimeError(f"converter/model mismatch: {sorted(set(params) ^ set(specs))[:10]}")
    missing = []
    todo = {name: spec for name, spec in specs.items() if wanted is None or wanted(name)}
    for name, spec in tqdm(todo.items(), desc="Loading weights", unit="tensor", delay=2.0, leave=False):
        names = _find_sources(reader, spec, base_prefix)
        if names is None:
            missing.append(spec.names[0])
            continue
        source = LazyWeight(reader, names, spec.layout)
        module_name, _, param_name = name.rpartition(".")
        shard_for = getattr(model.get_submodule(module_name), "shard_for", None)
        shard = shard_for(param_name) if shard_for else None
        expected = list(params[name].shape)
        if shard is not None:
            expected[shard.dim] = shard.full
        if tuple(source.shape) != tuple(expected):
            raise CheckpointError(
                f"checkpoint tensor {', '.join(names)} has shape {tuple(source.shape)} but the config "
                f"implies {tuple(expected)} (for {name}); does config.json belong to these weights?"
            )
        value = source.full() if shard is None else shard.take(source)
        set_module_tensor_to_device(model, name, device, value=value, dtype=dtype)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"checkpoint in {reader.folder} lacks {len(missing)} weights: {shown}")
