"""What every route of one server shares: the model, its tokenizer, the settings, the batchers, the metrics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from energon_hf.engine.dynamic_batcher import DynamicBatcher
from energon_hf.engine.scheduler import ContinuousBatcher
from energon_hf.modeling import EnergonModel

from .errors import APIError
from .metrics import Metrics


@dataclass
class ServeSettings:
    served_name: str
    api_key: str | None = None
    max_queue: int = 256          # requests waiting for admission before new ones get 429
    max_batch_tokens: int = 4096  # prompt tokens of one prefill step; real tokens of one encoder batch
    kv_cache_tokens: int = 16384
    max_body_bytes: int = 1 << 20
    max_n: int = 16               # choices of one request
    embed_policy: str = "packed"  # encoder batches: "packed" (FIFO under the token budget) or "priority"
    max_wait_ms: float = 50.0     # "priority": the longest a request waits before its batch must run


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

    def check_model(self, name: str) -> None:
        if name != self.settings.served_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {self.settings.served_name!r}",
                           param="model", code="model_not_found")

    def check_queue(self, waiting: int, adding: int = 1) -> None:
        """429 when `adding` more requests would put more than max_queue in the queue of `waiting`."""
        if waiting + adding > self.settings.max_queue:
            raise APIError(429, f"the queue is full ({self.settings.max_queue} requests waiting); retry shortly",
                           kind="rate_limit_error", headers={"Retry-After": "1"})

    @property
    def healthy(self) -> bool:
        if getattr(self.model.runner, "broken", False):
            return False
        return all(b.alive for b in (self.batcher, self.encoder) if b is not None)

    def close(self) -> None:
        """Stop the batchers (their waiting requests fail) and then the engine."""
        for batcher in (self.batcher, self.encoder):
            if batcher is not None:
                batcher.close()
        self.model.close()
