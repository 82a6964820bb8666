"""The model zoo: which HF architecture maps to which packed implementation.

Adding an architecture is one model file (a Llama-like one: a `LlamaForCausalLM` subclass with its
`decoder_options`) and one line here; its weight map is the model's own `weight_specs`.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig

from energon_hf.errors import UnsupportedModelError

from . import bert, gemma2, gemma3, gpt2, llama, mistral, opt, phi3, qwen2, qwen3, vit
from .staged import StagedModel


@dataclass(frozen=True)
class Architecture:
    name: str  # as config.json's architectures names it
    model_type: str  # config.json's model_type
    model_cls: type[StagedModel]
    can_generate: bool = False


# The first architecture listed for a model_type is the one used when config.json names none, as
# AutoModelForCausalLM / AutoModel would choose.
ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("GPT2LMHeadModel", "gpt2", gpt2.GPT2LMHeadModel, can_generate=True),
        Architecture("GPT2Model", "gpt2", gpt2.GPT2Model),
        Architecture("BertModel", "bert", bert.BertModel),
        Architecture("BertForMaskedLM", "bert", bert.BertForMaskedLM),
        Architecture("BertForSequenceClassification", "bert", bert.BertForSequenceClassification),
        Architecture("BertForTokenClassification", "bert", bert.BertForTokenClassification),
        Architecture("Gemma2ForCausalLM", "gemma2", gemma2.Gemma2ForCausalLM, can_generate=True),
        Architecture("Gemma3ForCausalLM", "gemma3_text", gemma3.Gemma3ForCausalLM, can_generate=True),
        Architecture("LlamaForCausalLM", "llama", llama.LlamaForCausalLM, can_generate=True),
        Architecture("MistralForCausalLM", "mistral", mistral.MistralForCausalLM, can_generate=True),
        Architecture("OPTForCausalLM", "opt", opt.OPTForCausalLM, can_generate=True),
        Architecture("Phi3ForCausalLM", "phi3", phi3.Phi3ForCausalLM, can_generate=True),
        Architecture("Qwen2ForCausalLM", "qwen2", qwen2.Qwen2ForCausalLM, can_generate=True),
        Architecture("Qwen3ForCausalLM", "qwen3", qwen3.Qwen3ForCausalLM, can_generate=True),
        Architecture("ViTModel", "vit", vit.ViTModel),
        Architecture("ViTForImageClassification", "vit", vit.ViTForImageClassification),
    )
}

DEFAULT_ARCHITECTURE: dict[str, str] = {}
for _a in ARCHITECTURES.values():
    DEFAULT_ARCHITECTURE.setdefault(_a.model_type, _a.name)
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
