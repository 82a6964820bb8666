"""Stalls: what a long prompt arriving mid-stream costs the stream already running, per step budget.

One client streams --stream-tokens tokens (greedy, exactly that many); --delay seconds later a second client
sends a --long-tokens-token prompt (random ids, max_tokens 1). For each --max-batch-tokens budget, a fresh
server (`python -m energon_hf.serve`): the longest and the median gap between the stream's tokens, and the
long prompt's latency. A step runs the running decodes plus at most the budget's worth of prompt tokens, so
the budget trades the stream's longest gap against the long prompt's time to its answer.

    .venv/bin/python -P bench/serve_stall.py             # SmolLM2, budgets 256 512 1024 4096: about 3 min
    .venv/bin/python -P bench/serve_stall.py --quick     # tiny random Llama: a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run with -P: the bench folder itself is not on sys.path
from common import machine_info, stop_server, write_result  # noqa: E402
from serve_vs_hf import SERVED_NAME, make_quick_model, start_energon_server  # noqa: E402

from energon_hf import defaults  # noqa: E402
from energon_hf.loading import resolve_model_path  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def stream_arrivals(url: str, prompt: list[int], tokens: int, started: threading.Event) -> list[float]:
    """The arrival time of each streamed chunk with text of a greedy completion of exactly `tokens` tokens (a
    token that ends inside a character comes with the next one)."""
    body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    arrivals = []
    with httpx.Client(timeout=600) as client, client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            choices = json.loads(line[6:])["choices"] if line.startswith("data: {") else []
            if choices and choices[0]["text"]:
                arrivals.append(time.perf_counter())
                started.set()
    return arrivals


def one_budget(model: str, budget: int, args: argparse.Namespace, ids: tuple[int, int], log: Path) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(args.seed)
    short = torch.randint(ids[0], ids[1], (16,), generator=gen).tolist()
    long = torch.randint(ids[0], ids[1], (args.long_tokens,), generator=gen).tolist()
    process, url = start_energon_server(model, args.threads, ["--max-batch-tokens", str(budget)], log)
    try:
        with httpx.Client(timeout=600) as client:  # first-call costs out of the timings
            client.post(url + "/v1/completions", json={"model": SERVED_NAME, "prompt": short, "max_tokens": 2})
        started, arrivals, long_latency = threading.Event(), [], []
        streamer = threading.Thread(target=lambda: arrivals.extend(stream_arrivals(url, short, args.stream_tokens,
                                                                                  started)))
        streamer.start()
        started.wait(600)
        time.sleep(args.delay)
        with httpx.Client(timeout=600) as client:
            start = time.perf_counter()
            client.post(url + "/v1/completions", json={"model": SERVED_NAME, "prompt": long, "max_tokens": 1,
                                                       "temperature": 0}).raise_for_status()
            long_latency.append(time.perf_counter() - start)
        streamer.join()
    finally:
        stop_server(process)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    return {"budget": budget, "stream_chunks": len(arrivals), "longest_gap_s": max(gaps),
            "median_gap_s": statistics.median(gaps), "long_prompt_latency_s": long_latency[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: the embedded SmolLM2)")
    parser.add_argument("--budgets", type=int, nargs="+", default=None, help="--max-batch-tokens values")
    parser.add_argument("--long-tokens", type=int, default=None, help="the long prompt's tokens (default 2000)")
    parser.add_argument("--stream-tokens", type=int, default=None, help="the stream's tokens (default 150)")
    parser.add_argument("--delay", type=float, default=None, help="seconds from the stream's first token to the "
                                                                  "long prompt (default 3)")
    # --repeats / --warmup: the other benches' knobs (tests/test_bench_smoke.py passes them to every script).
    parser.add_argument("--repeats", type=int, default=1, help="unused: one run per budget")
    parser.add_argument("--warmup", type=int, default=1, help="unused: one warm-up request per server")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny random Llama: a smoke run")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    budgets = args.budgets or ([16, 256] if args.quick else [256, 512, 1024, 4096])
    args.long_tokens = args.long_tokens or (200 if args.quick else 2000)
    args.stream_tokens = args.stream_tokens or (64 if args.quick else 150)
    args.delay = args.delay if args.delay is not None else (0.02 if args.quick else 3.0)
    out_path = args.out or RESULTS / ("serve_stall_quick.json" if args.quick else "serve_stall.json")
    transformers.utils.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix="serve_stall_") as tmp:
        model = str(make_quick_model(Path(tmp) / "tiny-llama")) if args.quick else \
            str(args.model or defaults.generation_model())
        folder = resolve_model_path(model)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        vocab = transformers.AutoConfig.from_pretrained(folder).vocab_size
        ids = (max(tokenizer.all_special_ids, default=0) + 1, min(vocab, len(tokenizer)))
        runs = []
        for budget in budgets:
            run = one_budget(model, budget, args, ids, Path(tmp) / f"server-{budget}.log")
            runs.append(run)
            print(f"budget {budget:>5}: longest gap {run['longest_gap_s']:.2f} s, median gap "
                  f"{run['median_gap_s'] * 1000:.0f} ms, the {args.long_tokens}-token prompt answered in "
                  f"{run['long_prompt_latency_s']:.2f} s")
    result = {"machine": machine_info(args.threads), "model": "tiny-llama" if args.quick else model,
              "long_tokens": args.long_tokens, "stream_tokens": args.stream_tokens, "delay_s": args.delay,
              "runs": runs}
    write_result(out_path, result)
    print(f"-> {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
