"""Quality of reduced precision on SmolLM2-135M-Instruct (the embedded default): perplexity of each variant on
chapter I of Lewis Carroll's Alice's Adventures in Wonderland (1865, public domain; Project Gutenberg eBook
#11), shipped in bench/data, and the agreement of its greedy tokens with the float32 model over 8 chat prompts
x 64 new tokens, free-running (a sequence parts for good at its first near-tie that rounds the other way) and
teacher-forced (the reference's prefix fed to each variant: the share of positions where it ranks the same
token first). The float32 reference is the GGUF file dequantized (what transformers loads from it).

    .venv/bin/python -P bench/quality.py             # every variant, the full text (about 2 min)
    .venv/bin/python -P bench/quality.py --quick     # 3 variants, fewer tokens and prompts (a smoke run)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import transformers

from energon_hf import EnergonModel, defaults
from energon_hf.converters.gguf_blocks import BLOCKS_FILE
from energon_hf.evaluate import agreement, forced_agreement, greedy_tokens, perplexity
from energon_hf.loading import resolve_model_path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run with -P: the bench folder itself is not on sys.path
from common import machine_info, write_result  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TEXT = Path(__file__).resolve().parent / "data" / "alice_chapter1.txt"
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain what a prime number is.",
           "Give me three tips for sleeping better.", "Who wrote Romeo and Juliet?",
           "Translate 'good morning' into Spanish.", "What is 12 times 12?", "Describe a cat in one sentence."]
# variant -> from_pretrained arguments; "folder": load the float checkpoint without the GGUF's blocks
VARIANTS = {
    "float32": dict(dtype="float32"),
    "bfloat16": dict(dtype="bfloat16"),
    "float16": dict(dtype="float16"),
    "int8": dict(dtype="float32", quantization="int8"),
    "int4 (GGUF Q4_1 blocks)": dict(dtype="float32", quantization="int4"),
    "int4 (quantized from float32)": dict(dtype="float32", quantization="int4", folder="float"),
    "int8-exact": dict(dtype="float32", quantization="int8-exact"),
    "int4-exact (GGUF Q4_1 blocks)": dict(dtype="float32", quantization="int4-exact"),
}
# issue 14's bounds: perplexity within this fraction of float32's, greedy agreement at least this
TARGETS = {"int8": (0.01, 0.90), "int4 (GGUF Q4_1 blocks)": (0.005, 0.90),
           "int4 (quantized from float32)": (0.05, None), "int8-exact": (0.01, 0.90),
           "int4-exact (GGUF Q4_1 blocks)": (0.005, 0.90)}


def float_only_folder(folder: Path, into: Path) -> Path:
    """The converted GGUF folder without its block map: int4 then quantizes the dequantized floats."""
    for path in folder.iterdir():
        if path.name != BLOCKS_FILE:
            (into / path.name).symlink_to(path)
    return into


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="float32, int8 and GGUF int4 on 128 tokens of text and one prompt x 8 tokens")
    parser.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS))
    parser.add_argument("--gpu", action="store_true", help="run the variants on CUDA")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    out_path = args.out or RESULTS / ("quality_quick.json" if args.quick else "quality.json")
    folder = resolve_model_path(defaults.generation_model())
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(TEXT.read_text(), return_tensors="pt").input_ids[0]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"][0] for p in PROMPTS]
    variants = args.variants or (["float32", "int8", "int4 (GGUF Q4_1 blocks)"] if args.quick else list(VARIANTS))
    if args.quick:
        ids, prompts = ids[:128], prompts[:1]
    new_tokens = 8 if args.quick else 64
    results, reference = {}, None
    with tempfile.TemporaryDirectory(prefix="quality_") as scratch:
        float_folder = float_only_folder(folder, Path(scratch))
        for name in ["float32", *[v for v in variants if v != "float32"]]:
            kwargs = dict(VARIANTS[name])
            source = float_folder if kwargs.pop("folder", None) else defaults.generation_model()
            model = EnergonModel.from_pretrained(source, device="cuda" if args.gpu else "cpu", **kwargs)
            ppl = perplexity(model, ids)
            tokens = greedy_tokens(model, prompts, new_tokens)
            reference = reference or {"perplexity": ppl, "tokens": tokens}
            row = {"perplexity": ppl, "perplexity_vs_float32": ppl / reference["perplexity"] - 1,
                   "greedy_agreement": agreement(tokens, reference["tokens"]),
                   "forced_agreement": forced_agreement(model, prompts, reference["tokens"]),
                   "settings": VARIANTS[name]}
            target = TARGETS.get(name)
            if target:
                row["target"] = {"perplexity_within": target[0], "greedy_agreement_at_least": target[1]}
                row["met"] = abs(row["perplexity_vs_float32"]) <= target[0] and \
                    (target[1] is None or row["greedy_agreement"] >= target[1])
            results[name] = row
            model.close()
            print(f"{name:32s} perplexity {ppl:8.3f} ({row['perplexity_vs_float32']:+.2%} vs float32), greedy "
                  f"agreement {row['greedy_agreement']:.1%} (teacher-forced {row['forced_agreement']:.1%})"
                  + (f", target met: {row['met']}" if target else ""))
    result = {"benchmark": "quality", "machine": machine_info(args.threads), "text": TEXT.name,
              "text_tokens": ids.numel(), "prompts": len(prompts), "new_tokens": new_tokens, "variants": results}
    write_result(out_path, result)
    print(f"-> {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
