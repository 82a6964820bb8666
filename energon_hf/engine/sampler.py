"""Turn next-token logits into tokens, with HF generate's parameters and semantics, for a whole step at once.

A `Sampler` holds what one HF generate call would: its parameters, its generator and the tokens each of its
rows has seen (for the repetition penalty). A step's rows may come from many samplers (a server's requests,
concurrent generate calls); `sample` processes them all with one pass of tensor ops, each row under its own
parameters, and draws once per generator. The processing is HF's, op for op: repetition penalty, n-gram and
bad-word bans, EOS held back before min_new_tokens, then when sampling temperature, top-k and top-p as
TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper compute them, then softmax and a multinomial draw
(an inverse-CDF draw for rows that need not reproduce transformers' random stream), or argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .params import GenerationParams

# The smallest temperature a division by keeps finite: float32 logits of about 10 over 1e-37 overflow to inf
# and the probabilities to nan. Below it sampling is the argmax anyway (a logit gap of 0.01 is e^100 apart).
MIN_TEMPERATURE = 1e-4


class Sampler:
    """The sampling state of one group of rows: parameters, generator, and a [B, V] bitmap of each row's own
    real tokens (prompt and generated), updated as tokens are drawn; unlike HF it never penalizes pad tokens
    of a padded prompt.

    `hf_draws`: draw with torch.multinomial, consuming the generator (or torch's global one) exactly as
    transformers' generate does, so seeds reproduce its tokens. It costs about 1 ms a row at 49k tokens
    (multinomial is an exponential race: one random number per vocabulary entry). Without it (a server's
    request that gave no seed), a row draws by inverse CDF from one uniform number: 64 rows in about 3 ms
    instead of 65.
    """

    def __init__(self, params: GenerationParams, vocab_size: int, device: torch.device,
                 generator: torch.Generator | None = None, hf_draws: bool = True):
        self.params = params
        self.generator = generator
        self.hf_draws = hf_draws or generator is not None
        self.seen: torch.Tensor | None = None
        self.history: list[list[int]] | None = None  # each row's tokens, where a ban reads them
        self.single_bans = [w[0] for w in params.bad_words_ids if len(w) == 1]
        self.sequence_bans = [w for w in params.bad_words_ids if len(w) > 1]
        self.bans = params.no_repeat_ngram_size > 0 or bool(params.bad_words_ids)
        self.vocab_size = vocab_size
        self.device = device
        self.temperature = max(params.temperature, MIN_TEMPERATURE)
        self.eos = torch.tensor(params.eos_token_ids, dtype=torch.long, device=device)

    def observe_prompts(self, prompt_ids: list[torch.Tensor]) -> None:
        if self.bans:
            self.history = [ids.tolist() for ids in prompt_ids]
        if self.params.repetition_penalty == 1.0:
            return
        self.seen = torch.zeros(len(prompt_ids), self.vocab_size, dtype=torch.bool, device=self.device)
        for row, ids in enumerate(prompt_ids):
            self.seen[row, ids.to(self.device)] = True

    def banned(self, row: int) -> list[int]:
        """The tokens row `row` may not draw next: those that would repeat one of its n-grams (HF's
        NoRepeatNGramLogitsProcessor), the bad words of one token, and the last token of each longer bad word whose
        other tokens end the row (HF's NoBadWordsLogitsProcessor)."""
        tokens, n = self.history[row], self.params.no_repeat_ngram_size
        banned = list(self.single_bans)
        if n > 0 and len(tokens) + 1 >= n:
            prefix = tokens[len(tokens) + 1 - n:]
            banned += [tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tokens[i:i + n - 1] == prefix]
        banned += [w[-1] for w in self.sequence_bans if len(w) - 1 <= len(tokens)
                   and tokens[len(tokens) - len(w) + 1:] == w[:-1]]
        return banned

    def observe(self, row: int, token: int) -> None:
        """Row `row` drew `token`."""
        if self.seen is not None:
            self.seen[row, token] = True
        if self.history is not None:
            self.history[row].append(token)

    def reorder(self, moves: list[tuple[int, int, int]]) -> None:
        """Beam search chose its beams: each (row, parent, token) makes `row` what row `parent` was, then `token`."""
        if self.seen is not None:
            parents = torch.tensor([parent for _, parent, _ in moves], device=self.device)
            rows = torch.tensor([row for row, _, _ in moves], device=self.device)
            self.seen[rows] = self.seen[parents]
        if self.history is not None:
            old = [list(tokens) for tokens in self.history]
            for row, parent, _ in moves:
                self.history[row] = list(old[parent])
        for row, _, token in moves:
            self.observe(row, token)

    def draws(self, rows: torch.Tensor, generated: torch.Tensor | int) -> list[Draw]:
        counts = torch.as_tensor(generated).expand(len(rows)).tolist()
        return [Draw(self, row, count) for row, count in zip(rows.tolist(), counts, strict=True)]

    def process(self, logits: torch.Tensor, rows: torch.Tensor, generated: torch.Tensor | int) -> torch.Tensor:
        """The scores tokens are drawn from (softmax, when sampling) or picked from (argmax): logits [n, V] of
        the rows `rows`, which have `generated` tokens so far (one count, or one per row)."""
        return process(logits, self.draws(rows, generated))

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor, generated: torch.Tensor | int) -> torch.Tensor:
        """logits [n, V] for the rows `rows` -> next tokens [n]."""
        return sample(logits, self.draws(rows, generated))


@dataclass
class Draw:
    """One row of a step to sample: row `row` of `sampler`'s group, with `generated` tokens so far."""

    sampler: Sampler
    row: int
    generated: int

    @property
    def params(self) -> GenerationParams:
        return self.sampler.params


def process(logits: torch.Tensor, draws: list[Draw]) -> torch.Tensor:
    """The scores of each row [n, V] after its own penalty, EOS suppression and (rows that sample) warpers.
    The caller's logits are never changed; they are copied only where a row is changed in place."""
    scores = logits.float()
    penalized = [i for i, d in enumerate(draws) if d.sampler.seen is not None]
    banning = [i for i, d in enumerate(draws) if d.sampler.bans]
    held_back = [i for i, d in enumerate(draws)  # EOS held back before min_new_tokens
                 if d.generated < d.params.min_new_tokens and d.sampler.eos.numel()]
    sampling = [i for i, d in enumerate(draws) if d.params.do_sample]
    every_row = len(sampling) == len(draws)
    if (penalized or banning or held_back or (sampling and not every_row)) \
            and scores.data_ptr() == logits.data_ptr():
        scores = scores.clone()
    if penalized:
        _penalize_repetition(scores, draws, penalized)
    for i in banning:
        banned = draws[i].sampler.banned(draws[i].row)
        if banned:
            scores[i, banned] = -float("inf")
    for i in held_back:
        scores[i, draws[i].sampler.eos] = -float("inf")
    if every_row:
        return _warp(scores, draws)
    if sampling:
        scores[sampling] = _warp(scores[sampling], [draws[i] for i in sampling])
    return scores


def sample(logits: torch.Tensor, draws: list[Draw]) -> torch.Tensor:
    """Next tokens [n]: argmax for greedy rows; one multinomial draw per generator for the rows that sample
    as HF does (a generate call's rows draw together, as HF's batch does), one inverse-CDF draw for the
    others; each sampler's seen tokens updated."""
    if all(not d.params.do_sample and d.sampler.seen is None and not d.sampler.bans for d in draws):
        return _greedy(logits, draws)
    scores = process(logits, draws)
    greedy, quick, by_generator = [], [], {}
    for i, draw in enumerate(draws):
        if not draw.params.do_sample:
            greedy.append(i)
        elif draw.sampler.hf_draws:
            by_generator.setdefault(id(draw.sampler.generator), []).append(i)
        else:
            quick.append(i)
    tokens = torch.empty(len(draws), dtype=torch.long, device=scores.device)
    for rows, draw in [(greedy, _argmax), (quick, _inverse_cdf)]:
        if len(rows) == len(draws):
            tokens = draw(scores)
        elif rows:
            tokens[rows] = draw(scores[rows])
    # Every generator's probabilities checked before any draws: a bad row fails the pass before a generator
    # moves, so the caller can retry the other groups with their generators untouched.
    probs = {id(rows): torch.softmax(scores[rows], dim=-1) for rows in by_generator.values()}
    for p in probs.values():
        if not (torch.isfinite(p).all() and (p >= 0).all() and (p.sum(-1) > 0).all()):
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
    for rows in by_generator.values():
        generator = draws[rows[0]].sampler.generator
        tokens[rows] = torch.multinomial(probs[id(rows)], 1, generator=generator).squeeze(1)
    for draw, token in zip(draws, tokens.tolist(), strict=True):
        draw.sampler.observe(draw.row, token)
    return tokens


def beam_candidates(logits: torch.Tensor, draws: list[Draw], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search's view of each row: the k best tokens and their scores [n, k], the scores being transformers'
    for beams: log_softmax of the float32 logits, then the row's processing (penalty, bans, EOS held back)."""
    scores = process(torch.log_softmax(logits.float(), dim=-1), draws)
    return torch.topk(scores, k, dim=-1)


def _greedy(logits: torch.Tensor, draws: list[Draw]) -> torch.Tensor:
    """Greedy rows without a repetition penalty: the argmax, and where it is an EOS token held back (before
    min_new_tokens), the argmax of that row without its EOS tokens. The tokens of process() and argmax (masking
    only lowers EOS scores, so a first maximum elsewhere stays the first), without copying the step's logits
    to mask them (0.2 of a 17 ms SmolLM2 step at batch 1)."""
    tokens = _argmax(logits)
    for i, (draw, token) in enumerate(zip(draws, tokens.tolist(), strict=True)):
        if draw.generated < draw.params.min_new_tokens and token in draw.params.eos_token_ids:
            row = logits[i].float().clone()
            row[draw.sampler.eos] = -float("inf")
            tokens[i] = _argmax(row)
    return tokens


def _argmax(scores: torch.Tensor) -> torch.Tensor:
    """HF's argmax (the first of tied maxima; NaN wins), through max: torch's CPU argmax does not vectorize
    (a 49k-token row: 86 against 39 us)."""
    return scores.max(dim=-1).indices


def _inverse_cdf(scores: torch.Tensor) -> torch.Tensor:
    """One token per row of scores [m, V]: the first whose cumulative probability exceeds a uniform draw from
    torch's global generator (scaled to the row's total), so a token of probability 0 is never picked."""
    cdf = torch.softmax(scores, dim=-1).cumsum(dim=-1)
    total = cdf[:, -1:]
    threshold = torch.minimum(torch.rand(scores.shape[0], 1, device=scores.device) * total,
                              torch.nextafter(total, torch.zeros_like(total)))  # strictly below the total
    return torch.searchsorted(cdf, threshold, right=True).squeeze(1)


def _penalize_repetition(scores: torch.Tensor, draws: list[Draw], rows: list[int]) -> None:
    """HF's RepetitionPenaltyLogitsProcessor on `rows` (those with a penalty), over each row's seen tokens."""
    seen = torch.stack([draws[i].sampler.seen[draws[i].row] for i in rows])
    penalty = torch.tensor([[draws[i].params.repetition_penalty] for i in rows], device=scores.device)
    part = scores[rows]
    scores[rows] = torch.where(seen, torch.where(part < 0, part * penalty, part / penalty), part)


def _warp(scores: torch.Tensor, draws: list[Draw]) -> torch.Tensor:
    """Temperature, top-k and top-p with per-row values, computed as HF's warpers do for one value: the same
    float32 operands (a Python float against a float32 tensor is a float32 operand), the same comparisons."""
    device, given = scores.device, scores
    temperature = torch.tensor([[d.sampler.temperature] for d in draws], dtype=torch.float32, device=device)
    if (temperature != 1.0).any():
        scores = scores / temperature
    vocab = scores.shape[-1]
    top_k = torch.tensor([[min(d.params.top_k, vocab)] for d in draws], device=device)
    if top_k.any():  # the k-th largest score of each row: a top-k of the largest k, not a sort of the vocabulary
        kth = torch.topk(scores, int(top_k.max()), dim=-1).values.gather(1, (top_k - 1).clamp(min=0))
        kth = torch.where(top_k > 0, kth, -float("inf"))
        scores = scores.masked_fill(scores < kth, -float("inf"))
    nucleus = [i for i, d in enumerate(draws) if d.params.top_p < 1.0]
    if not nucleus:
        return scores
    if scores is given:  # top-p changes rows in place; temperature and top-k already made a new tensor
        scores = scores.clone()
    cheap = [i for i in nucleus if not draws[i].sampler.hf_draws]
    covered = _top_p_among_candidates(scores, cheap, [draws[i].params.top_p for i in cheap]) if cheap else []
    rest = [i for i in nucleus if i not in covered]
    if rest:
        scores[rest] = _top_p_sorted(scores[rest], [draws[i].params.top_p for i in rest])
    return scores


def _top_p_sorted(scores: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """HF's TopPLogitsWarper, op for op, with a top_p per row: sort the vocabulary, remove the tokens whose
    ascending cumulative probability is at most 1 - top_p, keep the most likely one."""
    least = torch.tensor([[1 - p] for p in top_p], dtype=torch.float32, device=scores.device)
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= least
    remove[..., -1:] = False  # min_tokens_to_keep = 1
    return scores.masked_fill(remove.scatter(1, sorted_indices, remove), -float("inf"))


TOP_P_CANDIDATES = 256


def _top_p_among_candidates(scores: torch.Tensor, rows: list[int], top_p: list[float]) -> list[int]:
    """Top-p without sorting the vocabulary, for rows that need no bit-exact agreement with HF (unseeded server
    requests): when a row's TOP_P_CANDIDATES most likely tokens hold at least top_p of its probability, the
    nucleus lies among them. A token is kept when the tokens above it hold less than top_p (HF's rule, up to
    float rounding at the boundary). Changes those rows of `scores` in place and returns them; the others
    need the sort. 64 rows of 49k tokens: a top-256 in about 6 ms, against 122 ms for the sort."""
    part = scores[rows]
    values, indices = torch.topk(part, min(TOP_P_CANDIDATES, part.shape[-1]), dim=-1)
    probs = torch.exp(values - torch.logsumexp(part, dim=-1, keepdim=True))
    above = probs.cumsum(dim=-1) - probs  # the mass of the candidates more likely than each
    p = torch.tensor([[q] for q in top_p], dtype=probs.dtype, device=probs.device)
    covered = probs.sum(dim=-1) >= p.squeeze(1)
    kept = torch.full_like(part, -float("inf")).scatter(1, indices, torch.where(above < p, values, -float("inf")))
    done = [row for row, ok in zip(rows, covered.tolist(), strict=True) if ok]
    if done:
        scores[done] = kept[covered]
    return done
