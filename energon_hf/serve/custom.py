"""The server of a custom model (a config file's model_class function, launched on tp x pp ranks): its
forward on `POST /v1/pipeline` with {"inputs": nested numbers, "parameters": {"dtype": ...}}, answered
with the output tensor as nested lists."""

from __future__ import annotations

import torch
from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from energon_hf.engine.launch import LaunchedModel
from energon_hf.errors import EngineDeadError

from .app import base_app
from .errors import APIError, engine_failed
from .metrics import Metrics
from .pipeline_api import PipelineRequest
from .state import ServeSettings

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64}


def create_custom_app(model: LaunchedModel, settings: ServeSettings, task: str = "custom") -> FastAPI:
    metrics = Metrics()
    app = base_app(settings, metrics, lambda: not model.runner.broken, task)
    app.state.launched = model

    @app.post("/v1/pipeline")
    async def forward(body: PipelineRequest):
        unknown = sorted(set(body.parameters) - {"dtype"})
        if unknown:
            raise APIError(400, f"parameters {unknown} are not accepted; accepted: ['dtype']", param="parameters")
        dtype = body.parameters.get("dtype", "float32")
        if dtype not in DTYPES:
            raise APIError(400, f"dtype must be one of {list(DTYPES)}, got {dtype!r}", param="parameters.dtype")
        try:
            inputs = torch.tensor(body.inputs, dtype=DTYPES[dtype])
        except (TypeError, ValueError, RuntimeError) as e:
            raise APIError(400, f"inputs must be a nested list of numbers of one shape: {e}", param="inputs") from e
        try:
            output = await run_in_threadpool(model, inputs)
        except EngineDeadError as e:
            metrics.answered("pipeline", 503)
            raise engine_failed(e) from e
        except Exception as e:  # noqa: BLE001 - the model's own error (a wrong shape): the engine is fine
            if model.runner.broken:
                raise engine_failed(e) from e
            metrics.answered("pipeline", 400)
            raise APIError(400, f"the model rejected the inputs: {type(e).__name__}: {e}", param="inputs") from e
        metrics.answered("pipeline", 200)
        return output.tolist() if isinstance(output, torch.Tensor) else output

    return app
