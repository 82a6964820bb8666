"""Weight-only quantized products in Triton (CUDA; tested on CPU under TRITON_INTERPRET=1).

x [..., K] @ W^T with W held as the CPU formats hold it (nn/formats.py): int4 nibbles with a float16 (scale, min)
per group (quantized.pack_nibbles / scales_and_mins), or int8 with float32 scales per group of input features (per
channel: one group of K). Each program dequantizes its tile of weight rows in registers, group by group, so the
weight streams from memory in its 4 or 8 bits and is never expanded in memory (on CUDA the formats had
dequantized the whole matrix for every product). The dequantized tile is rounded to x's dtype for `tl.dot`
(tensor cores for float16 / bfloat16; float32 products in IEEE float32, not TF32, as the attention kernels keep
them for parity) and accumulated in float32; the output is x's dtype. Shapes the kernels do not take run the torch
references (quantized.int4_linear / int8_linear).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import quantized


def _row_block(rows: int) -> int:
    """x rows per program: tl.dot's minimum of 16 for decode steps, 64 for prompts."""
    return 16 if rows <= 16 else 64


def _precision(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"  # (tf32 only applies to float32 inputs)


@triton.jit
def _int4_linear(x, nibbles, table, out, M, N, K, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    HALF: tl.constexpr = GROUP // 2
    j = tl.arange(0, HALF)
    row_ok, col_ok = rows < M, cols < N
    groups = K // GROUP
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, groups):
        # byte i of a group: element i in its low nibble, element i + GROUP / 2 in its high one
        x_low = tl.load(x + rows[:, None] * K + g * GROUP + j[None, :], mask=row_ok[:, None], other=0.0)
        x_high = tl.load(x + rows[:, None] * K + g * GROUP + HALF + j[None, :], mask=row_ok[:, None], other=0.0)
        packed = tl.load(nibbles + cols[:, None] * (K // 2) + g * HALF + j[None, :], mask=col_ok[:, None], other=0)
        pair = table + (cols * groups + g) * 2
        scale = tl.load(pair, mask=col_ok, other=0.0).to(tl.float32)[:, None]
        low = tl.load(pair + 1, mask=col_ok, other=0.0).to(tl.float32)[:, None]
        w_low = ((packed & 15).to(tl.float32) * scale + low).to(x_low.dtype)
        w_high = ((packed >> 4).to(tl.float32) * scale + low).to(x_high.dtype)
        acc += tl.dot(x_low, tl.trans(w_low), input_precision=PRECISION)
        acc += tl.dot(x_high, tl.trans(w_high), input_precision=PRECISION)
    tl.store(out + rows[:, None] * N + cols[None, :], acc.to(out.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _int8_linear(x, q, scale, out, M, N, K, GROUP, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < M, cols < N
    groups = K // GROUP
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):  # BLOCK_K divides GROUP: one scale per weight row per step
        xs = tl.load(x + rows[:, None] * K + k + ks[None, :], mask=row_ok[:, None], other=0.0)
        w = tl.load(q + cols[:, None] * K + k + ks[None, :], mask=col_ok[:, None], other=0).to(tl.float32)
        s = tl.load(scale + cols * groups + k // GROUP, mask=col_ok, other=0.0)
        acc += tl.dot(xs, tl.trans((w * s[:, None]).to(xs.dtype)), input_precision=PRECISION)
    tl.store(out + rows[:, None] * N + cols[None, :], acc.to(out.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def int4_linear(x: torch.Tensor, nibbles: torch.Tensor, table: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [..., K] @ W^T for W = q * scale + min (nibbles [N, K / 2], table [N, K / group_size, 2] float16)."""
    if group_size < 32 or group_size & (group_size - 1):  # tl.dot: 16+ elements per half group, a power of two
        return quantized.int4_linear(x, nibbles, table, group_size)
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    (rows, features), outputs = flat.shape, nibbles.shape[0]
    out = torch.empty(rows, outputs, dtype=x.dtype, device=x.device)
    block_m, block_n = _row_block(rows), 64
    grid = (triton.cdiv(rows, block_m), triton.cdiv(outputs, block_n))
    _int4_linear[grid](flat, nibbles.contiguous(), table.contiguous(), out, rows, outputs, features, GROUP=group_size,
                       BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=_precision(x))
    return out.view(*x.shape[:-1], outputs)


def int8_linear(x: torch.Tensor, q8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ W^T for W = q * scale (q8 [N, K] int8, scale [N, groups] float32)."""
    (outputs, features), groups = q8.shape, scale.shape[1]
    group = features // groups
    block_k = next((b for b in (64, 32, 16) if group % b == 0), None)
    if block_k is None:
        return quantized.int8_linear(x, q8, scale)
    flat = x.reshape(-1, features).contiguous()
    rows = flat.shape[0]
    out = torch.empty(rows, outputs, dtype=x.dtype, device=x.device)
    block_m, block_n = _row_block(rows), 64
    grid = (triton.cdiv(rows, block_m), triton.cdiv(outputs, block_n))
    _int8_linear[grid](flat, q8.contiguous(), scale.contiguous(), out, rows, outputs, features, group,
                       BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=_precision(x))
    return out.view(*x.shape[:-1], outputs)
