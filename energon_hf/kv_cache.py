"""Paged KV cache: fixed-size blocks so sequences join and leave a batch without copying.

The storage (`KVCache`) lives where the model runs; the bookkeeping (`BlockAllocator`, block tables,
slot mapping) lives with whoever schedules sequences. Only integer tables cross between them.
"""

from __future__ import annotations

import math
import os
from collections import deque

import torch

from energon_hf import kernels
from energon_hf.kernels import compiled

BLOCK_SIZE = 16  # tokens per cache block, for every entry point (the server, generate, the benchmarks)


class KVCache:
    """Per-layer K and V blocks: [num_layers, num_blocks, block_size, kv_heads, head_dim].

    A pipeline stage holds only its own layers: layer ids first_layer .. first_layer + num_layers - 1.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, first_layer: int = 0):
        shape = (num_layers, num_blocks, block_size, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.first_layer = first_layer
        self._layers = list(zip(self.k.unbind(), self.v.unbind(), strict=True))  # views, made once: layer() is a lookup
        kernels.prepare(self.k.device)  # the attention that will read this cache, built before the first step
        # one compiled op for both writes on CPU (csrc/paged_decode.cpp), two index_copy_ calls elsewhere
        self._compiled_write = self.k.is_cpu and compiled.available()

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    def grown(self, num_blocks: int) -> KVCache:
        """A cache of `num_blocks` blocks holding this one's blocks at the same ids (a growing batcher keeps
        the sequences it is running)."""
        layers, _, block_size, kv_heads, head_dim = self.k.shape
        bigger = KVCache(layers, num_blocks, block_size, kv_heads, head_dim, self.k.dtype, self.k.device,
                         self.first_layer)
        bigger.k[:, :self.num_blocks] = self.k
        bigger.v[:, :self.num_blocks] = self.v
        return bigger

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V blocks [num_blocks, block_size, kv_heads, head_dim] of model layer `layer`."""
        return self._layers[layer - self.first_layer]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy each (source, destination) block, in every layer (a shared block a sequence is about to write)."""
        if copies:
            src, dst = (torch.tensor(ids, device=self.k.device) for ids in zip(*copies, strict=True))
            self.k[:, dst] = self.k[:, src]
            self.v[:, dst] = self.v[:, src]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store the packed new tokens' K/V [T, kv_heads, head_dim] at their slots."""
        keys, values = self._layers[layer - self.first_layer]
        if self._compiled_write and not (k.requires_grad and torch.is_grad_enabled()):  # (the op has no backward)
            torch.ops.energon_hf.kv_cache_write(keys, values, k, v, slot_mapping)
            return
        keys.view(-1, *k.shape[1:]).index_copy_(0, slot_mapping, k)
        values.view(-1, *v.shape[1:]).index_copy_(0, slot_mapping, v)


class BlockAllocator:
    """Hands out cache block ids per sequence; raises when the cache is full.

    Sequences may share blocks (beam search: a beam's continuations share their parent's context): a block is
    free again when no table holds it, and a sequence about to write into a shared block gets its own copy first
    (`writable`: copy-on-write)."""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.num_blocks_total = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self.tables: dict[int, list[int]] = {}
        self._shared: dict[int, int] = {}  # block -> tables holding it, for blocks held by more than one

    @property
    def num_free(self) -> int:
        return len(self._free)

    def grow(self, num_blocks: int) -> None:
        """Hand out block ids up to `num_blocks` (the storage must grow to match before a step uses them)."""
        self._free.extend(range(self.num_blocks_total, num_blocks))
        self.num_blocks_total = max(self.num_blocks_total, num_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def reserve(self, seq_id: int, num_tokens: int) -> list[int]:
        """Make sure `seq_id` owns enough blocks for `num_tokens` tokens in total."""
        table = self.tables.setdefault(seq_id, [])
        missing = self.blocks_for(num_tokens) - len(table)
        if missing > len(self._free):
            raise MemoryError(f"KV cache full: need {missing} blocks, {len(self._free)} free")
        table.extend(self._free.popleft() for _ in range(max(missing, 0)))
        return table

    def release(self, seq_id: int) -> None:
        self._drop(self.tables.pop(seq_id, []))
        if not self.tables:  # all free: hand blocks out in order again, so a lone sequence's are consecutive
            self._free, self._shared = deque(range(self.num_blocks_total)), {}

    def share(self, tables: dict[int, list[int]]) -> None:
        """Set the named sequences' tables to `tables` (built from blocks that tables hold now: a beam takes its
        parent's), then free the blocks no table holds any more."""
        for table in tables.values():
            for block in table:
                self._shared[block] = self._shared.get(block, 1) + 1
        for seq_id in tables:
            self._drop(self.tables.pop(seq_id, []))
        self.tables.update((seq_id, list(table)) for seq_id, table in tables.items())

    @property
    def sharing(self) -> bool:
        """Whether any block is shared (else no write needs a copy)."""
        return bool(self._shared)

    def writable(self, seq_id: int, position: int) -> tuple[int, int] | None:
        """Make the block that holds `position` of `seq_id` its own before it is written: a shared block is
        replaced by a fresh one; returns (shared block, fresh block), whose contents the cache must copy before
        the step writes, or None."""
        table = self.tables[seq_id]
        index = position // self.block_size
        block = table[index]
        if block not in self._shared:
            return None
        if not self._free:
            raise MemoryError("KV cache full: no block to copy a shared one into")
        table[index] = fresh = self._free.popleft()
        self._drop([block])
        return block, fresh

    def _drop(self, blocks: list[int]) -> None:
        """One holder fewer for each block: free those that no table holds."""
        for block in blocks:
            holders = self._shared.pop(block, 1) - 1
            if holders > 1:
                self._shared[block] = holders
            elif holders == 0:
                self._free.append(block)

    def block_table_tensor(self, seq_ids: list[int], device: torch.device | str) -> torch.Tensor:
        width = max(len(self.tables[s]) for s in seq_ids)
        rows = [self.tables[s] + [0] * (width - len(self.tables[s])) for s in seq_ids]
        return torch.tensor(rows, dtype=torch.int32, device=device)



def slot_mapping(block_tables: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                 block_size: int) -> torch.Tensor:
    """Flat cache slot of token `positions[i]` of the sequence whose block table is row `rows[i]`."""
    blocks = block_tables[rows, positions // block_size].long()
    return blocks * block_size + positions % block_size


def sequence_slots(table: list[int], positions: range, block_size: int) -> list[int]:
    """slot_mapping for one sequence on Python lists (a decode step's batch is built from lists: cached_batch)."""
    return [table[p // block_size] * block_size + p % block_size for p in positions]


def bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Cache bytes one token takes: its key and value in every layer."""
    return 2 * layers * kv_heads * head_dim * dtype.itemsize


def available_memory(device: torch.device) -> int:
    """Bytes the device has free now: CUDA's free memory; on a CPU, Linux's MemAvailable (what can be allocated
    without swapping, reclaimable page cache included), else the free physical pages."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def tokens_for_memory(free_bytes: float, per_token: int, fraction: float, most: int) -> int:
    """The cache tokens that `fraction` of `free_bytes` holds, in whole blocks: at least one block, at most
    `most` (tokens that could ever be in use)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"the KV cache memory fraction must be in (0, 1], got {fraction}")
    blocks = int(fraction * free_bytes // (per_token * BLOCK_SIZE))
    return BLOCK_SIZE * max(1, min(blocks, -(-most // BLOCK_SIZE)))
