"""energon_hf.converters: HF checkpoints -> energon weights (name maps, transforms, reading, loading)."""

from .bert import (
    bert_masked_lm_specs,
    bert_model_specs,
    bert_sequence_classification_specs,
    bert_token_classification_specs,
)
from .checkpoint import CheckpointReader, find_weight_files
from .gpt2 import gpt2_lm_head_specs, gpt2_model_specs
from .loader import load_weights
from .opt import opt_causal_lm_specs
from .vit import vit_image_classification_specs, vit_model_specs
from .weights import WeightSpec

__all__ = [
    "CheckpointReader",
    "WeightSpec",
    "bert_masked_lm_specs",
    "bert_model_specs",
    "bert_sequence_classification_specs",
    "bert_token_classification_specs",
    "find_weight_files",
    "gpt2_lm_head_specs",
    "gpt2_model_specs",
    "load_weights",
    "opt_causal_lm_specs",
    "vit_image_classification_specs",
    "vit_model_specs",
]
