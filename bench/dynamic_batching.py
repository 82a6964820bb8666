"""Experiment b, dynamic batching against FIFO (EnergonAI: +34.7%), through the real server.

A seeded stream of embedding requests (one text each, U[8, 256] tokens, Poisson arrivals at --rate
requests/s) is sent by an asyncio httpx client to /v1/embeddings of three servers in turn, on
all-MiniLM-L6-v2 (fp32), each alone on the machine:

- fifo_padded: transformers' model padded to each batch's longest, batches in arrival order under
  --max-batch-tokens real tokens (bench/padded_embed_server.py, `--embed-batching packed`);
- energonai_padded: the same padded model under EnergonAI's dynamic batching (length groups that pad
  least, by size and waiting time; `--embed-batching priority`);
- energon_packed: `python -m energon_hf.serve` as shipped: padding-free batches, in arrival order.

Per server: throughput (requests/s and real tokens/s, from the first arrival to the last answer),
p50/p99 latency, mean sequences per batch (from /metrics). Ratios against fifo_padded. Sanity: every
request's embedding is the same on the three servers (max abs diff < 1e-4; 1e-2 in fp16 on GPU).

    .venv/bin/python -P bench/dynamic_batching.py            # full: 300 requests per server, a few minutes
    .venv/bin/python -P bench/dynamic_batching.py --quick    # 24 short requests: a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import transformers

from energon_hf import defaults
from energon_hf.loading import resolve_model_path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # run with -P: the bench folder is not on sys.path
from common import batch_size_stats, machine_info, percentile, start_server, stop_server, write_result  # noqa: E402

RESULTS = BENCH / "results"
TARGET = 0.35  # the target: at least +35% throughput over FIFO with pad-to-longest
SERVED_NAME = "bench"


def make_texts(tokenizer, lengths: list[int], rng: random.Random) -> list[str]:
    """Texts of exactly the given token counts (special tokens included): whole words the vocabulary
    holds as one token each."""
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and w.islower() and len(w) >= 3]
    words.sort()
    texts = []
    for n in lengths:
        text = " ".join(rng.choice(words) for _ in range(n - 2))  # [CLS] ... [SEP]
        if len(tokenizer(text)["input_ids"]) != n:
            raise RuntimeError(f"a text of {n - 2} vocabulary words did not tokenize to {n} tokens")
        texts.append(text)
    return texts


async def send_stream(url: str, texts: list[str], arrivals: list[float]) -> list[dict[str, Any]]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=1800, limits=limits) as client:
        start = time.perf_counter()

        async def one(i: int) -> dict[str, Any]:
            await asyncio.sleep(max(0.0, arrivals[i] - (time.perf_counter() - start)))
            sent = time.perf_counter()
            response = await client.post(url + "/v1/embeddings", json={"model": SERVED_NAME, "input": texts[i]})
            response.raise_for_status()
            body = response.json()
            done = time.perf_counter()
            return {"latency_s": done - sent, "done_s": done - start, "tokens": body["usage"]["prompt_tokens"],
                    "embedding": body["data"][0]["embedding"]}

        return await asyncio.gather(*(one(i) for i in range(len(texts))))


def run_server(name: str, command: list[str], texts: list[str], arrivals: list[float], threads: int,
               log: Path) -> tuple[dict[str, Any], list[list[float]]]:
    """The stream through one server: its figures, and each request's embedding (for the sanity check)."""
    process, url = start_server(command, threads, log)
    try:
        asyncio.run(send_stream(url, texts[:4], [0.0] * 4))  # first-call costs out of the timings
        before = batch_size_stats(url).get("encode", (0.0, 0.0))
        answers = asyncio.run(send_stream(url, texts, arrivals))
        after = batch_size_stats(url)["encode"]
    finally:
        stop_server(process)
    wall = max(a["done_s"] for a in answers)
    latencies = [a["latency_s"] for a in answers]
    tokens = sum(a["tokens"] for a in answers)
    batches = after[1] - before[1]
    level = {"server": name, "requests": len(answers), "wall_s": wall, "requests_per_s": len(answers) / wall,
             "real_tokens_per_s": tokens / wall, "latency_p50_s": percentile(latencies, 50),
             "latency_p99_s": percentile(latencies, 99), "batches": int(batches),
             "mean_sequences_per_batch": (after[0] - before[0]) / max(1.0, batches), "latencies_s": latencies}
    print(f"{name:<17} {level['requests_per_s']:6.1f} req/s, {level['real_tokens_per_s']:7.0f} tok/s, "
          f"p50 {level['latency_p50_s']:.2f} s, p99 {level['latency_p99_s']:.2f} s, "
          f"{level['mean_sequences_per_batch']:.1f} sequences/batch", flush=True)
    return level, [a["embedding"] for a in answers]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="24 short requests: a smoke run")
    parser.add_argument("--gpu", action="store_true", help="CUDA, fp16, on every server")
    parser.add_argument("--requests", type=int, default=None, help="requests per server (default 300; quick 24)")
    parser.add_argument("--rate", type=float, default=None,
                        help="mean arrivals per second (default 40; quick 100; GPU 400: more than the servers take)")
    parser.add_argument("--lengths", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                        help="tokens per text (default 8 256; quick 8 32)")
    parser.add_argument("--max-batch-tokens", type=int, default=4096)
    parser.add_argument("--max-wait-ms", type=float, default=50.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    count = args.requests or (24 if args.quick else 300)
    rate = args.rate or (400.0 if args.gpu else 100.0 if args.quick else 40.0)
    low, high = args.lengths or ((8, 32) if args.quick else (8, 256))
    out_path = args.out or RESULTS / ("dynamic_batching_quick.json" if args.quick else "dynamic_batching.json")
    transformers.utils.logging.set_verbosity_error()
    machine = machine_info(args.threads)
    model = str(resolve_model_path(defaults.embedding_model()))
    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    rng = random.Random(args.seed)
    lengths = [rng.randint(low, high) for _ in range(count)]
    texts = make_texts(tokenizer, lengths, rng)
    arrivals, now = [], 0.0
    for _ in range(count):
        arrivals.append(now)
        now += rng.expovariate(rate)

    common = ["--served-name", SERVED_NAME, "--max-batch-tokens", str(args.max_batch_tokens),
              "--max-wait-ms", str(args.max_wait_ms)]
    device = ["--device", "cuda", "--dtype", "float16"] if args.gpu else ["--dtype", "float32"]
    padded = [sys.executable, "-P", str(BENCH / "padded_embed_server.py"), "--model", model, *common, *device]
    servers = {
        "fifo_padded": [*padded, "--embed-batching", "packed"],
        "energonai_padded": [*padded, "--embed-batching", "priority"],
        "energon_packed": [sys.executable, "-P", "-m", "energon_hf.serve", "--model", model, *common, *device,
                           "--embed-batching", "packed", "--max-queue", str(count + 16)],
    }
    levels, vectors = {}, {}
    with tempfile.TemporaryDirectory(prefix="batching_bench_") as tmp:
        for name, command in servers.items():
            levels[name], vectors[name] = run_server(name, command, texts, arrivals, args.threads,
                                                     Path(tmp) / f"{name}.log")
    first = next(iter(vectors.values()))
    diff = max(abs(a - b) for other in vectors.values() for u, v in zip(first, other, strict=True)
               for a, b in zip(u, v, strict=True))
    base = levels.get("fifo_padded")
    ratios = {name: level["requests_per_s"] / base["requests_per_s"] for name, level in levels.items()} if base else {}
    result = {"benchmark": "dynamic_batching", "machine": machine, "model": "all-MiniLM-L6-v2",
              "device": "cuda" if args.gpu else "cpu",
              "settings": {"requests": count, "rate_per_s": rate, "lengths": [low, high], "threads": args.threads,
                           "max_batch_tokens": args.max_batch_tokens, "max_wait_ms": args.max_wait_ms,
                           "seed": args.seed, "quick": args.quick},
              "workload": {"lengths": lengths, "arrivals_s": arrivals}, "servers": levels,
              "throughput_ratio_over_fifo": ratios, "target_gain": TARGET, "max_abs_diff_embeddings": diff,
              "same_embeddings": diff < (1e-2 if args.gpu else 1e-4),
              "loadavg_end": machine_info(args.threads)["loadavg_1_5_15"]}
    write_result(out_path, result)
    print("throughput over FIFO padded: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
          + f"; max|diff| of embeddings {diff:.1e} -> {out_path}")
    return 0 if result["same_embeddings"] else 1


if __name__ == "__main__":
    sys.exit(main())
