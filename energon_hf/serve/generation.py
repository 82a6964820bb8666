"""/v1/completions and /v1/chat/completions on the continuous batcher.

Each of a request's n choices is one batcher request; they share an event queue, so one loop turns their
tokens into text (stop strings cut it), logprobs and finish reasons, whether the answer streams as
server-sent events or comes back whole. The batcher's thread hands events to the event loop, so a request
holds no thread while it waits, and a client that goes away (streamed or not) cancels its sequences at once:
they leave the batch at the next engine step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse

from energon_hf.engine.batcher import DONE, Request
from energon_hf.engine.params import GenerationParams
from energon_hf.engine.sampling import TokenLogprob

from .errors import APIError, engine_failed
from .schemas import ChatCompletionRequest, CompletionRequest, _Request
from .state import Served
from .text import LogprobFormatter, TextStopper

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_TOKENS = 512

router = APIRouter()


class Cancelled(RuntimeError):
    """A request ended before its answer: its client went away, or the server is shutting down."""


class LoopEvents:
    """A request's events, put by the batcher's thread and awaited on the event loop."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()

    def put(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody waits for these events any more
            pass

    async def get(self) -> Any:
        return await self._queue.get()


@dataclass
class Choice:
    index: int
    request: Request
    stopper: TextStopper
    logprobs: LogprobFormatter | None
    finish: str | None = None
    seen: int = 0  # tokens already handed out
    last_token_at: float | None = None  # perf_counter of its last token (latency metrics); None: none yet


@dataclass
class Update:
    """What one event added to one choice."""

    index: int
    text: str
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: str | None = None


def _served(http: HTTPRequest) -> Served:
    return http.app.state.served


def generation_params(served: Served, body: _Request, prompt_len: int, default_tokens: int) -> GenerationParams:
    """The batcher's parameters of a request. The token limit may be at most the context less one (what the
    served schema states); a prompt plus the limit beyond the context generates up to the context's end,
    finishing with "length" (the schema cannot state a bound on a sum, so a schema-valid request is served)."""
    served.check_model(body.model)
    if served.batcher is None:
        raise APIError(400, f"{served.settings.served_name} is an encoder: use /v1/embeddings", param="model")
    if prompt_len == 0:
        raise APIError(400, "the prompt is empty", param="prompt")
    if prompt_len >= served.context:
        raise APIError(400, f"the prompt has {prompt_len} tokens; the model's context is {served.context}",
                       param="prompt")
    for name in ("max_tokens", "max_completion_tokens"):
        given = getattr(body, name, None)
        if given is not None and given >= served.context:
            raise APIError(400, f"{name} is {given}; the model's context is {served.context} tokens", param=name)
    limit = getattr(body, "max_completion_tokens", None) or body.max_tokens
    served.check_queue(len(served.batcher.waiting), body.choices)
    return GenerationParams(max_new_tokens=min(limit or default_tokens, served.context - prompt_len),
                            do_sample=body.temperature > 0, temperature=body.temperature or 1.0, top_k=0,
                            top_p=body.top_p, eos_token_ids=[] if body.ignore_eos else served.eos_ids, seed=body.seed)


def submit_choices(served: Served, body: _Request, prompt: list[int], params: GenerationParams,
                   logprobs: int | None, chat: bool) -> list[Choice]:
    """The n (or best_of) choices of one request; seed s gives choice i the seed s + i, so choices differ when
    sampling."""
    events = LoopEvents()
    served.metrics.prompt_tokens.inc(len(prompt))
    choices: list[Choice] = []
    try:
        for i in range(body.choices):
            generator = None
            if params.seed is not None:
                generator = torch.Generator(served.model.device).manual_seed((params.seed + i) % (1 << 64))
            request = served.batcher.submit(prompt, params, generator, logprobs=logprobs, events=events,
                                            hf_draws=False)  # a seed still draws as transformers does
            formatter = LogprobFormatter(served.tokenizer, chat) if logprobs is not None else None
            choices.append(Choice(i, request, TextStopper(served.tokenizer, body.stops()), formatter))
    except ValueError as e:
        cancel_choices(served, choices)
        raise APIError(400, str(e), param="max_tokens") from e
    except RuntimeError as e:
        cancel_choices(served, choices)
        raise APIError(503, str(e), kind="engine_error") from e
    return choices


def cancel_choices(served: Served, choices: list[Choice]) -> None:
    for choice in choices:
        served.batcher.cancel(choice.request)


@asynccontextmanager
async def cancelled_on_disconnect(served: Served, http: HTTPRequest, choices: list[Choice]):
    """Cancel the choices as soon as the client disconnects (its body is read: the next message that
    receive() gives is the disconnect)."""
    async def watch() -> None:
        while (await http.receive())["type"] != "http.disconnect":
            pass
        cancel_choices(served, choices)

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()


async def choice_updates(served: Served, choices: list[Choice], started: float) -> AsyncIterator[Update]:
    """Every choice's text, tokens and logprobs as its events arrive, until each has finished; each token's
    time goes to the latency metrics (`started`: the request's arrival)."""
    by_id = {c.request.request_id: c for c in choices}
    events = choices[0].request.events
    unfinished = len(choices)
    while unfinished:
        request, item = await events.get()
        choice = by_id[request.request_id]
        if choice.finish is not None:  # cut by a stop string already; its cancel's DONE
            continue
        if item is not DONE:
            now = time.perf_counter()
            histogram = served.metrics.inter_token if choice.last_token_at else served.metrics.first_token
            histogram.observe(now - (choice.last_token_at or started))
            choice.last_token_at = now
        if item is DONE:
            if request.error is not None:
                raise request.error
            if request.finish_reason == "cancelled":
                raise Cancelled("the request was cancelled: the client went away or the server is shutting down")
            text, _ = choice.stopper.push(request.tokens, final=True)
            choice.finish = "stop" if request.finish_reason == "stop" else "length"
        else:
            text, stopped = choice.stopper.push(request.tokens)
            if stopped:
                choice.finish = "stop"
                served.batcher.cancel(request)
        count = len(request.tokens)  # logprobs are appended before tokens: both cover `count`
        update = Update(choice.index, text, request.tokens[choice.seen:count],
                        request.token_logprobs[choice.seen:count], choice.finish)
        choice.seen = count
        unfinished -= choice.finish is not None
        yield update


async def chat_prompt(served: Served, messages: list[dict]) -> list[int]:
    """The token ids of a conversation through the tokenizer's chat template, ready for the reply (in the
    request pool: a template over long messages is CPU work)."""
    encoded = await served.offload(served.tokenizer.apply_chat_template, messages, add_generation_prompt=True,
                                   tokenize=True, return_dict=True)
    return list(encoded["input_ids"])


async def _prompt_tokens(served: Served, body: CompletionRequest) -> list[int]:
    if isinstance(body.prompt, str):
        if not body.prompt:
            return []
        if served.tokenizer is None:
            raise APIError(400, f"{served.settings.served_name} has no tokenizer: send the prompt as token ids",
                           param="prompt")
        return (await served.offload(served.tokenizer, body.prompt, add_special_tokens=True))["input_ids"]
    vocab = served.model.config.vocab_size
    if any(t < 0 or t >= vocab for t in body.prompt):
        raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
    return list(body.prompt)


# A stream answers server-sent events: the schema says so, next to the JSON of a whole answer.
STREAMED = {200: {"content": {"application/json": {}, "text/event-stream": {}},
                  "description": "the completion, or with stream: true its server-sent events"}}


@router.post("/v1/completions", responses=STREAMED)
async def completions(body: CompletionRequest, http: HTTPRequest):
    served = _served(http)
    prompt = await _prompt_tokens(served, body)
    params = generation_params(served, body, len(prompt), DEFAULT_COMPLETION_TOKENS)
    # ranking best_of completions reads each token's log-probability, asked for whether the client wants them or not
    logprobs = body.logprobs if body.choices == body.n or body.logprobs is not None else 0
    return await _respond(served, http, "completions", body, prompt, params, logprobs, chat=False)


@router.post("/v1/chat/completions", responses=STREAMED)
async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
    served = _served(http)
    tokenizer = served.tokenizer
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise APIError(400, f"{served.settings.served_name} has no chat template: use /v1/completions")
    messages = [m.model_dump() for m in body.messages]
    prompt = await chat_prompt(served, messages)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = generation_params(served, body, len(prompt), DEFAULT_CHAT_TOKENS)
    return await _respond(served, http, "chat", body, prompt, params, logprobs, chat=True)


async def _respond(served: Served, http: HTTPRequest, endpoint: str, body: _Request, prompt: list[int],
                   params: GenerationParams, logprobs: int | None, chat: bool):
    started = time.perf_counter()
    choices = submit_choices(served, body, prompt, params, logprobs, chat)
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": served.settings.served_name}
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        if len(choices) > body.n:
            return StreamingResponse(_stream_best(served, http, body, choices, head, len(prompt), include_usage,
                                                  started), media_type="text/event-stream")
        return StreamingResponse(_stream(served, choices, head, endpoint, chat, len(prompt), include_usage,
                                         started), media_type="text/event-stream")
    results = await collect_choices(served, http, choices, endpoint, started)
    completion = sum(len(tokens) for _, tokens, _ in results)  # best_of's unanswered completions count too
    out = []
    for index, (choice, text, logprobs) in enumerate(_answered(body, choices, results)):
        entry = {"index": index, "finish_reason": choice.finish, "logprobs": logprobs}
        entry.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        out.append(entry)
    served.metrics.answered(endpoint, 200, started, completion)
    return {**head, "object": "chat.completion" if chat else "text_completion", "choices": out,
            "usage": _usage(len(prompt), completion)}


def _answered(body: _Request, choices: list[Choice], results: list[tuple[str, list[int], list[TokenLogprob]]]
              ) -> list[tuple[Choice, str, dict | None]]:
    """The choices answered, with their text and formatted logprobs (where asked): all of them, or best_of's n with
    the highest mean log-probability per token, best first."""
    answered = list(zip(choices, results, strict=True))
    if len(choices) > body.n:
        answered = sorted(answered, key=lambda a: -sum(lp.logprob for lp in a[1][2]) / max(len(a[1][2]), 1))
        answered = answered[: body.n]
    shown = len(choices) == body.n or getattr(body, "logprobs", None) is not None
    return [(choice, text, choice.logprobs.format(tokens, lps) if choice.logprobs and shown else None)
            for choice, (text, tokens, lps) in answered]


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def collect_choices(served: Served, http: HTTPRequest, choices: list[Choice], endpoint: str,
                          started: float) -> list[tuple[str, list[int], list[TokenLogprob]]]:
    """Each choice's whole text, tokens and logprobs; the choices are cancelled when the client goes away,
    and an engine failure or a shutdown is a 503 (the server stays up)."""
    texts: list[list[str]] = [[] for _ in choices]
    tokens: list[list[int]] = [[] for _ in choices]
    lps: list[list[TokenLogprob]] = [[] for _ in choices]
    try:
        async with cancelled_on_disconnect(served, http, choices):
            async for update in choice_updates(served, choices, started):
                texts[update.index].append(update.text)
                tokens[update.index] += update.tokens
                lps[update.index] += update.logprobs
    except Cancelled as e:
        served.metrics.answered(endpoint, 503)
        raise APIError(503, str(e), kind="engine_error") from e
    except Exception as e:  # noqa: BLE001 - the engine failed this request
        served.metrics.answered(endpoint, 503)
        raise engine_failed(e) from e
    finally:
        cancel_choices(served, choices)
    return [("".join(t), k, lp) for t, k, lp in zip(texts, tokens, lps, strict=True)]


def _event(payload: dict) -> str:
    return "data: " + json.dumps(payload) + "\n\n"


def _chunk(head: dict, chat: bool, index: int, text: str | None, finish: str | None, logprobs: dict | None = None,
           role: bool = False) -> str:
    """One server-sent event of a stream: a choice's text (chat: its delta), finish reason and logprobs."""
    if chat:
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
    else:
        choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
    return _event({**head, "object": "chat.completion.chunk" if chat else "text_completion", "choices": [choice]})


async def _stream_best(served: Served, http: HTTPRequest, body: CompletionRequest, choices: list[Choice], head: dict,
                       prompt_len: int, include_usage: bool, started: float) -> AsyncIterator[str]:
    """best_of streamed: the best n are known once every choice is done; each comes as one chunk of its text, then
    its finish."""
    try:
        results = await collect_choices(served, http, choices, "completions", started)
    except APIError as e:  # the stream's headers are sent: the error goes in the stream
        yield _event({"error": {"message": e.message, "type": e.kind}})
        return
    generated = sum(len(tokens) for _, tokens, _ in results)
    for index, (choice, text, logprobs) in enumerate(_answered(body, choices, results)):
        yield _chunk(head, False, index, text, None, logprobs)
        yield _chunk(head, False, index, None, choice.finish)
    if include_usage:
        yield _event({**head, "object": "text_completion", "choices": [], "usage": _usage(prompt_len, generated)})
    yield "data: [DONE]\n\n"
    served.metrics.answered("completions", 200, started, generated)


async def _stream(served: Served, choices: list[Choice], head: dict, endpoint: str, chat: bool, prompt_len: int,
                  include_usage: bool, started: float) -> AsyncIterator[str]:
    """Server-sent events; when the client goes away the response is cancelled and `finally` frees the
    sequences at once."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    generated = 0
    try:
        if chat:
            for choice in choices:
                yield _chunk(head, chat, choice.index, None, None, role=True)
        try:
            async for update in choice_updates(served, choices, started):
                generated += len(update.tokens)
                formatter = choices[update.index].logprobs
                lps = formatter.format(update.tokens, update.logprobs) if formatter and update.tokens else None
                if update.text or lps:
                    yield _chunk(head, chat, update.index, update.text, None, lps)
                if update.finish:
                    yield _chunk(head, chat, update.index, None, update.finish)
        except Exception as e:  # noqa: BLE001 - headers are sent: the error goes in the stream
            message = str(e) if isinstance(e, Cancelled) else f"the engine failed: {e}"
            yield _event({"error": {"message": message, "type": "engine_error"}})
            served.metrics.answered(endpoint, 503)
            return
        if include_usage:
            yield _event({**head, "object": kind, "choices": [], "usage": _usage(prompt_len, generated)})
        yield "data: [DONE]\n\n"
        served.metrics.answered(endpoint, 200, started, generated)
    finally:  # the client went away, or the stream ended: the sequences leave the batch either way
        cancel_choices(served, choices)
