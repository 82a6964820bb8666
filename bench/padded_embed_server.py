"""The benchmark's padded baseline server: energon_hf's real server app (routes, dynamic batcher, HTTP) with
/v1/embeddings' batches run by transformers' model, padded to each batch's longest sequence.

experiment b (bench/dynamic_batching.py) starts it twice, with `--embed-batching packed` (FIFO: arrival
order under the token budget, padded: EnergonAI's FIFO baseline) and `priority` (EnergonAI's dynamic
batching, which groups similar lengths to pad less), next to the real `python -m energon_hf.serve`.

    .venv/bin/python -P bench/padded_embed_server.py --model FOLDER --embed-batching priority --port 8030
"""

from __future__ import annotations

import argparse
import sys

import torch
import transformers
import uvicorn

from energon_hf import EnergonModel
from energon_hf.serve.app import ServeSettings, create_app


def mean_pooling_runner(model, tokenizer):
    """run_batch for the DynamicBatcher: token sequences -> one mean-pooled vector each, through a padded model
    (tokenizer.pad: right padding to the batch's longest)."""
    def run(sequences: list[list[int]]) -> list[torch.Tensor]:
        batch = tokenizer.pad({"input_ids": sequences}, return_tensors="pt").to(model.device)
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return list((hidden * mask).sum(1) / mask.sum(1))
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a BERT-family base model folder with its tokenizer")
    parser.add_argument("--served-name", default="bench")
    parser.add_argument("--embed-batching", choices=("packed", "priority"), default="packed")
    parser.add_argument("--max-batch-tokens", type=int, default=4096)
    parser.add_argument("--max-wait-ms", type=float, default=50.0)
    parser.add_argument("--max-queue", type=int, default=1 << 20, help="requests waiting before 429 (default: many)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    transformers.utils.logging.set_verbosity_error()
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    dtype = getattr(torch, args.dtype)
    padded = transformers.AutoModel.from_pretrained(args.model, attn_implementation="sdpa",
                                                    dtype=dtype).to(args.device).eval()
    run_padded = mean_pooling_runner(padded, tokenizer)  # tokenizer.pad: right padding to the batch's longest

    def run_batch(sequences: list[list[int]]) -> list[torch.Tensor]:
        with torch.inference_mode():
            return run_padded(sequences)

    # The served EnergonModel answers /v1/pipeline and /v1/models; /v1/embeddings runs `run_batch`.
    model = EnergonModel.from_pretrained(args.model, dtype=dtype, device=args.device)
    settings = ServeSettings(served_name=args.served_name, max_batch_tokens=args.max_batch_tokens,
                             max_queue=args.max_queue, embed_policy=args.embed_batching, max_wait_ms=args.max_wait_ms)
    app = create_app(model, tokenizer, settings, embed_runner=run_batch)
    print(f"serving {args.served_name!r} (transformers padded, {args.embed_batching}) on "
          f"http://127.0.0.1:{args.port}", flush=True)
    try:
        uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
    finally:
        app.state.served.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
