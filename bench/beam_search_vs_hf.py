"""Beam search against transformers' generate on the same weights, side by side in one process: seconds per call
(best of --repeats, interleaved) and whether the tokens are equal. Default: the embedded SmolLM2-135M-Instruct in
float32 (its GGUF dequantized), one prompt, 4 beams, 32 new tokens.

    python -P bench/beam_search_vs_hf.py [--model PATH] [--beams 4] [--new 32] [--repeats 3] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import transformers

from energon_hf import EnergonModel, defaults

PROMPT = "The history of the city of Paris begins with"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a checkpoint folder or .gguf (default: the embedded SmolLM2)")
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--new", type=int, default=32, help="new tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ours = EnergonModel.from_pretrained(args.model or defaults.generation_model(), dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(ours.folder, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(ours.folder)
    ids = tokenizer([PROMPT], return_tensors="pt").input_ids
    kwargs = dict(max_new_tokens=args.new, num_beams=args.beams, do_sample=False, eos_token_id=None,
                  pad_token_id=tokenizer.pad_token_id or 0)
    seconds: dict[str, list[float]] = {"transformers": [], "energon_hf": []}
    outputs = {}
    for _ in range(args.repeats):
        for name, model in (("transformers", hf), ("energon_hf", ours)):
            start = time.perf_counter()
            with torch.no_grad():
                outputs[name] = model.generate(ids, **kwargs)
            seconds[name].append(time.perf_counter() - start)
    best = {name: min(times) for name, times in seconds.items()}
    result = {"beams": args.beams, "new_tokens": args.new, "seconds": seconds, "best": best,
              "ratio": best["transformers"] / best["energon_hf"],
              "same_tokens": torch.equal(outputs["transformers"], outputs["energon_hf"]),
              "text": tokenizer.decode(outputs["energon_hf"][0, ids.shape[1]:])}
    print(f"{args.beams} beams, {args.new} new tokens: transformers {best['transformers']:.2f} s, energon_hf "
          f"{best['energon_hf']:.2f} s (best of {args.repeats}): {result['ratio']:.2f}x; same tokens: "
          f"{result['same_tokens']}")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
