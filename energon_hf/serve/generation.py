"""/v1/completions and /v1/chat/completions on the continuous batcher.

Each of a request's n choices is one batcher request; they share an event queue, so one loop turns their
tokens into text (stop strings cut it), logprobs and finish reasons, whether the answer streams as
server-sent events or comes back whole.
"""

from __future__ import annotations

import json
import queue
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from energon_hf.engine.params import GenerationParams
from energon_hf.engine.scheduler import DONE, Request, TokenLogprob

from .errors import APIError, engine_failed
from .schemas import ChatCompletionRequest, CompletionRequest, _Request
from .state import Served
from .text import LogprobFormatter, TextStopper

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_TOKENS = 512

router = APIRouter()


@dataclass
class Choice:
    index: int
    request: Request
    stopper: TextStopper
    logprobs: LogprobFormatter | None
    finish: str | None = None
    seen: int = 0  # tokens already handed out


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


def generation_params(served: Served, body: _Request, prompt_len: int, default_tokens: int, field_name: str,
                      logprobs: int | None) -> GenerationParams:
    served.check_model(body.model)
    if served.batcher is None:
        raise APIError(400, f"{served.settings.served_name} is an encoder: use /v1/embeddings", param="model")
    if body.n > served.settings.max_n:
        raise APIError(400, f"n is {body.n}; this server returns at most {served.settings.max_n} choices", param="n")
    if logprobs is not None and logprobs > 20:
        raise APIError(400, f"at most 20 top logprobs per token, got {logprobs}", param="logprobs")
    if prompt_len == 0:
        raise APIError(400, "the prompt is empty", param="prompt")
    if prompt_len >= served.context:
        raise APIError(400, f"the prompt has {prompt_len} tokens; the model's context is {served.context}",
                       param="prompt")
    limit = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if limit is not None and prompt_len + limit > served.context:
        raise APIError(400, f"prompt ({prompt_len} tokens) + {field_name} ({limit}) is over the model's context "
                            f"of {served.context} tokens", param=field_name)
    served.check_queue(len(served.batcher.waiting), body.n)
    return GenerationParams(max_new_tokens=limit or min(default_tokens, served.context - prompt_len),
                            do_sample=body.temperature > 0, temperature=body.temperature or 1.0, top_k=0,
                            top_p=body.top_p, eos_token_ids=[] if body.ignore_eos else served.eos_ids, seed=body.seed)


def submit_choices(served: Served, body: _Request, prompt: list[int], params: GenerationParams,
                   logprobs: int | None, chat: bool) -> list[Choice]:
    """The n choices of one request; seed s gives choice i the seed s + i, so choices differ when sampling."""
    events: queue.Queue = queue.Queue()
    choices: list[Choice] = []
    try:
        for i in range(body.n):
            generator = None
            if params.seed is not None:
                generator = torch.Generator(served.model.device).manual_seed(params.seed + i)
            request = served.batcher.submit(prompt, params, generator, logprobs=logprobs, events=events)
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


def choice_updates(served: Served, choices: list[Choice]) -> Iterator[Update]:
    """Every choice's text, tokens and logprobs as its events arrive, until each has finished."""
    by_id = {c.request.request_id: c for c in choices}
    events = choices[0].request.events
    unfinished = len(choices)
    while unfinished:
        request, item = events.get()
        choice = by_id[request.request_id]
        if choice.finish is not None:  # cut by a stop string already; its cancel's DONE
            continue
        if item is DONE:
            if request.error is not None:
                raise request.error
            if request.finish_reason == "cancelled":
                raise RuntimeError("the request was cancelled: the server is shutting down")
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


def _prompt_tokens(served: Served, body: CompletionRequest) -> list[int]:
    if isinstance(body.prompt, str):
        return served.tokenizer(body.prompt, add_special_tokens=True)["input_ids"] if body.prompt else []
    vocab = served.model.config.vocab_size
    if any(t < 0 or t >= vocab for t in body.prompt):
        raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
    return list(body.prompt)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, http: HTTPRequest):
    served = _served(http)
    prompt = _prompt_tokens(served, body)
    params = generation_params(served, body, len(prompt), DEFAULT_COMPLETION_TOKENS, "max_tokens", body.logprobs)
    return await _respond(served, "completions", body, prompt, params, body.logprobs, chat=False)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
    served = _served(http)
    tokenizer = served.tokenizer
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise APIError(400, f"{served.settings.served_name} has no chat template: use /v1/completions")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    messages = [m.model_dump() for m in body.messages]
    prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"])
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = generation_params(served, body, len(prompt), DEFAULT_CHAT_TOKENS,
                     "max_completion_tokens" if body.max_completion_tokens else "max_tokens", logprobs)
    return await _respond(served, "chat", body, prompt, params, logprobs, chat=True)


async def _respond(served: Served, endpoint: str, body: _Request, prompt: list[int], params: GenerationParams,
                   logprobs: int | None, chat: bool):
    started = time.perf_counter()
    choices = submit_choices(served, body, prompt, params, logprobs, chat)
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": served.settings.served_name}
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(_stream(served, choices, head, endpoint, chat, len(prompt), include_usage,
                                         started), media_type="text/event-stream")
    try:
        results = await run_in_threadpool(collect_choices, served, choices)
    except Exception as e:  # noqa: BLE001 - the engine failed this request: 503, the server stays up
        served.metrics.answered(endpoint, 503)
        raise engine_failed(e) from e
    finally:
        cancel_choices(served, choices)
    out = []
    for choice, (text, tokens, lps) in zip(choices, results, strict=True):
        entry = {"index": choice.index, "finish_reason": choice.finish,
                 "logprobs": choice.logprobs.format(tokens, lps) if choice.logprobs else None}
        entry.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        out.append(entry)
    completion = sum(len(tokens) for _, tokens, _ in results)
    served.metrics.answered(endpoint, 200, started, completion)
    return {**head, "object": "chat.completion" if chat else "text_completion", "choices": out,
            "usage": _usage(len(prompt), completion)}


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def collect_choices(served: Served, choices: list[Choice]) -> list[tuple[str, list[int], list[TokenLogprob]]]:
    texts: list[list[str]] = [[] for _ in choices]
    tokens: list[list[int]] = [[] for _ in choices]
    lps: list[list[TokenLogprob]] = [[] for _ in choices]
    for update in choice_updates(served, choices):
        texts[update.index].append(update.text)
        tokens[update.index] += update.tokens
        lps[update.index] += update.logprobs
    return [("".join(t), k, lp) for t, k, lp in zip(texts, tokens, lps, strict=True)]


def _stream(served: Served, choices: list[Choice], head: dict, endpoint: str, chat: bool, prompt_len: int,
            include_usage: bool, started: float) -> Iterator[str]:
    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(payload: dict) -> str:
        return "data: " + json.dumps(payload) + "\n\n"

    def chunk(index: int, text: str | None, finish: str | None, logprobs: dict | None = None,
              role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
        return event({**head, "object": kind, "choices": [choice]})

    generated = 0
    try:
        if chat:
            for choice in choices:
                yield chunk(choice.index, None, None, role=True)
        try:
            for update in choice_updates(served, choices):
                generated += len(update.tokens)
                formatter = choices[update.index].logprobs
                lps = formatter.format(update.tokens, update.logprobs) if formatter and update.tokens else None
                if update.text or lps:
                    yield chunk(update.index, update.text, None, lps)
                if update.finish:
                    yield chunk(update.index, None, update.finish)
        except Exception as e:  # noqa: BLE001 - headers are sent: the error goes in the stream
            yield event({"error": {"message": f"the engine failed: {e}", "type": "engine_error"}})
            served.metrics.answered(endpoint, 503)
            return
        if include_usage:
            yield event({**head, "object": kind, "choices": [], "usage": _usage(prompt_len, generated)})
        yield "data: [DONE]\n\n"
        served.metrics.answered(endpoint, 200, started, generated)
    finally:  # the client went away, or the stream ended: the sequences leave the batch either way
        cancel_choices(served, choices)
