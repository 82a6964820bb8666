"""Sampling where the logits are. With each step's batch the batcher sends a `SamplingPlan`: which logits row
samples under which group's sampler, and the groups that are new or gone since the last step. The runner that
holds the logits (the driver's own LocalRunner, or the multi-process engine's output rank: the last stage's
first tensor-parallel rank) keeps each group's `Sampler` in its `Samplers` and answers with token ids and the
logprobs a request asked for. `[rows, vocab]` float logits never cross a socket: 64 rows of SmolLM2's 49k
vocabulary are 12.6 MB a step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .params import GenerationParams
from .sampler import Draw, Sampler, beam_candidates, sample


@dataclass
class TokenLogprob:
    """The log-probability of a generated token under the model's distribution (before sampling
    parameters), and the `top` most likely tokens with theirs."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass(frozen=True)
class SamplerSpec:
    """What builds a group's Sampler where the logits are. `prompts` (each row's prompt) only where the
    repetition penalty or a ban reads them (GenerationParams.reads_history)."""

    key: int
    params: GenerationParams
    vocab_size: int
    generator: torch.Generator | None = None
    hf_draws: bool = True
    prompts: list[list[int]] | None = None

    def build(self, device: torch.device) -> Sampler:
        generator = self.generator
        if generator is not None and (generator.device.type != device.type or
                                      device.index not in (None, generator.device.index)):
            # made on the driver for its device (the engine's CPU generators for a CUDA rank, another card): the
            # same seed on ours; the state starts afresh, exact for the fresh generators seed= and the engine make
            generator = torch.Generator(device).manual_seed(generator.initial_seed())
        sampler = Sampler(self.params, self.vocab_size, device, generator, self.hf_draws)
        if self.prompts is not None:
            sampler.observe_prompts([torch.tensor(p, dtype=torch.long) for p in self.prompts])
        return sampler


@dataclass(frozen=True)
class SampleRow:
    """A logits row to sample: row `row` of group `key`, `generated` tokens so far; `logprobs` as Request's;
    `beam`: the number of best tokens a beam wants back with their scores (sampler.beam_candidates), instead of a
    drawn token."""

    key: int
    row: int
    generated: int
    logprobs: int | None = None
    beam: int = 0


@dataclass
class SamplingPlan:
    """`rows`: one entry per logits row of the step, None for a row to skip (its request finished while the
    step was made); `new` groups are built before, `dropped` ones forgotten; `reset` forgets every group first
    (a new batcher's first plan); `reorders`: beam groups' choices since their last step (Sampler.reorder)."""

    rows: list[SampleRow | None]
    new: list[SamplerSpec] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    reset: bool = False
    reorders: dict[int, list[tuple[int, int, int]]] = field(default_factory=dict)


@dataclass
class Sampled:
    """Per row of the plan: its token (None: skipped, or its group failed) and logprob record (None: not asked);
    `errors` by group key, for the groups whose sampling failed (their rows alone)."""

    tokens: list[int | None]
    logprobs: list[TokenLogprob | None]
    errors: dict[int, BaseException] = field(default_factory=dict)
    candidates: dict[int, tuple[list[int], list[float]]] = field(default_factory=dict)  # beam rows: tokens, scores


class Samplers:
    """The samplers of the groups in flight, on the rank that samples."""

    def __init__(self, device: torch.device):
        self.device = device
        self.groups: dict[int, Sampler] = {}

    def sample(self, logits: torch.Tensor, plan: SamplingPlan) -> Sampled:
        """Tokens for the plan's rows: one batched pass for the whole step; if that fails, group by group, so
        a group's bad parameters end that group alone, with the error."""
        self._update(plan)
        candidates = self._beams(logits, plan.rows)
        live = sorted((i for i, r in enumerate(plan.rows) if r is not None and not r.beam),
                      key=lambda i: plan.rows[i].row)
        errors: dict[int, BaseException] = {}
        try:
            drawn = dict(zip(live, self._draw(logits, plan.rows, live), strict=True)) if live else {}
        except RuntimeError:
            drawn = {}
            for key, members in self._by_group(plan.rows, live).items():
                try:
                    drawn.update(zip(members, self._draw(logits, plan.rows, members), strict=True))
                except RuntimeError as e:  # these sampling parameters: the other groups go on
                    errors[key] = e
        tokens = [drawn.get(i) for i in range(len(plan.rows))]
        return Sampled(tokens, _logprobs(logits, plan.rows, tokens), errors, candidates)

    def _beams(self, logits: torch.Tensor, rows: list[SampleRow | None]) -> dict[int, tuple[list[int], list[float]]]:
        """The beam rows' best tokens and scores, one pass for all (their groups' beams want the same count)."""
        beams = [i for i, r in enumerate(rows) if r is not None and r.beam]
        if not beams:
            return {}
        draws = [Draw(self.groups[rows[i].key], rows[i].row, rows[i].generated) for i in beams]
        values, ids = beam_candidates(logits[beams], draws, max(rows[i].beam for i in beams))
        return {i: (ids[n].tolist(), values[n].tolist()) for n, i in enumerate(beams)}

    def _update(self, plan: SamplingPlan) -> None:
        if plan.reset:
            self.groups.clear()
        for key in plan.dropped:
            self.groups.pop(key, None)
        for spec in plan.new:
            self.groups[spec.key] = spec.build(self.device)
        for key, moves in plan.reorders.items():
            if key in self.groups:  # (a group dropped with its last choice still on the way)
                self.groups[key].reorder(moves)

    def _draw(self, logits: torch.Tensor, rows: list[SampleRow | None], members: list[int]) -> list[int]:
        """The tokens of the rows at `members` (each group's rows in row order)."""
        draws = [Draw(self.groups[rows[i].key], rows[i].row, rows[i].generated) for i in members]
        every_row = members == list(range(logits.shape[0]))
        return sample(logits if every_row else logits[members], draws).tolist()

    @staticmethod
    def _by_group(rows: list[SampleRow | None], members: list[int]) -> dict[int, list[int]]:
        groups: dict[int, list[int]] = {}
        for i in members:
            groups.setdefault(rows[i].key, []).append(i)
        return groups


def _logprobs(logits: torch.Tensor, rows: list[SampleRow | None],
              tokens: list[int | None]) -> list[TokenLogprob | None]:
    """The sampled tokens' log-probabilities and top alternatives, for the rows that asked: one log_softmax
    and top-k for the whole step."""
    records: list[TokenLogprob | None] = [None] * len(rows)
    wanted = [r.logprobs for r, t in zip(rows, tokens, strict=True)
              if r is not None and r.logprobs is not None and t is not None]
    if not wanted:
        return records
    logp = torch.log_softmax(logits.float(), dim=-1)
    top_values, top_ids = logp.topk(max(wanted), dim=-1)
    for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
        if row is not None and row.logprobs is not None and token is not None:
            k = row.logprobs
            top = list(zip(top_ids[i, :k].tolist(), top_values[i, :k].tolist(), strict=True))
            records[i] = TokenLogprob(float(logp[i, token]), top)
    return records
