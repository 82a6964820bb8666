"""Fill a model built on the meta device with weights read from a checkpoint, tensor by tensor."""

from __future__ import annotations

import torch
from accelerate.utils import set_module_tensor_to_device
from torch import nn
from tqdm.auto import tqdm

from energon_hf.errors import CheckpointError

from .checkpoint import CheckpointReader
from .weights import WeightSpec

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


def _read_sources(reader: CheckpointReader, spec: WeightSpec, base_prefix: str) -> list[torch.Tensor] | None:
    for sources in (spec.names, *spec.alternatives):
        found = []
        for source in sources:
            name = next((c for c in _candidates(source, base_prefix) if c in reader), None)
            if name is None:
                break
            found.append(reader.get(name))
        else:
            return found
    return None


def load_weights(model: nn.Module, specs: dict[str, WeightSpec], reader: CheckpointReader,
                 dtype: torch.dtype, device: torch.device, base_prefix: str = "") -> None:
    params = dict(model.named_parameters())
    if set(params) != set(specs):  # a bug in a converter, not in the user's checkpoint
        raise RuntimeError(f"converter/model mismatch: {sorted(set(params) ^ set(specs))[:10]}")
    missing = []
    for name, spec in tqdm(specs.items(), desc="Loading weights", unit="tensor", delay=2.0, leave=False):
        tensors = _read_sources(reader, spec, base_prefix)
        if tensors is None:
            missing.append(spec.names[0])
            continue
        value = spec.build(tensors)
        expected = tuple(params[name].shape)
        if tuple(value.shape) != expected:
            raise CheckpointError(
                f"checkpoint tensor {', '.join(spec.names)} has shape {tuple(value.shape)} but the config "
                f"implies {expected} (for {name}); does config.json belong to these weights?"
            )
        set_module_tensor_to_device(model, name, device, value=value.to(dtype))
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"checkpoint in {reader.folder} lacks {len(missing)} weights: {shown}")
