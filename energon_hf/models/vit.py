"""ViT on packed tokens (ViTModel, ViTForImageClassification): patches + [CLS] per image, pre-LN encoder."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput

from energon_hf.batch import PackedBatch
from energon_hf.converters import WeightSpec, vit_image_classification_specs, vit_model_specs
from energon_hf.nn import Linear, Linear1D_Col, Linear1D_Row, attend
from energon_hf.nn.norm import LayerNorm
from energon_hf.parallel import divide

from .staged import StagedModel

if TYPE_CHECKING:
    from transformers import ViTConfig


class ViTLayer(nn.Module):
    def __init__(self, config: ViTConfig, layer_idx: int):
        super().__init__()
        hidden, eps = config.hidden_size, config.layer_norm_eps
        self.num_heads = divide(config.num_attention_heads, "attention heads")  # this rank's heads
        self.head_dim = hidden // config.num_attention_heads
        self.layer_idx = layer_idx
        self.norm_before = LayerNorm(hidden, eps=eps)
        self.qkv = Linear1D_Col(hidden, 3 * hidden, bias=config.qkv_bias, parts=(hidden,) * 3,
                                step_buffer="qkv")
        self.attn_out = Linear1D_Row(hidden, hidden)
        self.norm_after = LayerNorm(hidden, eps=eps)
        self.fc = Linear1D_Col(hidden, config.intermediate_size, activation=config.hidden_act, feeds_product=True,
                               step_buffer="mlp")
        self.out = Linear1D_Row(config.intermediate_size, hidden)

    def forward(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        qkv = self.qkv(self.norm_before(x), batch.buffers)
        q, k, v = qkv.view(x.shape[0], 3, self.num_heads, self.head_dim).unbind(1)
        ctx = attend(q, k, v, batch.attn, self.layer_idx, causal=False, scale=None)
        x = x + self.attn_out(ctx.reshape(x.shape[0], -1))
        return x + self.out(self.fc(self.norm_after(x), batch.buffers))


class ViTModel(StagedModel):
    hf_output = BaseModelOutputWithPooling
    token_outputs = ("last_hidden_state",)
    base_prefix = "vit."
    main_input = "pixel_values"
    head_modules = ("norm", "pooler")

    def __init__(self, config: ViTConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        hidden, patch = config.hidden_size, config.patch_size
        self.num_patches = (config.image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(config.num_channels, hidden, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden))
        self.position_embeddings = nn.Parameter(torch.zeros(1, self.num_patches + 1, hidden))
        self.layers = nn.ModuleList(ViTLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LayerNorm(hidden, eps=config.layer_norm_eps)
        self.pooler = Linear(hidden, config.pooler_output_size, activation=config.pooler_act) if add_pooling_layer \
            else None

    @property
    def tokens_per_image(self) -> int:
        return self.num_patches + 1

    def weight_specs(self) -> dict[str, WeightSpec]:
        return vit_model_specs(self.config, pooler=self.pooler is not None)

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        """Every image gives the same number of tokens, so packing is a reshape: [B*(P+1), H]."""
        patches = self.patch_embed(batch.pixel_values.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        return (torch.cat((cls, patches), dim=1) + self.position_embeddings).flatten(0, 1)

    def first_tokens(self, hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        return hidden.index_select(0, batch.attn.cu_seqlens[:-1].long())

    def finish(self, x: torch.Tensor, batch: PackedBatch) -> dict[str, torch.Tensor]:
        hidden = self.norm(x)
        out = {"last_hidden_state": hidden}
        if self.pooler is not None:
            out["pooler_output"] = self.pooler(self.first_tokens(hidden, batch))
        return out


class ViTForImageClassification(StagedModel):
    hf_output = ImageClassifierOutput
    token_outputs = ()
    base_prefix = "vit."
    main_input = "pixel_values"
    layers_path = "vit.layers"
    head_modules = ("vit.norm", "classifier")

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.vit = ViTModel(config, add_pooling_layer=False)
        self.classifier = Linear(config.hidden_size, config.num_labels)

    @property
    def tokens_per_image(self) -> int:
        return self.vit.tokens_per_image

    def weight_specs(self) -> dict[str, WeightSpec]:
        return vit_image_classification_specs(self.config)

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        return self.vit.embed(batch)

    def finish(self, x: torch.Tensor, batch: PackedBatch) -> dict[str, torch.Tensor]:
        return {"logits": self.classifier(self.vit.first_tokens(self.vit.norm(x), batch))}
