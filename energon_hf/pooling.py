"""sentence-transformers' Pooling module, on packed tokens: one vector per sequence from its token embeddings.

The hidden states arrive as the model computes them, [total tokens, hidden] with `cu_seqlens` marking each
sequence's rows, so every mode is a segment reduction (as sentence-transformers' own flattened path for
FlashAttention-2 unpadding) and no padded [batch, longest, hidden] tensor is ever built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# sentence-transformers' modes, in the order its Pooling concatenates them
MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# the config.json keys of sentence-transformers < 5, one bool per mode, in the same order
_LEGACY_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


@dataclass(frozen=True)
class Pooling:
    """`modes` pooled and concatenated in the given order; `include_prompt=False` leaves a prompt's tokens out
    (the first `prompt_length` tokens of each sequence; INSTRUCTOR-style models)."""

    modes: tuple[str, ...] = ("mean",)
    include_prompt: bool = True

    def __post_init__(self):
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"pooling modes must be among {MODES}, got {self.modes}")

    @classmethod
    def from_config(cls, config: dict) -> Pooling:
        """A Pooling folder's config.json: `pooling_mode` (a name or a list) or the legacy per-mode bools."""
        modes = config.get("pooling_mode")
        if modes is None:
            modes = [mode for key, mode in _LEGACY_KEYS.items() if config.get(key)] or ["mean"]
        modes = (modes,) if isinstance(modes, str) else tuple(modes)
        return cls(modes, bool(config.get("include_prompt", True)))

    def __call__(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor, prompt_length: int = 0) -> torch.Tensor:
        """hidden [T, H] packed, cu_seqlens [B+1] -> [B, H * len(modes)]. Half-precision inputs accumulate in
        float32 and are returned in their own dtype, as sentence-transformers does."""
        cu = cu_seqlens.to(hidden.device, torch.long)
        lengths = cu[1:] - cu[:-1]
        count = lengths.shape[0]
        skip = prompt_length if not self.include_prompt else 0
        segments = torch.repeat_interleave(torch.arange(count, device=hidden.device), lengths,
                                           output_size=hidden.shape[0])
        positions = torch.arange(hidden.shape[0], device=hidden.device) - cu[:-1][segments]
        kept, kept_segments, kept_positions = hidden, segments, positions
        if skip:
            keep = positions >= skip
            kept, kept_segments, kept_positions = hidden[keep], segments[keep], positions[keep]
        accumulate = torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16) else hidden.dtype
        width = hidden.shape[1]

        def segment_sum(values: torch.Tensor) -> torch.Tensor:
            return values.new_zeros(count, width).index_add_(0, kept_segments, values)

        vectors = []
        for mode in self.modes:
            if mode == "cls":
                vectors.append(hidden[cu[:-1] + torch.where(lengths > skip, skip, 0)])
            elif mode == "lasttoken":
                vectors.append(hidden[cu[1:] - 1])
            elif mode == "max":
                start = hidden.new_full((count, width), float("-inf"))
                vectors.append(start.scatter_reduce(0, kept_segments[:, None].expand(-1, width), kept, "amax"))
            elif mode in ("mean", "mean_sqrt_len_tokens"):
                counts = (lengths - skip).clamp(min=1e-9).to(accumulate)[:, None]
                denominator = counts if mode == "mean" else counts.sqrt()
                vectors.append((segment_sum(kept.to(accumulate)) / denominator).to(hidden.dtype))
            else:  # weightedmean: token i of a sequence weighs i + 1 (a left-out prompt keeps its positions)
                weights = (kept_positions + 1).to(accumulate)[:, None]
                total = torch.zeros(count, 1, dtype=accumulate, device=hidden.device).index_add_(0, kept_segments,
                                                                                               weights)
                vectors.append((segment_sum(kept.to(accumulate) * weights) / total.clamp(min=1e-9)).to(hidden.dtype))
        return torch.cat(vectors, dim=-1)
