"""GPU check of energon_hf.kernels: the kernel tests on CUDA, then one line per kernel saying whether the
Triton kernel matched its torch reference, and its speed against plain torch on the same GPU.

    python -P bench/gpu_kernels.py            # needs a CUDA device; about a minute
    python -P bench/gpu_kernels.py --quick    # tiny sizes on CPU through the Triton interpreter (smoke test)

Figures: remove/rebuild padding and the elementwise kernels as a fraction of the GPU's copy bandwidth
([32, 512, 4096] fp16 with about half of the positions padding; target >= 70%), varlen attention against
one SDPA call (flash) on equal lengths (target <= 1.5x its time), and against the torch implementation on
mixed lengths; paged decode attention against the torch implementation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Sizes:
    batch: int
    seqlen: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    context: int  # longest cached context for the decode check
    dtype: torch.dtype
    device: str


FULL = Sizes(32, 512, 4096, 32, 8, 128, 2048, torch.float16, "cuda")
QUICK = Sizes(3, 12, 40, 4, 2, 16, 40, torch.float32, "cpu")


def timer(device: str, repeats: int) -> Callable[[Callable[[], object]], float]:
    """Median seconds of fn(): CUDA events on a GPU, perf_counter elsewhere."""

    def measure(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(repeats):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                begin = time.perf_counter()
                fn()
                times.append(time.perf_counter() - begin)
        return sorted(times)[len(times) // 2]

    return measure


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def run_checks(s: Sizes, measure: Callable) -> dict[str, dict]:
    from energon_hf import kernels  # after ENERGON_HF_KERNELS / TRITON_INTERPRET are set
    from energon_hf.kernels import attention, elementwise, padding
    from energon_hf.kv_cache import BlockAllocator, KVCache

    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(s.device, s.dtype)  # noqa: E731
    tol = 2e-3 if s.dtype == torch.float16 else 1e-4
    close = lambda a, b: (a.float() - b.float()).abs().max().item() <= tol  # noqa: E731
    x = rand(s.batch, s.seqlen, s.hidden)
    copy_bw = 2 * nbytes(x) / measure(lambda: x.clone())
    results: dict[str, dict] = {"copy": {"GBps": copy_bw / 1e9}}

    def bandwidth(name: str, matched: bool, moved: int, ours: Callable, theirs: Callable) -> None:
        t_ours, t_theirs = measure(ours), measure(theirs)
        results[name] = {"matched": matched, "GBps": moved / t_ours / 1e9, "fraction_of_copy": moved / t_ours / copy_bw,
                         "speedup_over_torch": t_theirs / t_ours}

    lengths = torch.randint(1, s.seqlen + 1, (s.batch,), generator=gen)
    mask = (torch.arange(s.seqlen)[None, :] < lengths[:, None]).to(s.device)
    packed, indices, cu, max_len = kernels.remove_padding(x, mask)
    ref = padding.remove_padding(x, mask)
    bandwidth("remove_padding", torch.equal(packed, ref[0]) and torch.equal(cu, ref[2]), 2 * nbytes(packed),
              lambda: kernels.remove_padding(x, mask), lambda: padding.remove_padding(x, mask))
    rebuilt = kernels.rebuild_padding(packed, indices, s.batch, s.seqlen)
    bandwidth("rebuild_padding", torch.equal(rebuilt, padding.rebuild_padding(packed, indices, s.batch, s.seqlen)),
              nbytes(packed, x), lambda: kernels.rebuild_padding(packed, indices, s.batch, s.seqlen),
              lambda: padding.rebuild_padding(packed, indices, s.batch, s.seqlen))

    rows = x.view(-1, s.hidden)
    weight, bias = rand(s.hidden), rand(s.hidden)
    bandwidth("bias_gelu", close(kernels.bias_gelu(rows, bias, "tanh"), elementwise.bias_gelu(rows, bias, "tanh")),
              2 * nbytes(rows), lambda: kernels.bias_gelu(rows, bias, "tanh"),
              lambda: elementwise.bias_gelu(rows, bias, "tanh"))
    bandwidth("silu_and_mul", close(kernels.silu_and_mul(rows), elementwise.silu_and_mul(rows)), nbytes(rows) * 3 // 2,
              lambda: kernels.silu_and_mul(rows), lambda: elementwise.silu_and_mul(rows))
    bandwidth("layer_norm", close(kernels.layer_norm(rows, weight, bias, 1e-5),
                                  elementwise.layer_norm(rows, weight, bias, 1e-5)),
              2 * nbytes(rows), lambda: kernels.layer_norm(rows, weight, bias, 1e-5),
              lambda: elementwise.layer_norm(rows, weight, bias, 1e-5))
    bandwidth("rms_norm", close(kernels.rms_norm(rows, weight, 1e-6), elementwise.rms_norm(rows, weight, 1e-6)),
              2 * nbytes(rows), lambda: kernels.rms_norm(rows, weight, 1e-6),
              lambda: elementwise.rms_norm(rows, weight, 1e-6))

    # Varlen attention, equal lengths: against one SDPA call (the flash path on a GPU).
    total = s.batch * s.seqlen
    q, k, v = rand(total, s.heads, s.head_dim), rand(total, s.kv_heads, s.head_dim), rand(total, s.kv_heads, s.head_dim)
    cu_eq = torch.arange(0, total + 1, s.seqlen, dtype=torch.int32, device=s.device)
    as_batch = lambda t: t.view(s.batch, s.seqlen, t.shape[1], s.head_dim).transpose(1, 2)  # noqa: E731
    sdpa = lambda: F.scaled_dot_product_attention(*map(as_batch, (q, k, v)), is_causal=True,  # noqa: E731
                                                  enable_gqa=True)
    ours = kernels.varlen_attention(q, k, v, cu_eq, s.seqlen, True)
    t_ours = measure(lambda: kernels.varlen_attention(q, k, v, cu_eq, s.seqlen, True))
    results["varlen_attention_equal"] = {"matched": close(ours, sdpa().transpose(1, 2).reshape(ours.shape)),
                                         "time_over_sdpa": t_ours / measure(sdpa)}
    # Mixed lengths (the packed case): against the torch implementation (per-sequence SDPA).
    qm, km, vm = (t[: int(cu[-1])] for t in (q, k, v))
    ours = kernels.varlen_attention(qm, km, vm, cu, max_len, True)
    t_ours = measure(lambda: kernels.varlen_attention(qm, km, vm, cu, max_len, True))
    results["varlen_attention_mixed"] = {
        "matched": close(ours, attention.varlen_attention(qm, km, vm, cu, max_len, True)),
        "speedup_over_torch": measure(lambda: attention.varlen_attention(qm, km, vm, cu, max_len, True)) / t_ours}

    # Paged decode: one new token per sequence over cached contexts of mixed lengths.
    block = 16
    contexts = torch.randint(1, s.context + 1, (s.batch,), generator=gen).tolist()
    num_blocks = sum(-(-n // block) for n in contexts)
    cache = KVCache(1, num_blocks, block, s.kv_heads, s.head_dim, s.dtype, s.device)
    for storage in (cache.k, cache.v):
        storage.copy_(torch.randn(storage.shape, generator=gen))
    allocator = BlockAllocator(num_blocks, block)
    for seq, n in enumerate(contexts):
        allocator.reserve(seq, n)
    tables = allocator.block_table_tensor(list(range(s.batch)), s.device)
    ctx = torch.tensor(contexts, dtype=torch.int32, device=s.device)
    cu_q = torch.arange(s.batch + 1, dtype=torch.int32, device=s.device)
    qd = rand(s.batch, s.heads, s.head_dim)
    args = (qd, cache.k[0], cache.v[0], tables, ctx, cu_q, 1)
    t_ours = measure(lambda: kernels.paged_attention(*args))
    kv_read = 2 * sum(contexts) * s.kv_heads * s.head_dim * cache.k.element_size()
    results["paged_attention_decode"] = {
        "matched": close(kernels.paged_attention(*args), attention.paged_attention(*args)),
        "speedup_over_torch": measure(lambda: attention.paged_attention(*args)) / t_ours,
        "kv_GBps": kv_read / t_ours / 1e9, "fraction_of_copy": kv_read / t_ours / copy_bw}

    # Weight-only int4 and int8 products of one decode row (an MLP's up projection), against dequantizing the weight
    # and F.linear (what the formats did on CUDA before the kernels): bytes are the weight's as it is held.
    from energon_hf.kernels import quantized
    width = -(-s.hidden // 32) * 32  # whole groups of 32
    w = torch.randn(4 * width, width, generator=gen)
    row = rand(1, width)
    q4, scale, zero = quantized.quantize_int4(w, 32)
    int4 = (quantized.pack_nibbles(q4, 32).to(s.device), quantized.scales_and_mins(scale, zero).to(s.device), 32)
    q8, scale8 = quantized.quantize_int8(w)
    int8 = (q8.to(s.device), scale8.float().reshape(-1, 1).to(s.device))
    cases = {"int4_decode_product": (kernels.int4_linear, quantized.int4_linear, int4, int4[:2]),
             "int8_decode_product": (kernels.int8_linear, quantized.int8_linear, int8, int8)}
    for name, (ours, theirs, args, held) in cases.items():
        moved, t_ours = nbytes(*held), measure(lambda: ours(row, *args))  # noqa: B023
        got, expected = ours(row, *args).float(), theirs(row, *args).float()  # sums of `width` products: relative
        results[name] = {"matched": (got - expected).abs().max().item() <= tol * expected.abs().max().item(),
                         "speedup_over_dequantize": measure(lambda: theirs(row, *args)) / t_ours,  # noqa: B023
                         "weight_GBps": moved / t_ours / 1e9, "fraction_of_copy": moved / t_ours / copy_bw}
    return results


def describe(name: str, figures: dict) -> str:
    parts = [f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}" for key, value in figures.items()]
    return f"{name}: " + ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes on CPU through the Triton interpreter")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu_kernels.json")
    args, _ = parser.parse_known_args(argv)
    os.environ["ENERGON_HF_KERNELS"] = "triton"  # read by the dispatch at every call
    tests_passed = None
    if args.quick:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
        sizes = QUICK
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing to check (--quick runs the script on CPU through the Triton interpreter)")
        return 0
    else:
        sizes = FULL
        env = {**os.environ, "TRITON_INTERPRET": "0"}  # real Triton on the GPU, not the CPU interpreter
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_kernels_triton.py",
                                "tests/test_kernels.py", "tests/test_models_on_triton.py"],
                               cwd=REPO, env=env, capture_output=True, text=True)
        tests_passed = tests.returncode == 0
        last = tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else tests.stderr[-500:]
        print(f"kernel tests on CUDA: {'passed' if tests_passed else 'FAILED'}: {last}")
    results = run_checks(sizes, timer(sizes.device, 3 if args.quick else args.repeats))
    for name, figures in results.items():
        print(describe(name, figures))
    device = torch.cuda.get_device_name() if sizes.device == "cuda" else "cpu (Triton interpreter)"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": device, "sizes": {k: str(v) for k, v in vars(sizes).items()},
                                    "tests_passed": tests_passed, "kernels": results}, indent=2) + "\n")
    matched = all(figures.get("matched", True) for figures in results.values())
    return 0 if matched and tests_passed is not False else 1


if __name__ == "__main__":
    sys.exit(main())
