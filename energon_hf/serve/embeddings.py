"""/v1/embeddings: sentence embeddings (sentence-transformers' mean pooling) through the dynamic batcher, so
texts of concurrent requests run together in one padding-free batch."""

from __future__ import annotations

import asyncio
import time

import torch
from fastapi import APIRouter
from fastapi import Request as HTTPRequest

from .errors import APIError, engine_failed
from .schemas import EmbeddingRequest
from .state import Served

router = APIRouter()


def mean_pooling_runner(model, tokenizer):
    """run_batch for the DynamicBatcher: token sequences -> one mean-pooled vector each."""
    def run(sequences: list[list[int]]) -> list[torch.Tensor]:
        batch = tokenizer.pad({"input_ids": sequences}, return_tensors="pt").to(model.device)
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return list((hidden * mask).sum(1) / mask.sum(1))
    return run


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, http: HTTPRequest):
    served: Served = http.app.state.served
    served.check_model(body.model)
    if served.encoder is None:
        what = "generates text" if served.batcher is not None else "has no sentence embeddings (use /v1/pipeline)"
        raise APIError(400, f"{served.settings.served_name} {what}: embeddings need an encoder base model",
                       param="model")
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts or any(not t.strip() for t in texts):
        raise APIError(400, "input must be non-empty strings", param="input")
    served.check_queue(len(served.encoder.waiting))
    started = time.perf_counter()
    sequences = served.tokenizer(texts, truncation=True)["input_ids"]
    try:
        vectors = await asyncio.wrap_future(served.encoder.submit(sequences))
    except Exception as e:  # noqa: BLE001 - the engine failed this batch: 503, the server stays up
        served.metrics.answered("embeddings", 503)
        raise engine_failed(e) from e
    if body.normalize:
        vectors = [torch.nn.functional.normalize(v, dim=-1) for v in vectors]
    tokens = sum(len(s) for s in sequences)
    served.metrics.answered("embeddings", 200, started)
    return {"object": "list", "model": served.settings.served_name,
            "data": [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
