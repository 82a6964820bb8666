"""Tensor-parallel layers with EnergonAI's (Megatron 1D) semantics. Each knows which part of the full
checkpoint tensor is its own (`shard_for`), and loads it from a full tensor (`load_full_`); the loader uses
the same `shard_for` to read only that part from disk. At tp=1 they are the plain layers.

    mlp = nn.Sequential(Linear1D_Col(h, 4 * h), Linear1D_Row(4 * h, h))  # output of the unsplit MLP
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from energon_hf import kernels
from energon_hf.batch import StepBuffers
from energon_hf.parallel import Shard, state, tp_all_gather, tp_all_reduce

from .formats import DenseWeight, FormatPlan, LinearWeight
from .linear import Linear


class ShardedMixin:
    """`load_full_(name, tensor)`: copy this rank's part of the full tensor `tensor` into parameter `name`."""

    def shard_for(self, param: str) -> Shard | None:
        return None

    @torch.no_grad()
    def load_full_(self, param: str, tensor: torch.Tensor) -> None:
        shard = self.shard_for(param)
        part = tensor if shard is None else shard.take(tensor)
        target = getattr(self, param)
        if target.is_meta:  # built on the meta device: materialize
            setattr(self, param, nn.Parameter(part.to(target.dtype).clone(), requires_grad=False))
        else:
            target.copy_(part)


class Linear1D_Col(ShardedMixin, Linear):  # noqa: N801 (EnergonAI's name)
    """Splits the output features over the TP ranks: y_r = x @ W_r^T + b_r.

    gather_output=False (the default) leaves each rank its slice, as the input of a Linear1D_Row;
    True all-gathers the full output. `parts` describes fused projections (q, k, v sizes; gate and up):
    each part is split evenly, so rank r holds [q_r, k_r, v_r]. `activation` (an HF activation name)
    is applied to the slice, fused with the bias where the device has a kernel for it.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gather_output: bool = False,
                 activation: str | None = None, parts: tuple[int, ...] | None = None, **kwargs):
        st = state()
        self.parts = tuple(parts) if parts else (out_features,)
        if sum(self.parts) != out_features:
            raise ValueError(f"parts {self.parts} do not add up to out_features={out_features}")
        for part in self.parts:
            if part % st.tp_size:
                raise ValueError(f"output features {part} are not divisible by tp={st.tp_size}")
        if gather_output and len(self.parts) > 1:
            raise ValueError("gather_output=True needs a single part (the gathered order would interleave parts)")
        super().__init__(in_features, out_features // st.tp_size, bias=bias, activation=activation, **kwargs)
        # a split down projection all-reduces its partial sums: in the model's dtype, not the bfloat16 handed over
        self.feeds_product = self.feeds_product and st.tp_size == 1
        self.gather_output = gather_output
        self._shard = Shard.split(0, self.parts, st.tp_rank, st.tp_size)

    def shard_for(self, param: str) -> Shard | None:
        return self._shard  # weight [out, in] and bias [out] both split along dim 0

    def forward(self, x: torch.Tensor, buffers: StepBuffers | None = None) -> torch.Tensor:
        if self.gather_output:
            return tp_all_gather(super().forward(x), dim=-1)
        return super().forward(x, buffers)


class Linear1D_Row(ShardedMixin, Linear):  # noqa: N801 (EnergonAI's name)
    """Splits the input features over the TP ranks: y = all_reduce(x_r @ W_r^T) + b.

    parallel_input=True (the default) takes this rank's slice of the input (a Linear1D_Col's output);
    False takes the full input and slices it. The bias is added once, after the all-reduce.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, parallel_input: bool = True,
                 **kwargs):
        st = state()
        if in_features % st.tp_size:
            raise ValueError(f"input features {in_features} are not divisible by tp={st.tp_size}")
        super().__init__(in_features // st.tp_size, out_features, bias=bias, **kwargs)
        self.parallel_input = parallel_input
        self._shard = Shard.split(1, (in_features,), st.tp_rank, st.tp_size)

    def shard_for(self, param: str) -> Shard | None:
        return self._shard if param == "weight" else None  # the bias is whole on every rank

    def forward(self, x: torch.Tensor, *, add_bias: bool = True) -> torch.Tensor:
        """`add_bias=False`: the caller adds the bias (nn/norm.add_and_norm, in the same pass as a residual)."""
        st = state()
        if st.tp_size == 1:
            return super().forward(x) if add_bias else self.project(x, None)
        if not self.parallel_input:
            x = x.narrow(-1, st.tp_rank * self.in_features, self.in_features)
        out = tp_all_reduce(self.project(x, None))
        return out if self.bias is None or not add_bias else out + self.bias


class VocabParallelEmbedding(ShardedMixin, nn.Module):
    """Embedding rows split over the TP ranks; the vocabulary is padded to a multiple of tp (zero rows).

    A lookup embeds the ids in this rank's range, zeros the others, and all-reduces. The same weight
    serves as a vocabulary-parallel LM head (`logits`), which gathers the full vocabulary for the caller.
    `lookups=False`: an untied LM head, which only ever computes logits.
    """

    head: LinearWeight | None = None  # the logits product's weight format, set once the weight is loaded

    def __init__(self, num_embeddings: int, embedding_dim: int, lookups: bool = True, **kwargs):
        super().__init__()
        st = state()
        self.lookups = lookups
        self.num_embeddings = num_embeddings
        self.rows_per_rank = math.ceil(num_embeddings / st.tp_size)
        self.start = st.tp_rank * self.rows_per_rank
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, embedding_dim, **kwargs))
        self._shard = Shard.padded(0, num_embeddings, st.tp_rank, st.tp_size)

    def shard_for(self, param: str) -> Shard | None:
        return self._shard

    def computes_logits(self, plan: FormatPlan, name: str) -> bool:
        """Whether this table is a vocabulary head whose product takes a weight format (an untied head, or the
        tied embedding on the rank that runs the head) once loaded."""
        return plan.pack and (not self.lookups or name == plan.tied_head)

    def finish_loading(self, plan: FormatPlan, name: str) -> None:
        """A head's product gets its weight in the device's fast form, in the model's dtype (also when the
        layers are quantized: see formats.Quantization; the loader gives a GGUF's 8-bit head its own blocks
        instead). A tied head keeps its table for lookups beside it: the head is the largest product of a small
        model (SmolLM2's takes 5.2 ms packed against 10.6 ms with F.linear at one token, float32, on the AMD
        EPYC)."""
        if self.computes_logits(plan, name):
            self.take_head(DenseWeight(self.weight))

    def take_head(self, head: LinearWeight) -> None:
        """Compute logits with `head` from now on; an untied head then needs no table."""
        self.head = head
        if not self.lookups:
            self.weight = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if state().tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows_per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return tp_all_reduce(out.masked_fill_(outside.unsqueeze(-1), 0.0))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] @ W^T over the whole vocabulary: [N, num_embeddings]."""
        local = kernels.linear(hidden, self.weight) if self.head is None else self.head(hidden)
        return tp_all_gather(local, dim=-1)[..., : self.num_embeddings]
