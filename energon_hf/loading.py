"""From a path, id or GGUF file to a loaded (possibly tensor/pipeline-sharded) packed model."""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from energon_hf.converters import CheckpointReader, load_weights
from energon_hf.converters.gguf import convert_gguf
from energon_hf.converters.sharded import load_rank, read_manifest
from energon_hf.errors import CheckpointError, ModelNotFoundError, UnsupportedModelError
from energon_hf.models import architecture_for
from energon_hf.nn.formats import FormatPlan, Quantization
from energon_hf.parallel import stage_layers, state

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
def resolve_model_path(path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder, a .gguf file (or a folder holding one) converted once to a cached folder, or a hub
    id downloaded (config, tokenizer, weights) through huggingface_hub."""
    local = Path(path).expanduser()
    if local.is_file() and local.suffix == ".gguf":
        return convert_gguf(local)
    if local.is_dir():
        gguf_files = sorted(local.glob("*.gguf"))
        if not (local / "config.json").exists() and len(gguf_files) == 1:
            return convert_gguf(gguf_files[0])
        return local
    if local.exists():
        raise ModelNotFoundError(f"{str(path)!r} is a file; pass a checkpoint folder or a .gguf file")
    text = str(path)
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text:
        raise ModelNotFoundError(f"model path {text!r} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.bin"]))
    except Exception as e:  # offline, unknown repo, bad id: all mean the same to the caller
        raise ModelNotFoundError(
            f"{text!r} is not a local folder and could not be fetched from the Hugging Face Hub: {e}"
        ) from e


def load_config(folder: Path) -> PretrainedConfig:
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"{folder} has no config.json; is it an HF checkpoint folder?")
    try:
        return AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError) as e:
        model_type = PretrainedConfig.get_config_dict(folder)[0].get("model_type")
        raise UnsupportedModelError(f"cannot read config.json of model_type {model_type!r} in {folder}: {e}") from e


def resolve_parallel(folder: Path, tp: int | None, pp: int | None) -> tuple[int, int]:
    """tp and pp to run with: as asked (default 1), or a pre-sharded folder's own, which must agree."""
    manifest = read_manifest(folder)
    if manifest is None:
        return tp or 1, pp or 1
    want = (tp or manifest["tp"], pp or manifest["pp"])
    if want != (manifest["tp"], manifest["pp"]):
        raise CheckpointError(f"{folder} was converted for tp={manifest['tp']}, pp={manifest['pp']}; "
                              f"load it with those, or convert the original checkpoint again for tp={want[0]}, "
                              f"pp={want[1]}")
    return want


def resolve_dtype(dtype: str | torch.dtype, config: PretrainedConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":  # transformers 5's default: the checkpoint's own dtype
        saved = getattr(config, "dtype", None)
        if isinstance(saved, str):
            saved = _DTYPES.get(saved)
        return saved if isinstance(saved, torch.dtype) and saved.is_floating_point else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of 'auto', {', '.join(repr(d) for d in _DTYPES)}")
    return _DTYPES[dtype]


# torch.nn.init's initialisers (the ones layers' reset_parameters call).
_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")
_meta_init_lock = threading.Lock()
_meta_init_users = 0
_meta_init_originals: dict[str, object] = {}


def _skipping_meta(init):
    @functools.wraps(init)
    def skip_meta(tensor, *args, **kwargs):
        return tensor if tensor.is_meta else init(tensor, *args, **kwargs)

    return skip_meta


@contextmanager
def _no_init_on_meta() -> Iterator[None]:
    """Layers built on the meta device skip their random initialisation: a meta tensor holds no values, so
    nothing changes, but torch runs those initialisers through its Python reference kernels there, whose
    first use imports torch._dynamo (seconds of start-up in every worker process). Tensors elsewhere (other
    threads included) are initialised as usual.

    Not transformers' `no_init_weights`: it swaps the initialisers for no-ops in every thread (a model
    built by another thread meanwhile keeps uninitialised memory), and two overlapping uses restore each
    other's no-ops, so a server loading two models at once would lose nn.init for good. This one is
    reference-counted and skips meta tensors only."""
    global _meta_init_users
    with _meta_init_lock:
        if _meta_init_users == 0:
            for name in _INIT_FUNCTIONS:
                _meta_init_originals[name] = getattr(nn.init, name)
                setattr(nn.init, name, _skipping_meta(_meta_init_originals[name]))
        _meta_init_users += 1
    try:
        yield
    finally:
        with _meta_init_lock:
            _meta_init_users -= 1
            if _meta_init_users == 0:
                for name in _INIT_FUNCTIONS:
                    setattr(nn.init, name, _meta_init_originals.pop(name))


T = TypeVar("T")


def on_passing_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """fn(*args, **kwargs), computed on a thread that ends with it.

    Each thread that runs torch's parallel CPU ops keeps an OpenMP worker pool for as long as it lives, and
    once the pools' threads outnumber the cores, libgomp stops spinning its idle workers (its throttled spin
    count): every parallel op then waits for its workers to wake. Loading is a process's first heavy torch
    work; done here, it leaves no pool behind, so the thread that runs the model afterwards (a server's
    batcher, the caller of generate) holds the only one. The server's single stream on SmolLM2 int4: 32
    tokens/s with the model loaded on its main thread, 44-51 loaded here.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="energon-load") as pool:
        return pool.submit(fn, *args, **kwargs).result()


def empty_model(config: PretrainedConfig) -> nn.Module:
    """The model for `config` on the meta device: its structure and class attributes, no memory."""
    with init_empty_weights(), _no_init_on_meta():
        return architecture_for(config).model_cls(config)


def load_model(folder: Path, dtype: torch.dtype, device: torch.device | str,
               quantization: Quantization | None = None, pack: bool = True) -> nn.Module:
    """Build the model of the checkpoint in `folder` and load this rank's share of its weights.

    Under tensor parallelism the parallel layers size themselves from `energon_hf.parallel.state()`
    and the loader reads only their shards; under pipeline parallelism only this stage's parameters are
    loaded (the others stay on the meta device). Each layer's weight is then held as `quantization` asks,
    and packed for the device's fastest product unless `pack` is off (weights that are to be saved).
    """
    config = load_config(folder)
    model = empty_model(config)
    st = state()
    wanted = None
    if st.pp_size > 1:
        layers = stage_layers(len(model.layer_list), st.pp_size, st.pp_rank)
        wanted = model.stage_params(layers, st.is_first_stage, st.is_last_stage)
    plan = FormatPlan(quantization, pack, model.tied_embedding() if st.is_last_stage else None,
                      panels=architecture_for(config).can_generate)
    manifest = read_manifest(folder)
    if manifest is not None:  # pre-sharded by energon_hf.convert: this rank's own file
        load_rank(model, folder, manifest, st.rank, dtype, torch.device(device), wanted, plan)
    else:
        load_weights(model, model.weight_specs(), CheckpointReader(folder), dtype, torch.device(device),
                     base_prefix=model.base_prefix, wanted=wanted, plan=plan)
    return model.eval().requires_grad_(False)
