"""Fill a model built on the meta device with weights read from a checkpoint, tensor by tensor."""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable

import torch
from accelerate.utils import set_module_tensor_to_device
from torch import nn
from tqdm.auto import tqdm

from energon_hf.errors import CheckpointError
from energon_hf.kernels import quantized as q
from energon_hf.nn.formats import DenseWeight, FormatPlan, Int4Weight, Int8Weight, RowSplitWeight
from energon_hf.parallel import Shard

from .checkpoint import CheckpointReader
from .gguf_blocks import GROUP_SIZE, INT4_KINDS
from .weights import LazyWeight, WeightSpec

_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None  # the process's own symbols: libc's
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


def finish_loading(model: nn.Module, name: str, plan: FormatPlan | None) -> None:
    """Once parameter `name` is loaded: a layer whose weight it is takes the format `plan` asks for
    (packed, quantized), so a quantized model never holds more than one float matrix at a time.

    Without autograd: a packed or quantized copy made from a parameter that requires grad keeps that
    parameter alive through its grad_fn (a gpt2-medium-sized model, 1.42 GB in fp32, sat at 3.0 GB RSS once
    packed). The float weight it replaced is then handed back to the system (`release_freed_memory`)."""
    module_name, _, param = name.rpartition(".")
    module = model.get_submodule(module_name)
    if plan is not None and param == "weight" and hasattr(module, "finish_loading"):
        with torch.no_grad():
            module.finish_loading(plan, module_name)
        release_freed_memory()


def release_freed_memory() -> None:
    """Return the heap's free memory to the system (glibc's malloc_trim; a no-op elsewhere).

    Loading frees one float matrix per layer once its packed or quantized form exists; glibc keeps those
    freed blocks, and copies of other sizes do not fit their holes, so the heap grows by about the model's
    size: a gpt2-medium-sized model (1.42 GB fp32) peaked at 2.65 GB packed against 1.65 GB unpacked, and at
    1.9 GB with a trim after each layer (measured with VmHWM)."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


# The GGUF block kinds each quantization method computes on as they are: int4 in groups of 32 (Q4_0, Q4_1), int8
# in groups of 32 (Q8_0). Other pairs (a Q4_1 file asked for int8, a Q8_0 file for int4) re-quantize the weights
# transformers dequantized.
_BLOCK_KINDS = {"int4": INT4_KINDS, "int8": ("Q8_0",)}


def _as_gguf_blocks(reader: CheckpointReader, names: list[str], spec: WeightSpec, plan: FormatPlan | None,
                    module: nn.Module, param: str, shard: Shard | None, device: torch.device) -> bool:
    """Whether this weight loads as the .gguf's own blocks: the quantization asked for holds them as they are
    (int4 in the blocks' groups of 32, or int8), a linear layer (heads stay float), rows as stored. int8 takes
    Q8_0's groups only where the compiled GEMV multiplies them (CPU: elsewhere, and through torch's int8 kernel,
    a grouped int8 product dequantizes the whole matrix per call) and the tensor-parallel split keeps whole
    groups; otherwise it quantizes per channel as for any checkpoint (int4 names a split inside a group)."""
    quantization = plan.quantization if plan is not None else None
    if quantization is None or reader.blocks is None or spec.layout == "transposed" or param != "weight" \
            or not hasattr(module, "take_format") or not reader.blocks.covers(names, _BLOCK_KINDS[quantization.method]):
        return False
    if quantization.method == "int4":
        return quantization.group_size == GROUP_SIZE
    return device.type == "cpu" and q.gemv_available() and (shard is None or shard.falls_on_groups(GROUP_SIZE))


def _head_as_gguf_blocks(reader: CheckpointReader, names: list[str], plan: FormatPlan | None, module: nn.Module,
                         name: str, param: str, device: torch.device) -> bool:
    """Whether this vocabulary head computes on the .gguf's own 8-bit blocks: a quantized model whose file holds
    the head as Q8_0 (the embedded SmolLM2's tied head), on CPU with the compiled GEMV (elsewhere a grouped int8
    product would dequantize the whole head per call). Its products are float32 on the file's weights, as the
    dequantized model's; a tied head's float table stays for embedding lookups."""
    return (plan is not None and plan.quantization is not None and reader.blocks is not None
            and param == "weight" and hasattr(module, "computes_logits") and module.computes_logits(plan, name)
            and reader.blocks.covers(names, ("Q8_0",)) and device.type == "cpu" and q.gemv_available())


def _from_blocks(reader: CheckpointReader, names: list[str], shard: Shard | None, device: torch.device,
                 what: str, expansion: torch.dtype | None) -> Int4Weight | Int8Weight:
    """This rank's share of the named tensors' blocks in their own format: Q4_* as Int4Weight, Q8_0 as a grouped
    Int8Weight (`expansion`: see Int8Weight and Int4Weight). A split must fall on the blocks' groups of 32 (else
    an error naming the layer)."""
    values, *groups = reader.blocks.read(names)
    if shard is not None:
        per_group = shard.grouped(GROUP_SIZE, what)
        values, groups = shard.take(values), [per_group.take(g) for g in groups]
    values, groups = values.to(device), [g.to(device) for g in groups]
    return Int4Weight(values, *groups, expansion) if len(groups) == 2 else Int8Weight(values, *groups, expansion)


def load_weights(model: nn.Module, specs: dict[str, WeightSpec], reader: CheckpointReader,
                 dtype: torch.dtype, device: torch.device, base_prefix: str = "",
                 wanted: Callable[[str], bool] | None = None, plan: FormatPlan | None = None) -> None:
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
        module = model.get_submodule(module_name)
        shard_for = getattr(module, "shard_for", None)
        shard = shard_for(param_name) if shard_for else None
        expected = list(params[name].shape)
        if shard is not None:
            expected[shard.dim] = shard.full
        if tuple(source.shape) != tuple(expected):
            raise CheckpointError(
                f"checkpoint tensor {', '.join(names)} has shape {tuple(source.shape)} but the config "
                f"implies {tuple(expected)} (for {name}); does config.json belong to these weights?"
            )
        if _as_gguf_blocks(reader, names, spec, plan, module, param_name, shard, device):
            module.take_format(_from_blocks(reader, names, shard, device, module_name, plan.quantization.expansion))
            continue
        if _head_as_gguf_blocks(reader, names, plan, module, module_name, param_name, device):
            head = _from_blocks(reader, names, shard, device, module_name, expansion=None)  # never expands
            if module.lookups:  # the float table, for lookups, and for products of many rows
                value = source.full() if shard is None else shard.take(source)
                set_module_tensor_to_device(model, name, device, value=value, dtype=dtype)
                with torch.no_grad():  # a packed copy would otherwise keep the parameter alive (finish_loading)
                    head = RowSplitWeight(head, DenseWeight(module.weight), q.INT8_HEAD_GEMV_ROWS)
            module.take_head(head)
            continue
        value = source.full() if shard is None else shard.take(source)
        set_module_tensor_to_device(model, name, device, value=value, dtype=dtype)
        finish_loading(model, name, plan)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"checkpoint in {reader.folder} lacks {len(missing)} weights: {shown}")
