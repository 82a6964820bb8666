"""python -m energon_hf.serve: an OpenAI-compatible HTTP server on an energon_hf model.

    python -m energon_hf.serve --model PATH_OR_GGUF [--tp 2 --pp 1] [--host 127.0.0.1 --port 8020]

Endpoints: /v1/completions and /v1/chat/completions (generation models; `stream: true` for server-sent
events), /v1/embeddings (encoder models), /v1/models, /health, /metrics (Prometheus).
"""

from __future__ import annotations

import argparse
import os
import sys

from energon_hf import defaults

DEFAULT_NAME = "SmolLM2-135M-Instruct"  # the embedded default model

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m energon_hf.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="checkpoint folder, hub id or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--served-name", default=None, help="the model name clients send (default: --model's name)")
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel worker processes (default 1)")
    parser.add_argument("--pp", type=int, default=None, help="pipeline stages (default 1)")
    parser.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, float16 or bfloat16")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8020, help="port to listen on (default 8020)")
    parser.add_argument("--max-batch-tokens", type=int, default=4096,
                        help="most prompt tokens admitted into one prefill step (default 4096)")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="requests allowed to wait for admission before new ones get 429 (default 256)")
    parser.add_argument("--kv-cache-tokens", type=int, default=16384,
                        help="tokens the KV cache holds across all running sequences (default 16384)")
    parser.add_argument("--embed-batching", choices=("packed", "priority"), default="packed",
                        help="how /v1/embeddings batches concurrent requests: packed (the oldest first under "
                             "--max-batch-tokens real tokens; padding-free) or priority (EnergonAI's: length "
                             "groups with the least padding, by batch size and waiting time) (default packed)")
    parser.add_argument("--max-wait-ms", type=float, default=50.0,
                        help="priority batching: a request that waited this long runs in the next batch (default 50)")
    parser.add_argument("--api-key", default=os.environ.get("ENERGON_HF_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on every route but /health "
                             "(default: $ENERGON_HF_API_KEY; none: open)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import uvicorn
    from transformers import AutoTokenizer

    from energon_hf import EnergonModel

    from .app import ServeSettings, create_app

    source = args.model or defaults.generation_model()
    model = EnergonModel.from_pretrained(source, dtype=args.dtype, device=args.device, tp=args.tp, pp=args.pp)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model.folder)
    except (OSError, ValueError):  # an image model: its pipeline loads the image processor
        tokenizer = None
    name = args.served_name or (DEFAULT_NAME if args.model is None
                                else os.path.basename(str(source).rstrip("/")).removesuffix(".gguf"))
    settings = ServeSettings(served_name=name, api_key=args.api_key, max_queue=args.max_queue,
                             max_batch_tokens=args.max_batch_tokens, kv_cache_tokens=args.kv_cache_tokens,
                             embed_policy=args.embed_batching, max_wait_ms=args.max_wait_ms)
    app = create_app(model, tokenizer, settings)
    print(f"serving {name!r} ({model.architecture.name}, tp={model.tp}, pp={model.pp}) on "
          f"http://{args.host}:{args.port}", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        app.state.served.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
