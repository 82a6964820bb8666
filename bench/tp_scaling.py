"""Experiment c, tensor-parallel scaling: a GPT-2-medium-sized model at tp = 1, 2 and 4, batch 1, 8 and 32.

Threads per rank are set so that the total equals --threads (the machine's cores): tp=1 runs in this
process with all of them; tp=2 and tp=4 start that many worker processes (tp=4 on a 2-core machine
gets one thread per rank and is oversubscribed: four processes share two cores, marked so in the
JSON). Every tp runs the same weights and the same input (sequences of --seqlen tokens); the median of
--repeats runs gives latency and tokens per second. Memory per rank: the parameter bytes each rank
holds and its peak RSS (tp=1: this process, which also holds the inputs; the random checkpoint is
written by a child process).
Sanity: every tp's last_hidden_state equals tp=1's within 1e-4 (fp32).

    .venv/bin/python -P bench/tp_scaling.py            # full: gpt2-medium config, a few minutes
    .venv/bin/python -P bench/tp_scaling.py --quick    # tiny config: a smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers

from energon_hf import EnergonModel
from energon_hf.engine.worker import peak_rss_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run with -P: the bench folder is not on sys.path
from common import machine_info, synchronized, time_calls, write_result  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SAVE_RANDOM = ("import sys, torch, transformers; torch.manual_seed(0); "
               "transformers.GPT2Model(transformers.GPT2Config.from_json_file(sys.argv[1])).save_pretrained(sys.argv[2])")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny config: a smoke run")
    parser.add_argument("--gpu", action="store_true", help="CUDA, fp16 (tp > 1 needs that many GPUs)")
    parser.add_argument("--tp", type=int, nargs="+", default=None, help="default 1 2 4 (quick 1 2)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 8 32 (quick 1 4)")
    parser.add_argument("--seqlen", type=int, default=None, help="tokens per sequence (default 64; quick 16)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="total threads, all ranks together")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.gpu else "cpu")
    dtype = torch.float16 if args.gpu else torch.float32
    tps = args.tp or ([1, 2] if args.quick else [1, 2, 4])
    if args.gpu:
        tps = [tp for tp in tps if tp <= torch.cuda.device_count()]
    batches = args.batches or ([1, 4] if args.quick else [1, 8, 32])
    seqlen = args.seqlen or (16 if args.quick else 64)
    out_path = args.out or RESULTS / ("tp_scaling_quick.json" if args.quick else "tp_scaling.json")
    if args.quick:
        config = transformers.GPT2Config(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                          bos_token_id=0, eos_token_id=0)
    else:  # gpt2-medium: 24 layers, 1024 wide, 16 heads
        config = transformers.GPT2Config(n_embd=1024, n_layer=24, n_head=16)
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    machine = machine_info(args.threads)
    gen = torch.Generator().manual_seed(0)
    inputs = {b: torch.randint(0, config.vocab_size, (b, seqlen), generator=gen).to(device) for b in batches}

    runs, reference = [], {}
    with tempfile.TemporaryDirectory(prefix="tp_bench_") as folder:
        # The random checkpoint is made in a child process, so that this one (tp=1's rank) never holds it.
        config.to_json_file(Path(folder) / "source_config.json")
        subprocess.run([sys.executable, "-P", "-c", SAVE_RANDOM, str(Path(folder) / "source_config.json"), folder],
                       check=True, timeout=600)
        for tp in tps:
            per_rank = max(1, args.threads // tp)
            model = EnergonModel.from_pretrained(folder, dtype=dtype, device=device, tp=tp, threads_per_rank=per_rank)
            try:
                for batch, ids in inputs.items():
                    call = synchronized(lambda ids=ids, model=model: model(input_ids=ids).last_hidden_state, device)
                    out = call().float().cpu()
                    reference.setdefault(batch, out)
                    times = time_calls({"forward": call}, args.warmup, args.repeats)["forward"]
                    median = statistics.median(times)
                    run = {"tp": tp, "batch": batch, "threads_per_rank": per_rank,
                           "oversubscribed": device.type == "cpu" and tp * per_rank > (os.cpu_count() or 1),
                           "times_s": times, "latency_s": median, "tokens_per_s": batch * seqlen / median,
                           "max_abs_diff_vs_tp1": (out - reference[batch]).abs().max().item()}
                    runs.append(run)
                    print(f"tp={tp} ({per_rank} thread/rank{', oversubscribed' if run['oversubscribed'] else ''}) "
                          f"batch {batch:>2} x {seqlen}: {median * 1e3:8.1f} ms, {run['tokens_per_s']:8.0f} tok/s, "
                          f"max|diff| vs tp=1 {run['max_abs_diff_vs_tp1']:.1e}", flush=True)
                if tp > 1:
                    ranks = model.runner.rank_stats()
                else:  # in this process: its parameters, and its own peak RSS
                    params = sum(p.numel() * p.element_size() for p in model.model.parameters())
                    ranks = [{"rank": 0, "param_bytes": params, "peak_rss_bytes": peak_rss_bytes()}]
                for run in runs:
                    if run["tp"] == tp:
                        run["ranks"] = [{key: r[key] for key in ("rank", "param_bytes", "peak_rss_bytes")}
                                        for r in ranks]
            finally:
                model.close()

    result = {"benchmark": "tp_scaling", "machine": machine, "device": device.type, "dtype": str(dtype),
              "model": "gpt2-medium config (GPT2Model)" if not args.quick else "tiny GPT-2 config",
              "settings": {"tp": tps, "batches": batches, "seqlen": seqlen, "repeats": args.repeats,
                           "warmup": args.warmup, "threads": args.threads, "quick": args.quick},
              "runs": runs, "loadavg_end": machine_info(args.threads)["loadavg_1_5_15"]}
    write_result(out_path, result)
    print(f"-> {out_path}")
    tolerance = 5e-2 if args.gpu else 1e-4
    return 0 if all(r["max_abs_diff_vs_tp1"] <= tolerance for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
