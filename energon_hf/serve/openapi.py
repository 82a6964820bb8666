"""The served OpenAPI schema (/openapi.json) states what this server, on this model, accepts: the served model
name, the context and vocabulary bounds, the routes and pipeline inputs of its task, the API key. A
schema-driven client or fuzzer (schemathesis) then reaches each route's logic instead of its 404s and 400s."""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI

from energon_hf.pipelines import IMAGE_TASKS

from .pipeline_api import PARAMETERS
from .schemas import ChatMessage
from .state import Served

TEXT = {"type": "string", "pattern": r"\S"}


def token_limit(context: int) -> dict[str, Any]:
    """A max_tokens-like field: optional, below the model's context."""
    return {"anyOf": [{"type": "integer", "minimum": 1, "maximum": context - 1}, {"type": "null"}]}


def install_served_schema(app: FastAPI, served: Served) -> None:
    """Replace app.openapi with one that adds this server's facts to FastAPI's generated schema (once)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            _state_the_model(schema, served)
        return app.openapi_schema

    app.openapi = openapi


def _state_the_model(schema: dict[str, Any], served: Served) -> None:
    paths, models = schema["paths"], schema["components"]["schemas"]
    settings, context = served.settings, served.context
    served_routes = {"/health", "/v1/models", "/metrics", "/v1/pipeline"}
    if served.batcher is not None:
        served_routes.add("/v1/completions")
        if getattr(served.tokenizer, "chat_template", None) is not None:
            served_routes.add("/v1/chat/completions")
    if served.encoder is not None:
        served_routes.add("/v1/embeddings")
    for path in set(paths) - served_routes:  # the route answers a 400 that says what to use instead
        del paths[path]
    for name in ("CompletionRequest", "ChatCompletionRequest", "EmbeddingRequest"):
        if name in models:
            models[name]["properties"]["model"] = {"type": "string", "enum": [settings.served_name]}
    for name, fields in (("CompletionRequest", ("max_tokens",)),
                         ("ChatCompletionRequest", ("max_tokens", "max_completion_tokens"))):
        for field in fields:
            models[name]["properties"][field] = token_limit(context)
    token_ids = {"type": "array", "minItems": 1, "maxItems": context - 1,
                 "items": {"type": "integer", "minimum": 0, "maximum": served.model.config.vocab_size - 1}}
    models["CompletionRequest"]["properties"]["prompt"] = {"anyOf": [{"type": "string", "minLength": 1}, token_ids]}
    models["EmbeddingRequest"]["properties"]["input"] = {
        "anyOf": [TEXT, {"type": "array", "items": TEXT, "minItems": 1, "maxItems": settings.max_inputs}]}
    models["PipelineRequest"]["properties"].update(_pipeline_fields(served))
    if settings.api_key:
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, operations in paths.items():
            if path != "/health":  # (the schema itself is not among its paths)
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}]


def _pipeline_fields(served: Served) -> dict[str, Any]:
    """inputs and parameters of /v1/pipeline for the served task."""
    task, context = served.task, served.context
    if task == "text-generation":
        message = ChatMessage.model_json_schema()
        inputs = {"anyOf": [{"type": "string", "minLength": 1}, {"type": "array", "items": message, "minItems": 1}]}
    else:
        one = TEXT
        if task in IMAGE_TASKS:
            one = {"type": "string", "contentEncoding": "base64", "contentMediaType": "image/*"}
        elif task == "fill-mask":
            one = {"type": "string", "pattern": re.escape(served.tokenizer.mask_token)}
        inputs = {"anyOf": [one, {"type": "array", "items": one, "minItems": 1,
                                  "maxItems": served.settings.max_inputs}]}
    parameters = PARAMETERS[task].model_json_schema()
    parameters.pop("title", None)
    if task == "text-generation":
        parameters["properties"]["max_new_tokens"] = token_limit(context)
    return {"inputs": inputs, "parameters": parameters}

