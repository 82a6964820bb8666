"""/v1/embeddings: sentence embeddings through the dynamic batcher, so texts of concurrent requests run together in
one padding-free batch; tokenized, pooled and normalized as sentence-transformers does for the model's folder
(energon_hf.sentence_transformer: its modules.json, else mean pooling).

A request is bounded before its work (--max-inputs texts, --max-request-tokens tokens) and its tokenizing
and answer's JSON run in the request pool: a large request never stalls the event loop or /health."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import torch
from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.responses import Response

from .errors import APIError, engine_failed
from .schemas import EmbeddingRequest
from .state import Served

router = APIRouter()


def encode_vector(vector: torch.Tensor, encoding_format: str) -> list[float] | str:
    """A vector as OpenAI returns it: a list of floats, or base64 of its little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(vector.float().numpy().astype("<f4").tobytes()).decode()
    return vector.float().tolist()


def tokenize(served: Served, texts: list[str]) -> list[list[int]]:
    """The texts' token ids behind the folder's default prompt (config_sentence_transformers.json's
    default_prompt_name), as SentenceTransformer.encode() tokenizes them."""
    return served.sentences.tokenize(served.sentences.prompted(texts)[0])


def answer_json(served: Served, vectors: list[torch.Tensor], body: EmbeddingRequest, tokens: int) -> bytes:
    if body.normalize:
        vectors = list(torch.nn.functional.normalize(torch.stack(vectors).float(), dim=-1))
    data = [{"object": "embedding", "index": i, "embedding": encode_vector(v, body.encoding_format)}
            for i, v in enumerate(vectors)]
    return json.dumps({"object": "list", "model": served.settings.served_name, "data": data,
                       "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}).encode()


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, http: HTTPRequest):
    served: Served = http.app.state.served
    served.check_model(body.model)
    if served.encoder is None:
        what = "generates text" if served.batcher is not None else "has no sentence embeddings (use /v1/pipeline)"
        raise APIError(400, f"{served.settings.served_name} {what}: embeddings need an encoder base model",
                       param="model")
    texts = [body.input] if isinstance(body.input, str) else body.input
    served.check_inputs(len(texts))
    if not texts or any(not t.strip() for t in texts):
        raise APIError(400, "input must be non-empty strings", param="input")
    served.check_queue(len(served.encoder.waiting))
    started = time.perf_counter()
    sequences = await served.offload(tokenize, served, texts)
    tokens = sum(len(s) for s in sequences)
    served.check_inputs(len(texts), tokens)
    try:
        vectors = await asyncio.wrap_future(served.encoder.submit(sequences))
    except Exception as e:  # noqa: BLE001 - the engine failed this batch: 503, the server stays up
        served.metrics.answered("embeddings", 503)
        raise engine_failed(e) from e
    content = await served.offload(answer_json, served, vectors, body, tokens)
    served.metrics.answered("embeddings", 200, started)
    return Response(content, media_type="application/json")
