"""The HTTP app: OpenAI-compatible completions, chat completions and embeddings on an EnergonModel.

Generation goes through the continuous batcher (every request joins the running batch at the next step);
embeddings run the encoder on each request's texts, packed. Errors are OpenAI-style JSON:
{"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from energon_hf.engine.params import GenerationParams
from energon_hf.engine.scheduler import ContinuousBatcher
from energon_hf.errors import EngineDeadError
from energon_hf.modeling import EnergonModel

from .schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, _Request

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_TOKENS = 512


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
           code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


@dataclass
class ServeSettings:
    served_name: str
    api_key: str | None = None
    max_queue: int = 256
    max_batch_tokens: int = 4096
    kv_cache_tokens: int = 16384
    max_body_bytes: int = 1 << 20


class Metrics:
    def __init__(self, batcher: ContinuousBatcher | None):
        self.registry = CollectorRegistry()
        self.requests = Counter("energon_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=self.registry)
        self.latency = Histogram("energon_request_latency_seconds", "Time to the full response", ["endpoint"],
                                 registry=self.registry)
        self.tokens = Counter("energon_generated_tokens", "Tokens generated", registry=self.registry)
        self.batch_size = Histogram("energon_batch_size", "Sequences in one engine step", ["kind"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        queue = Gauge("energon_queue_length", "Requests waiting for admission", registry=self.registry)
        running = Gauge("energon_running_sequences", "Sequences in the running batch", registry=self.registry)
        if batcher is not None:
            queue.set_function(lambda: len(batcher.waiting))
            running.set_function(lambda: len(batcher.running))
            batcher.on_step = lambda kind, seqs: self.batch_size.labels(kind).observe(seqs)


class TextStopper:
    """Incremental detokenization with stop strings: `push(tokens)` returns the text that is safe to send
    (never a partial UTF-8 character, never the start of a stop string) and whether a stop string ended it."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops, self.sent = tokenizer, [s for s in stops if s], 0
        self.hold = max((len(s) for s in self.stops), default=1) - 1

    def push(self, tokens: list[int], final: bool = False) -> tuple[str, bool]:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        hits = [text.find(s, max(0, self.sent - len(s))) for s in self.stops]
        hits = [h for h in hits if h >= 0]
        if hits:
            end, stopped = min(hits), True
        else:
            end, stopped = len(text) if final else len(text.rstrip("\ufffd")) - self.hold, False
        delta = text[self.sent:max(end, self.sent)]
        self.sent += len(delta)
        return delta, stopped


def create_app(model: EnergonModel, tokenizer, settings: ServeSettings) -> FastAPI:
    generates = model.can_generate()
    context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 20)
    batcher = None
    if generates:
        batcher = ContinuousBatcher(model.runner, model.config.vocab_size,
                                    num_blocks=max(1, settings.kv_cache_tokens // 16), block_size=16,
                                    max_batch_tokens=settings.max_batch_tokens, device=model.device)
    metrics = Metrics(batcher)
    app = FastAPI(title="energon_hf", version="0.1")
    app.state.batcher, app.state.model = batcher, model
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.append(tokenizer.eos_token_id)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """API key (constant-time) on every route but /health, and the body size limit."""
        if settings.api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
                return _error(401, "invalid or missing API key (Authorization: Bearer ...)",
                              kind="authentication_error", code="invalid_api_key")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            return _error(413, f"request body of {length} bytes is over the limit of {settings.max_body_bytes}")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON: {first.get('msg')}")
        field = ".".join(where) or None
        return _error(400, f"{field or 'body'}: {first.get('msg')}", param=field)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return _error(exc.status, exc.message, exc.param, exc.kind, exc.code, exc.headers)

    @app.get("/health")
    def health():
        broken = batcher is not None and not batcher.alive
        if broken or getattr(model.runner, "broken", None):
            return _error(503, "the engine is down", kind="engine_error")
        return {"status": "ok"}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": settings.served_name, "object": "model", "created": 0,
                                            "owned_by": "energon_hf"}]}

    @app.get("/metrics")
    def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def check_model(body) -> None:
        if body.model != settings.served_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves {settings.served_name!r}",
                           param="model", code="model_not_found")

    def params_for(body: _Request, prompt_len: int, default_tokens: int, field: str) -> GenerationParams:
        check_model(body)
        if batcher is None:
            raise APIError(400, f"{settings.served_name} is an encoder: use /v1/embeddings", param="model")
        if body.n != 1:
            raise APIError(400, "n must be 1: this server returns one choice per request", param="n")
        if body.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        if prompt_len == 0:
            raise APIError(400, "the prompt is empty", param="prompt")
        if prompt_len >= context:
            raise APIError(400, f"the prompt has {prompt_len} tokens; the model's context is {context}",
                           param="prompt")
        limit = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if limit is not None and prompt_len + limit > context:
            raise APIError(400, f"prompt ({prompt_len} tokens) + {field} ({limit}) is over the model's context "
                                f"of {context} tokens", param=field)
        if len(batcher.waiting) >= settings.max_queue:
            raise APIError(429, f"the queue is full ({settings.max_queue} requests waiting); retry shortly",
                           kind="rate_limit_error", headers={"Retry-After": "1"})
        new = limit or min(default_tokens, context - prompt_len)
        return GenerationParams(max_new_tokens=new, do_sample=body.temperature > 0,
                                temperature=body.temperature or 1.0, top_k=0, top_p=body.top_p,
                                eos_token_ids=eos_ids, seed=body.seed)

    def submit(prompt: list[int], params: GenerationParams):
        generator = None if params.seed is None else torch.Generator(model.device).manual_seed(params.seed)
        try:
            return batcher.submit(prompt, params, generator)
        except ValueError as e:
            raise APIError(400, str(e), param="max_tokens") from e
        except RuntimeError as e:
            raise APIError(503, str(e), kind="engine_error") from e

    def run(request, stops: list[str]) -> tuple[str, str]:
        """Wait for a request (in a worker thread): its text, cut at a stop string, and finish reason."""
        stopper = TextStopper(tokenizer, stops)
        text = ""
        for _ in request.stream():
            delta, stopped = stopper.push(request.tokens)
            text += delta
            if stopped:
                batcher.cancel(request)
                request.result()
                return text, "stop"
        if request.error is not None:
            raise request.error
        text += stopper.push(request.tokens, final=True)[0]
        return text, "stop" if request.finish_reason == "stop" else "length"

    def engine_failed(e: Exception) -> APIError:
        return APIError(503, f"the engine failed: {e}", kind="engine_error")

    async def respond(endpoint: str, body: _Request, prompt: list[int], params: GenerationParams, chat: bool):
        """Submit to the batcher; answer as server-sent events, or as one JSON body once it finished."""
        started = time.perf_counter()
        request = submit(prompt, params)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        kind = "chat.completion" if chat else "text_completion"
        if body.stream:
            return StreamingResponse(stream(request, body.stops(), rid, kind, chat, endpoint, started),
                                     media_type="text/event-stream")
        return await finish(endpoint, body, prompt, rid, kind, request, started, chat)

    def stream(request, stops, rid, kind, chat, endpoint, started) -> Iterator[str]:
        stopper = TextStopper(tokenizer, stops)
        created = int(time.time())

        def chunk(delta: str, finish: str | None) -> str:
            choice = ({"index": 0, "delta": {"content": delta} if delta or not finish else {},
                       "finish_reason": finish} if chat else
                      {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None})
            return "data: " + json.dumps({"id": rid, "object": kind + ".chunk", "created": created,
                                          "model": settings.served_name, "choices": [choice]}) + "\n\n"
        try:
            if chat:
                yield "data: " + json.dumps({"id": rid, "object": kind + ".chunk", "created": created,
                                             "model": settings.served_name, "choices": [
                                                 {"index": 0, "delta": {"role": "assistant", "content": ""},
                                                  "finish_reason": None}]}) + "\n\n"
            finish = None
            for _ in request.stream():
                delta, stopped = stopper.push(request.tokens)
                if delta:
                    yield chunk(delta, None)
                if stopped:
                    finish = "stop"
                    break
            if request.error is not None:
                yield "data: " + json.dumps({"error": {"message": f"the engine failed: {request.error}",
                                                       "type": "engine_error"}}) + "\n\n"
                metrics.requests.labels(endpoint, "503").inc()
                return
            if finish is None:
                tail = stopper.push(request.tokens, final=True)[0]
                finish = "stop" if request.finish_reason == "stop" else "length"
                yield chunk(tail, None) if tail else ""
            yield chunk("", finish)
            yield "data: [DONE]\n\n"
            metrics.requests.labels(endpoint, "200").inc()
            metrics.tokens.inc(len(request.tokens))
            metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        finally:  # the client went away, or the stream ended: the sequence leaves the batch either way
            batcher.cancel(request)

    async def finish(endpoint: str, body: _Request, prompt: list[int], rid, kind, request, started, chat: bool):
        try:
            text, reason = await run_in_threadpool(run, request, body.stops())
        except (EngineDeadError, RuntimeError) as e:
            metrics.requests.labels(endpoint, "503").inc()
            raise engine_failed(e) from e
        usage = {"prompt_tokens": len(prompt), "completion_tokens": len(request.tokens),
                 "total_tokens": len(prompt) + len(request.tokens)}
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
                  if chat else {"index": 0, "text": text, "finish_reason": reason, "logprobs": None})
        metrics.requests.labels(endpoint, "200").inc()
        metrics.tokens.inc(len(request.tokens))
        metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return {"id": rid, "object": kind, "created": int(time.time()), "model": settings.served_name,
                "choices": [choice], "usage": usage}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        if isinstance(body.prompt, str):
            prompt = tokenizer(body.prompt, add_special_tokens=True)["input_ids"] if body.prompt else []
        else:
            prompt = list(body.prompt)
            if any(t < 0 or t >= model.config.vocab_size for t in prompt):
                raise APIError(400, f"prompt token ids must be in [0, {model.config.vocab_size})", param="prompt")
        params = params_for(body, len(prompt), DEFAULT_COMPLETION_TOKENS, "max_tokens")
        return await respond("completions", body, prompt, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            raise APIError(400, f"{settings.served_name} has no chat template: use /v1/completions")
        messages = [m.model_dump() for m in body.messages]
        prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"])
        params = params_for(body, len(prompt), DEFAULT_CHAT_TOKENS,
                            "max_completion_tokens" if body.max_completion_tokens else "max_tokens")
        return await respond("chat", body, prompt, params, chat=True)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        check_model(body)
        if generates:
            raise APIError(400, f"{settings.served_name} generates text: embeddings need an encoder model",
                           param="model")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or any(not t.strip() for t in texts):
            raise APIError(400, "input must be non-empty strings", param="input")
        started = time.perf_counter()

        def embed() -> tuple[torch.Tensor, int]:
            batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1)  # sentence-transformers' mean pooling
            if body.normalize:
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
            return pooled, int(batch["attention_mask"].sum())

        try:
            vectors, tokens = await run_in_threadpool(embed)
        except (EngineDeadError, RuntimeError) as e:
            raise engine_failed(e) from e
        metrics.requests.labels("embeddings", "200").inc()
        metrics.latency.labels("embeddings").observe(time.perf_counter() - started)
        return {"object": "list", "model": settings.served_name,
                "data": [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    return app
