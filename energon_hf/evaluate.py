"""What reduced precision costs a model, measured rather than assumed: perplexity on a text, and how many
greedy tokens agree with a reference model (bench/quality.py, and the quality tests)."""

from __future__ import annotations

import math

import torch

from .modeling import EnergonModel


@torch.inference_mode()
def perplexity(model: EnergonModel, ids: torch.Tensor, window: int = 1024) -> float:
    """exp(mean negative log-likelihood) of each token of `ids` [N] given the ones before it, in consecutive
    windows of `window` tokens (each window's first token has no context and is not scored)."""
    total, count = 0.0, 0
    for start in range(0, ids.numel() - 1, window):
        chunk = ids[start:start + window]
        if chunk.numel() < 2:
            break
        logits = model(input_ids=chunk[None]).logits[0, :-1].float()
        total += torch.nn.functional.cross_entropy(logits, chunk[1:].to(logits.device), reduction="sum").item()
        count += chunk.numel() - 1
    return math.exp(total / count)


def _left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return ids, mask


def greedy_tokens(model: EnergonModel, prompts: list[torch.Tensor], new_tokens: int) -> list[list[int]]:
    """Exactly `new_tokens` greedy tokens after each prompt (EOS held back, so every variant does the same work
    and every position can be compared)."""
    ids, mask = _left_padded(prompts)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False)
    return out[:, ids.shape[1]:].tolist()


@torch.inference_mode()
def forced_agreement(model: EnergonModel, prompts: list[torch.Tensor], reference: list[list[int]]) -> float:
    """Share of `reference`'s tokens (from `greedy_tokens`) that `model` also ranks first when fed the same
    prefix (teacher forcing): unlike `agreement`, one near-tie does not decide the rest of the sequence."""
    ids, mask = _left_padded([torch.cat([p, torch.tensor(r[:-1])]) for p, r in zip(prompts, reference, strict=True)])
    positions = (mask.cumsum(1) - 1).clamp_min(0)  # as generate numbers them: each sequence from 0
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    eos = model.generation_config.eos_token_id if model.generation_config else None
    if eos is not None:  # greedy_tokens held EOS back
        logits[..., eos] = -float("inf")
    predicted = logits.argmax(-1)
    same = sum((predicted[row, -len(ref):] == torch.tensor(ref)).sum().item() for row, ref in enumerate(reference))
    return same / sum(len(ref) for ref in reference)


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
    """Share of positions where two runs chose the same token (after a first difference a sequence usually
    goes its own way, so this also says how early they part)."""
    same = sum(a == b for row, ref in zip(tokens, reference, strict=True) for a, b in zip(row, ref, strict=True))
    return same / sum(len(ref) for ref in reference)


def passages(text: str, count: int | None = None) -> list[str]:
    """Overlapping word windows of `text`, 6 to 48 words long (a fixed cycle): a few hundred texts of mixed
    lengths from one shipped page, whose near neighbours (shared words) give retrieval something to find."""
    words = text.split()
    found = [" ".join(words[i: i + 6 + (i * 7) % 43]) for i in range(0, len(words) - 6, 7)]
    return found[:count]


def embedding_fidelity(embeddings: torch.Tensor, reference: torch.Tensor, queries: int = 50,
                       k: int = 10) -> dict[str, float]:
    """How faithful sentence embeddings [N, D] are to `reference`'s (same texts): the worst and mean cosine of
    each pair, and retrieval: the first `queries` texts search the others, and `top10_overlap` is the share of
    the reference's top-k hits that the embeddings' top-k also holds."""
    a, b = (torch.nn.functional.normalize(x.float(), dim=-1) for x in (embeddings, reference))
    cosine = (a * b).sum(-1)
    hits = (a[:queries] @ a[queries:].T).topk(k).indices
    expected = (b[:queries] @ b[queries:].T).topk(k).indices
    overlap = sum(len(set(h.tolist()) & set(e.tolist())) for h, e in zip(hits, expected, strict=True))
    return {"worst_cosine": cosine.min().item(), "mean_cosine": cosine.mean().item(),
            "top10_overlap": overlap / (queries * k)}
