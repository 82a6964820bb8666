"""POST /v1/pipeline: the Hugging Face Inference API's shape, {"inputs": ..., "parameters": {...}}, for the
served model's pipeline task; the answer is what `transformers.pipeline` returns, as JSON.

Generation models go through the continuous batcher (so they share it with /v1/completions); encoder
tasks through energon_hf.pipeline (transformers' own pre- and post-processing). Images come as base64
(optionally a data: URL); paths and URLs are refused, so no request makes the server read a file or
fetch anything. Images are bounded before they are decoded (--max-image-bytes, --max-image-pixels: a
decompression bomb is refused from its header) and decoded in the request pool, off the event loop.
"""

from __future__ import annotations

import base64
import binascii
import io
import time
from typing import Any, Literal

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.concurrency import run_in_threadpool
from pydantic import ConfigDict, Field

from energon_hf.pipelines import IMAGE_TASKS

from .errors import APIError, engine_failed
from .generation import chat_prompt, collect_choices, generation_params, submit_choices
from .schemas import SEED_RANGE, Body, Bool, ChatMessage, CompletionRequest, Number, integer
from .state import Served, ServeSettings

router = APIRouter()

DEFAULT_NEW_TOKENS = 256
# Inputs of one request that run through the model together (the model is padding-free: the same results as
# one at a time). MiniLM feature-extraction of 512 short texts: 3.3 s one at a time, 0.73 s in batches of 64.
PIPELINE_BATCH = 64


class Parameters(Body):
    """The call arguments a task accepts from a client, typed (anything else is a 400 naming it); the served
    OpenAPI schema states the same model."""

    model_config = ConfigDict(extra="forbid")


TopK = integer(ge=1)
Function = Literal["sigmoid", "softmax", "none"]


class FillMaskParameters(Parameters):
    top_k: TopK | None = None
    targets: str | list[str] | None = None


class FeatureExtractionParameters(Parameters):
    truncation: Bool | None = None


class TextClassificationParameters(Parameters):
    top_k: TopK | None = None
    function_to_apply: Function | None = None


class TokenClassificationParameters(Parameters):
    aggregation_strategy: Literal["none", "simple", "first", "average", "max"] | None = None
    ignore_labels: list[str] | None = None
    stride: integer(ge=0) | None = None


class ImageFeatureExtractionParameters(Parameters):
    pool: Bool | None = None


class GenerationParameters(Parameters):
    """text-generation's parameters, as transformers' pipeline call takes them."""

    max_new_tokens: integer(ge=1) | None = None
    do_sample: Bool = False
    temperature: Number = Field(default=1.0, ge=0.0, le=2.0)
    top_p: Number = Field(default=1.0, gt=0.0, le=1.0)
    seed: integer(**SEED_RANGE) | None = None
    stop: str | list[str] | None = None
    return_full_text: Bool = True


PARAMETERS: dict[str, type[Parameters]] = {
    "fill-mask": FillMaskParameters,
    "feature-extraction": FeatureExtractionParameters,
    "text-classification": TextClassificationParameters,
    "token-classification": TokenClassificationParameters,
    "image-classification": TextClassificationParameters,  # top_k and function_to_apply, as text's
    "image-feature-extraction": ImageFeatureExtractionParameters,
    "text-generation": GenerationParameters,
}


def task_parameters(task: str, given: dict[str, Any]) -> Parameters:
    """The client's parameters checked against the task's model: an unknown name or a wrong type is a 400."""
    accepted = PARAMETERS[task].model_fields
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise APIError(400, f"parameters {unknown} are not accepted for {task}; accepted: {sorted(accepted)}",
                       param="parameters")
    try:
        return PARAMETERS[task](**given)
    except ValueError as e:  # pydantic's checks of the values
        raise APIError(400, f"parameters: {e}", param="parameters") from e


class PipelineRequest(Body):
    model_config = ConfigDict(extra="forbid")

    inputs: Any
    parameters: dict[str, Any] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict)  # the Inference API's wait_for_model etc.: no effect


@router.post("/v1/pipeline")
async def run_pipeline(body: PipelineRequest, http: HTTPRequest):
    served: Served = http.app.state.served
    task = served.task
    parameters = task_parameters(task, body.parameters)
    if body.inputs is None or body.inputs == "" or body.inputs == []:
        raise APIError(400, f"{task} needs inputs", param="inputs")
    if task == "text-generation":
        return await _generate(served, body, parameters, http)
    served.check_inputs(len(body.inputs) if isinstance(body.inputs, list) else 1)
    if task in IMAGE_TASKS:
        inputs = await served.offload(_decode_images, body.inputs, served.settings)
    else:
        inputs = _texts(body.inputs)
    try:
        batching = {"batch_size": PIPELINE_BATCH} if isinstance(inputs, list) else {}
        result = await run_in_threadpool(served.pipeline, inputs, **batching,
                                         **parameters.model_dump(exclude_none=True))
    except (ValueError, TypeError, KeyError) as e:
        raise APIError(400, f"{task}: {e}", param="inputs") from e
    except Exception as e:  # noqa: BLE001 - transformers' PipelineException is bad input; the rest is the engine
        if type(e).__name__ == "PipelineException":
            raise APIError(400, f"{task}: {e}", param="inputs") from e
        raise engine_failed(e) from e
    served.metrics.answered("pipeline", 200)
    return _jsonable(result)


def _texts(inputs: Any) -> str | list[str]:
    if isinstance(inputs, str) or (isinstance(inputs, list) and all(isinstance(x, str) for x in inputs)):
        return inputs
    raise APIError(400, "inputs must be a string or a list of strings", param="inputs")


def _decode_images(inputs: Any, settings: ServeSettings) -> Any:
    """base64 (or data: URL) strings -> PIL images; anything else, and any image over the limits, is refused."""
    from PIL import Image

    def one(item: Any, where: str):
        if not isinstance(item, str):
            raise APIError(400, f"{where}: images must be base64 strings", param="inputs")
        data = item.split(",", 1)[1] if item.startswith("data:") else item
        if len(data) // 4 * 3 > settings.max_image_bytes:
            raise APIError(400, f"{where}: the image has about {len(data) // 4 * 3} bytes; the limit is "
                                f"{settings.max_image_bytes} (--max-image-bytes)", param="inputs",
                           code="image_too_large")
        try:
            image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))  # reads the header only
        except Image.DecompressionBombError as e:  # PIL's own, far higher bound
            raise APIError(400, f"{where}: a decompression bomb ({e}); the limit is {settings.max_image_pixels} "
                                f"pixels (--max-image-pixels)", param="inputs", code="image_too_large") from e
        except (binascii.Error, ValueError, OSError) as e:
            raise APIError(400, f"{where} is not a base64-encoded image (paths and URLs are not accepted): {e}",
                           param="inputs") from e
        try:
            width, height = image.size
            if width * height > settings.max_image_pixels:
                raise APIError(400, f"{where}: the image is {width} x {height} pixels; the limit is "
                                    f"{settings.max_image_pixels} pixels (--max-image-pixels)", param="inputs",
                               code="image_too_large")
            image.load()
        except (ValueError, OSError) as e:
            raise APIError(400, f"{where} is not a readable image: {e}", param="inputs") from e
        return image.convert("RGB")

    if isinstance(inputs, list):
        return [one(item, f"inputs[{i}]") for i, item in enumerate(inputs)]
    return one(inputs, "inputs")


async def _generate(served: Served, body: PipelineRequest, p: GenerationParameters, http: HTTPRequest) -> list[dict]:
    """text-generation as transformers' pipeline answers it: [{"generated_text": ...}] per input; chat
    messages in, the conversation with the reply appended out."""
    started = time.perf_counter()
    inputs = body.inputs
    chat = isinstance(inputs, list) and inputs and all(isinstance(m, dict) for m in inputs)
    if chat:
        try:
            messages = [ChatMessage(**m).model_dump() for m in inputs]
        except ValueError as e:
            raise APIError(400, f"inputs: not a list of chat messages: {e}", param="inputs") from e
        try:
            prompt = await chat_prompt(served, messages)
        except Exception as e:  # noqa: BLE001 - a malformed conversation
            raise APIError(400, f"inputs: not a list of chat messages: {e}", param="inputs") from e
    elif isinstance(inputs, str):
        prompt = (await served.offload(served.tokenizer, inputs))["input_ids"]
    else:
        raise APIError(400, "inputs must be a string or a list of chat messages", param="inputs")
    if not prompt:
        raise APIError(400, "inputs: the text has no tokens", param="inputs")
    if p.max_new_tokens is not None and p.max_new_tokens >= served.context:
        raise APIError(400, f"parameters: max_new_tokens is {p.max_new_tokens}; the model's context is "
                            f"{served.context} tokens", param="parameters")
    default_new = getattr(served.model.generation_config, "max_new_tokens", None) or DEFAULT_NEW_TOKENS
    request = CompletionRequest(model=served.settings.served_name, prompt=prompt,
                                max_tokens=p.max_new_tokens or min(default_new, served.context - 1),
                                temperature=p.temperature if p.do_sample else 0.0, top_p=p.top_p, seed=p.seed,
                                stop=p.stop)
    params = generation_params(served, request, len(prompt), default_new)
    choices = submit_choices(served, request, prompt, params, None, chat=False)
    [(text, tokens, _)] = await collect_choices(served, http, choices, "pipeline", started)
    served.metrics.answered("pipeline", 200, tokens=len(tokens))
    if chat:
        return [{"generated_text": [*inputs, {"role": "assistant", "content": text}]}]
    return [{"generated_text": inputs + text if p.return_full_text else text}]


def _jsonable(value: Any) -> Any:
    """Pipelines return numpy scalars and tensors inside lists and dicts."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value
