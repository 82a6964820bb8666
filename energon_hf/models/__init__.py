"""The model zoo: which HF architecture maps to which packed implementation and converter."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig

from energon_hf.converters import (
    WeightSpec,
    bert_masked_lm_specs,
    bert_model_specs,
    bert_sequence_classification_specs,
    bert_token_classification_specs,
    gpt2_lm_head_specs,
    gpt2_model_specs,
    llama_causal_lm_specs,
    opt_causal_lm_specs,
    vit_image_classification_specs,
    vit_model_specs,
)
from energon_hf.errors import UnsupportedModelError

from . import bert, gpt2, llama, opt, vit


@dataclass(frozen=True)
class Architecture:
    name: str
    model_cls: type[nn.Module]
    weight_specs: Callable[[PretrainedConfig], dict[str, WeightSpec]]
    can_generate: bool = False


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("GPT2LMHeadModel", gpt2.GPT2LMHeadModel, gpt2_lm_head_specs, can_generate=True),
        Architecture("GPT2Model", gpt2.GPT2Model, gpt2_model_specs),
        Architecture("BertModel", bert.BertModel, bert_model_specs),
        Architecture("BertForMaskedLM", bert.BertForMaskedLM, bert_masked_lm_specs),
        Architecture("BertForSequenceClassification", bert.BertForSequenceClassification,
                     bert_sequence_classification_specs),
        Architecture("BertForTokenClassification", bert.BertForTokenClassification, bert_token_classification_specs),
        Architecture("LlamaForCausalLM", llama.LlamaForCausalLM, llama_causal_lm_specs, can_generate=True),
        Architecture("OPTForCausalLM", opt.OPTForCausalLM, opt_causal_lm_specs, can_generate=True),
        Architecture("ViTModel", vit.ViTModel, vit_model_specs),
        Architecture("ViTForImageClassification", vit.ViTForImageClassification, vit_image_classification_specs),
    )
}

# Used when config.json names no architecture, as AutoModelForCausalLM / AutoModel would choose.
DEFAULT_ARCHITECTURE = {"gpt2": "GPT2LMHeadModel", "bert": "BertModel", "llama": "LlamaForCausalLM",
                        "opt": "OPTForCausalLM", "vit": "ViTModel"}
SUPPORTED_MODEL_TYPES = tuple(DEFAULT_ARCHITECTURE)


def architecture_for(config: PretrainedConfig) -> Architecture:
    """The head follows config.architectures[0], as HF Auto classes do."""
    model_type = getattr(config, "model_type", None)
    if model_type not in DEFAULT_ARCHITECTURE:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    names = getattr(config, "architectures", None) or [DEFAULT_ARCHITECTURE[model_type]]
    if names[0] not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"architecture {names[0]!r} is not supported; supported architectures: {', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[names[0]]
