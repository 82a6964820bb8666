"""Llama-family decoders on packed tokens (LlamaForCausalLM): RMSNorm, rotary positions, SwiGLU,
grouped-query attention, sliding windows where the config sets them. Variants that differ from Llama only in a
few switches (Qwen2's q/k/v bias, Qwen3's q/k norms) are a subclass that reads its `DecoderOptions` from its
config: one small file each."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from energon_hf import kernels
from energon_hf.batch import PackedBatch, StepBuffers
from energon_hf.nn import Linear1D_Col, Linear1D_Row, VocabParallelEmbedding, attend
from energon_hf.nn.lm_head import rows_for_logits, untied_head, vocab_logits
from energon_hf.nn.norm import RMSNorm
from energon_hf.nn.rotary import RotaryEmbedding, apply_rotary
from energon_hf.parallel import divide

from .llama_decode import LlamaDecodeLoop
from .staged import StagedModel

if TYPE_CHECKING:
    from transformers import LlamaConfig, PretrainedConfig


@dataclass(frozen=True)
class DecoderOptions:
    """Where a Llama-like architecture's layers differ from Llama's (`LlamaForCausalLM.decoder_options`)."""

    qkv_bias: bool = False  # biases on the q, k and v projections
    o_bias: bool = False  # a bias on the output projection
    mlp_bias: bool = False  # biases on gate, up and down
    qk_norm: bool = False  # an RMSNorm over each query and key head before the rotary (Qwen3, Gemma 3)
    norm: type[RMSNorm] = RMSNorm  # every RMSNorm's class (Gemma's weights are offsets from 1)
    activation: str | None = None  # the MLP's gate activation (None: config.hidden_act)
    attention_scale: float | None = None  # the scores' scale (None: head_dim ** -0.5)
    softcap: float | None = None  # attention logits capped as softcap * tanh(scores / softcap) (Gemma 2)
    # where config.sliding_window applies, as each architecture's transformers class applies it: None (Llama: never),
    # "every layer" (Mistral, Phi-3), "layer types" (the layers config.layer_types calls "sliding_attention")
    sliding: Literal["every layer", "layer types"] | None = None


def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_window(config: PretrainedConfig, layer_idx: int, sliding: str | None) -> int | None:
    """The layer's sliding attention window (DecoderOptions.sliding says where the config's applies); None: full
    attention."""
    window = getattr(config, "sliding_window", None)
    if sliding is None or window is None:
        return None
    if sliding == "layer types" and config.layer_types[layer_idx] != "sliding_attention":
        return None
    return window


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int, options: DecoderOptions):
        super().__init__()
        # This rank's heads: query and key/value heads are both split (GQA groups stay whole).
        self.num_heads = divide(config.num_attention_heads, "attention heads")
        self.num_kv_heads = divide(config.num_key_value_heads, "key/value heads")
        self.head_dim = head_dim(config)
        self.layer_idx = layer_idx
        self.window = layer_window(config, layer_idx, options.sliding)
        q_size = config.num_attention_heads * self.head_dim
        kv_size = config.num_key_value_heads * self.head_dim
        self.qkv = Linear1D_Col(config.hidden_size, q_size + 2 * kv_size, bias=options.qkv_bias,
                                parts=(q_size, kv_size, kv_size), step_buffer="qkv")
        self.qk_width = (self.num_heads + self.num_kv_heads) * self.head_dim
        self.o_proj = Linear1D_Row(q_size, config.hidden_size, bias=options.o_bias)
        self.q_norm = options.norm(self.head_dim, config.rms_norm_eps) if options.qk_norm else None
        self.k_norm = options.norm(self.head_dim, config.rms_norm_eps) if options.qk_norm else None
        self.scale = options.attention_scale or self.head_dim**-0.5
        self.softcap = options.softcap

    def forward(self, x: torch.Tensor, batch: PackedBatch, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        qkv = self.qkv(x, batch.buffers)
        tokens = x.shape[0]
        # q and k sit side by side in qkv: one rotary pass over both heads
        qk = qkv[:, : self.qk_width].view(tokens, -1, self.head_dim)
        if self.q_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, : self.num_heads]), self.k_norm(qk[:, self.num_heads:])), dim=1)
        qk = apply_rotary(qk, *cos_sin)
        q, k = qk.split((self.num_heads, self.num_kv_heads), dim=1)
        v = qkv[:, self.qk_width:].view(tokens, self.num_kv_heads, self.head_dim)
        out = attend(q, k, v, batch.attn, self.layer_idx, causal=True, scale=self.scale, window=self.window,
                     softcap=self.softcap)
        return self.o_proj(out.reshape(x.shape[0], -1))


class LlamaMLP(nn.Module):
    """SwiGLU with gate and up fused into one projection."""

    def __init__(self, config: LlamaConfig, options: DecoderOptions):
        from transformers.activations import get_activation  # slow to import (see nn/linear.py): only here

        super().__init__()
        size = config.intermediate_size
        self.intermediate = divide(size, "intermediate_size")  # this rank's gate and up halves
        self.gate_up = Linear1D_Col(config.hidden_size, 2 * size, bias=options.mlp_bias, parts=(size, size),
                                    step_buffer="mlp")
        self.down_proj = Linear1D_Row(size, config.hidden_size, bias=options.mlp_bias)
        activation = options.activation or config.hidden_act
        self.fused_silu = activation == "silu"  # the common case gets the fused kernel
        self.act = get_activation(activation)

    def forward(self, x: torch.Tensor, buffers: StepBuffers | None = None) -> torch.Tensor:
        gate_up = self.gate_up(x, buffers)
        if self.fused_silu:
            return self.down_proj(kernels.silu_and_mul(gate_up))
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return self.down_proj(self.act(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int, options: DecoderOptions):
        super().__init__()
        self.input_layernorm = options.norm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx, options)
        self.post_attention_layernorm = options.norm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config, options)

    def forward(self, x: torch.Tensor, batch: PackedBatch, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), batch, cos_sin)
        return x + self.mlp(self.post_attention_layernorm(x), batch.buffers)


class LlamaModel(nn.Module):
    """The body's parameters under HF's `model.` names; LlamaForCausalLM runs them stage by stage."""

    def __init__(self, config: LlamaConfig, options: DecoderOptions, layer_cls: type[LlamaDecoderLayer]):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layer_cls(config, i, options) for i in range(config.num_hidden_layers))
        self.norm = options.norm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(StagedModel):
    hf_output = CausalLMOutputWithPast
    token_outputs = ("logits",)
    base_prefix = "model."
    layers_path = "model.layers"
    head_modules = ("model.norm", "lm_head")
    packed_modules = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}
    layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer  # a variant with another residual layout has its own

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, self.decoder_options(config), self.layer_cls)
        self.rotary = self.rotary_embedding(config)
        self.lm_head = untied_head(config)
        self.decode_loop: LlamaDecodeLoop | None = None  # built at the first decode step it applies to

    @staticmethod
    def decoder_options(config: LlamaConfig) -> DecoderOptions:
        """The switches this architecture's config sets (a variant overrides this, and refuses what it lacks)."""
        return DecoderOptions(qkv_bias=config.attention_bias, o_bias=config.attention_bias,
                              mlp_bias=config.mlp_bias)

    @staticmethod
    def rotary_embedding(config: LlamaConfig) -> RotaryEmbedding:
        """The rotary tables every layer shares (`layer_args` hands the step's to each layer)."""
        return RotaryEmbedding(config, head_dim(config))

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        return self.model.embed_tokens(batch.input_ids)

    def layer_args(self, batch: PackedBatch, x: torch.Tensor) -> tuple:
        return (self.rotary.cos_sin(batch.positions, x.dtype, batch.attn.cu_seqlens),)  # once per step, every layer

    def run_layers(self, x: torch.Tensor, batch: PackedBatch, extra: tuple, indices: range) -> torch.Tensor:
        """Decode steps on CPU run as one loop of the ops the modules would pick (llama_decode.py), for Llama's own
        layers (a variant with another layer, Gemma's, runs its modules)."""
        if self.layer_cls is LlamaDecoderLayer and LlamaDecodeLoop.applies(x, batch):
            if self.decode_loop is None:
                self.decode_loop = LlamaDecodeLoop(self.model.layers)
            return self.decode_loop.run(x, batch, *extra, indices)
        return super().run_layers(x, batch, extra, indices)

    def finish(self, x: torch.Tensor, batch: PackedBatch) -> dict[str, torch.Tensor]:
        hidden = self.model.norm(rows_for_logits(x, batch))
        return {"logits": vocab_logits(hidden, self.model.embed_tokens, self.lm_head)}

    def tied_embedding(self) -> str | None:
        return "model.embed_tokens" if self.lm_head is None else None

    def kv_cache_layout(self) -> tuple[int, int, int]:
        """(layers, kv heads, head dim) of the KV cache this model fills."""
        c = self.config
        return c.num_hidden_layers, divide(c.num_key_value_heads, "key/value heads"), head_dim(c)
