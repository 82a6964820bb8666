"""Every model is embed -> layers -> finish: the cut points of pipeline parallelism.

A pipeline stage runs a contiguous range of layers; the first stage also embeds, the last also finishes
(final norm and head). `stage_params` says which parameters a stage needs, so the loader reads only those
(the rest stay on the meta device and cost nothing).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from energon_hf.batch import PackedBatch
from energon_hf.converters import WeightSpec


class StagedModel(nn.Module):
    # The model contract: what an architecture may declare, with the defaults every other one gets.
    layers_path: str = "layers"  # the nn.ModuleList of transformer layers
    head_modules: tuple[str, ...] = ()  # modules that `finish` uses; all others but the layers are `embed`'s
    base_prefix: str = ""  # the checkpoint's prefix of the base model's weights ("bert.", "model.")
    main_input: str = "input_ids"  # "pixel_values" for image models
    learned_positions: bool = False  # position ids end at max_position_embeddings (rotary ones do not)
    positions_count_real_tokens: bool = False  # forward numbers positions by the mask's cumsum (OPT), not columns
    # our fused module -> the checkpoint's separate modules beside it, concatenated in this order
    packed_modules: dict[str, tuple[str, ...]] = {}

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        raise NotImplementedError

    def layer_args(self, batch: PackedBatch, x: torch.Tensor) -> tuple:
        """Extra arguments every layer takes after (x, batch), computed once per step (Llama: cos/sin)."""
        return ()

    def finish(self, x: torch.Tensor, batch: PackedBatch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def weight_specs(self) -> dict[str, WeightSpec]:
        """Each parameter's source in an HF checkpoint. By default the parameter's own name, or for a module named
        in `packed_modules` the concatenation of the checkpoint's modules beside it (as nano-vllm's
        packed_modules_mapping: "qkv" <- q_proj, k_proj, v_proj), so a model that keeps HF's names declares
        nothing more. Architectures whose names differ from their checkpoints' (GPT-2, BERT, OPT, ViT) return
        their converter's map instead."""
        specs = {}
        for name, _ in self.named_parameters():
            module, _, param = name.rpartition(".")
            parent, _, leaf = module.rpartition(".")
            parts = self.packed_modules.get(leaf)
            if parts is None:
                specs[name] = WeightSpec(name)
            else:
                specs[name] = WeightSpec(tuple(f"{parent}.{part}.{param}".lstrip(".") for part in parts), "concat")
        return specs

    def recompute_at(self) -> int | None:
        """A context length at which a generated sequence runs again from its first token (Scheduler.recompute_at),
        or None: never."""
        return None

    def tied_embedding(self) -> str | None:
        """The embedding module a tied head reads (the last stage needs it too)."""
        return None

    @property
    def layer_list(self) -> nn.ModuleList:
        return self.get_submodule(self.layers_path)

    def forward(self, batch: PackedBatch, hidden: torch.Tensor | None = None, layers: range | None = None,
                last: bool = True) -> dict[str, torch.Tensor] | torch.Tensor:
        """The whole model, or one stage: start from `hidden` (None: embed), run `layers`, finish if `last`."""
        x = self.embed(batch) if hidden is None else hidden
        extra = self.layer_args(batch, x)
        x = self.run_layers(x, batch, extra, range(len(self.layer_list)) if layers is None else layers)
        return self.finish(x, batch) if last else x

    def run_layers(self, x: torch.Tensor, batch: PackedBatch, extra: tuple, indices: range) -> torch.Tensor:
        """The layers `indices` on x, each with (x, batch, *extra) (an architecture may run some steps another
        way: Llama's decode loop)."""
        blocks = self.layer_list
        for i in indices:
            x = blocks[i](x, batch, *extra)
        return x

    def stage_params(self, layers: range, first: bool, last: bool) -> Callable[[str], bool]:
        prefix, tied = self.layers_path + ".", self.tied_embedding()

        def under(name: str, module: str | None) -> bool:
            return module is not None and (name == module or name.startswith(module + "."))

        def wanted(name: str) -> bool:
            if name.startswith(prefix):
                return int(name[len(prefix):].split(".", 1)[0]) in layers
            if any(under(name, m) for m in self.head_modules):
                return last
            return first or (last and under(name, tied))

        return wanted
