"""Turn next-token logits into tokens, with HF generate's parameters and semantics."""

from __future__ import annotations

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .params import GenerationParams

# The smallest temperature a division by keeps finite: float32 logits of about 10 over 1e-37 overflow to inf
# and the probabilities to nan. Below it sampling is the argmax anyway (a logit gap of 0.01 is e^100 apart).
MIN_TEMPERATURE = 1e-4


class Sampler:
    """Repetition penalty, EOS suppression before min_new_tokens, then (when sampling) temperature,
    top-k and top-p in HF's order through HF's own warpers, then argmax or a multinomial draw.

    The repetition penalty covers each sequence's own real tokens (prompt and generated), tracked as a
    [B, V] bitmap updated once per step; unlike HF it never penalizes pad tokens of a padded prompt.
    """

    def __init__(self, params: GenerationParams, vocab_size: int, device: torch.device,
                 generator: torch.Generator | None = None):
        self.params = params
        self.generator = generator
        self.seen: torch.Tensor | None = None
        self.vocab_size = vocab_size
        self.device = device
        self.warpers = LogitsProcessorList()
        if params.do_sample:
            if params.temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(max(params.temperature, MIN_TEMPERATURE)))
            if params.top_k:
                self.warpers.append(TopKLogitsWarper(top_k=params.top_k))
            if params.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(top_p=params.top_p))
        self.eos = torch.tensor(params.eos_token_ids, dtype=torch.long, device=device)

    def observe_prompts(self, prompt_ids: list[torch.Tensor]) -> None:
        if self.params.repetition_penalty == 1.0:
            return
        self.seen = torch.zeros(len(prompt_ids), self.vocab_size, dtype=torch.bool, device=self.device)
        for row, ids in enumerate(prompt_ids):
            self.seen[row, ids.to(self.device)] = True

    def process(self, logits: torch.Tensor, rows: torch.Tensor, generated: torch.Tensor | int) -> torch.Tensor:
        """The scores tokens are drawn from (softmax, when sampling) or picked from (argmax): logits [n, V] of
        the sequences at `rows` of the batch, which have `generated` tokens so far (one count, or one per row),
        after the repetition penalty, EOS suppression and the warpers."""
        scores = logits.float()
        if self.seen is not None:
            seen = self.seen[rows]
            penalty = self.params.repetition_penalty
            scores = torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)
        if self.params.min_new_tokens and self.eos.numel():
            early = torch.as_tensor(generated).expand(scores.shape[0]) < self.params.min_new_tokens
            scores[early.nonzero(), self.eos] = -float("inf")
        return self.warpers(None, scores) if self.params.do_sample else scores

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor, generated: torch.Tensor | int) -> torch.Tensor:
        """logits [n, V] for the sequences at `rows` of the batch -> next tokens [n]."""
        scores = self.process(logits, rows, generated)
        if self.params.do_sample:
            tokens = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=self.generator).squeeze(1)
        else:
            tokens = scores.argmax(dim=-1)
        if self.seen is not None:
            self.seen[rows, tokens] = True
        return tokens
