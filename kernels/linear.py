"""Dense projections (torch implementation).

On CPU, for a handful of rows (decode steps: one token per running sequence), `W @ x^T` runs 1.2-2.9x
faster than `x @ W^T` (F.linear) with cold weights, measured on this project's 2-core machines for
SmolLM2's shapes (576x3072, 1536x576, the 49152-row LM head) at 2 <= rows <= 64: the weight streams
through once in its stored row-major order. Prefill-sized inputs and other devices keep F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SMALL_BATCH_ROWS = range(2, 65)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ weight[out, in]^T + bias -> [..., out]."""
    if x.device.type == "cpu" and x.dim() == 2 and x.shape[0] in SMALL_BATCH_ROWS:
        out = torch.mm(weight, x.t()) if bias is None else torch.addmm(bias[:, None], weight, x.t())
        return out.t().contiguous()
    return F.linear(x, weight, bias)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str) -> torch.Tensor:
    """gelu(x @ W^T + b). On CPU the bias rides in the matmul (addmm), which beats a separate fused pass."""
    return F.gelu(linear(x, weight, bias), approximate=approximate)
