"""PNG figures of a suite run (bench/run.py), one per experiment, shaped like EnergonAI's: throughput bars by
batch size, throughput and latency per batching policy, latency against tensor-parallel size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"transformers": "#9e9e9e", "energon": "#1f77b4"}


def _title(suite: dict[str, Any], what: str) -> str:
    machine = suite["machine"]
    where = machine.get("gpu") or f"{machine['cpu_count']}-core CPU, {machine['torch_threads']} threads"
    return f"{what} ({where}, {suite['mode']})"


def plot_runtime(result: dict[str, Any], suite: dict[str, Any], path: Path) -> None:
    models = list(dict.fromkeys(run["model"] for run in result["runs"]))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        runs = [run for run in result["runs"] if run["model"] == model]
        xs = range(len(runs))
        for offset, side in ((-0.2, "transformers"), (0.2, "energon")):
            ax.bar([x + offset for x in xs], [run["real_tokens_per_s"][side] for run in runs], 0.4,
                   label="transformers (padded, sdpa)" if side == "transformers" else "energon_hf (packed)",
                   color=COLORS[side])
        for x, run in zip(xs, runs, strict=True):
            ax.annotate(f"{run['ratio']:.2f}x", (x + 0.2, run["real_tokens_per_s"]["energon"]), ha="center",
                        va="bottom", fontsize=8)
        ax.set_xticks(list(xs), [str(run["batch"]) for run in runs])
        ax.set_xlabel("batch size")
        ax.set_title(model)
    axes[0][0].set_ylabel("real tokens / s")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(_title(suite, "a. runtime: packed vs padded forward"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_dynamic_batching(result: dict[str, Any], suite: dict[str, Any], path: Path) -> None:
    servers = result["servers"]
    names = list(servers)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.bar(names, [servers[n]["requests_per_s"] for n in names], color=["#9e9e9e", "#ff7f0e", "#1f77b4"][:len(names)])
    for x, name in enumerate(names):
        ratio = result["throughput_ratio_over_fifo"].get(name)
        if ratio is not None:
            left.annotate(f"{ratio:.2f}x", (x, servers[name]["requests_per_s"]), ha="center", va="bottom", fontsize=8)
    left.set_ylabel("requests / s")
    left.set_title("throughput")
    xs = range(len(names))
    right.bar([x - 0.2 for x in xs], [servers[n]["latency_p50_s"] for n in names], 0.4, label="p50")
    right.bar([x + 0.2 for x in xs], [servers[n]["latency_p99_s"] for n in names], 0.4, label="p99")
    right.set_xticks(list(xs), names)
    right.set_ylabel("latency (s)")
    right.set_title("latency")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(_title(suite, f"b. dynamic batching, {result['settings']['requests']} requests at "
                               f"{result['settings']['rate_per_s']:g}/s"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tp_scaling(result: dict[str, Any], suite: dict[str, Any], path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for tp in result["settings"]["tp"]:
        runs = [run for run in result["runs"] if run["tp"] == tp]
        label = f"tp={tp}" + (" (oversubscribed)" if any(run["oversubscribed"] for run in runs) else "")
        batches = [run["batch"] for run in runs]
        left.plot(batches, [run["latency_s"] * 1e3 for run in runs], marker="o", label=label)
        right.plot(batches, [run["tokens_per_s"] for run in runs], marker="o", label=label)
    for ax, what in ((left, "latency (ms)"), (right, "tokens / s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(what)
        ax.legend(fontsize=8)
    fig.suptitle(_title(suite, f"c. tensor parallelism, {result['model']}"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_generation(result: dict[str, Any], suite: dict[str, Any], path: Path) -> None:
    levels = result["server"]
    clients = [int(c) for c in levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.plot(clients, [levels[str(c)]["tokens_per_s"] for c in clients], marker="o", color=COLORS["energon"],
              label="energon_hf server (continuous batching)")
    left.axhline(result["transformers"]["tokens_per_s"], color=COLORS["transformers"], linestyle="--",
                 label=f"transformers generate, static batch of {result['transformers']['batch_size']}")
    left.set_xscale("log", base=2)
    left.set_xlabel("concurrent clients")
    left.set_ylabel("generated tokens / s")
    left.legend(fontsize=8)
    right.plot(clients, [levels[str(c)]["latency_p50_s"] for c in clients], marker="o", label="p50")
    right.plot(clients, [levels[str(c)]["latency_p99_s"] for c in clients], marker="o", label="p99")
    right.set_xscale("log", base=2)
    right.set_xlabel("concurrent clients")
    right.set_ylabel("request latency (s)")
    right.legend(fontsize=8)
    fig.suptitle(_title(suite, f"d. generation, ratio {result['ratio']:.2f}x"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_decode(result: dict[str, Any], suite: dict[str, Any], path: Path) -> None:
    batches = list(result["runs"])
    variants = list(result["runs"][batches[0]]["variants"])
    fig, axes = plt.subplots(1, len(batches), figsize=(3.6 * len(batches), 3.6), squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=True):
        run = result["runs"][batch]
        names = ["transformers float32", *variants]
        rates = [run["transformers_float32_new_tokens_per_s"], *(run["variants"][v]["new_tokens_per_s"]
                                                                 for v in variants)]
        ax.bar(range(len(names)), rates, color=[COLORS["transformers"]] + [COLORS["energon"]] * len(variants))
        ax.set_xticks(range(len(names)), ["HF fp32", *variants], rotation=45, fontsize=8)
        ax.set_title(f"batch {batch}")
    axes[0][0].set_ylabel("new tokens / s")
    fig.suptitle(_title(suite, "e. generation per precision"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_quality(result: dict[str, Any], suite: dict[str, Any], path: Path) -> None:
    names = list(result["variants"])
    rows = [result["variants"][n] for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.bar(range(len(names)), [100 * r["perplexity_vs_float32"] for r in rows], color=COLORS["energon"])
    left.set_ylabel("perplexity vs float32 (%)")
    right.bar([x - 0.2 for x in range(len(names))], [100 * r["greedy_agreement"] for r in rows], 0.4,
              label="free-running")
    right.bar([x + 0.2 for x in range(len(names))], [100 * r["forced_agreement"] for r in rows], 0.4,
              label="teacher-forced")
    right.set_ylabel("greedy tokens equal to float32 (%)")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    fig.suptitle(_title(suite, "f. quality per precision (SmolLM2)"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_embeddings(result: dict[str, Any], suite: dict[str, Any], path: Path) -> None:
    names = list(result["variants"])
    rows = [result["variants"][name] for name in names]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(names)), 3.6))
    ax.bar(range(len(names)), [row["speed_vs_float32"] for row in rows], 0.6, color=COLORS["energon"])
    for x, row in enumerate(rows):
        ax.annotate(f"cos >= {row['worst_cosine']:.4f}", (x, row["speed_vs_float32"]), ha="center", va="bottom",
                    fontsize=7)
    ax.axhline(1.0, color=COLORS["transformers"], linewidth=1)
    ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
    ax.set_ylabel("speed vs our float32")
    fig.suptitle(_title(suite, f"g. encoders per precision ({result['model']})"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PLOTTERS = {"runtime": plot_runtime, "dynamic_batching": plot_dynamic_batching, "tp_scaling": plot_tp_scaling,
            "generation": plot_generation, "decode": plot_decode, "quality": plot_quality,
            "embeddings": plot_embeddings}


def make_plots(suite: dict[str, Any], folder: Path) -> list[Path]:
    """One PNG per experiment that produced a result; returns their paths."""
    paths = []
    for name, entry in suite["experiments"].items():
        if "result" in entry and name in PLOTTERS:
            path = folder / f"{name}.png"
            PLOTTERS[name](entry["result"], suite, path)
            paths.append(path)
    return paths
