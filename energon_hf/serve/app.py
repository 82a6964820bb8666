"""The HTTP app: OpenAI-compatible completions, chat completions and embeddings, the HF Inference API's
/v1/pipeline, health and Prometheus metrics, on one EnergonModel.

Generation runs on the continuous batcher (engine/scheduler.py): every request joins the running batch at
the next step. Encoder embeddings run on the dynamic batcher (engine/dynamic_batcher.py): requests that
arrive while the model is busy go together into the next padding-free batch. Errors are OpenAI-style JSON:
{"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from energon_hf.engine.dynamic_batcher import DynamicBatcher
from energon_hf.engine.scheduler import ContinuousBatcher
from energon_hf.modeling import EnergonModel
from energon_hf.pipelines import _task_for, pipeline

from . import embeddings, generation, pipeline_api
from .errors import APIError
from .metrics import Metrics
from .state import Served, ServeSettings

__all__ = ["ServeSettings", "create_app"]

EmbedRunner = Callable[[list[list[int]]], Sequence[Any]]  # token sequences -> one embedding each


def _eos_ids(model: EnergonModel, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _served(model: EnergonModel, tokenizer, settings: ServeSettings, embed_runner: EmbedRunner | None) -> Served:
    metrics = Metrics()
    task = _task_for(model)
    batcher = encoder = encoder_pipeline = None
    if model.can_generate():
        batcher = ContinuousBatcher(model.runner, model.config.vocab_size,
                                    num_blocks=max(1, settings.kv_cache_tokens // 16), block_size=16,
                                    max_batch_tokens=settings.max_batch_tokens, device=model.device)
        batcher.on_step = metrics.step
        metrics.watch(lambda: batcher.waiting, lambda: batcher.running)
    else:
        encoder_pipeline = pipeline(task, model=model, tokenizer=tokenizer)
        if task == "feature-extraction" and model.architecture.name.endswith("Model"):  # a base encoder
            run_batch = embed_runner or embeddings.mean_pooling_runner(model, tokenizer)
            encoder = DynamicBatcher(run_batch, settings.max_batch_tokens,
                                     settings.embed_policy, settings.max_wait_ms / 1000)
            encoder.on_batch = lambda sequences: metrics.step("encode", sequences)
            metrics.watch(lambda: encoder.waiting, lambda: encoder.running)
    context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 20)
    return Served(model, tokenizer, settings, metrics, batcher, encoder, _eos_ids(model, tokenizer), context, task,
                  encoder_pipeline)


def base_app(settings: ServeSettings, metrics: Metrics, healthy: Callable[[], bool], task: str) -> FastAPI:
    """What every server has: the API key and body size guard, JSON errors, /health, /v1/models, /metrics."""
    app = FastAPI(title="energon_hf", version="0.1")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """API key (constant-time) on every route but /health, and the body size limit."""
        if settings.api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
                return APIError(401, "invalid or missing API key (Authorization: Bearer ...)",
                                kind="authentication_error", code="invalid_api_key").response()
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            return APIError(413, f"request body of {length} bytes is over the limit of "
                                 f"{settings.max_body_bytes}").response()
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return APIError(400, f"the body is not valid JSON: {first.get('msg')}").response()
        field = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return APIError(400, f"{field or 'body'}: {first.get('msg')}", param=field).response()

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    @app.get("/health")
    def health():
        if not healthy():
            return APIError(503, "the engine is down", kind="engine_error").response()
        return {"status": "ok"}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": settings.served_name, "object": "model", "created": 0,
                                            "owned_by": "energon_hf", "task": task}]}

    @app.get("/metrics")
    def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def create_app(model: EnergonModel, tokenizer, settings: ServeSettings,
               embed_runner: EmbedRunner | None = None) -> FastAPI:
    """The server of an EnergonModel: generation or encoder routes by what the model is. `embed_runner`
    replaces what /v1/embeddings' batches run (token sequences -> one vector each; default: mean pooling over
    `model`), e.g. another pooling, or the benchmark's padded transformers baseline."""
    served = _served(model, tokenizer, settings, embed_runner)
    app = base_app(settings, served.metrics, lambda: served.healthy, served.task)
    app.state.served = served
    for module in (generation, embeddings, pipeline_api):
        app.include_router(module.router)
    return app
