"""Tensor-parallel overhead: a GPT-2-small-sized model at tp=2 (two worker processes, one thread each)
against tp=1 (this process, two threads), same weights, same input, timed interleaved in one run.

On a 2-core machine both use the same cores, so the ratio is the cost of splitting (all-reduces over gloo,
the driver's messages) rather than a speed-up. Target: tp=2 latency at most 1.15x tp=1's.

    .venv/bin/python -P bench/tp_latency.py            # gpt2-small config, batch 8 x 128 (a few minutes)
    .venv/bin/python -P bench/tp_latency.py --quick    # tiny config: a smoke test of the script
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import transformers

from energon_hf import EnergonModel

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run with -P: the bench folder is not on sys.path
from common import machine_info, time_calls  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 1.15


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny config: a smoke run")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="threads of the tp=1 run (tp=2: threads/2 per rank)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out_path = args.out or RESULTS / ("tp_latency_quick.json" if args.quick else "tp_latency.json")
    if args.quick:
        config = transformers.GPT2Config(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4)
        args.batch, args.seqlen = 2, 16
    else:
        config = transformers.GPT2Config()  # gpt2-small: 12 layers, 768 wide, 12 heads, 50257 tokens
    torch.set_num_threads(args.threads)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seqlen), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        transformers.GPT2Model(config).save_pretrained(folder)
        single = EnergonModel.from_pretrained(folder)
        with EnergonModel.from_pretrained(folder, tp=2, threads_per_rank=max(1, args.threads // 2)) as split:
            diff = (single(input_ids=ids).last_hidden_state - split(input_ids=ids).last_hidden_state).abs().max()
            times = time_calls({"tp1": lambda: single(input_ids=ids), "tp2": lambda: split(input_ids=ids)},
                               args.warmup, args.repeats)
            stats = split.runner.rank_stats()
    medians = {name: statistics.median(t) for name, t in times.items()}
    ratio = medians["tp2"] / medians["tp1"]
    result = {"benchmark": "tp_latency", "machine": machine_info(args.threads),
              "settings": {**vars(args), "out": str(out_path), "model": "gpt2-small config (GPT2Model)"},
              "times_s": times, "median_s": medians, "ratio_tp2_over_tp1": ratio, "target_at_most": TARGET,
              "max_abs_diff_tp2_vs_tp1": diff.item(), "rank_stats": stats}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"batch {args.batch} x {args.seqlen}: tp=1 ({args.threads} threads) {medians['tp1'] * 1e3:.0f} ms, "
          f"tp=2 ({max(1, args.threads // 2)} thread/rank) {medians['tp2'] * 1e3:.0f} ms, ratio {ratio:.2f}x "
          f"(target <= {TARGET}x), max|diff| {diff:.1e} -> {out_path}")
    return 0 if diff < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
