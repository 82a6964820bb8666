"""Batch builders and comparison helpers for parity tests."""

import torch

ATOL = 1e-4
MIXED_LENGTHS = [1, 64, 7, 33, 2, 50, 16, 5]


def padded_batch(lengths: list[int], vocab: int, side: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids [B, max(lengths)] (pads hold id 0) and a 0/1 mask, padded on `side`."""
    gen = torch.Generator().manual_seed(seed)
    seqlen = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), seqlen), generator=gen)
    mask = torch.zeros(len(lengths), seqlen, dtype=torch.long)
    for row, n in enumerate(lengths):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, seqlen - n:] = 1
    return ids.masked_fill(mask == 0, 0), mask


def max_diff_on_real(ours: torch.Tensor, theirs: torch.Tensor, mask: torch.Tensor) -> float:
    """Max abs difference over non-pad positions of [B, S, ...] tensors (compared on CPU: a GPU run's sides may
    come back on different devices)."""
    keep = mask.bool().cpu()
    return (ours.cpu()[keep].float() - theirs.cpu()[keep].float()).abs().max().item()


def first_real_index(mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's first real token."""
    return mask.long().argmax(dim=1)


def assert_greedy_matches(ours, hf, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int = 32, **kwargs):
    """Our greedy generate returns exactly transformers' tokens (prompt + new, pads after EOS)."""
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, **{"eos_token_id": None, **kwargs})
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, **kwargs)
    got = ours.generate(ids, attention_mask=mask, **kwargs)
    assert got.shape == expected.shape
    assert torch.equal(got.cpu(), expected.cpu())
    return got


def assert_forward_matches(ours, hf, ids: torch.Tensor, mask: torch.Tensor, field: str = "logits", **inputs):
    """Same ModelOutput type and shape as transformers, and values within ATOL on real tokens."""
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, **inputs)
    got = ours(input_ids=ids, attention_mask=mask, **inputs)
    assert type(got) is type(expected)
    assert getattr(got, field).shape == getattr(expected, field).shape
    assert max_diff_on_real(getattr(got, field), getattr(expected, field), mask) <= ATOL
    return got


def greedy_gap(ours, hf, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> float:
    """How far our greedy tokens fall below transformers' own choice, judged by transformers: its logits on our
    generated sequences (teacher-forced, EOS held back as generate holds it), at each new token the largest logit
    minus our token's, the worst over all. 0 when every token is transformers' argmax; a near-tie that rounded the
    other way gives a gap within rounding, where free-running agreement would count the rest of the sequence as
    different."""
    kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    new = ours.generate(ids, attention_mask=mask, **kwargs)[:, ids.shape[1]:]
    assert new.shape == (ids.shape[0], max_new_tokens)
    full_mask = torch.cat([mask, torch.ones_like(new)], dim=1)
    positions = (full_mask.cumsum(1) - 1).clamp_min(0)  # as generate numbers a left-padded row's tokens
    with torch.no_grad():
        logits = hf(input_ids=torch.cat([ids, new], dim=1), attention_mask=full_mask,
                    position_ids=positions).logits[:, ids.shape[1] - 1: -1].float()
    eos = hf.generation_config.eos_token_id
    if eos is not None:
        logits[..., eos] = -float("inf")
    chosen = logits.gather(-1, new[..., None])[..., 0]
    return (logits.max(-1).values - chosen).max().item()
