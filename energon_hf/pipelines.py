"""`energon_hf.pipeline`: transformers.pipeline's tasks, arguments and outputs, computed by an EnergonModel.

transformers' own task classes do the pre- and post-processing (tokenizer, chat template, scores, labels,
aggregation), so results have the same structure, keys and types as `transformers.pipeline`; their model
calls land on the EnergonModel, which strips each batch's padding once and runs it packed, in this process
or on its tp x pp engine. Switching is one import:

    from energon_hf import pipeline        # instead of: from transformers import pipeline
    pipe = pipeline("fill-mask", model="path/to/bert", tp=2)
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, Pipeline
from transformers.pipelines import SUPPORTED_TASKS, TASK_ALIASES

from energon_hf import images
from energon_hf.modeling import EnergonModel

TEXT_TASKS = ("text-generation", "fill-mask", "feature-extraction", "text-classification", "token-classification")
IMAGE_TASKS = ("image-classification", "image-feature-extraction")
TASKS = TEXT_TASKS + IMAGE_TASKS
ALIASES = {alias: task for alias, task in TASK_ALIASES.items() if task in TASKS}

# The task each architecture serves when none is named (transformers reads it from the hub's pipeline_tag).
_TASK_BY_SUFFIX = {"LMHeadModel": "text-generation", "ForCausalLM": "text-generation", "ForMaskedLM": "fill-mask",
                   "ForSequenceClassification": "text-classification",
                   "ForTokenClassification": "token-classification",
                   "ForImageClassification": "image-classification"}


def _task_for(model: EnergonModel) -> str:
    name = model.architecture.name
    for suffix, task in _TASK_BY_SUFFIX.items():
        if name.endswith(suffix):
            return task
    return "image-feature-extraction" if model.architecture.model_cls.main_input == "pixel_values" \
        else "feature-extraction"


def _canonical(task: str) -> str:
    task = ALIASES.get(task, task)
    if task not in TASKS:
        raise KeyError(f"Unknown task {task!r}; energon_hf.pipeline supports {', '.join(TASKS)} "
                       f"(aliases: {', '.join(ALIASES)})")
    return task


def _check_inputs(task: str, inputs: Any) -> None:
    """Clear errors for what transformers would only trip over later (or accept by accident)."""
    if inputs is None:
        raise ValueError(f"{task} needs inputs: got None")
    if isinstance(inputs, list | tuple):
        if not inputs:
            raise ValueError(f"{task} got an empty list of inputs")
        kinds = {_kind(task, x) for x in inputs}
        if len(kinds) > 1:
            raise ValueError(f"{task} inputs must all be of one kind, got a mix of {', '.join(sorted(kinds))}")
        for i, item in enumerate(inputs):
            _check_one(task, item, f"input {i}")
    elif not isinstance(inputs, Iterable) or isinstance(inputs, str | dict):
        _check_one(task, inputs, "the input")


def _kind(task: str, item: Any) -> str:
    """Images may come as PIL images, paths or URLs side by side; anything else must match exactly."""
    if task in IMAGE_TASKS and (isinstance(item, str | os.PathLike) or type(item).__module__.startswith("PIL")):
        return "image"
    return type(item).__name__


def _check_one(task: str, item: Any, where: str) -> None:
    if item is None:
        raise ValueError(f"{where} of {task} is None")
    if task in TEXT_TASKS and isinstance(item, str) and not item.strip():
        raise ValueError(f"{where} of {task} is an empty string")
    if task in IMAGE_TASKS and isinstance(item, str | os.PathLike) and not str(item).startswith(("http://",
                                                                                                   "https://")):
        images.load_image(item)  # a clear error for a missing file or one that is not an image


class EnergonPipelineMixin:
    """Goes in front of a transformers pipeline class: checks inputs, and accepts our model in place of a
    PreTrainedModel (transformers would log that an 'EnergonModel' is not a supported architecture)."""

    def check_model_type(self, supported_models: Any) -> None:
        pass

    def __call__(self, inputs: Any = None, *args: Any, **kwargs: Any) -> Any:
        _check_inputs(self.task, inputs)
        return super().__call__(inputs, *args, **kwargs)


class UnpaddedFeaturesMixin:
    """feature-extraction: each text's features cover its own tokens, whatever batch it ran in.
    (transformers returns a batched text's features padded to the batch's longest, pad positions included.)"""

    def _forward(self, model_inputs: dict) -> dict:
        features = self.model(**model_inputs)[0]
        return {"features": features, "attention_mask": model_inputs["attention_mask"]}

    def postprocess(self, model_outputs: dict, return_tensors: bool = False) -> Any:
        features = model_outputs["features"][:, model_outputs["attention_mask"][0].bool()]
        return features if return_tensors else features.tolist()


_TASK_MIXINS = {"feature-extraction": (UnpaddedFeaturesMixin,)}
_CLASSES: dict[str, type] = {}


def _pipeline_class(task: str) -> type[Pipeline]:
    base = SUPPORTED_TASKS[task]["impl"]
    if isinstance(base, str):  # transformers 5 names the class, imported on use
        module, _, name = base.rpartition(".")
        base = getattr(importlib.import_module(module), name)
    if task not in _CLASSES:
        bases = (EnergonPipelineMixin, *_TASK_MIXINS.get(task, ()), base)
        _CLASSES[task] = type(f"Energon{base.__name__}", bases, {})
    return _CLASSES[task]


def pipeline(task: str | None = None, model: str | os.PathLike | EnergonModel | None = None, tokenizer: Any = None,
             tp: int | None = None, pp: int | None = None, dtype: str | torch.dtype = "auto",
             device: str | torch.device = "cpu", batch_size: int | None = None, image_processor: Any = None,
             quantization: str | None = None, **kwargs: Any) -> Pipeline:
    """transformers.pipeline's signature for the tasks in TASKS; `model` is a path, a hub id, a .gguf file
    or an EnergonModel; `tp` / `pp` start the multi-process engine; `quantization` ("int8", "int4", "int8-exact",
    "int4-exact") as in EnergonModel.from_pretrained. Other keyword arguments go to the transformers pipeline
    class (for example generation parameters, `top_k`, `aggregation_strategy`)."""
    if model is None:
        raise ValueError("pipeline() needs model=: a checkpoint path, a hub id, a .gguf file or an EnergonModel")
    task = None if task is None else _canonical(task)  # an unknown task fails before anything loads
    energon = model if isinstance(model, EnergonModel) else EnergonModel.from_pretrained(
        model, dtype=dtype, device=device, tp=tp, pp=pp, quantization=quantization)
    task = task or _task_for(energon)
    folder = Path(energon.folder) if energon.folder else None
    if task in TEXT_TASKS:
        if tokenizer is None or isinstance(tokenizer, str | os.PathLike):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer or folder)
    elif image_processor is None or isinstance(image_processor, str | os.PathLike):
        image_processor = images.load_processor(image_processor or folder)
    return _pipeline_class(task)(model=energon, tokenizer=tokenizer, image_processor=image_processor, task=task,
                                 device=energon.device, batch_size=batch_size, **kwargs)
