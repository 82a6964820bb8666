"""Packed (energon_hf) vs padded (transformers, SDPA) forward of a bert-base BertModel on CPU.

Both models are built from the same randomly initialised checkpoint and run on the same right-padded
batch of variable-length sequences, alternately, in one process. The metric is real (non-pad) tokens
per second of the median run; the ratio energon/HF is what padding removal buys.

Run from the repository root (the package is installed in editable mode, `-P` keeps the root off
sys.path):

    .venv/bin/python -P bench/bert_packed_vs_hf.py            # full: bert-base, 32 seqs of 8..256 tokens
    .venv/bin/python -P bench/bert_packed_vs_hf.py --quick    # tiny config, a few seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from transformers import BertConfig, BertModel

from energon_hf import EnergonModel

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run with -P: the bench folder itself is not on sys.path
from common import machine_info, time_calls  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_OUT = RESULTS / "bert_packed_vs_hf.json"
DEFAULT_QUICK_OUT = RESULTS / "bert_packed_vs_hf_quick.json"  # a smoke run never overwrites the real one
TOLERANCE = 1e-4
TARGET_RATIO = 1.8


@dataclass
class Settings:
    batch: int
    min_len: int
    max_len: int
    seed: int
    repeats: int
    warmup: int
    threads: int
    quick: bool


def parse_args(argv: list[str] | None = None) -> tuple[Settings, Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=None, help="sequences per batch (default 32; quick 8)")
    parser.add_argument("--min-len", type=int, default=None, help="shortest sequence (default 8)")
    parser.add_argument("--max-len", type=int, default=None, help="longest sequence (default 256; quick 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, lengths and token ids")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs each (default 5; quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs each (default 2; quick 1)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true", help="tiny BERT config and batch: a smoke run")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON results (default {DEFAULT_OUT}; quick: {DEFAULT_QUICK_OUT.name})")
    args = parser.parse_args(argv)

    def pick(value: int | None, full: int, quick: int) -> int:
        return value if value is not None else (quick if args.quick else full)

    settings = Settings(
        batch=pick(args.batch, 32, 8),
        min_len=pick(args.min_len, 8, 8),
        max_len=pick(args.max_len, 256, 64),
        seed=args.seed,
        repeats=pick(args.repeats, 5, 3),
        warmup=pick(args.warmup, 2, 1),
        threads=args.threads,
        quick=args.quick,
    )
    if settings.batch < 1 or settings.repeats < 1 or settings.warmup < 0 or settings.threads < 1:
        parser.error("--batch, --repeats and --threads must be >= 1, --warmup >= 0")
    if not 1 <= settings.min_len <= settings.max_len:
        parser.error("need 1 <= --min-len <= --max-len")
    out = args.out if args.out is not None else (DEFAULT_QUICK_OUT if args.quick else DEFAULT_OUT)
    return settings, out


def bert_config(quick: bool) -> BertConfig:
    if quick:
        return BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=256, max_position_embeddings=128)
    return BertConfig()  # bert-base: hidden 768, 12 layers, 12 heads, intermediate 3072


def make_batch(config: BertConfig, settings: Settings) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Right-padded ids [B, S] (pad = config.pad_token_id) and mask [B, S], S = the longest length."""
    if settings.max_len > config.max_position_embeddings:
        raise SystemExit(f"--max-len {settings.max_len} exceeds max_position_embeddings "
                         f"{config.max_position_embeddings}")
    gen = torch.Generator().manual_seed(settings.seed)
    lengths = torch.randint(settings.min_len, settings.max_len + 1, (settings.batch,), generator=gen).tolist()
    seqlen = max(lengths)
    pad_id = config.pad_token_id or 0
    ids = torch.full((settings.batch, seqlen), pad_id, dtype=torch.long)
    mask = torch.zeros((settings.batch, seqlen), dtype=torch.long)
    for row, length in enumerate(lengths):
        # Token ids avoid the pad id so the only difference between rows is the mask.
        ids[row, :length] = torch.randint(pad_id + 1, config.vocab_size, (length,), generator=gen)
        mask[row, :length] = 1
    return ids, mask, lengths


def build_models(config: BertConfig, seed: int, folder: str) -> tuple[BertModel, EnergonModel]:
    torch.manual_seed(seed)
    BertModel(config).eval().save_pretrained(folder)
    hf = BertModel.from_pretrained(folder, attn_implementation="sdpa").eval()
    if next(hf.parameters()).dtype != torch.float32:
        raise SystemExit(f"HF model loaded as {next(hf.parameters()).dtype}, expected float32")
    ours = EnergonModel.from_pretrained(folder, dtype="float32")
    return hf, ours


def ideal_ratio(config: BertConfig, lengths: list[int]) -> float:
    """Encoder-layer FLOPs of the padded batch over those of the packed one: the speedup padding
    removal can give at equal efficiency (linear layers ~ tokens, attention ~ sum of length^2)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    per_token = 2 * hidden * (4 * hidden + 2 * inter)  # qkv + out projection + the two MLP matmuls
    per_square = 4 * hidden  # q @ k^T and p @ v
    padded_to = max(lengths)
    padded = len(lengths) * (padded_to * per_token + padded_to**2 * per_square)
    packed = sum(length * per_token + length**2 * per_square for length in lengths)
    return padded / packed


def main(argv: list[str] | None = None) -> int:
    settings, out_path = parse_args(argv)
    transformers.utils.logging.disable_progress_bar()  # save/load bars would bury the summary line
    torch.set_num_threads(settings.threads)
    machine = machine_info(settings.threads)  # before the runs: the load average is other processes'
    config = bert_config(settings.quick)
    ids, mask, lengths = make_batch(config, settings)
    real_tokens = int(mask.sum())
    padded_tokens = ids.numel()

    with tempfile.TemporaryDirectory(prefix="bert_bench_") as folder:
        hf, ours = build_models(config, settings.seed, folder)

    def run_hf() -> torch.Tensor:
        with torch.inference_mode():
            return hf(input_ids=ids, attention_mask=mask).last_hidden_state

    def run_ours() -> torch.Tensor:
        return ours(input_ids=ids, attention_mask=mask).last_hidden_state

    real = mask.bool()
    max_abs_diff = (run_hf()[real] - run_ours()[real]).abs().max().item()

    calls = {"hf_sdpa_padded": run_hf, "energon_packed": run_ours}
    times = time_calls(calls, settings.warmup, settings.repeats)
    medians = {name: statistics.median(values) for name, values in times.items()}
    tokens_per_s = {name: real_tokens / median for name, median in medians.items()}
    ratio = tokens_per_s["energon_packed"] / tokens_per_s["hf_sdpa_padded"]
    # The min is the least disturbed run: on a shared machine it is the steadier of the two figures.
    ratio_of_min = min(times["hf_sdpa_padded"]) / min(times["energon_packed"])
    ideal = ideal_ratio(config, lengths)

    result = {
        "benchmark": "bert_packed_vs_hf",
        "machine": machine,
        "settings": asdict(settings),
        "model_config": {key: getattr(config, key) for key in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings")},
        "batch": {"lengths": lengths, "padded_to": ids.shape[1], "real_tokens": real_tokens,
                  "padded_tokens": padded_tokens, "padding_fraction": 1 - real_tokens / padded_tokens},
        "max_abs_diff_last_hidden_state": max_abs_diff,
        "max_abs_diff_ok": max_abs_diff < TOLERANCE,
        "times_s": times,
        "median_s": medians,
        "real_tokens_per_s": tokens_per_s,
        "ratio_energon_over_hf": ratio,
        "ratio_of_min_times": ratio_of_min,
        "ideal_ratio_flops": ideal,
        "loadavg_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "target_ratio": TARGET_RATIO,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")

    name = "tiny-bert (quick)" if settings.quick else "bert-base"
    print(f"{name} B={settings.batch} len {settings.min_len}..{settings.max_len} "
          f"({real_tokens}/{padded_tokens} real tokens) threads={settings.threads}: "
          f"HF sdpa {tokens_per_s['hf_sdpa_padded']:.0f} tok/s, "
          f"energon {tokens_per_s['energon_packed']:.0f} tok/s, ratio {ratio:.2f}x "
          f"(of min times {ratio_of_min:.2f}x; FLOP ideal {ideal:.2f}x; target {TARGET_RATIO}x), "
          f"max|diff| {max_abs_diff:.2e} -> {out_path}")
    if max_abs_diff >= TOLERANCE:
        print(f"WARNING: max abs diff {max_abs_diff:.3e} >= {TOLERANCE:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
