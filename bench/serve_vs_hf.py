"""Serving throughput: the OpenAI-compatible server (continuous batching) against transformers' static batches.

One seeded workload of requests with prompt lengths U[8, 256] (random token ids) and output lengths
U[8, 128], greedy, exactly max_tokens each (`ignore_eos` on the server, EOS disabled for transformers).

Server side: `python -m energon_hf.serve` runs as a subprocess with --threads torch threads; for each
concurrency level (1, 8, 64) that many client threads (httpx) send their share of the requests back to
back. Per level: requests/s, p50/p99 latency, p50/p99 time to first token (the server's histogram),
generated tokens/s (sum of completion_tokens / wall time).

transformers side, after the server is stopped (the two never share the cores): the requests of the
highest level through `AutoModelForCausalLM.generate` in static left-padded batches of --hf-batch; each
batch runs to its longest max_tokens, and only each request's own output length counts as useful tokens.

Ratio = server tokens/s at the highest level / transformers tokens/s (target >= 3x). Sanity: the server's
text for the first --check requests (served in the full batch) equals transformers' greedy text for the
same prompt alone.

    .venv/bin/python -P bench/serve_vs_hf.py             # full: SmolLM2, about 7 minutes on an idle 2-core machine
    .venv/bin/python -P bench/serve_vs_hf.py --quick     # tiny random Llama, SmolLM2's tokenizer: < 1 min

Needs httpx (the test and bench extras).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
import transformers

from energon_hf import defaults
from energon_hf.loading import resolve_model_path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run with -P: the bench folder itself is not on sys.path
from common import (  # noqa: E402
    batch_size_stats,
    first_token_histogram,
    histogram_quantile,
    machine_info,
    percentile,
    start_server,
    stop_server,
    write_result,
)

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 3.0  # the issue's target: server tokens/s at 64 clients >= 3x transformers' static batches
SERVED_NAME = "bench"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@dataclass
class Job:
    prompt: list[int]
    max_tokens: int


def workload(count: int, prompt_lens: tuple[int, int], output_lens: tuple[int, int], ids: tuple[int, int],
             seed: int) -> list[Job]:
    """`count` requests from one seeded generator; every concurrency level takes a prefix of this list, so
    the transformers side and the sanity check see exactly the requests the server saw."""
    gen = torch.Generator().manual_seed(seed)
    jobs = []
    for _ in range(count):
        n = int(torch.randint(prompt_lens[0], prompt_lens[1] + 1, (1,), generator=gen))
        new = int(torch.randint(output_lens[0], output_lens[1] + 1, (1,), generator=gen))
        jobs.append(Job(torch.randint(ids[0], ids[1], (n,), generator=gen).tolist(), new))
    return jobs


def make_quick_model(folder: Path) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer (the server needs a real tokenizer to answer text).
    The wide init keeps greedy logits apart, so that the same-text check has no near-ties to trip on."""
    source = resolve_model_path(defaults.generation_model())
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=2, max_position_embeddings=2048)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            (folder / name).write_bytes((source / name).read_bytes())
    return folder


# -- the server -------------------------------------------------------------------------------------------
def start_energon_server(model: str, threads: int, extra: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    return start_server([sys.executable, "-P", "-m", "energon_hf.serve", "--model", model, "--served-name",
                         SERVED_NAME, "--dtype", "float32", *extra], threads, log)


def complete(client: httpx.Client, url: str, job: Job) -> dict[str, Any]:
    response = client.post(url + "/v1/completions", json={
        "model": SERVED_NAME, "prompt": job.prompt, "max_tokens": job.max_tokens, "temperature": 0,
        "ignore_eos": True})
    response.raise_for_status()
    return response.json()


def run_level(url: str, jobs: list[Job], clients: int) -> dict[str, Any]:
    """`clients` threads, thread i sending jobs i, i + clients, ... back to back; wall time runs from the
    moment all threads are ready to the last response."""
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    errors: list[BaseException] = []
    ready = threading.Barrier(clients + 1)

    def client_thread(index: int) -> None:
        with httpx.Client(timeout=3600) as client:
            try:
                # The connection opens before the clock starts: a client's first request through httpx costs it
                # ~15 ms of CPU, and 64 of them at once took ~1 s of the server's 2 cores from its first steps
                # (SmolLM2 float32: 17.1-17.3 s for the 64 requests opened first, 18.1-18.6 s opened on the clock).
                client.get(url + "/health").raise_for_status()
            except BaseException:
                ready.abort()  # the other threads and the clock stop waiting; the error is reported below
                raise
            ready.wait()
            try:
                for k in range(index, len(jobs), clients):
                    start = time.perf_counter()
                    body = complete(client, url, jobs[k])
                    results[k] = {"latency_s": time.perf_counter() - start,
                                  "completion_tokens": body["usage"]["completion_tokens"],
                                  "text": body["choices"][0]["text"]}
            except BaseException as e:  # noqa: BLE001 - reported after the join
                errors.append(e)

    before, first_before = batch_size_stats(url), first_token_histogram(url)
    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    try:
        ready.wait()
    except threading.BrokenBarrierError:  # a client could not reach the server
        for thread in threads:
            thread.join()
        raise RuntimeError(f"a client could not open its connection to {url}") from None
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed at {clients} clients: {errors[0]!r}") from errors[0]
    after, first_after = batch_size_stats(url), first_token_histogram(url)
    done = [r for r in results if r is not None]
    latencies = [r["latency_s"] for r in done]
    generated = sum(r["completion_tokens"] for r in done)
    mean_batch = {kind: (after[kind][0] - before.get(kind, (0, 0))[0]) /
                  max(1.0, after[kind][1] - before.get(kind, (0, 0))[1]) for kind in after}
    steps = {kind: int(after[kind][1] - before.get(kind, (0, 0))[1]) for kind in after}
    return {"clients": clients, "requests": len(jobs), "wall_s": wall, "requests_per_s": len(jobs) / wall,
            "latency_p50_s": percentile(latencies, 50), "latency_p99_s": percentile(latencies, 99),
            # time to first token, from the server's histogram (bucketed, interpolated within a bucket)
            "ttft_p50_s": histogram_quantile(0.5, first_before, first_after),
            "ttft_p99_s": histogram_quantile(0.99, first_before, first_after),
            "generated_tokens": generated, "tokens_per_s": generated / wall,
            "exact_lengths": all(r["completion_tokens"] == j.max_tokens for r, j in zip(done, jobs, strict=True)),
            "engine_steps": steps, "mean_batch_per_step": mean_batch,
            "latencies_s": latencies, "texts": [r["text"] for r in done]}


# -- transformers -----------------------------------------------------------------------------------------
def hf_generate(hf: torch.nn.Module, jobs: list[Job], pad_id: int) -> tuple[torch.Tensor, int]:
    """One static batch, left-padded, run to its longest max_tokens with EOS disabled (eos_token_id=None
    neither stops nor suppresses EOS: the same tokens the server's ignore_eos gives)."""
    width = max(len(j.prompt) for j in jobs)
    ids = torch.full((len(jobs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(jobs), width, dtype=torch.long)
    for row, job in enumerate(jobs):
        ids[row, width - len(job.prompt):] = torch.tensor(job.prompt)
        mask[row, width - len(job.prompt):] = 1
    new = max(j.max_tokens for j in jobs)
    # min_new_tokens only says what is meant (exactly `new` tokens); with no EOS it has nothing to suppress.
    with torch.inference_mode():
        out = hf.generate(ids.to(hf.device), attention_mask=mask.to(hf.device), max_new_tokens=new,
                          min_new_tokens=new, do_sample=False,
                          eos_token_id=None, pad_token_id=pad_id)
    return out[:, width:], new


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint folder or .gguf (default: SmolLM2)")
    parser.add_argument("--clients", type=int, nargs="+", default=None, help="concurrency levels (default 1 8 64)")
    parser.add_argument("--requests", type=int, nargs="+", default=None,
                        help="requests per level, one per --clients (default 8 16 64)")
    parser.add_argument("--prompt-lens", type=int, nargs=2, default=[8, 256], metavar=("MIN", "MAX"))
    parser.add_argument("--output-lens", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                        help="max_tokens range (default 8 128; quick 4 16)")
    parser.add_argument("--hf-batch", type=int, default=None,
                        help="transformers' static batch size (default: the last level's request count)")
    parser.add_argument("--check", type=int, default=None, help="requests checked against transformers alone")
    parser.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                        help="passed on to the server, e.g. --server-args --kv-cache-tokens 32768 (must be last)")
    # --repeats / --warmup: the other benches' knobs (tests/test_bench_smoke.py passes them to every script).
    parser.add_argument("--repeats", type=int, default=1, help="runs of each level; the median tokens/s is kept")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up requests to the server before timing")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, for the server and transformers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny random Llama: a smoke run")
    parser.add_argument("--gpu", action="store_true", help="CUDA, fp16, on both sides")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    clients = args.clients or ([1, 4] if args.quick else [1, 8, 64])
    counts = args.requests or ([4, 8] if args.quick else [8, 16, 64])
    if len(counts) != len(clients):
        parser.error("--requests needs one count per --clients level")
    output_lens = tuple(args.output_lens or ((4, 16) if args.quick else (8, 128)))
    hf_batch = args.hf_batch or counts[-1]
    check = args.check if args.check is not None else (2 if args.quick else 3)
    out_path = args.out or RESULTS / ("serve_vs_hf_quick.json" if args.quick else "serve_vs_hf.json")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    machine = machine_info(args.threads)

    with tempfile.TemporaryDirectory(prefix="serve_bench_") as tmp:
        model = str(make_quick_model(Path(tmp) / "tiny-llama")) if args.quick else \
            str(args.model or defaults.generation_model())
        folder = resolve_model_path(model)  # the HF folder the server converts a GGUF to (cached, shared)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        vocab = transformers.AutoConfig.from_pretrained(folder).vocab_size
        # Ids above every special token and inside both the model's and the tokenizer's vocabulary.
        ids = (max(tokenizer.all_special_ids, default=0) + 1, min(vocab, len(tokenizer)))
        jobs = workload(max(counts), tuple(args.prompt_lens), output_lens, ids, args.seed)

        # -- the server: each level in turn, nothing else running --
        device_args = ["--device", "cuda", "--dtype", "float16"] if args.gpu else []  # the later --dtype wins
        process, url = start_energon_server(model, args.threads, [*device_args, *args.server_args],
                                            Path(tmp) / "server.log")
        levels: dict[str, dict[str, Any]] = {}
        try:
            with httpx.Client(timeout=600) as client:
                for _ in range(args.warmup):  # first-call costs (allocator, lazy imports) out of the timings
                    complete(client, url, Job(jobs[0].prompt[:8], 4))
            for n_clients, count in zip(clients, counts, strict=True):
                runs = [run_level(url, jobs[:count], n_clients) for _ in range(args.repeats)]
                level = sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]
                level["tokens_per_s_runs"] = [r["tokens_per_s"] for r in runs]
                levels[str(n_clients)] = level
                print(f"server, {n_clients:>3} clients: {count} requests in {level['wall_s']:.1f} s, "
                      f"{level['tokens_per_s']:.1f} tok/s, p50 {level['latency_p50_s']:.2f} s, "
                      f"p99 {level['latency_p99_s']:.2f} s, time to first token p50 {level['ttft_p50_s']:.2f} s "
                      f"(p99 {level['ttft_p99_s']:.2f} s), mean decode batch "
                      f"{level['mean_batch_per_step'].get('decode', 0):.1f}", flush=True)
        finally:
            stop_server(process)
            server_log = (Path(tmp) / "server.log").read_text()[-2000:]

        # -- transformers: the last level's requests in static batches, after the server is gone --
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float16 if args.gpu else torch.float32).to("cuda" if args.gpu else "cpu").eval()
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        hf_generate(hf, [Job(jobs[0].prompt[:8], 2)], pad_id)  # warm-up, as on the server
        hf_jobs = jobs[:counts[-1]]
        batches = []
        start = time.perf_counter()
        for first in range(0, len(hf_jobs), hf_batch):
            chunk = hf_jobs[first:first + hf_batch]
            t0 = time.perf_counter()
            _, new = hf_generate(hf, chunk, pad_id)
            batches.append({"size": len(chunk), "new_tokens": new, "time_s": time.perf_counter() - t0})
        hf_wall = time.perf_counter() - start
        useful = sum(j.max_tokens for j in hf_jobs)
        hf_result = {"batch_size": hf_batch, "requests": len(hf_jobs), "wall_s": hf_wall, "useful_tokens": useful,
                     "generated_tokens_with_padding": sum(b["size"] * b["new_tokens"] for b in batches),
                     "tokens_per_s": useful / hf_wall, "batches": batches}
        print(f"transformers, static batches of {hf_batch}: {len(hf_jobs)} requests in {hf_wall:.1f} s, "
              f"{hf_result['tokens_per_s']:.1f} useful tok/s", flush=True)

        # -- sanity: the server's text (served in the full batch) == transformers' greedy text, alone --
        top = levels[str(clients[-1])]
        checks = []
        for k in range(min(check, counts[-1])):
            tokens, _ = hf_generate(hf, [jobs[k]], pad_id)
            hf_text = tokenizer.decode(tokens[0].tolist(), skip_special_tokens=True)  # as the server decodes
            checks.append({"request": k, "same_text": hf_text == top["texts"][k],
                           "server_text": top["texts"][k], "transformers_text": hf_text})
        same_text = all(c["same_text"] for c in checks)
        # The same requests at 1 client and in the full batch: batching must not change greedy results.
        first = levels[str(clients[0])]
        same_across = all(first["texts"][k] == top["texts"][k] for k in range(min(counts)))

    ratio = top["tokens_per_s"] / hf_result["tokens_per_s"]
    result = {"benchmark": "serve_vs_hf", "machine": machine, "model": model,
              "settings": {**vars(args), "out": str(out_path), "clients": clients, "requests": counts,
                           "output_lens": list(output_lens), "hf_batch": hf_batch, "check": check},
              "workload": {"prompt_lengths": [len(j.prompt) for j in jobs], "max_tokens": [j.max_tokens for j in jobs],
                           "token_id_range": list(ids),
                           "kv_tokens_at_peak": sum(len(j.prompt) + j.max_tokens for j in jobs[:counts[-1]])},
              "server": levels, "transformers": hf_result,
              "ratio": ratio, "target": TARGET, "same_text": same_text,
              "same_text_across_concurrency": same_across, "checks": checks,
              "all_exact_lengths": all(level["exact_lengths"] for level in levels.values()),
              "server_log_tail": server_log,
              # With --threads = all cores, other busy processes stall every OpenMP barrier: compare the
              # load at the end with machine.loadavg_1_5_15 (at the start) before trusting the numbers.
              "loadavg_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    write_result(out_path, result)

    print(f"\n{'side':<26}{'requests':>9}{'wall s':>9}{'req/s':>8}{'p50 s':>8}{'p99 s':>8}{'tok/s':>9}")
    for level in levels.values():
        print(f"{'server, ' + str(level['clients']) + ' clients':<26}{level['requests']:>9}{level['wall_s']:>9.1f}"
              f"{level['requests_per_s']:>8.2f}{level['latency_p50_s']:>8.2f}{level['latency_p99_s']:>8.2f}"
              f"{level['tokens_per_s']:>9.1f}")
    print(f"{'transformers, batch ' + str(hf_batch):<26}{hf_result['requests']:>9}{hf_wall:>9.1f}"
          f"{hf_result['requests'] / hf_wall:>8.2f}{'':>8}{'':>8}{hf_result['tokens_per_s']:>9.1f}")
    print(f"ratio (server at {clients[-1]} clients / transformers): {ratio:.2f}x (target {TARGET}x); "
          f"same text: {same_text}; same across concurrency: {same_across}; "
          f"exact lengths: {result['all_exact_lengths']}")
    print(f"-> {out_path}")
    return 0 if same_text and same_across and result["all_exact_lengths"] else 1


if __name__ == "__main__":
    sys.exit(main())
