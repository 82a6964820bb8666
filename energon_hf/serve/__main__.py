"""python -m energon_hf.serve: an OpenAI-compatible HTTP server on an energon_hf model.

    python -m energon_hf.serve [--model PATH_OR_GGUF] [--tp 2 --pp 1] [--host 127.0.0.1 --port 8020]
    python -m energon_hf.serve --config energon_config.py      # EnergonAI's config files

Endpoints: /v1/completions and /v1/chat/completions (generation models; `stream: true` for server-sent
events), /v1/embeddings (encoder base models), /v1/pipeline (the HF Inference API's {"inputs",
"parameters"} for the model's task), /v1/models, /health, /metrics (Prometheus).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator

import uvicorn

from energon_hf import defaults

DEFAULT_NAME = "SmolLM2-135M-Instruct"  # the embedded default model
# Flags a --config file may set: their defaults apply after the file (a flag given on the command line wins).
# tp/pp None: 1, or what a pre-sharded checkpoint's manifest says.
DEFAULTS = {"model": None, "tp": None, "pp": None, "dtype": "auto", "device": "cpu", "host": "127.0.0.1", "port": 8020,
            "quantization": None}
# The embedded SmolLM2 computes on its GGUF file's own 4-bit weights unless --quantization says otherwise:
# perplexity within 0.01 % of the dequantized float32 model, 2x its decode speed (bench/quality.py, README).
DEFAULT_MODEL_QUANTIZATION = "int4"
STOP_MARGIN_S = 5.0  # after the drain: time for the stopped requests' answers before uvicorn cancels them


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m energon_hf.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="checkpoint folder, hub id or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--config", default=None,
                        help="an EnergonAI-style Python config file (model_class, model_type, half, backend, "
                             "tp_init_size, pp_init_size, server_host, server_port, host, port, rm_padding, "
                             "checkpoint; see energon_hf/serve/config.py); flags given here win over it")
    parser.add_argument("--served-name", default=None, help="the model name clients send (default: --model's name)")
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel worker processes (default 1)")
    parser.add_argument("--pp", type=int, default=None, help="pipeline stages (default 1)")
    parser.add_argument("--dtype", default=None, help="auto (the checkpoint's; default), float32, float16 or bfloat16")
    parser.add_argument("--quantization", default=None,
                        choices=("none", "int8", "int4", "int8-exact", "int4-exact"),
                        help="weight-only quantization of the layers' linear products: int8 (per output channel) "
                             "or int4 (groups of 32; a GGUF file's Q4_0/Q4_1 tensors load as they are); '-exact': "
                             "prompts multiply in float32, not bfloat16 (slower prompts, the float32 model's "
                             f"greedy tokens more often); default: {DEFAULT_MODEL_QUANTIZATION} for the embedded "
                             "SmolLM2, none for --model")
    parser.add_argument("--device", default=None, help="cpu (default) or cuda")
    parser.add_argument("--driver-address", default=None, metavar="HOST:PORT",
                        help="serve ranks started by torchrun on other machines (python -m energon_hf.node "
                             "--driver HOST:PORT, the same $ENERGON_HF_ENGINE_KEY everywhere): listen here "
                             "until all tp x pp have connected, instead of starting them on this machine")
    parser.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None,
                        help="port to listen on (default 8020; 0: a free one, printed as 'listening on URL')")
    parser.add_argument("--max-batch-tokens", type=int, default=None,
                        help="most tokens of one generation step (decodes plus prompt chunks; default 512: a long "
                             "prompt stalls running streams for at most one such step), or most real tokens of "
                             "one encoder batch (default 4096)")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="requests allowed to wait for admission before new ones get 429 (default 256)")
    parser.add_argument("--kv-cache-tokens", type=int, default=None,
                        help="tokens the KV cache holds across all running sequences (default: sized by "
                             "--kv-cache-memory-fraction)")
    parser.add_argument("--kv-cache-memory-fraction", type=float, default=0.1,
                        help="without --kv-cache-tokens: the share of the memory left after loading the model "
                             "(RAM on a CPU, each card's free memory on CUDA) that the KV cache takes, as vLLM's "
                             "--gpu-memory-utilization (default 0.1)")
    parser.add_argument("--embed-batching", choices=("packed", "priority"), default="packed",
                        help="how /v1/embeddings batches concurrent requests: packed (the oldest first under "
                             "--max-batch-tokens real tokens; padding-free) or priority (EnergonAI's: length "
                             "groups with the least padding, by batch size and waiting time) (default packed)")
    parser.add_argument("--max-wait-ms", type=float, default=50.0,
                        help="priority batching: a request that waited this long runs in the next batch (default 50)")
    limits = parser.add_argument_group("limits", "bounds on one request, each checked before the work it bounds; "
                                                  "a request over one gets a 4xx that names it")
    limits.add_argument("--max-body-bytes", type=int, default=8 << 20,
                        help="request body size, enforced while reading (chunked or not): 413 (default 8 MiB)")
    limits.add_argument("--max-inputs", type=int, default=2048,
                        help="texts or images in one embeddings or pipeline request (default 2048, as OpenAI)")
    limits.add_argument("--max-request-tokens", type=int, default=65536,
                        help="tokens of all inputs of one embeddings request together (default 65536)")
    limits.add_argument("--max-image-pixels", type=int, default=4096 * 4096,
                        help="width x height of one image, read from its header before decoding, so "
                             "decompression bombs are refused (default 16777216)")
    limits.add_argument("--max-image-bytes", type=int, default=4 << 20,
                        help="encoded size of one image (default 4 MiB)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="on SIGTERM or Ctrl-C: stop accepting, let in-flight requests finish for at most "
                             "this many seconds, then end the rest with an error and exit (default 30)")
    parser.add_argument("--api-key", default=os.environ.get("ENERGON_HF_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on every route but /health and the OpenAPI "
                             "schema and docs "
                             "(default: $ENERGON_HF_API_KEY; none: open)")
    return parser.parse_args(argv)


def resolve(args: argparse.Namespace) -> dict:
    """The settings: command-line flags, else the config file's, else the defaults."""
    from .config import read_config

    config = read_config(args.config) if args.config else {}
    merged = {key: getattr(args, key) if getattr(args, key) is not None else config.get(key, default)
              for key, default in DEFAULTS.items()}
    merged["factory"] = None if args.model else config.get("factory")
    if merged["model"] is None and merged["factory"] is None and merged["quantization"] is None:
        merged["quantization"] = DEFAULT_MODEL_QUANTIZATION
    merged["task"] = config.get("task")
    return merged


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .config import ConfigError

    try:
        setup = resolve(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from energon_hf.errors import EngineDeadError

    from .app import ServeSettings

    def settings(name: str) -> ServeSettings:
        return ServeSettings(served_name=name, api_key=args.api_key, max_queue=args.max_queue,
                             max_batch_tokens=args.max_batch_tokens, kv_cache_tokens=args.kv_cache_tokens,
                             kv_cache_memory_fraction=args.kv_cache_memory_fraction,
                             embed_policy=args.embed_batching, max_wait_ms=args.max_wait_ms,
                             max_body_bytes=args.max_body_bytes, max_inputs=args.max_inputs,
                             max_request_tokens=args.max_request_tokens, max_image_pixels=args.max_image_pixels,
                             max_image_bytes=args.max_image_bytes)

    try:
        app, name, description, close, stop = _build(setup, args, settings)
    except (ValueError, OSError, ImportError, EngineDeadError) as e:  # a model that cannot be served as asked
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"serving {name!r} ({description}) on http://{setup['host']}:{setup['port']}", flush=True)
    config = uvicorn.Config(app, host=setup["host"], port=setup["port"], log_level="warning",
                            timeout_graceful_shutdown=args.shutdown_timeout + STOP_MARGIN_S)
    try:
        DrainingServer(config, args.shutdown_timeout, stop, close).run()
    finally:
        close()
    return 0


class DrainingServer(uvicorn.Server):
    """uvicorn with a bounded drain: on SIGTERM or SIGINT it stops accepting (uvicorn's own shutdown), lets
    in-flight requests finish for `drain_s`, then calls `stop` (stop the batchers: every remaining request
    ends with an error, an error event in a stream and 503 otherwise), and `close` (the engine's workers)
    before uvicorn re-raises the signal to exit with it."""

    def __init__(self, config: uvicorn.Config, drain_s: float, stop: Callable[[], None], close: Callable[[], None]):
        super().__init__(config)
        self.drain_s, self.stop, self.close = drain_s, stop, close

    async def startup(self, sockets=None) -> None:
        """uvicorn's start, then the address it listens on (with --port 0, the free port it took)."""
        await super().startup(sockets)
        if self.started and self.servers:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            print(f"listening on http://{host}:{port}", flush=True)

    def handle_exit(self, sig: int, frame) -> None:
        if not self.should_exit:
            timer = threading.Timer(self.drain_s, self.stop)
            timer.daemon = True
            timer.start()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            try:
                yield
            finally:
                self.close()


def _build(setup: dict, args: argparse.Namespace, settings):
    """The app, its served name and description, and its close and stop (stop taking requests) functions."""
    if setup["factory"] is not None:  # a config file's custom model_class
        from energon_hf.engine.launch import launch

        from .custom import create_custom_app

        factory = setup["factory"]
        if args.driver_address:
            raise ValueError("--driver-address serves a checkpoint (--model); a config file's model_class runs "
                             "on this machine only")
        name = args.served_name or getattr(getattr(factory, "func", factory), "__name__", "custom")
        model = launch(factory, tp=setup["tp"] or 1, pp=setup["pp"] or 1, device=setup["device"])
        app = create_custom_app(model, settings(name), setup["task"] or "custom")
        description = f"custom model, tp={setup['tp'] or 1}, pp={setup['pp'] or 1}"
        return app, name, description, model.close, model.close
    from transformers import AutoTokenizer

    from energon_hf import EnergonModel

    from .app import create_app

    source = setup["model"] or defaults.generation_model()
    model = EnergonModel.from_pretrained(source, dtype=setup["dtype"], device=setup["device"], tp=setup["tp"],
                                         pp=setup["pp"], quantization=setup["quantization"],
                                         driver_address=args.driver_address)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model.folder)
    except (OSError, ValueError):  # an image model: its pipeline loads the image processor
        tokenizer = None
    name = args.served_name or (DEFAULT_NAME if setup["model"] is None
                                else os.path.basename(str(source).rstrip("/")).removesuffix(".gguf"))
    app = create_app(model, tokenizer, settings(name))
    description = (f"{model.architecture.name}, {str(model.dtype).removeprefix('torch.')}, quantization="
                   f"{model.quantization or 'none'}, tp={model.tp}, pp={model.pp}")
    served = app.state.served
    if served.batcher is not None:
        allocator = served.batcher.allocator
        description += (f", KV cache of {allocator.num_blocks_total * allocator.block_size} tokens, steps of at most "
                        f"{served.batcher.scheduler.max_batch_tokens} tokens")
    return app, name, description, served.close, served.stop_batchers


if __name__ == "__main__":
    sys.exit(main())
