"""Runs packed batches on a model in this process, and owns its KV cache and the samplers of the groups in
flight."""

from __future__ import annotations

import threading

import torch
from torch import nn

from energon_hf.batch import PackedBatch
from energon_hf.kv_cache import KVCache

from .sampling import Sampled, Samplers, SamplingPlan


class LocalRunner:
    """The single-device runner; the multi-process engine offers the same `run` / `step` / `ensure_cache`.

    `layers` (a pipeline stage's layer range) limits the KV cache, and `run`, to those layers. Calls from
    several threads (the batcher's, a caller's forward) run one at a time, as on the multi-process engine.
    """

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype, layers: range | None = None):
        self.model = model
        self.device = device
        self.dtype = dtype
        self.layers = layers
        self.kv_cache: KVCache | None = None
        self.samplers = Samplers(device)
        self._lock = threading.Lock()

    def ensure_cache(self, num_blocks: int, block_size: int) -> None:
        """Have a cache of at least `num_blocks` blocks: grown, never shrunk, keeping the blocks it holds (a new
        block size starts an empty one)."""
        with self._lock:
            cache = self.kv_cache
            if cache is not None and cache.block_size == block_size:
                if cache.num_blocks < num_blocks:
                    self.kv_cache = cache.grown(num_blocks)
                return
            num_layers, kv_heads, head_dim = self.model.kv_cache_layout()
            layers = self.layers or range(num_layers)
            self.kv_cache = None  # free the old one before allocating
            self.kv_cache = KVCache(len(layers), num_blocks, block_size, kv_heads, head_dim, self.dtype,
                                    self.device, first_layer=layers.start)

    def close(self) -> None:
        self.kv_cache = None

    def step(self, batch: PackedBatch, plan: SamplingPlan) -> Sampled:
        """A generation step: the batch through the model and its cache, its logits rows sampled here."""
        return self.samplers.sample(self.run(batch, use_cache=True)["logits"], plan)

    @torch.inference_mode()
    def run(self, batch: PackedBatch, use_cache: bool = False, hidden: torch.Tensor | None = None,
            last: bool = True) -> dict[str, torch.Tensor] | torch.Tensor:
        """The model's outputs; a pipeline stage starts from `hidden` (None on the first stage) and returns
        its hidden states unless it is the `last`."""
        batch = batch.to(self.device)
        with self._lock:
            if use_cache:
                batch.attn.kv_cache = self.kv_cache
                self.kv_cache.copy_blocks(batch.block_copies)
            if self.layers is None:
                return self.model(batch)
            return self.model(batch, hidden=hidden, layers=self.layers, last=last)
