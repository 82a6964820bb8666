"""BERT on packed tokens (BertModel, BertForMaskedLM, BertForSequenceClassification)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.modeling_outputs import (
    BaseModelOutputWithPoolingAndCrossAttentions,
    MaskedLMOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)

from energon_hf.batch import PackedBatch
from energon_hf.converters import (
    WeightSpec,
    bert_masked_lm_specs,
    bert_model_specs,
    bert_sequence_classification_specs,
    bert_token_classification_specs,
)
from energon_hf.nn import Linear, Linear1D_Col, Linear1D_Row, VocabParallelEmbedding, attend
from energon_hf.nn.lm_head import rows_for_logits, untied_head, vocab_logits
from energon_hf.nn.norm import LayerNorm, add_and_norm
from energon_hf.parallel import divide

from .staged import StagedModel

if TYPE_CHECKING:
    from transformers import BertConfig


class BertLayer(nn.Module):
    """Post-LayerNorm encoder layer with q, k, v fused into one projection."""

    def __init__(self, config: BertConfig, layer_idx: int):
        super().__init__()
        hidden, eps = config.hidden_size, config.layer_norm_eps
        self.num_heads = divide(config.num_attention_heads, "attention heads")  # this rank's heads
        self.head_dim = hidden // config.num_attention_heads
        self.layer_idx = layer_idx
        self.causal = bool(config.is_decoder)
        self.qkv = Linear1D_Col(hidden, 3 * hidden, parts=(hidden,) * 3, step_buffer="qkv")
        self.attn_out = Linear1D_Row(hidden, hidden)
        self.attn_norm = LayerNorm(hidden, eps=eps)
        self.fc = Linear1D_Col(hidden, config.intermediate_size, activation=config.hidden_act, feeds_product=True,
                               step_buffer="mlp")
        self.out = Linear1D_Row(config.intermediate_size, hidden)
        self.out_norm = LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        q, k, v = self.qkv(x, batch.buffers).view(x.shape[0], 3, self.num_heads, self.head_dim).unbind(1)
        ctx = attend(q, k, v, batch.attn, self.layer_idx, causal=self.causal, scale=None)
        x = add_and_norm(self.attn_norm, self.attn_out, ctx.reshape(x.shape[0], -1), x)
        return add_and_norm(self.out_norm, self.out, self.fc(x, batch.buffers), x)


class BertModel(StagedModel):
    hf_output = BaseModelOutputWithPoolingAndCrossAttentions
    token_outputs = ("last_hidden_state",)
    learned_positions = True  # position ids past max_position_embeddings do not exist
    base_prefix = "bert."
    head_modules = ("pooler",)

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, hidden)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, hidden)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, hidden)
        self.embed_norm = LayerNorm(hidden, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(config, i) for i in range(config.num_hidden_layers))
        self.pooler = Linear(hidden, hidden) if add_pooling_layer else None

    def weight_specs(self) -> dict[str, WeightSpec]:
        return bert_model_specs(self.config, pooler=self.pooler is not None)

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        token_types = batch.token_type_ids
        if token_types is None:
            token_types = torch.zeros_like(batch.input_ids)
        x = self.word_embeddings(batch.input_ids) + self.token_type_embeddings(token_types)
        return self.embed_norm(x + self.position_embeddings(batch.positions))

    def pool(self, hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """tanh(dense(first token)) per sequence: the first real token, i.e. [CLS]."""
        first = hidden.index_select(0, batch.attn.cu_seqlens[:-1].long())
        return torch.tanh(self.pooler(first))

    def finish(self, x: torch.Tensor, batch: PackedBatch) -> dict[str, torch.Tensor]:
        out = {"last_hidden_state": x}
        if self.pooler is not None:
            out["pooler_output"] = self.pool(x, batch)
        return out


class BertForMaskedLM(StagedModel):
    hf_output = MaskedLMOutput
    token_outputs = ("logits",)
    learned_positions = True  # position ids past max_position_embeddings do not exist
    base_prefix = "bert."
    layers_path = "bert.layers"
    head_modules = ("transform", "transform_norm", "decoder", "decoder_bias")

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.bert = BertModel(config, add_pooling_layer=False)
        self.transform = Linear(hidden, hidden, activation=config.hidden_act)
        self.transform_norm = LayerNorm(hidden, eps=config.layer_norm_eps)
        # Tied (the default) decoder weights are the word embeddings, read in place.
        self.decoder = untied_head(config)
        self.decoder_bias = nn.Parameter(torch.zeros(config.vocab_size))

    def weight_specs(self) -> dict[str, WeightSpec]:
        return bert_masked_lm_specs(self.config)

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        return self.bert.embed(batch)

    def finish(self, x: torch.Tensor, batch: PackedBatch) -> dict[str, torch.Tensor]:
        hidden = self.transform_norm(self.transform(rows_for_logits(x, batch)))
        return {"logits": vocab_logits(hidden, self.bert.word_embeddings, self.decoder, self.decoder_bias)}

    def tied_embedding(self) -> str | None:
        return "bert.word_embeddings" if self.decoder is None else None


class BertForSequenceClassification(StagedModel):
    hf_output = SequenceClassifierOutput
    token_outputs = ()
    learned_positions = True  # position ids past max_position_embeddings do not exist
    base_prefix = "bert."
    layers_path = "bert.layers"
    head_modules = ("bert.pooler", "classifier")

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=True)
        self.classifier = Linear(config.hidden_size, config.num_labels)

    def weight_specs(self) -> dict[str, WeightSpec]:
        return bert_sequence_classification_specs(self.config)

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        return self.bert.embed(batch)

    def finish(self, x: torch.Tensor, batch: PackedBatch) -> dict[str, torch.Tensor]:
        return {"logits": self.classifier(self.bert.pool(x, batch))}


class BertForTokenClassification(StagedModel):
    hf_output = TokenClassifierOutput
    token_outputs = ("logits",)
    learned_positions = True  # position ids past max_position_embeddings do not exist
    base_prefix = "bert."
    layers_path = "bert.layers"
    head_modules = ("classifier",)

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=False)
        self.classifier = Linear(config.hidden_size, config.num_labels)

    def weight_specs(self) -> dict[str, WeightSpec]:
        return bert_token_classification_specs(self.config)

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        return self.bert.embed(batch)

    def finish(self, x: torch.Tensor, batch: PackedBatch) -> dict[str, torch.Tensor]:
        return {"logits": self.classifier(x)}
