"""What every route of one server shares: the model, its tokenizer, the settings, the batchers, the metrics,
and the bounded pool that does a request's CPU-heavy work off the event loop."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from energon_hf.engine.batcher import ContinuousBatcher
from energon_hf.engine.dynamic_batcher import DynamicBatcher
from energon_hf.modeling import EnergonModel
from energon_hf.sentence_transformer import SentenceTransformer

from .errors import APIError
from .metrics import Metrics

T = TypeVar("T")


# A generation step's default budget. A 2,000-token prompt arriving beside a running stream (SmolLM2 float32,
# bench/serve_stall.py, two runs) stalls the stream for at most 0.64 s at 256, 1.09 s at 512, 2.40 s at 1024 and
# 3.6-4.2 s at 4096, and is answered in 3.6-4.3 s at each; a burst of 64 requests runs equally fast at all four
# (bench/serve_vs_hf.py). Below 512 the running decodes would leave little of a step to admit new prompts.
GENERATION_STEP_TOKENS = 512
ENCODER_BATCH_TOKENS = 4096  # an encoder batch is all prompt: larger batches, fewer calls


@dataclass
class ServeSettings:
    served_name: str
    api_key: str | None = None
    max_queue: int = 256          # requests waiting for admission before new ones get 429
    max_batch_tokens: int | None = None  # tokens of one generation step (decodes, prompt chunks), or of one
    # encoder batch; None: GENERATION_STEP_TOKENS or ENCODER_BATCH_TOKENS
    kv_cache_tokens: int | None = None  # None: sized from the memory left after loading
    kv_cache_memory_fraction: float = 0.1  # the share of that memory the KV cache takes
    embed_policy: str = "packed"  # encoder batches: "packed" (FIFO under the token budget) or "priority"
    max_wait_ms: float = 50.0     # "priority": the longest a request waits before its batch must run
    # Limits on one request; each is checked before the work it bounds, and a request over one gets a 4xx
    # that names it. The body limit holds while reading, chunked or not (413 without reading further).
    max_body_bytes: int = 8 << 20
    max_inputs: int = 2048                # texts or images of one embeddings or pipeline request (OpenAI: 2048)
    max_request_tokens: int = 65536       # tokens of one embeddings or pipeline request, all inputs together
    max_image_pixels: int = 4096 * 4096   # decoded size of one image (decompression bombs are refused unread)
    max_image_bytes: int = 4 << 20        # encoded size of one image
    request_threads: int = 4              # the pool that tokenizes, decodes images and writes big JSON


@dataclass
class Served:
    model: EnergonModel
    tokenizer: object
    settings: ServeSettings
    metrics: Metrics
    batcher: ContinuousBatcher | None   # generation models
    encoder: DynamicBatcher | None      # encoder models
    eos_ids: list[int]
    context: int                        # the model's context length in tokens
    task: str                           # the pipeline task /v1/pipeline serves
    pipeline: Callable[..., Any] | None  # energon_hf.pipeline of that task (encoder tasks)
    sentences: SentenceTransformer | None = None  # base encoders: /v1/embeddings' tokenizing and pooling
    pool: ThreadPoolExecutor = field(init=False)

    def __post_init__(self) -> None:
        self.pool = ThreadPoolExecutor(self.settings.request_threads, thread_name_prefix="energon-request")

    async def offload(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run CPU-heavy request work (tokenizing, chat templates, image decoding, big JSON) in the bounded
        pool, so the event loop keeps answering other requests and /health meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args, **kwargs))

    def check_model(self, name: str) -> None:
        if name != self.settings.served_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {self.settings.served_name!r}",
                           param="model", code="model_not_found")

    def check_queue(self, waiting: int, adding: int = 1) -> None:
        """429 when `adding` more requests would put more than max_queue in the queue of `waiting`."""
        if waiting + adding > self.settings.max_queue:
            raise APIError(429, f"the queue is full ({self.settings.max_queue} requests waiting); retry shortly",
                           kind="rate_limit_error", headers={"Retry-After": "1"})

    def check_inputs(self, count: int, tokens: int | None = None) -> None:
        """400 when one request holds more inputs or tokens than the server takes at once."""
        if count > self.settings.max_inputs:
            raise APIError(400, f"{count} inputs in one request; the limit is {self.settings.max_inputs} "
                                f"(--max-inputs)", param="input", code="too_many_inputs")
        if tokens is not None and tokens > self.settings.max_request_tokens:
            raise APIError(400, f"the inputs hold {tokens} tokens; the limit per request is "
                                f"{self.settings.max_request_tokens} (--max-request-tokens)", param="input",
                           code="too_many_tokens")

    @property
    def healthy(self) -> bool:
        if getattr(self.model.runner, "broken", None):
            return False
        return all(b.alive for b in (self.batcher, self.encoder) if b is not None)

    def stop_batchers(self) -> None:
        """Stop taking and running requests: the waiting and running ones end (streams with an error event,
        others with 503). The first step of a shutdown whose drain time is over."""
        for batcher in (self.batcher, self.encoder):
            if batcher is not None:
                batcher.close()

    def close(self) -> None:
        """Stop the batchers, the request pool and then the engine."""
        self.stop_batchers()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.model.close()
