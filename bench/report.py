"""The README's results table, generated from a suite run's JSON (bench/run.py --readme).

The run's suite.json and plots are copied to bench/published/<mode>/ (committed, unlike bench/results/), and
the text between README.md's `<!-- bench-results:start -->` and `<!-- bench-results:end -->` markers is
replaced by tables made from that JSON, so every figure in the README can be traced to one run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

START, END = "<!-- bench-results:start -->", "<!-- bench-results:end -->"


def _runtime(result: dict[str, Any]) -> list[str]:
    peak = result["matmul_peak_flops_per_s"] / 1e9
    lines = [f"**a. Runtime**: packed forward vs transformers padded (sdpa), lengths U[P/16, P-P/16], "
             f"P = {result['settings']['padded_len']}; matmul peak measured {peak:.0f} GFLOP/s "
             f"(targets at batch 32: {result['targets']['ratio_at_batch_32']}x, "
             f"{result['targets']['peak_fraction_at_batch_32']:.0%} of peak)", "",
             "| model | batch | padding | transformers tok/s | energon_hf tok/s | ratio | energon_hf % of peak |",
             "|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        lines.append(f"| {run['model']} | {run['batch']} | {run['padding_fraction']:.0%} "
                     f"| {run['real_tokens_per_s']['transformers']:.0f} | {run['real_tokens_per_s']['energon']:.0f} "
                     f"| **{run['ratio']:.2f}x** | {run['peak_fraction']['energon']:.0%} |")
    return lines


def _dynamic_batching(result: dict[str, Any]) -> list[str]:
    settings = result["settings"]
    lines = [f"**b. Dynamic batching** through the server: {settings['requests']} embedding requests "
             f"(all-MiniLM-L6-v2, U[{settings['lengths'][0]}, {settings['lengths'][1]}] tokens) arriving at "
             f"{settings['rate_per_s']:g}/s (target: +{result['target_gain']:.0%} over FIFO)", "",
             "| server | requests/s | real tokens/s | p50 s | p99 s | sequences/batch | throughput vs FIFO |",
             "|---|---|---|---|---|---|---|"]
    for name, level in result["servers"].items():
        ratio = result["throughput_ratio_over_fifo"].get(name)
        lines.append(f"| {name} | {level['requests_per_s']:.1f} | {level['real_tokens_per_s']:.0f} "
                     f"| {level['latency_p50_s']:.2f} | {level['latency_p99_s']:.2f} "
                     f"| {level['mean_sequences_per_batch']:.1f} | " + (f"**{ratio:.2f}x** |" if ratio else "- |"))
    return lines


def _tp_scaling(result: dict[str, Any]) -> list[str]:
    settings = result["settings"]
    lines = [f"**c. Tensor parallelism**: {result['model']}, sequences of {settings['seqlen']} tokens, "
             f"{settings['threads']} threads in all", "",
             "| tp | batch | threads/rank | latency ms | tokens/s | params/rank MiB | peak RSS/rank MiB |",
             "|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        ranks = run.get("ranks", [])
        params = max((r["param_bytes"] for r in ranks), default=0) / 2**20
        rss = max((r["peak_rss_bytes"] for r in ranks), default=0) / 2**20
        tp = f"{run['tp']}" + (" (oversubscribed)" if run["oversubscribed"] else "")
        lines.append(f"| {tp} | {run['batch']} | {run['threads_per_rank']} | {run['latency_s'] * 1e3:.0f} "
                     f"| {run['tokens_per_s']:.0f} | {params:.0f} | {rss:.0f} |")
    return lines


def _generation(result: dict[str, Any]) -> list[str]:
    hf = result["transformers"]
    lines = [f"**d. Generation**: the server (continuous batching) vs transformers' generate in a static batch "
             f"of {hf['batch_size']}; prompts U[{result['settings']['prompt_lens'][0]}, "
             f"{result['settings']['prompt_lens'][1]}], outputs U[{result['settings']['output_lens'][0]}, "
             f"{result['settings']['output_lens'][1]}] tokens (target {result['target']}x)", "",
             "| side | requests | tokens/s | p50 s | p99 s |", "|---|---|---|---|---|"]
    for clients, level in result["server"].items():
        lines.append(f"| server, {clients} clients | {level['requests']} | {level['tokens_per_s']:.1f} "
                     f"| {level['latency_p50_s']:.1f} | {level['latency_p99_s']:.1f} |")
    lines.append(f"| transformers, batch {hf['batch_size']} | {hf['requests']} | {hf['tokens_per_s']:.1f} | - | - |")
    lines += ["", f"Ratio at {list(result['server'])[-1]} clients: **{result['ratio']:.2f}x**."]
    return lines


def _decode(result: dict[str, Any]) -> list[str]:
    batches = list(result["runs"])
    variants = list(result["runs"][batches[0]]["variants"])
    settings = result["settings"]
    lines = [f"**e. Generation per precision**: {Path(result['model']).name}, greedy, {settings['new_tokens']} new "
             f"tokens per sequence, prompts U[{settings['min_len']}, {settings['max_len']}]; new tokens/s and the "
             f"ratio to transformers float32 in the same run; at batch 1 the bytes a decode step streams x steps/s "
             f"against the measured read bandwidth ({result['read_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s)", "",
             "| dtype / quantization | " + " | ".join(f"batch {b}" for b in batches) + " | batch 1 GB/s | target |",
             "|---|" + "---|" * (len(batches) + 2)]
    lines.append("| transformers float32 | " + " | ".join(
        f"{result['runs'][b]['transformers_float32_new_tokens_per_s']:.1f}" for b in batches) + " | | |")
    for name in variants:
        cells = [f"{result['runs'][b]['variants'][name]['new_tokens_per_s']:.1f} "
                 f"(**{result['runs'][b]['variants'][name]['ratio_vs_transformers_float32']:.2f}x**)" for b in batches]
        one = result["runs"].get("1", {}).get("variants", {}).get(name, {})
        rate = f"{one['effective_bytes_per_s'] / 1e9:.1f} ({one['fraction_of_read_bandwidth']:.0%})" if one else ""
        target = one.get("target_new_tokens_per_s")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {rate} | {f'{target:g} tok/s' if target else ''} |")
    return lines


def _quality(result: dict[str, Any]) -> list[str]:
    lines = [f"**f. Quality per precision**: SmolLM2 perplexity on {result['text']} ({result['text_tokens']} "
             f"tokens), and greedy tokens equal to float32's over {result['prompts']} chat prompts x "
             f"{result['new_tokens']} (free-running, and teacher-forced on float32's tokens)", "",
             "| variant | perplexity | vs float32 | greedy agreement | teacher-forced | target |",
             "|---|---|---|---|---|---|"]
    for name, row in result["variants"].items():
        target = row.get("target")
        met = "" if not target else (f"ppl within {target['perplexity_within']:.1%}" +
                                     (f", agreement >= {target['greedy_agreement_at_least']:.0%}"
                                      if target["greedy_agreement_at_least"] else "") +
                                     f": {'met' if row['met'] else 'missed'}")
        lines.append(f"| {name} | {row['perplexity']:.3f} | {row['perplexity_vs_float32']:+.2%} "
                     f"| {row['greedy_agreement']:.1%} | {row['forced_agreement']:.1%} | {met} |")
    return lines


def _embeddings(result: dict[str, Any]) -> list[str]:
    lines = [f"**g. Encoders per precision**: {result['model']} sentence embeddings of {result['passages']} passages "
             f"against our float32 (worst and mean cosine, top-10 retrieval overlap), and each side's speed over our "
             f"float32 encode, interleaved in one process", "",
             "| variant | worst cosine | mean cosine | top-10 overlap | speed vs our float32 |",
             "|---|---|---|---|---|"]
    for name, row in result["variants"].items():
        lines.append(f"| {name} | {row['worst_cosine']:.5f} | {row['mean_cosine']:.6f} | {row['top10_overlap']:.1%} "
                     f"| **{row['speed_vs_float32']:.2f}x** |")
    return lines


SECTIONS = {"runtime": _runtime, "dynamic_batching": _dynamic_batching, "tp_scaling": _tp_scaling,
            "generation": _generation, "decode": _decode, "quality": _quality, "embeddings": _embeddings}


def results_markdown(suite: dict[str, Any], plots: list[str]) -> str:
    machine = suite["machine"]
    where = machine.get("gpu") or (f"{machine['cpu_count']}-core CPU ({machine['machine']}), "
                                   f"{machine['torch_threads']} threads")
    lines = [f"Generated by `bench/run.py --readme` from `{plots[0].rsplit('/', 1)[0]}/suite.json` "
             f"({suite['mode']} mode, {suite['started']}): {where}, torch {machine['torch']}, transformers "
             f"{machine['transformers']}, load average at the start {machine['loadavg_1_5_15'][0]:.2f}.", ""]
    reruns = [f"{name} ({entry['rerun']})" for name, entry in suite["experiments"].items() if "rerun" in entry]
    if reruns:
        lines += [f"Re-run alone later on the same machine (`bench/run.py --only ... --readme`): {', '.join(reruns)}.",
                  ""]
    for name, entry in suite["experiments"].items():
        if "result" not in entry or name not in SECTIONS:
            lines += [f"**{name}**: failed (exit {entry['exit']}).", ""]
            continue
        lines += SECTIONS[name](entry["result"]) + [""]
    lines += [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines).rstrip() + "\n"


def update_readme(suite: dict[str, Any], readme: Path, plots: list[Path]) -> None:
    """Publish the run (suite.json and plots to bench/published/<mode>/) and rewrite the README's table."""
    published = readme.parent / "bench" / "published" / suite["mode"]
    published.mkdir(parents=True, exist_ok=True)
    (published / "suite.json").write_text(json.dumps(suite, indent=2, default=str) + "\n")
    links = []
    for plot in plots:
        shutil.copyfile(plot, published / plot.name)
        links.append(str((published / plot.name).relative_to(readme.parent)))
    if not links:
        links = [str((published / "suite.json").relative_to(readme.parent))]
    text = readme.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{readme} has no {START} ... {END} section")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + START + "\n" + results_markdown(suite, links) + END + tail)
