"""Generation throughput: energon_hf's KV-cache generate against transformers' generate, same weights.

SmolLM2-135M-Instruct (the embedded default) by default; batch 1 and batch 8 with mixed prompt lengths
(left-padded for transformers, packed for energon_hf), greedy, exactly --new-tokens new tokens each
(min_new_tokens holds EOS back so both sides do the same work). Metric: new tokens per second.

    .venv/bin/python -P bench/generate_vs_hf.py             # full: SmolLM2, 64 new tokens, batch 1 and 8
    .venv/bin/python -P bench/generate_vs_hf.py --quick     # tiny random Llama, a few seconds
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

from energon_hf import EnergonModel, defaults

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run with -P: the bench folder itself is not on sys.path
from common import machine_info, time_calls  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {1: 1.0, 8: 1.5}  # issue 3: at least 1.0x transformers at batch 1, 1.5x at batch 8


def prompts(batch: int, min_len: int, max_len: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts [B, S] of lengths U[min_len, max_len] and their mask."""
    gen = torch.Generator().manual_seed(seed + batch)
    lengths = torch.randint(min_len, max_len + 1, (batch,), generator=gen).tolist()
    width = max(lengths)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(10, vocab, (n,), generator=gen)
        mask[row, width - n:] = 1
    return ids, mask


def load(quick: bool, model: str | None, folder: str) -> tuple[EnergonModel, torch.nn.Module]:
    if quick:
        config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).save_pretrained(folder)
        model = folder
    ours = EnergonModel.from_pretrained(model or defaults.generation_model(), dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(ours.folder, dtype=torch.float32).eval()
    return ours, hf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint folder or .gguf (default: SmolLM2)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=None, help="new tokens per sequence (default 64)")
    parser.add_argument("--min-len", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny random Llama: a smoke run")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    new_tokens = args.new_tokens or (8 if args.quick else 64)
    out_path = args.out or RESULTS / ("generate_vs_hf_quick.json" if args.quick else "generate_vs_hf.json")
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    machine = machine_info(args.threads)

    with tempfile.TemporaryDirectory(prefix="gen_bench_") as folder:
        ours, hf = load(args.quick, args.model, folder)
        runs = {}
        for batch in args.batches:
            ids, mask = prompts(batch, args.min_len, args.max_len, ours.config.vocab_size, args.seed)
            kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=ours.generation_config.pad_token_id or 0)

            def run_hf(ids=ids, mask=mask, kwargs=kwargs):
                with torch.inference_mode():
                    return hf.generate(ids, attention_mask=mask, **kwargs)

            def run_ours(ids=ids, mask=mask, kwargs=kwargs):
                return ours.generate(ids, attention_mask=mask, **kwargs)

            same_tokens = torch.equal(run_hf(), run_ours())
            times = time_calls({"transformers": run_hf, "energon_hf": run_ours}, args.warmup, args.repeats)
            tokens_per_s = {name: batch * new_tokens / statistics.median(t) for name, t in times.items()}
            ratio = tokens_per_s["energon_hf"] / tokens_per_s["transformers"]
            runs[str(batch)] = {"prompt_lengths": mask.sum(1).tolist(), "times_s": times,
                                "new_tokens_per_s": tokens_per_s, "ratio": ratio, "same_tokens": same_tokens,
                                "target": TARGETS.get(batch)}
            print(f"batch {batch}: transformers {tokens_per_s['transformers']:.1f} tok/s, energon_hf "
                  f"{tokens_per_s['energon_hf']:.1f} tok/s, ratio {ratio:.2f}x (target {TARGETS.get(batch)}), "
                  f"same tokens: {same_tokens}")

    result = {"benchmark": "generate_vs_hf", "machine": machine, "model": ours.name_or_path,
              "settings": {**vars(args), "out": str(out_path), "new_tokens": new_tokens}, "runs": runs}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"-> {out_path}")
    return 0 if all(run["same_tokens"] for run in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
