"""Weight-only quantized products: int8 per output channel or in groups, int4 in groups along the input (torch
implementation, the references of the Triton kernels, and the dispatch to the compiled CPU kernels).

Activations stay floating point. On CPU with the compiled ops (kernels/compiled.py), products of few rows (decode
steps: fewer than INT8_DENSE_ROWS / INT4_DENSE_ROWS) run csrc/gemv.cpp: each weight is decoded to float32 in
registers and multiplied with float32 activations, so the product is exact to float32 rounding. torch's own int4
and int8 kernels round the activations to bfloat16 (about 4e-3 relative error per product), which took the
free-running greedy agreement of SmolLM2's 4-bit model with its float32 model from 100 % to 72 %
(bench/quality.py, 8 prompts x 64 tokens); they also cost two casts per product. Products of more rows (prompts,
large decode batches) expand the weight to bfloat16 for the dense GEMM. Without the compiled ops, torch's
kernels run (with float32 activations they are 6-20x slower, so the product casts to bfloat16 and back). CUDA
runs the Triton kernels (triton_quantized.py, through the dispatch: int4_linear / int8_linear); every other
device (and shapes the kernels refuse) runs the reference: dequantize, then F.linear.

Formats (the portable form, from which each device packs its own):
- int8: q [out, in] int8, scale [out] or [out, in / group]: w = q * scale.
- int4: q [out, in] uint8 in 0..15, scale and zero [out, in / group]: w = (q - 8) * scale + zero, the form of
  torch's int4 kernels (gpt-fast's); GGUF's Q4_1 (w = d * q + m) is scale = d, zero = m + 8 d, and Q4_0
  (w = d * (q - 8)) is zero = 0, both exactly. The compiled kernels hold (scale, min = zero - 8 scale) in
  float16, exact for both, and quantize_int4 makes its scales and minimums float16 values.
"""

from __future__ import annotations

import threading
from functools import cache

import torch
import torch.nn.functional as F

from . import compiled

CPU_COMPUTE_DTYPE = torch.bfloat16
# From this many rows on (prompts, batched decodes), an int8 or int4 product on CPU expands the weight to
# bfloat16 (the compiled dequantize_int8_into / dequantize_int4_into) into a reused buffer and runs the dense
# GEMM, where torch's bfloat16 GEMM is oneDNN's; fewer rows run the compiled float32 GEMV, whose four-row
# 512-bit kernels moved the crossover up. SmolLM2's 120 matrices of 30 layers, cold, 2-core Xeon with AMX,
# GEMV against expanded (interleaved, 2026-12-07): int4 18.4 / 28.8 / 38.2 / 50.5 / 76.7 / 99.0 ms against
# 49.2 / 51.8 / 51.7 / 58.2 / 72.2 / 74.8 at 8 / 16 / 24 / 32 / 48 / 64 rows; int8 24.0 / 36.0 / 46.1 / 55.2 /
# 77.0 against 52.3 / 54.3 / 55.2 / 56.0 / 61.7 at 8 / 16 / 24 / 32 / 48 rows (one expanded matrix, 3072 x
# 576 at 16 rows: the expansion 157 us, oneDNN's product 233 us with its weight reorder). torch's own int4 and
# int8 kernels cost about a GEMV per row and round the activations to bfloat16. Expanding to float32 instead (the
# exact quantizations, formats.EXACT_SUFFIX) costs 1.4x / 1.9x / 2.8x the bfloat16 path at 40 / 128 / 512 rows.
INT8_DENSE_ROWS = 32
INT4_DENSE_ROWS = 40
# A GGUF's 8-bit vocabulary head (converters/loader.py) runs the GEMV below this many rows, F.linear on the float
# table it keeps for lookups from there (SmolLM2's head, cold: 14.3 against 16.3 ms at 32 rows, 20.9 against 20.0
# at 48; 5.1 against 20.9 at 8).
INT8_HEAD_GEMV_ROWS = 40
_WIDE_GEMV = "avx512f" in compiled.cpu_flags()  # the -march=native build has csrc/gemv.cpp's four-row kernels
# float16 weights take the compiled kernel up to FLOAT16_GEMV_ROWS rows. SmolLM2 in float16, generate at batch
# 8 / 12 / 16 / 24 / 32 / 48 (one process, alternating, 2026-12-07, the four-row kernel): 201 / 243 / 266 / 287 /
# 294 / 299 new tokens/s through it against F.linear's 153 / 204 / 236 / 278 / 293 / 324.
# Measured where AVX-512 builds the four-row kernel; the 256-bit row_dot alone had lost to F.linear from 16 rows
# (924 against 741 us), so other hosts keep 8.
FLOAT16_GEMV_ROWS = 24 if _WIDE_GEMV else 8
# float32 weights held plain (where oneDNN's packing does not pay: formats.onednn_packing_pays) take the four-row
# kernel for these row counts. SmolLM2's 120 layer matrices, cold, one process alternating, at 1 / 2 / 4 / 8 / 12 /
# 16 / 20 / 24 / 32 rows: 22.4 / 22.7 / 25.2 / 30.1 / 33.8 / 38.1 / 45.8 / 47.8 / 56.2 ms against F.linear's 18.1 /
# 20.9 / 34.1 / 40.0 / 45.7 / 42.4 / 48.0 / 47.7 / 52.2 (its GEMV for one row reads faster than ours).
FLOAT32_GEMV_ROWS = range(3, 17) if _WIDE_GEMV else range(0)
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4 kernels take
_INT4_CPU_ROWS = 16  # torch's CPU int4 packing needs out_features divisible by this


def float_gemv_rows(dtype: torch.dtype) -> range:
    """The row counts whose products with a plain float weight of `dtype` run the compiled GEMV (float_gemv)."""
    if dtype == torch.float16:
        return range(1, FLOAT16_GEMV_ROWS + 1)
    return FLOAT32_GEMV_ROWS if dtype == torch.float32 else range(0)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per output channel: scale = max |w| / 127 of each row."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric in groups of `group_size` input features: each group's [min, max] in 16 levels."""
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"{in_features} input features are not a multiple of the int4 group size {group_size}")
    w = weight.float().reshape(out_features, -1, group_size)
    low, high = w.amin(dim=2), w.amax(dim=2)
    # scale and low float16-exact (GGUF's Q4_1 stores them so): the CPU kernels' table is float16
    scale = ((high - low) / 15).clamp_min(2**-24).half().float()
    low = low.half().float()
    q = torch.round((w - low[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8)
    return q.reshape(out_features, in_features), scale, low + 8 * scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w = q * scale, `scale` [out] (per channel) or [out, groups] (per group of input features: GGUF's Q8_0)."""
    groups = scale.reshape(q.shape[0], -1).float()
    return (q.float().view(q.shape[0], groups.shape[1], -1) * groups[..., None]).view(q.shape).to(dtype)


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    group_size = q.shape[1] // scale.shape[1]
    w = (q.float() - 8).reshape(q.shape[0], -1, group_size) * scale.float()[..., None] + zero.float()[..., None]
    return w.reshape(q.shape).to(dtype)


def int4_kernel_fits(out_features: int, in_features: int, group_size: int, device: torch.device) -> bool:
    """Whether torch's packed int4 kernel takes this matrix on `device` (else the reference runs)."""
    return (device.type == "cpu" and group_size in INT4_GROUP_SIZES and in_features % group_size == 0
            and out_features % _INT4_CPU_ROWS == 0)


def pack_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU kernel's layout: packed nibbles, and scales with zeros as [in / group, out, 2] bfloat16."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(CPU_COMPUTE_DTYPE).contiguous()
    return packed, scales_and_zeros


@cache
def fast_bfloat16_gemm() -> bool:
    """Whether torch's bfloat16 GEMM on this CPU is oneDNN's (AMX or AVX512-BF16), the product that expanded
    weights run on: without it the expansion would not pay."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def scales_and_mins(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The compiled kernels' table [out, groups, 2] float16: w = q * scale + min, min = zero - 8 scale. GGUF's
    blocks and quantize_int4's groups have float16 scales and minimums, which this gives back (zero = min + 8
    scale is formed in float32; for the magnitudes of real weights both steps are exact)."""
    return torch.stack([scale, zero - 8 * scale], dim=-1).half().contiguous()


def unpack_nibbles(nibbles: torch.Tensor, table: torch.Tensor, group_size: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight [out, in] that pack_nibbles' bytes and a scales_and_mins table hold: q * scale + min."""
    groups = nibbles.view(nibbles.shape[0], -1, group_size // 2)
    q = torch.cat((groups & 15, groups >> 4), dim=-1).float()
    return (q * table[..., :1].float() + table[..., 1:].float()).reshape(nibbles.shape[0], -1).to(dtype)


def int4_linear(x: torch.Tensor, nibbles: torch.Tensor, table: torch.Tensor, group_size: int) -> torch.Tensor:
    """x @ W^T for a nibbles-and-table weight, dequantized to x's dtype: the reference of the device kernel
    (kernels.int4_linear; triton_quantized.py)."""
    return F.linear(x, unpack_nibbles(nibbles, table, group_size, x.dtype))


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x @ W^T for W = q * scale, dequantized to x's dtype: the reference of the device kernel."""
    return F.linear(x, dequantize_int8(q, scale, x.dtype))


def pack_nibbles(q: torch.Tensor, group_size: int) -> torch.Tensor:
    """q [out, in] in 0..15 as [out, in / 2] bytes, group by group: byte i of a group holds the group's element i in
    its low half and element i + group_size / 2 in its high half (dequantize_int4_into's layout)."""
    groups = q.to(torch.uint8).reshape(q.shape[0], -1, 2, group_size // 2)
    return (groups[:, :, 0] | (groups[:, :, 1] << 4)).reshape(q.shape[0], -1).contiguous()


_scratch = threading.local()


def _expansion_target(out_features: int, in_features: int, x: torch.Tensor,
                      dtype: torch.dtype = CPU_COMPUTE_DTYPE) -> torch.Tensor:
    """Where a weight expanded for `x`'s product goes: a `dtype` [out, in] buffer that every layer reuses, one per
    thread and dtype (a fresh tensor per product would page-fault its megabytes in on every call, and layers on
    one thread run one after another); its own tensor where autograd records the product, since the next layer
    would overwrite the shared buffer before backward reads it."""
    if torch.is_grad_enabled() and x.requires_grad:
        return torch.empty(out_features, in_features, dtype=dtype)
    name = str(dtype).removeprefix("torch.")
    buffer = getattr(_scratch, name, None)
    if buffer is None or buffer.numel() < out_features * in_features:
        buffer = torch.empty(out_features * in_features, dtype=dtype)
        setattr(_scratch, name, buffer)
    return buffer[: out_features * in_features].view(out_features, in_features)


def int4_dense_matmul(x: torch.Tensor, nibbles: torch.Tensor, table: torch.Tensor, group_size: int,
                      bias: torch.Tensor | None = None, gelu: str | None = None,
                      keep_compute_dtype: bool = False, dtype: torch.dtype = CPU_COMPUTE_DTYPE) -> torch.Tensor:
    """x [..., in] @ W^T (+ bias, then GELU) with W expanded to `dtype` (bfloat16, or float32: the exact product)
    from its nibbles and scales_and_mins' table (CPU, the compiled op), in x's dtype (the compute dtype with
    `keep_compute_dtype`)."""
    weight = _expansion_target(nibbles.shape[0], nibbles.shape[1] * 2, x, dtype)
    torch.ops.energon_hf.dequantize_int4_into(nibbles, table, group_size, weight)
    return _dense_linear(x, weight, bias, gelu, keep_compute_dtype)


def int8_dense_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                      gelu: str | None = None, keep_compute_dtype: bool = False,
                      dtype: torch.dtype = CPU_COMPUTE_DTYPE) -> torch.Tensor:
    """x [..., in] @ W^T (+ bias, then GELU) with W = q * scale expanded to `dtype` (bfloat16, or float32: the
    exact product), in x's dtype (the compute dtype with `keep_compute_dtype`) (CPU). `scale` [out, groups]:
    float32 for the compiled dequantize_int8_into (w rounded once; 5x faster than torch's op), bfloat16 for
    torch's `q * scale` without the compiled ops."""
    weight = _expansion_target(*q.shape, x, dtype)
    if scale.dtype == torch.float32:
        torch.ops.energon_hf.dequantize_int8_into(q, scale, weight)
    else:
        shape = (q.shape[0], scale.shape[1], -1)
        torch.mul(q.view(shape), scale[..., None], out=weight.view(shape))
    return _dense_linear(x, weight, bias, gelu, keep_compute_dtype)


def _dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: str | None,
                  keep_compute_dtype: bool = False) -> torch.Tensor:
    """x [..., in] @ weight^T (+ bias, then GELU) in the weight's dtype, returned in x's dtype (the weight's with
    `keep_compute_dtype`). float32 runs F.linear: oneDNN's fused epilogue measured slower there (SmolLM2's 30
    layers at 40 rows: 93.5 against 85.3 ms)."""
    if weight.dtype != torch.float32:
        return _bfloat16_linear(x, weight, bias, gelu, keep_compute_dtype)
    out = F.linear(x.float(), weight, None if bias is None else bias.float())
    out = out if gelu is None else F.gelu(out, approximate=gelu)
    return out if keep_compute_dtype else out.to(x.dtype)


def _bfloat16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: str | None,
                     keep_compute_dtype: bool = False) -> torch.Tensor:
    """x [..., in] @ weight^T in bfloat16, with the bias (rounded to bfloat16, as the product is) and the GELU
    ("none": erf, "tanh") in oneDNN's epilogue, returned in x's dtype. all-MiniLM-L6-v2's int8 forward (4683
    tokens) spent 40 % of its time adding a float32 bias and converting in separate passes; the fused
    [4683, 768] x [768, 3072] product with GELU takes 28 ms against 49 for product, bias and GELU apart."""
    flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    flat = flat.to(CPU_COMPUTE_DTYPE).contiguous()
    bias = None if bias is None else bias.to(CPU_COMPUTE_DTYPE)
    if torch.backends.mkldnn.is_available() and not records_grad(x):
        out = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none" if gelu is None else "gelu", [],
                                                 "" if gelu is None else gelu)
    else:
        out = F.linear(flat, weight, bias)
        out = out if gelu is None else F.gelu(out, approximate=gelu)
    out = out if keep_compute_dtype else out.to(x.dtype)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[-1])


def _cpu_product(op, x: torch.Tensor, *weight) -> torch.Tensor:
    """op(x2d in bfloat16, *weight) for x [..., in], returned in x's dtype (no copies when x is 2-D bf16)."""
    flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    out = op(flat.to(CPU_COMPUTE_DTYPE).contiguous(), *weight).to(x.dtype)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[-1])


def gemv_available() -> bool:
    """Whether products of few rows run the compiled GEMV kernels (csrc/gemv.cpp): the ops loaded, with their
    vector code (AVX2, FMA, F16C) compiled in; their portable loops alone would be slower than torch's kernels."""
    return compiled.available() and _gemv_vectorized()


@cache
def _gemv_vectorized() -> bool:
    return bool(torch.ops.energon_hf.gemv_vectorized())


def records_grad(x: torch.Tensor) -> bool:
    """Whether autograd records a product with x: the compiled kernels have no backward."""
    return torch.is_grad_enabled() and x.requires_grad


def gemv(op, x: torch.Tensor, *weight) -> torch.Tensor:
    """A compiled GEMV kernel (csrc/gemv.cpp: `op(x2d, *weight)`, activations in any of compiled.DTYPES, the
    product computed in float32 and returned in x's dtype) on x [..., in]."""
    flat = x.reshape(-1, x.shape[-1])
    out = op(flat.contiguous() if x.dtype in compiled.DTYPES else flat.float().contiguous(), *weight)
    return out.to(x.dtype).view(*x.shape[:-1], out.shape[-1])


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [..., in] @ W^T for a pack_int4 weight (CPU), in x's dtype."""
    return _cpu_product(torch.ops.aten._weight_int4pack_mm_for_cpu, x, packed, group_size, scales_and_zeros)


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ W^T for an int8 weight with a bfloat16 `scale` (CPU), in x's dtype."""
    return _cpu_product(torch.ops.aten._weight_int8pack_mm, x, q, scale)
