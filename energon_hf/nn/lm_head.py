"""Vocabulary logits, shared by every language-model head."""

from __future__ import annotations

import torch

from energon_hf.engine.batch import PackedBatch

from .parallel import VocabParallelEmbedding


def rows_for_logits(hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """All token rows, or only `batch.logits_indices` (generation needs each sequence's last token)."""
    return hidden if batch.logits_indices is None else hidden.index_select(0, batch.logits_indices)


def vocab_logits(hidden: torch.Tensor, embedding: VocabParallelEmbedding, head: VocabParallelEmbedding | None,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """hidden @ W^T (+ bias) over the full vocabulary; a tied head (None) reads the embedding matrix in place,
    so loading never has to re-tie parameters. Both are vocabulary-parallel under tensor parallelism."""
    logits = (embedding if head is None else head).logits(hidden)
    return logits if bias is None else logits + bias
