"""Dense projections (torch implementation).

Which CPU product is fastest for a handful of rows (decode steps: one token per running sequence) depends on the
host; measured with cold weights on this project's 2-core machines:
- AMD EPYC (Zen 4): `W @ x^T` runs 1.2-2.9x faster than `x @ W^T` (F.linear) for SmolLM2's shapes (576x3072,
  1536x576, the 49152-row LM head) at 2 <= rows <= 64: the weight streams through once in its stored row-major
  order. (And oneDNN's packed layout beats both: nn/formats.DenseWeight.)
- Intel Xeon with AMX: of torch's products F.linear wins at every row count; SmolLM2's 120 layer matrices at 2 / 8
  / 32 rows: 19.4 / 38.2 / 46.7 ms against 44.8 / 47.7 / 54.3 with `W @ x^T` and 32.8 / 37.4 / 49.2 packed; at one
  row 16.9 against 26.3 packed. (Our own product on weights in column panels beats it from 2 rows:
  kernels/panels.py, which generating models' float32 layers take there.)
Prefill-sized inputs and other devices keep F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import compiled

SMALL_BATCH_ROWS = range(2, 65)


def amx_cpu() -> bool:
    """Whether this CPU has AMX tiles (Intel Sapphire Rapids and later): the hosts where F.linear on the plain
    float32 weight is the fastest small product (above)."""
    return "amx_tile" in compiled.cpu_flags()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ weight[out, in]^T + bias -> [..., out]. `out`: a [rows, out] buffer that products of
    BUFFERED_ROWS rows or more write into (batch.StepBuffers says why); others return a new tensor."""
    if _into(out, x, weight):
        return torch.mm(x, weight.t(), out=out) if bias is None else torch.addmm(bias, x, weight.t(), out=out)
    if x.device.type == "cpu" and x.dim() == 2 and x.shape[0] in SMALL_BATCH_ROWS and not amx_cpu():
        out = torch.mm(weight, x.t()) if bias is None else torch.addmm(bias[:, None], weight, x.t())
        return out.t().contiguous()
    return F.linear(x, weight, bias)


# From this many rows a product writes into the buffer it is given (below it, decode steps keep their own paths).
BUFFERED_ROWS = SMALL_BATCH_ROWS.stop


def fits_buffer(out: torch.Tensor | None, x: torch.Tensor, out_features: int) -> bool:
    """Whether a product of x [rows, in] with `out_features` outputs can write into `out` (the caller's buffer,
    None where it has none): BUFFERED_ROWS rows or more, the buffer's shape, dtype and device, no autograd on x."""
    return out is not None and x.dim() == 2 and x.shape[0] >= BUFFERED_ROWS \
        and out.shape == (x.shape[0], out_features) and out.dtype == x.dtype and out.device == x.device \
        and not (torch.is_grad_enabled() and x.requires_grad)


def _into(out: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the product x @ W^T can write into `out`: `fits_buffer`, with W in x's dtype and not recorded."""
    return x.dtype == weight.dtype and fits_buffer(out, x, weight.shape[0]) \
        and not (torch.is_grad_enabled() and weight.requires_grad)


# From this many rows (encoder batches, prompts) a CPU product with a GELU runs oneDNN's inner product with the bias
# and GELU in its epilogue, one pass over the output fewer: float32 on the 2-core Xeon, [4683, 384] x [384, 1536]
# 21.3 against 23.9 ms, [4683, 768] x [768, 3072] 101 against 111 (F.linear, then torch's GELU).
FUSED_GELU_ROWS = 64


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """gelu(x @ W^T + b). On CPU, fewer rows than FUSED_GELU_ROWS: the bias rides in the matmul (addmm), which
    beats a separate fused pass, then torch's GELU. Given a buffer `out` (as `linear`), the product writes into it
    and the GELU runs in place: bert-base's [4089, 768] x [768, 3072] 84 against 104 ms for oneDNN's fused
    epilogue into a new (page-faulting) tensor; all-MiniLM-L6-v2's [4683, 384] x [384, 1536] 28.5 against 28.2."""
    if _into(out, x, weight):
        return torch.ops.aten.gelu_(linear(x, weight, bias, out), approximate=approximate)
    records = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)  # oneDNN's op has no backward
    if x.device.type == "cpu" and x.dim() == 2 and x.shape[0] >= FUSED_GELU_ROWS and x.is_contiguous() \
            and x.dtype == weight.dtype and x.dtype in (torch.float32, torch.bfloat16) and not records \
            and (bias is None or bias.dtype == x.dtype) and torch.backends.mkldnn.is_available():
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], approximate)
    return F.gelu(linear(x, weight, bias), approximate=approximate)
