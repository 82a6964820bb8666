"""GPU check of energon_hf.kernels: the kernel tests on CUDA, then one line per kernel with whether it
matched the torch implementation and its speed against plain torch on the same GPU.

    python -P bench/gpu_kernels.py          # needs a CUDA device; about a minute

Figures: remove/rebuild padding as a fraction of the GPU's copy bandwidth for [32, 512, 4096] fp16 with
half of the positions padding (target >= 70%); varlen attention against one SDPA call on equal lengths.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from energon_hf import kernels
from energon_hf.kernels import padding

REPO = Path(__file__).resolve().parents[1]


def cuda_time(fn, repeats: int = 20) -> float:
    """Median seconds of fn() measured with CUDA events."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # real Triton on the GPU, not the CPU interpreter
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_kernels_triton.py",
                            "tests/test_kernels.py"], cwd=REPO, env=env, capture_output=True, text=True)
    print(f"kernel tests on CUDA: {'passed' if tests.returncode == 0 else 'FAILED'}: "
          f"{tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else tests.stderr[-500:]}")

    os.environ["ENERGON_HF_KERNELS"] = "triton"  # read by the dispatch at every call
    results = {"device": torch.cuda.get_device_name(), "tests_passed": tests.returncode == 0}
    batch, seqlen, hidden = 32, 512, 4096
    x = torch.randn(batch, seqlen, hidden, device="cuda", dtype=torch.float16)
    lengths = torch.randint(1, seqlen + 1, (batch,), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(seqlen)[None, :] < lengths[:, None]).cuda()
    copy_s = cuda_time(lambda: x.clone())
    copy_bw = 2 * x.numel() * x.element_size() / copy_s

    packed, indices, cu, max_len = kernels.remove_padding(x, mask)
    ref = padding.remove_padding(x, mask)
    moved = 2 * packed.numel() * packed.element_size()
    remove_bw = moved / cuda_time(lambda: kernels.remove_padding(x, mask))
    print(f"remove_padding: matched={torch.equal(packed, ref[0])}, {remove_bw / 1e9:.0f} GB/s = "
          f"{remove_bw / copy_bw:.0%} of copy ({copy_bw / 1e9:.0f} GB/s)")
    rebuilt = kernels.rebuild_padding(packed, indices, batch, seqlen)
    rebuild_bw = (moved + x.numel() * x.element_size()) / cuda_time(
        lambda: kernels.rebuild_padding(packed, indices, batch, seqlen))
    print(f"rebuild_padding: matched={torch.equal(rebuilt, padding.rebuild_padding(packed, indices, batch, seqlen))}, "
          f"{rebuild_bw / 1e9:.0f} GB/s = {rebuild_bw / copy_bw:.0%} of copy")

    heads, dim, length = 32, 128, 512
    q, k, v = (torch.randn(batch * length, heads, dim, device="cuda", dtype=torch.float16) for _ in range(3))
    cu_eq = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device="cuda")
    os.environ["ENERGON_HF_KERNELS"] = "torch"  # no Triton attention yet: the torch path through the dispatch
    ours = kernels.varlen_attention(q, k, v, cu_eq, length, True)
    as_batch = lambda t: t.view(batch, length, heads, dim).transpose(1, 2)
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(*map(as_batch, (q, k, v)), is_causal=True)
    matched = torch.allclose(ours, sdpa().transpose(1, 2).reshape(ours.shape), atol=2e-3)
    ratio = cuda_time(lambda: kernels.varlen_attention(q, k, v, cu_eq, length, True)) / cuda_time(sdpa)
    print(f"varlen_attention (torch path): matched={matched}, {ratio:.2f}x the time of SDPA flash on equal lengths")
    results |= {"copy_GBps": copy_bw / 1e9, "remove_fraction_of_copy": remove_bw / copy_bw,
                "rebuild_fraction_of_copy": rebuild_bw / copy_bw, "varlen_time_over_sdpa": ratio}
    out = REPO / "bench" / "results" / "gpu_kernels.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if tests.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
