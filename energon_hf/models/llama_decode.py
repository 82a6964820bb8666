"""Decode steps of Llama-family layers as one tight loop of compiled CPU ops.

A decode step at batch 1 does little arithmetic per op (SmolLM2: 30 layers of about 14 ops), so the Python
around each op costs as much as the op: the module calls, the kernel dispatch and the weight formats' checks
took SmolLM2's int4 step from 9.3 ms (the same ops called bare) to 12.8 ms on the 2-core Xeon, each wrapper
costing about 10 us in a step (the interpreter runs cold between the weight streams) against 3 us in a warm
loop. This loop calls exactly the ops the layers' modules would pick for the step (RMSNorm, the formats'
products, rotary, the cache writes, the step's attention plan, SiLU-and-mul), so its results are the modules' bit
for bit; it applies to decode steps on CPU with the compiled ops (`applies`), and the modules run every other step
(and any layer with another activation).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from energon_hf.batch import PackedBatch
from energon_hf.kernels import backend_for, compiled
from energon_hf.kernels.attention import step_plan
from energon_hf.nn.formats import Product
from energon_hf.nn.norm import RMSNorm
from energon_hf.parallel import state

if TYPE_CHECKING:
    from .llama import LlamaDecoderLayer


class LlamaDecodeLoop:
    """The decode loop over a model's Llama decoder layers, with each layer's bare products per row count."""

    def __init__(self, layers: nn.ModuleList):
        self.layers = layers
        self._products: dict[tuple[int, torch.dtype], list[tuple[Product, ...] | None]] = {}

    @staticmethod
    def applies(x: torch.Tensor, batch: PackedBatch) -> bool:
        """A step of one new token per sequence, read through the KV cache, on CPU outside autograd, one
        tensor-parallel rank, with the compiled ops (the paths the modules' own checks would take)."""
        attn = batch.attn
        return (attn.kv_cache is not None and not attn.is_prefill and attn.max_seqlen == 1 and x.is_cpu
                and not torch.is_grad_enabled() and state().tp_size == 1 and backend_for(x.device) == "torch"
                and compiled.available())

    def products(self, rows: int, dtype: torch.dtype) -> list[tuple[Product, ...] | None]:
        """Per layer: its four products (qkv, o_proj, gate_up, down_proj) for `rows` rows of `dtype`, or None
        where a layer needs its module (another activation, norms in another dtype, a weight not loaded in a format:
        another pipeline stage's layer, or a subclass's own forward)."""
        key = (rows, dtype)
        if key not in self._products:
            self._products[key] = [_layer_products(layer, rows, dtype) for layer in self.layers]
        return self._products[key]

    def run(self, x: torch.Tensor, batch: PackedBatch, cos_sin: tuple[torch.Tensor, torch.Tensor],
            indices: range) -> torch.Tensor:
        """`indices`' layers on x [rows, hidden] (callers check `applies` first)."""
        products = self.products(x.shape[0], x.dtype)
        attn, cos, sin = batch.attn, *cos_sin
        cache, slots, plans = attn.kv_cache, attn.slot_mapping, {}
        ops = torch.ops.energon_hf
        for i in indices:
            layer, bare = self.layers[i], products[i]
            attention, rows = layer.self_attn, x.shape[0]
            heads, kv_heads, head_dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
            if bare is None or cos.shape[-1] != head_dim:  # (a partial rotary: the module's apply_rotary)
                x = layer(x, batch, cos_sin)
                continue
            qkv, o_proj, gate_up, down_proj = bare
            fused = qkv(ops.rms_norm(x, layer.input_layernorm.weight, layer.input_layernorm.eps))
            qk = fused[:, : attention.qk_width].view(rows, -1, head_dim)
            if attention.q_norm is not None:  # Qwen3: as LlamaAttention.forward
                qk = torch.cat((attention.q_norm(qk[:, :heads]), attention.k_norm(qk[:, heads:])), dim=1)
            qk = ops.rotary(qk, cos, sin)
            cache.write(attention.layer_idx, qk[:, heads:],
                        fused[:, attention.qk_width:].view(rows, kv_heads, head_dim), slots)
            q, keys, values = qk[:, :heads], *cache.layer(attention.layer_idx)
            plan = plans.get(attention.window)
            if plan is None:  # kernels.paged_attention's plan for the step (per window), shared with the modules
                plan = plans[attention.window] = step_plan(q, keys, values, attn.block_tables, attn.context_lens,
                                                           attn.cu_seqlens, 1, attn.scratch, attention.window)
            context = plan.attend(q, keys, values, head_dim**-0.5)
            x = x + o_proj(context.reshape(rows, -1))
            hidden = ops.rms_norm(x, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.eps)
            x = x + down_proj(ops.silu_and_mul(gate_up(hidden)))
        return x


def _layer_products(layer: LlamaDecoderLayer, rows: int, dtype: torch.dtype) -> tuple[Product, ...] | None:
    from .llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP  # llama.py imports this file

    attention, mlp = layer.self_attn, layer.mlp
    # the loop is these classes' forward: a subclass that changes one (q/k norms, another residual) runs its own
    if (type(layer).forward, type(attention).forward, type(mlp).forward) != \
            (LlamaDecoderLayer.forward, LlamaAttention.forward, LlamaMLP.forward):
        return None
    if type(layer.input_layernorm) is not RMSNorm or attention.softcap is not None \
            or attention.scale != attention.head_dim**-0.5:  # Gemma's norms, capped or rescaled scores
        return None
    linears = (attention.qkv, attention.o_proj, mlp.gate_up, mlp.down_proj)
    norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
    if not mlp.fused_silu or any(m.format is None for m in linears) or any(w.dtype != dtype for w in norms):
        return None
    # a layer with a bias (Qwen2's q/k/v) projects as its module does, bias included
    return tuple(m.format.bare_product(rows, dtype) if m.bias is None else partial(m.project, bias=m.bias)
                 for m in linears)
