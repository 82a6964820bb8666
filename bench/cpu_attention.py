"""Decode attention on CPU, one step of a model's layers: energon_hf's compiled kernel reading the paged cache in
place, against the torch-only path it replaces (each layer gathers its blocks, in groups of similar length, then
SDPA) and against transformers' way (a contiguous cache per sequence, padded to the longest, SDPA with a mask).

SmolLM2-135M's attention shapes (9 query heads, 3 key/value heads of 64, 30 layers, block size 16) by default,
float32 (`--dtype bfloat16` / `float16` for half-precision caches), contexts U[28, 310] (a server's mix of
prompts and answers), 4, 16 and 64 sequences. Every layer has its own cache, so the step streams keys and values
as a model's would. The paths are checked against each other (1e-4 in float32, a few units in the last place of
the output's magnitude in half precision).

    .venv/bin/python -P bench/cpu_attention.py
    .venv/bin/python -P bench/cpu_attention.py --dtype bfloat16
    .venv/bin/python -P bench/cpu_attention.py --batches 64 --lengths 1000 2000
    .venv/bin/python -P bench/cpu_attention.py --quick   # a smoke run (CI)
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from energon_hf.kernels import attention, compiled
from energon_hf.kv_cache import BLOCK_SIZE

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run with -P: the bench folder itself is not on sys.path
from common import machine_info, time_calls, write_result  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def step_inputs(batch: int, layers: int, heads: int, kv_heads: int, dim: int, lengths: tuple[int, int],
                seed: int, dtype: torch.dtype = torch.float32) -> dict:
    """Random caches with each sequence's blocks scattered, as a busy allocator leaves them."""
    rng = random.Random(seed)
    context = [rng.randint(*lengths) for _ in range(batch)]
    blocks = [-(-n // BLOCK_SIZE) for n in context]
    order = list(range(sum(blocks)))
    rng.shuffle(order)
    tables = torch.zeros(batch, max(blocks), dtype=torch.int32)
    start = 0
    for row, n in enumerate(blocks):
        tables[row, :n] = torch.tensor(order[start:start + n])
        start += n
    shape = (layers, sum(blocks), BLOCK_SIZE, kv_heads, dim)
    return dict(q=torch.randn(batch, heads, dim, dtype=dtype), k=torch.randn(shape, dtype=dtype),
                v=torch.randn(shape, dtype=dtype), tables=tables,
                context=torch.tensor(context, dtype=torch.int32))


def padded_caches(x: dict) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """transformers' layout of the same keys: [batch, kv heads, longest, dim] per layer, and the padding mask."""
    context = x["context"].tolist()
    longest = max(context)
    mask = (torch.arange(longest)[None, :] < x["context"][:, None])[:, None, None, :]
    caches = []
    for layer in range(x["k"].shape[0]):
        k, v = (torch.zeros(len(context), x["k"].shape[3], longest, x["k"].shape[4], dtype=x["k"].dtype)
                for _ in range(2))
        for row, n in enumerate(context):
            blocks = x["tables"][row, : -(-n // BLOCK_SIZE)].long()
            k[row, :, :n] = x["k"][layer, blocks].flatten(0, 1)[:n].transpose(0, 1)
            v[row, :, :n] = x["v"][layer, blocks].flatten(0, 1)[:n].transpose(0, 1)
        caches.append((k, v, mask))
    return caches


def compare(batch: int, args: argparse.Namespace) -> dict | None:
    """The three paths on one step of `batch` decodes: their times, or None when they disagree."""
    heads, kv_heads, dim = args.heads
    scale = dim**-0.5
    dtype = getattr(torch, args.dtype)
    x = step_inputs(batch, args.layers, heads, kv_heads, dim, tuple(args.lengths), seed=batch, dtype=dtype)
    hf_layout = padded_caches(x)

    def in_place():
        plan = attention._InPlaceDecodePlan(x["tables"], x["context"])
        return [plan.attend(x["q"], x["k"][i], x["v"][i], scale) for i in range(args.layers)]

    def gathered():  # the torch-only plan, as ENERGON_HF_CPU_EXTENSION=0 runs it
        plan = attention.gathering_decode_plan(x["tables"], x["context"], BLOCK_SIZE)
        return [plan.attend(x["q"], x["k"][i], x["v"][i], scale) for i in range(args.layers)]

    def transformers_way():
        q = x["q"][:, :, None]
        return [F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                               enable_gqa=kv_heads != heads)[:, :, 0] for k, v, mask in hf_layout]

    calls = {"in place": in_place, "gathered": gathered, "transformers": transformers_way}
    outs = {name: call() for name, call in calls.items()}
    bound = 1e-4 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps * max(o.abs().max().item()
                                                                                   for o in outs["transformers"])
    for name in ("gathered", "transformers"):
        worst = max((a.float() - b.float()).abs().max().item()
                    for a, b in zip(outs["in place"], outs[name], strict=True))
        if worst > bound:
            print(f"batch {batch}: in place and {name} differ by {worst:.2e}", file=sys.stderr)
            return None
    ms = {name: statistics.median(t) * 1e3 for name, t in time_calls(calls, args.warmup, args.repeats).items()}
    return {"batch": batch, "keys": int(x["context"].sum()), **{f"{k} ms": round(v, 2) for k, v in ms.items()},
            "vs gathered": round(ms["gathered"] / ms["in place"], 2),
            "vs transformers": round(ms["transformers"] / ms["in place"], 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--heads", type=int, nargs=3, default=[9, 3, 64], metavar=("Q", "KV", "DIM"))
    parser.add_argument("--lengths", type=int, nargs=2, default=[28, 310])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="2 layers, 2 and 5 sequences of 3-40 tokens: a smoke run")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.layers, args.lengths = [2, 5], 2, [3, 40]
    torch.set_num_threads(args.threads)
    if not compiled.available():
        print("the compiled CPU ops are unavailable here (no C++ compiler?): nothing to compare", file=sys.stderr)
        return 1
    results = {"machine": machine_info(args.threads), "args": {k: str(v) for k, v in vars(args).items()}, "rows": []}
    for batch in args.batches:
        row = compare(batch, args)
        if row is None:
            return 1
        results["rows"].append(row)
        print(f"{batch:3d} sequences ({row['keys']} keys), {args.layers} layers: in place "
              f"{row['in place ms']:.1f} ms, gathered {row['gathered ms']:.1f} ms ({row['vs gathered']}x), "
              f"transformers' padded SDPA {row['transformers ms']:.1f} ms ({row['vs transformers']}x)")
    name = "cpu_attention" if args.dtype == "float32" else f"cpu_attention_{args.dtype}"
    out = args.out or RESULTS / f"{name}.json"
    write_result(out, results)
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
