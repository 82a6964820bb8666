"""A pipeline stage of the multi-process engine: runs its layers on micro-batches, receiving hidden states
from the previous stage and sending its own to the next, so that the stages overlap: while stage s works
on micro-batch i, stage s-1 already works on i+1.

Every rank receives the whole step from the driver and splits it the same way, so only hidden states
travel between stages (torch.distributed send/recv, each TP rank to its counterpart).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from energon_hf.batch import AttentionMetadata, PackedBatch
from energon_hf.parallel import state

from .runner import LocalRunner


def split_batch(batch: PackedBatch, parts: int) -> list[PackedBatch]:
    """Contiguous groups of sequences with about equal token counts (at most `parts`, none empty)."""
    cu = batch.attn.cu_seqlens.long()
    num_seqs, total = cu.shape[0] - 1, int(cu[-1])
    parts = max(1, min(parts, num_seqs))
    # Cut after the sequence whose end first reaches each k/parts of the tokens.
    cuts = sorted({int(torch.searchsorted(cu[1:], total * k / parts)) + 1 for k in range(1, parts)} - {num_seqs})
    bounds = [0, *cuts, num_seqs]
    return [_sequences(batch, a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def _sequences(batch: PackedBatch, first: int, end: int) -> PackedBatch:
    """Sequences first .. end-1 of the batch, as a batch of their own."""
    attn, cu = batch.attn, batch.attn.cu_seqlens
    lo, hi = int(cu[first]), int(cu[end])
    tokens = lambda t: None if t is None else t[lo:hi]  # noqa: E731
    seqs = lambda t: None if t is None else t[first:end]  # noqa: E731
    new_cu = cu[first:end + 1] - cu[first]
    logits_indices = batch.logits_indices
    if logits_indices is not None:
        keep = (logits_indices >= lo) & (logits_indices < hi)
        logits_indices = logits_indices[keep] - lo
    lengths = new_cu[1:] - new_cu[:-1]
    sub_attn = AttentionMetadata(new_cu, int(lengths.max()), attn.kv_cache, tokens(attn.slot_mapping),
                                 seqs(attn.block_tables), seqs(attn.context_lens), attn.is_prefill)
    return PackedBatch(batch.input_ids[lo:hi] if batch.input_ids.numel() else batch.input_ids,
                       batch.positions[lo:hi], sub_attn, tokens(batch.token_type_ids), seqs(batch.pixel_values),
                       logits_indices, block_copies=batch.block_copies if first == 0 else [])  # copied once


_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.bool)
_MAX_DIMS = 8


def send_tensor(tensor: torch.Tensor, dst: int) -> None:
    """Send a tensor whose shape and dtype the receiver does not know: a header first, then the data."""
    if tensor.dtype not in _DTYPES or tensor.dim() > _MAX_DIMS:
        raise ValueError(f"a stage output must be a tensor of at most {_MAX_DIMS} dims and one of {_DTYPES}, "
                         f"got {tensor.dtype} {tuple(tensor.shape)}")
    header = torch.full((_MAX_DIMS + 2,), -1, dtype=torch.int64)
    header[0], header[1] = _DTYPES.index(tensor.dtype), tensor.dim()
    header[2:2 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
    dist.send(header.to(tensor.device), dst)
    dist.send(tensor.contiguous(), dst)


def recv_tensor(src: int, device: torch.device) -> torch.Tensor:
    header = torch.empty(_MAX_DIMS + 2, dtype=torch.int64, device=device)
    dist.recv(header, src)
    dtype, dims = _DTYPES[int(header[0])], int(header[1])
    tensor = torch.empty(header[2:2 + dims].tolist(), dtype=dtype, device=device)
    dist.recv(tensor, src)
    return tensor


def call_stage(model: torch.nn.Module, args: tuple, kwargs: dict, device: torch.device):
    """A custom model's stage: the first stage takes the caller's arguments, every later stage the previous
    stage's output tensor; the last stage's output is the result."""
    st = state()
    if st.is_first_stage:
        out = model(*args, **kwargs)
    else:
        out = model(recv_tensor(st.stage_rank(st.pp_rank - 1), device))
    if st.is_last_stage:
        return out
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"pipeline stage {st.pp_rank} must return one tensor for the next stage, got {type(out)}")
    send_tensor(out, st.stage_rank(st.pp_rank + 1))
    return None


class PipelineStage:
    def __init__(self, runner: LocalRunner, hidden_size: int, dtype: torch.dtype, device: torch.device):
        self.runner, self.hidden_size, self.dtype, self.device = runner, hidden_size, dtype, device

    def run(self, batch: PackedBatch, use_cache: bool = False) -> dict[str, torch.Tensor] | None:
        st = state()
        outputs, sends = [], []
        for micro in split_batch(batch, st.pp_size):
            hidden = None
            if not st.is_first_stage:
                tokens = int(micro.attn.cu_seqlens[-1])
                hidden = torch.empty(tokens, self.hidden_size, dtype=self.dtype, device=self.device)
                dist.recv(hidden, src=st.stage_rank(st.pp_rank - 1))
            out = self.runner.run(micro, use_cache, hidden=hidden, last=st.is_last_stage)
            if st.is_last_stage:
                outputs.append(out)
            else:  # non-blocking: this stage goes on with the next micro-batch while the send is in flight
                out = out.contiguous()
                sends.append((dist.isend(out, dst=st.stage_rank(st.pp_rank + 1)), out))
        for request, _ in sends:
            request.wait()
        if not st.is_last_stage:
            return None
        return {key: torch.cat([o[key] for o in outputs]) for key in outputs[0]}
