"""Sharded loading: a gpt2-xl-sized checkpoint (1.5B parameters, random weights made locally, about 6 GB in
fp32) loaded at tp=4, against transformers' from_pretrained of the same folder, in one run.

Each side loads in a fresh process (so neither inherits the other's memory) and reports its wall time and
peak RSS; energon_hf also reports every worker rank's peak RSS. The folder is read once beforehand so that
both find it in the page cache. Targets: per-rank peak RSS at most 0.35x the model's size; load time no
worse than transformers'.

    .venv/bin/python -P bench/tp_load_memory.py            # makes bench/results/gpt2-xl-random once (6 GB)
    .venv/bin/python -P bench/tp_load_memory.py --quick    # tiny config: a smoke test of the script

The config has 32 heads instead of gpt2-xl's 25 so that tp=4 divides them (the parameter count is the same).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from energon_hf.convert import convert

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run with -P: the bench folder is not on sys.path
from common import machine_info, write_result  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RSS_TARGET = 0.35

# Runs in a fresh interpreter; prints one JSON line.
LOADERS = {
    "transformers": """
        import json, resource, time, torch, transformers
        start = time.perf_counter()
        model = transformers.GPT2LMHeadModel.from_pretrained({folder!r}, dtype=torch.float32)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({{"load_s": seconds, "peak_rss_bytes": peak}}))
    """,
    "energon_hf": """
        import json, resource, time
        from energon_hf import EnergonModel
        start = time.perf_counter()
        model = EnergonModel.from_pretrained({folder!r}, dtype="float32", tp={tp}, threads_per_rank=1)
        seconds = time.perf_counter() - start
        ranks = model.runner.rank_stats()
        model.close()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({{"load_s": seconds, "driver_peak_rss_bytes": peak, "ranks": ranks}}))
    """,
}


def make_checkpoint(folder: Path, config: transformers.GPT2Config) -> int:
    """Random weights in HF's GPT-2 names, written without building the model (one tensor at a time)."""
    if (folder / "model.safetensors").is_file():
        return (folder / "model.safetensors").stat().st_size
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in transformers.GPT2LMHeadModel(config).state_dict().items()
                  if not k.endswith((".attn.bias", ".attn.masked_bias")) and k != "lm_head.weight"}
    gen = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(shape, generator=gen) * 0.02 for name, shape in shapes.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)
    return (folder / "model.safetensors").stat().st_size


def run_loader(name: str, folder: Path, tp: int) -> dict:
    code = textwrap.dedent(LOADERS[name]).format(folder=str(folder), tp=tp)
    done = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{name} loader failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny config: a smoke run")
    parser.add_argument("--tp", type=int, default=4)
    parser.add_argument("--folder", type=Path, default=None, help="where the random checkpoint lives")
    parser.add_argument("--out", type=Path, default=None)
    args, _ = parser.parse_known_args(argv)
    out_path = args.out or RESULTS / ("tp_load_memory_quick.json" if args.quick else "tp_load_memory.json")
    if args.quick:
        config = transformers.GPT2Config(vocab_size=1000, n_positions=64, n_embd=64, n_layer=2, n_head=4)
        folder = args.folder or out_path.parent / "gpt2-tiny-random"
        args.tp = 2
    else:
        config = transformers.GPT2Config(n_embd=1600, n_layer=48, n_head=32, n_positions=1024)
        folder = args.folder or RESULTS / "gpt2-xl-random"
    size = make_checkpoint(folder, config)
    sharded = folder.with_name(folder.name + f"-tp{args.tp}")
    if not (sharded / "energon_manifest.json").is_file():  # the same weights, pre-sharded once
        convert(folder, sharded, tp=args.tp)
    (folder / "model.safetensors").read_bytes() if args.quick else subprocess.run(
        ["cat", str(folder / "model.safetensors")], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    runs = {}
    for name, source in (("transformers", folder), ("energon_hf", folder), ("energon_hf_presharded", sharded)):
        start = time.perf_counter()
        runs[name] = run_loader(name.removesuffix("_presharded"), source, args.tp)
        runs[name]["process_wall_s"] = time.perf_counter() - start
    worst_rank = max(r["peak_rss_bytes"] for r in runs["energon_hf"]["ranks"])
    mean_build = sum(r["build_s"] for r in runs["energon_hf"]["ranks"]) / args.tp
    result = {
        "benchmark": "tp_load_memory", "machine": machine_info(torch.get_num_threads()),
        "settings": {"tp": args.tp, "folder": str(folder), "config": config.to_diff_dict()},
        "checkpoint_bytes": size, "runs": runs,
        "worst_rank_peak_rss_over_model": worst_rank / size, "rss_target_at_most": RSS_TARGET,
        "load_time_ratio_energon_over_hf": runs["energon_hf"]["load_s"] / runs["transformers"]["load_s"],
        "load_time_ratio_presharded_over_hf": runs["energon_hf_presharded"]["load_s"] / runs["transformers"]["load_s"],
    }
    write_result(out_path, result)
    hf, ours, pre = runs["transformers"], runs["energon_hf"], runs["energon_hf_presharded"]
    print(f"checkpoint {size / 1e9:.2f} GB; transformers: load {hf['load_s']:.1f} s, peak RSS "
          f"{hf['peak_rss_bytes'] / 1e9:.2f} GB; energon_hf tp={args.tp}: load {ours['load_s']:.1f} s "
          f"(ratio {result['load_time_ratio_energon_over_hf']:.2f}x; each rank builds in {mean_build:.1f} s, the rest "
          f"is starting {args.tp} interpreters), pre-sharded {pre['load_s']:.1f} s "
          f"({result['load_time_ratio_presharded_over_hf']:.2f}x); worst rank peak RSS {worst_rank / 1e9:.2f} GB "
          f"= {result['worst_rank_peak_rss_over_model']:.2f}x the model (target <= {RSS_TARGET}x) -> {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
