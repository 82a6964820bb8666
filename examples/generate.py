"""Generate text with any supported checkpoint: an HF folder, a .gguf file, or the embedded SmolLM2.

    python -P examples/generate.py --prompt "The capital of France is" --max-new-tokens 16
    python -P examples/generate.py --model path/to/gpt2 --prompt "Hello" --prompt "Once upon a time"
    python -P examples/generate.py --chat --prompt "What is the capital of France?"
"""

from __future__ import annotations

import argparse

import transformers

from energon_hf import EnergonModel, defaults


def main() -> None:
    parser = argparse.ArgumentParser(description="text generation on energon_hf")
    parser.add_argument("--model", default=None, help="HF folder or .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable: one batch)")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--sample", action="store_true", help="sample (temperature 0.7, top-p 0.9) instead of greedy")
    args = parser.parse_args()

    with EnergonModel.from_pretrained(args.model or defaults.generation_model()) as model:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model.folder, padding_side="left")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if args.chat:
            chats = [[{"role": "user", "content": p}] for p in args.prompt]
            inputs = tokenizer.apply_chat_template(chats, add_generation_prompt=True, padding=True,
                                                   return_tensors="pt", return_dict=True)
        else:
            inputs = tokenizer(args.prompt, padding=True, return_tensors="pt")
        sampling = dict(do_sample=True, temperature=0.7, top_p=0.9, seed=0) if args.sample else {}
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, **sampling)
        for prompt, row in zip(args.prompt, out, strict=True):
            print(f"> {prompt}\n{tokenizer.decode(row[inputs['input_ids'].shape[1]:], skip_special_tokens=True)}\n")


if __name__ == "__main__":
    main()
