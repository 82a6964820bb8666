"""POST /v1/pipeline: the Hugging Face Inference API's shape, {"inputs": ..., "parameters": {...}}, for the
served model's pipeline task; the answer is what `transformers.pipeline` returns, as JSON.

Generation models go through the continuous batcher (so they share it with /v1/completions); encoder
tasks through energon_hf.pipeline (transformers' own pre- and post-processing). Images come as base64
(optionally a data: URL); paths and URLs are refused, so no request makes the server read a file or
fetch anything.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from energon_hf.pipelines import IMAGE_TASKS

from .errors import APIError, engine_failed
from .generation import cancel_choices, collect_choices, generation_params, submit_choices
from .schemas import CompletionRequest
from .state import Served

router = APIRouter()

# The call arguments each task accepts from a client (anything else is a 400 naming it).
PARAMETERS = {
    "fill-mask": {"top_k", "targets"},
    "feature-extraction": {"truncation"},
    "text-classification": {"top_k", "function_to_apply"},
    "token-classification": {"aggregation_strategy", "ignore_labels", "stride"},
    "image-classification": {"top_k", "function_to_apply"},
    "image-feature-extraction": {"pool"},
    "text-generation": {"max_new_tokens", "do_sample", "temperature", "top_p", "seed", "stop", "return_full_text"},
}
DEFAULT_NEW_TOKENS = 256


class PipelineRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: Any
    parameters: dict[str, Any] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict)  # the Inference API's wait_for_model etc.: no effect


@router.post("/v1/pipeline")
async def run_pipeline(body: PipelineRequest, http: HTTPRequest):
    served: Served = http.app.state.served
    task = served.task
    unknown = sorted(set(body.parameters) - PARAMETERS[task])
    if unknown:
        raise APIError(400, f"parameters {unknown} are not accepted for {task}; accepted: "
                            f"{sorted(PARAMETERS[task])}", param="parameters")
    if body.inputs is None or body.inputs == "" or body.inputs == []:
        raise APIError(400, f"{task} needs inputs", param="inputs")
    if task == "text-generation":
        return await _generate(served, body)
    inputs = _decode_images(body.inputs) if task in IMAGE_TASKS else _texts(body.inputs)
    try:
        result = await run_in_threadpool(served.pipeline, inputs, **body.parameters)
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


def _decode_images(inputs: Any) -> Any:
    """base64 (or data: URL) strings -> PIL images; anything else is refused."""
    from PIL import Image

    def one(item: Any, where: str):
        if not isinstance(item, str):
            raise APIError(400, f"{where}: images must be base64 strings", param="inputs")
        data = item.split(",", 1)[1] if item.startswith("data:") else item
        try:
            image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
            image.load()
        except (binascii.Error, ValueError, OSError) as e:
            raise APIError(400, f"{where} is not a base64-encoded image (paths and URLs are not accepted): {e}",
                           param="inputs") from e
        return image.convert("RGB")

    if isinstance(inputs, list):
        return [one(item, f"inputs[{i}]") for i, item in enumerate(inputs)]
    return one(inputs, "inputs")


async def _generate(served: Served, body: PipelineRequest) -> list[dict]:
    """text-generation as transformers' pipeline answers it: [{"generated_text": ...}] per input; chat
    messages in, the conversation with the reply appended out."""
    p = body.parameters
    inputs = body.inputs
    chat = isinstance(inputs, list) and inputs and all(isinstance(m, dict) for m in inputs)
    if chat:
        try:
            prompt = list(served.tokenizer.apply_chat_template(inputs, add_generation_prompt=True, tokenize=True,
                                                               return_dict=True)["input_ids"])
        except Exception as e:  # noqa: BLE001 - a malformed conversation
            raise APIError(400, f"inputs: not a list of chat messages: {e}", param="inputs") from e
    elif isinstance(inputs, str):
        prompt = served.tokenizer(inputs)["input_ids"]
    else:
        raise APIError(400, "inputs must be a string or a list of chat messages", param="inputs")
    default_new = getattr(served.model.generation_config, "max_new_tokens", None) or DEFAULT_NEW_TOKENS
    try:
        request = CompletionRequest(model=served.settings.served_name, prompt=prompt,
                                    max_tokens=p.get("max_new_tokens", default_new),
                                    temperature=p.get("temperature", 1.0) if p.get("do_sample") else 0.0,
                                    top_p=p.get("top_p", 1.0), seed=p.get("seed"), stop=p.get("stop"))
    except ValueError as e:  # pydantic's checks of the values
        raise APIError(400, f"parameters: {e}", param="parameters") from e
    params = generation_params(served, request, len(prompt), default_new, "max_new_tokens", None)
    choices = submit_choices(served, request, prompt, params, None, chat=False)
    try:
        [(text, tokens, _)] = await run_in_threadpool(collect_choices, served, choices)
    except Exception as e:  # noqa: BLE001 - the engine failed this request: 503, the server stays up
        served.metrics.answered("pipeline", 503)
        raise engine_failed(e) from e
    finally:
        cancel_choices(served, choices)
    served.metrics.answered("pipeline", 200, tokens=len(tokens))
    if chat:
        return [{"generated_text": [*inputs, {"role": "assistant", "content": text}]}]
    return [{"generated_text": inputs + text if p.get("return_full_text", True) else text}]


def _jsonable(value: Any) -> Any:
    """Pipelines return numpy scalars and tensors inside lists and dicts."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value
