"""Decode steps of Llama-family layers as one tight loop of compiled CPU ops.

A decode step at batch 1 does little arithmetic per op (SmolLM2: 30 layers of about 14 ops), so the Python
around each op costs as much as the op: the module calls, the kernel dispatch and the weight formats' checks
took SmolLM2's int4 step from 9.3 ms (the same ops called bare) to 12.8 ms on the 2-core Xeon, each wrapper
costing about 10 us in a step (the interpreter runs cold between the weight streams) against 3 us in a warm
loop. This loop calls exactly the ops the layers' modules would pick for the step (RMSNorm, the formats'
products, rotary, the cache writes, the step's attention plan, SiLU-and-mul), so its results are the modules' bit
for bit; it applies to decode steps on CPU with the compiled ops (`applies`), and the modules run every other step
(and any layer with another activation). Each residual add runs in one op with the norm after it (add_rms_norm),
and each layer's facts are read once per row count (`LayerOps`), not from its modules in every step.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class LayerOps:
    """One Llama layer's decode step as bare calls, with the facts the step reads (a module attribute costs a
    lookup through nn.Module.__getattr__ per use: about 225 per SmolLM2 step)."""

    qkv: Product
    o_proj: Product
    gate_up: Product
    down_proj: Product
    input_norm: tuple[torch.Tensor, float]  # (weight, eps)
    post_norm: tuple[torch.Tensor, float]
    qk_norms: tuple[nn.Module, nn.Module] | None  # Qwen3's RMSNorms over each query and key head
    layer_idx: int
    heads: int
    kv_heads: int
    head_dim: int
    qk_width: int
    window: int | None


class LlamaDecodeLoop:
    """The decode loop over a model's Llama decoder layers, with each layer's bare ops per row count."""

    def __init__(self, layers: nn.ModuleList):
        self.layers = layers
        self._ops: dict[tuple[int, torch.dtype], list[LayerOps | None]] = {}

    @staticmethod
    def applies(x: torch.Tensor, batch: PackedBatch) -> bool:
        """A step of one new token per sequence, read through the KV cache, on CPU outside autograd, one
        tensor-parallel rank, with the compiled ops (the paths the modules' own checks would take)."""
        attn = batch.attn
        return (attn.kv_cache is not None and not attn.is_prefill and attn.max_seqlen == 1 and x.is_cpu
                and not torch.is_grad_enabled() and state().tp_size == 1 and backend_for(x.device) == "torch"
                and compiled.available())

    def layer_ops(self, rows: int, dtype: torch.dtype) -> list[LayerOps | None]:
        """Per layer: its ops for `rows` rows of `dtype`, or None where a layer needs its module (another
        activation, norms in another dtype, a weight not loaded in a format: another pipeline stage's layer, or a
        subclass's own forward)."""
        key = (rows, dtype)
        if key not in self._ops:
            self._ops[key] = [_layer_ops(layer, rows, dtype) for layer in self.layers]
        return self._ops[key]

    def run(self, x: torch.Tensor, batch: PackedBatch, cos_sin: tuple[torch.Tensor, torch.Tensor],
            indices: range) -> torch.Tensor:
        """`indices`' layers on x [rows, hidden] (callers check `applies` first)."""
        layer_ops, rows = self.layer_ops(x.shape[0], x.dtype), x.shape[0]
        attn, (cos, sin) = batch.attn, cos_sin
        cache, slots, plans = attn.kv_cache, attn.slot_mapping, {}
        ops = torch.ops.energon_hf
        delta = None  # the last layer's MLP output, not yet added: the next norm adds it in the same op
        for i in indices:
            step = layer_ops[i]
            if step is None or cos.shape[-1] != step.head_dim:  # (a partial rotary: the module's apply_rotary)
                x = self.layers[i](x if delta is None else x + delta, batch, cos_sin)
                delta = None
                continue
            x, hidden = (x, ops.rms_norm(x, *step.input_norm)) if delta is None else \
                ops.add_rms_norm(x, delta, *step.input_norm)
            fused = step.qkv(hidden)
            heads, head_dim = step.heads, step.head_dim
            qk = fused[:, : step.qk_width].view(rows, -1, head_dim)
            if step.qk_norms is not None:  # Qwen3: as LlamaAttention.forward
                q_norm, k_norm = step.qk_norms
                qk = torch.cat((q_norm(qk[:, :heads]), k_norm(qk[:, heads:])), dim=1)
            qk = ops.rotary(qk, cos, sin)
            cache.write(step.layer_idx, qk[:, heads:], fused[:, step.qk_width:].view(rows, step.kv_heads, head_dim),
                        slots)
            q, (keys, values) = qk[:, :heads], cache.layer(step.layer_idx)
            plan = plans.get(step.window)
            if plan is None:  # kernels.paged_attention's plan for the step (per window), shared with the modules
                plan = plans[step.window] = step_plan(q, keys, values, attn.block_tables, attn.context_lens,
                                                      attn.cu_seqlens, 1, attn.scratch, step.window)
            context = plan.attend(q, keys, values, head_dim**-0.5)  # (_layer_ops takes no other scale)
            x, hidden = ops.add_rms_norm(x, step.o_proj(context.reshape(rows, -1)), *step.post_norm)
            delta = step.down_proj(ops.silu_and_mul(step.gate_up(hidden)))
        return x if delta is None else x + delta


def _layer_ops(layer: LlamaDecoderLayer, rows: int, dtype: torch.dtype) -> LayerOps | None:
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
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    if not mlp.fused_silu or any(m.format is None for m in linears) or any(n.weight.dtype != dtype for n in norms):
        return None
    # a layer with a bias (Qwen2's q/k/v) projects as its module does, bias included
    qkv, o_proj, gate_up, down_proj = (m.format.bare_product(rows) if m.bias is None else
                                       partial(m.project, bias=m.bias) for m in linears)
    return LayerOps(qkv=qkv, o_proj=o_proj, gate_up=gate_up, down_proj=down_proj,
                    input_norm=(norms[0].weight, norms[0].eps), post_norm=(norms[1].weight, norms[1].eps),
                    qk_norms=None if attention.q_norm is None else (attention.q_norm, attention.k_norm),
                    layer_idx=attention.layer_idx, heads=attention.num_heads, kv_heads=attention.num_kv_heads,
                    head_dim=attention.head_dim, qk_width=attention.qk_width, window=attention.window)
