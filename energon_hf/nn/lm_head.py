"""Vocabulary logits, shared by every language-model head."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from energon_hf.batch import PackedBatch

from .parallel import VocabParallelEmbedding

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def untied_head(config: PretrainedConfig, width: int | None = None) -> VocabParallelEmbedding | None:
    """A model's own LM head, or None when it is tied to the word embeddings (read in place by `vocab_logits`)."""
    if config.tie_word_embeddings:
        return None
    return VocabParallelEmbedding(config.vocab_size, width or config.hidden_size, lookups=False)


def rows_for_logits(hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """All token rows, or only `batch.logits_indices` (generation needs each sequence's last token)."""
    return hidden if batch.logits_indices is None else hidden.index_select(0, batch.logits_indices)


def vocab_logits(hidden: torch.Tensor, embedding: VocabParallelEmbedding, head: VocabParallelEmbedding | None,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """hidden @ W^T (+ bias) over the full vocabulary; a tied head (None) reads the embedding matrix in place,
    so loading never has to re-tie parameters. Both are vocabulary-parallel under tensor parallelism."""
    logits = (embedding if head is None else head).logits(hidden)
    return logits if bias is None else logits + bias
