"""Beam search as transformers' generate computes it (GenerationMixin._beam_search), one prompt at a time.

Each step the rank that holds the logits sends back, for every running beam, its best tokens with their scores
(log-softmax, then the request's processing: sampler.beam_candidates). `PromptBeams.advance` then does what
transformers does with the [num_beams * vocab] accumulated scores of a batch row: the best `keep` continuations
(their union is within each beam's own best `keep`), the `num_beams` best of those that did not stop as the next
running beams, the ones that stopped (EOS, the length limit, a stop string) among the first `num_beams` offered to
the finished hypotheses under the length penalty, and the early-stopping heuristic. Every score op is the same
float32 op on the same values as transformers'.

The batcher turns each step's choice into the beams' sequences: a beam continues its parent's tokens and shares its
parent's KV cache blocks, copied only when written (BlockAllocator.writable); no prompt is computed twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

NEG = -1.0e9  # transformers' score of a beam that must not be picked


@dataclass(frozen=True)
class BeamSettings:
    num_beams: int
    max_new_tokens: int
    eos_token_ids: tuple[int, ...] = ()
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1

    @property
    def keep(self) -> int:
        """The continuations kept per step: enough that num_beams of them survive every EOS token stopping one."""
        return max(2, 1 + len(self.eos_token_ids)) * self.num_beams


class PromptBeams:
    """One prompt's beam search state: running beams (tokens and scores) and the finished hypotheses."""

    def __init__(self, prompt: list[int], settings: BeamSettings,
                 stops: Callable[[list[int]], bool] | None = None):
        k = settings.num_beams
        self.prompt, self.settings, self.stops = prompt, settings, stops
        self.running_scores = torch.zeros(1, k)
        self.running_scores[:, 1:] = NEG  # the beams start as copies of one: only the first one's continuations
        self.running: list[list[int]] = [[] for _ in range(k)]
        self.finished_scores = torch.full((1, k), NEG)
        self.finished_tokens: list[list[int]] = [[] for _ in range(k)]
        self.finished = torch.zeros(1, k, dtype=torch.bool)
        self.improvable = torch.ones(1, 1, dtype=torch.bool)  # transformers' is_early_stop_heuristic_unsatisfied
        self.generated = 0
        self.done = False

    def advance(self, ids: list[list[int]], scores: list[list[float]]) -> list[tuple[int, int]]:
        """Each running beam's best tokens and their scores (beams that are copies of the first one may be left
        out: before the first step) -> the next running beams as (parent beam, token)."""
        s, k = self.settings, self.settings.num_beams
        keep = s.keep
        beams = len(ids)
        accumulated = torch.tensor(scores, dtype=torch.float32)[:, :keep] + self.running_scores[0, :beams, None]
        top_scores, top = torch.topk(accumulated.reshape(1, -1), keep)
        parents = (top[0] // keep).tolist()
        tokens = [ids[p][i % keep] for p, i in zip(parents, top[0].tolist(), strict=True)]
        continued = [self.running[p] + [t] for p, t in zip(parents, tokens, strict=True)]
        hits = torch.tensor([[self._stops(c) for c in continued]])

        # the next running beams: the best that did not stop
        running_scores = top_scores + hits.to(torch.float32) * NEG
        order = torch.topk(running_scores, k)[1][0].tolist()
        self.running_scores = running_scores[:, order]
        self.running = [continued[i] for i in order]

        # the finished hypotheses: those among the first num_beams that stopped, under the length penalty
        just_finished = hits & (torch.arange(keep) < k)[None, :]
        offered = top_scores / ((self.generated + 1) ** s.length_penalty)
        full = torch.all(self.finished, dim=-1, keepdim=True) & (s.early_stopping is True)
        offered += full.to(torch.float32) * NEG
        offered += (~self.improvable).to(torch.float32) * NEG
        offered += (~just_finished) * NEG
        merged_scores = torch.cat((self.finished_scores, offered), dim=1)
        merged_tokens = self.finished_tokens + continued
        merged_finished = torch.cat((self.finished, just_finished), dim=1)
        best = torch.topk(merged_scores, k)[1][0]
        self.finished_scores, self.finished = merged_scores[:, best], merged_finished[:, best]
        self.finished_tokens = [merged_tokens[i] for i in best.tolist()]

        self.generated += 1
        self.improvable = self._improvable()
        self.done = not bool(self.improvable.all()) or bool(hits.all()) \
            or (bool(self.finished.all()) and s.early_stopping is True)
        return [(parents[i], tokens[i]) for i in order]

    def results(self) -> list[list[int]]:
        """The num_return_sequences best finished hypotheses' tokens."""
        return self.finished_tokens[: self.settings.num_return_sequences]

    def _stops(self, tokens: list[int]) -> bool:
        s = self.settings
        return tokens[-1] in s.eos_token_ids or len(tokens) >= s.max_new_tokens \
            or (self.stops is not None and self.stops(self.prompt + tokens))

    def _improvable(self) -> torch.Tensor:
        """transformers' _check_early_stop_heuristic: whether the best running beam could still beat the worst
        finished hypothesis."""
        s = self.settings
        length = s.max_new_tokens if s.early_stopping == "never" and s.length_penalty > 0.0 else self.generated
        best_possible = self.running_scores[:, :1] / (length**s.length_penalty)
        worst = torch.where(self.finished, torch.min(self.finished_scores, dim=1, keepdim=True)[0], NEG)
        return self.improvable & torch.any(best_possible > worst, dim=-1, keepdim=True)


class BeamGroup:
    """The beam searches of one generate call: each prompt's num_beams requests (rows p * num_beams + j) and its
    PromptBeams."""

    def __init__(self, requests: list, settings: BeamSettings, stops: Callable[[list[int]], bool] | None = None):
        self.requests, self.settings = requests, settings
        self.prompts = [PromptBeams(r.prompt, settings, stops) for r in requests[::settings.num_beams]]

    def members(self, prompt: int) -> list:
        k = self.settings.num_beams
        return self.requests[prompt * k:(prompt + 1) * k]

    def results(self) -> list[list[int]]:
        """num_return_sequences token lists per prompt, prompt by prompt."""
        return [tokens for search in self.prompts for tokens in search.results()]
