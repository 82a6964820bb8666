"""The HTTP app: OpenAI-compatible completions, chat completions and embeddings, the HF Inference API's
/v1/pipeline, health and Prometheus metrics, on one EnergonModel.

Generation runs on the continuous batcher (engine/batcher.py; its pure Scheduler in engine/scheduler.py):
every request joins the running batch at the next step. Encoder embeddings run on the dynamic batcher
(engine/dynamic_batcher.py): requests that arrive while the model is busy go together into the next
padding-free batch. Errors are OpenAI-style JSON: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import functools
import hmac
import logging
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from energon_hf.engine.dynamic_batcher import DynamicBatcher
from energon_hf.errors import UnsupportedModelError
from energon_hf.kv_cache import BLOCK_SIZE, available_memory, bytes_per_token, tokens_for_memory
from energon_hf.modeling import EnergonModel
from energon_hf.pipelines import _task_for, pipeline
from energon_hf.sentence_transformer import SentenceTransformer

from . import embeddings, generation, pipeline_api
from .errors import APIError, ErrorResponse, install_error_handlers
from .metrics import Metrics
from .openapi import install_served_schema
from .state import ENCODER_BATCH_TOKENS, GENERATION_STEP_TOKENS, Served, ServeSettings

__all__ = ["ServeSettings", "create_app"]

# Answers every route may give besides its own (the served OpenAPI schema lists them, with the error body).
ERROR_RESPONSES = {status: {"model": ErrorResponse, "description": what} for status, what in (
    (400, "invalid request"), (401, "invalid or missing API key"), (404, "unknown model or route"),
    (413, "request body over --max-body-bytes"), (429, "queue full"), (500, "internal error"),
    (503, "engine failed or shutting down"))}

MAX_RUNNING = 256  # sequences one generation step runs at most (the batcher's default)
log = logging.getLogger(__name__)
EmbedRunner = Callable[[list[list[int]]], Sequence[Any]]  # token sequences -> one embedding each


def _eos_ids(model: EnergonModel, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def kv_cache_tokens(model: EnergonModel, settings: ServeSettings) -> int:
    """`settings.kv_cache_tokens`, else what its memory fraction of the device's free memory holds (as vLLM's
    --gpu-memory-utilization; the server loads the model first, so the weights are already taken), at most
    what MAX_RUNNING sequences of the model's whole context could use. Local CPU ranks share one host's
    memory, so the whole model's cache counts against it; each CUDA rank has a card of its own and holds
    1 / (tp x pp) of it. Remote ranks (--driver-address) are assumed to have the driver's free memory."""
    if settings.kv_cache_tokens is not None:
        return settings.kv_cache_tokens
    layers, kv_heads, head_dim = model.model.kv_cache_layout()  # the whole model's (a driver's model is unsplit)
    per_token = bytes_per_token(layers, kv_heads, head_dim, model.dtype)
    free = available_memory(model.device) * (model.tp * model.pp if model.device.type == "cuda" else 1)
    return tokens_for_memory(free, per_token, settings.kv_cache_memory_fraction, MAX_RUNNING * context_of(model))


def context_of(model: EnergonModel) -> int:
    """The most tokens one sequence may hold (prompt and output): the model's max_position_embeddings."""
    return int(getattr(model.config, "max_position_embeddings", 0) or 1 << 20)


def _sentence_embeddings(model: EnergonModel) -> SentenceTransformer | None:
    """How /v1/embeddings embeds for this base encoder; None (no such route) where its modules.json asks for a
    module we do not compute: the other routes still serve."""
    try:
        return SentenceTransformer(model)
    except UnsupportedModelError as e:
        log.warning("no /v1/embeddings for this model: %s", e)
        return None


def _served(model: EnergonModel, tokenizer, settings: ServeSettings, embed_runner: EmbedRunner | None) -> Served:
    metrics = Metrics()
    task = _task_for(model)
    batcher = encoder = encoder_pipeline = sentences = None
    if model.can_generate():
        batcher = model.start_batcher(max(1, kv_cache_tokens(model, settings) // BLOCK_SIZE),
                                      max_batch_tokens=GENERATION_STEP_TOKENS if settings.max_batch_tokens is None
                                      else settings.max_batch_tokens,
                                      max_running=MAX_RUNNING)
        batcher.on_step = metrics.step
        metrics.watch(lambda: batcher.waiting, lambda: batcher.running)
        metrics.watch_cache(batcher.allocator)
        metrics.watch_preemptions(lambda: batcher.preemptions)
    else:
        encoder_pipeline = pipeline(task, model=model, tokenizer=tokenizer)
        if task == "feature-extraction" and model.architecture.name.endswith("Model"):  # a base encoder
            sentences = _sentence_embeddings(model)
        if sentences is not None:
            # the folder's default prompt, as encode() applies it: every request has the same one
            run_batch = embed_runner or functools.partial(sentences.embed_sequences,
                                                          prompt_length=sentences.prompted([])[1], normalize=False)
            batch_tokens = ENCODER_BATCH_TOKENS if settings.max_batch_tokens is None else settings.max_batch_tokens
            encoder = DynamicBatcher(run_batch, batch_tokens,
                                     settings.embed_policy, settings.max_wait_ms / 1000)
            encoder.on_batch = lambda sequences: metrics.step("encode", sequences)
            metrics.watch(lambda: encoder.waiting, lambda: encoder.running)
    return Served(model, tokenizer, settings, metrics, batcher, encoder, _eos_ids(model, tokenizer),
                  context_of(model), task, encoder_pipeline, sentences)


def bearer_token(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header (the scheme is case-insensitive, as every HTTP
    auth scheme), or None for any other header."""
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


PUBLIC = {"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}  # open even with a key (as vLLM)


class APIKeyGuard:
    """`Authorization: Bearer KEY` (compared in constant time) on every route but the PUBLIC ones. Plain ASGI, not
    FastAPI's http middleware, which would stand between a streamed response and the client's disconnect."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self.api_key = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in PUBLIC:
            given = bearer_token(Headers(scope=scope).get("authorization", "")) or ""
            if not hmac.compare_digest(given.encode(), self.api_key):
                response = APIError(401, "invalid or missing API key (Authorization: Bearer ...)",
                                    kind="authentication_error", code="invalid_api_key").response()
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def base_app(settings: ServeSettings, metrics: Metrics, healthy: Callable[[], bool], task: str) -> FastAPI:
    """What every server has: the API key, the body size limit (FastAPI's, enforced while reading), errors in
    OpenAI's shape, /health, /v1/models, /metrics."""
    app = FastAPI(title="energon_hf", version="0.1", max_body_size=settings.max_body_bytes,
                  responses=ERROR_RESPONSES)
    install_error_handlers(app, settings.max_body_bytes)

    if settings.api_key:
        app.add_middleware(APIKeyGuard, api_key=settings.api_key)

    @app.get("/health", responses={503: {"model": ErrorResponse, "description": "the engine is down"}})
    def health():
        if not healthy():
            return APIError(503, "the engine is down", kind="engine_error").response()
        return {"status": "ok"}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": settings.served_name, "object": "model", "created": 0,
                                            "owned_by": "energon_hf", "task": task}]}

    @app.get("/metrics", responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                                          "description": "Prometheus text format"}})
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
    install_served_schema(app, served)
    for module in (generation, embeddings, pipeline_api):
        app.include_router(module.router)
    return app
