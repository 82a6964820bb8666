"""How a layer holds its [out, in] weight for the product it does every step.

A layer's weight is loaded as a plain float tensor (this rank's shard), then handed to one of these formats:

- `DenseWeight`: the float weight. On CPU (float32, bfloat16) it is reordered once into oneDNN's blocked
  layout for its inner-product kernel. Measured on this project's 2-core machine over SmolLM2-135M's 211
  matrices, cold weights, float32: 26 ms per step at 1 token against F.linear's 45 ms, 24 against 39 ms at 8
  tokens (the previous W @ x^T path), 55 against 82 ms at 32; bfloat16: 13.5 ms at 1 token, 175 against
  213 ms at 256. float16 has no such kernel on CPUs without AVX512-FP16 and keeps F.linear.
- `Int8Weight`: int8 per output channel (weight-only); on CPU, products of many rows expand it to bfloat16 for
  the dense GEMM, as int4's do.
- `Int4Weight`: int4 in groups along the input features (weight-only). On CPU it also keeps the nibbles (half a
  byte per weight more) that products of many rows (prompts, large decode batches) expand to bfloat16 for the
  dense GEMM, where torch's int4 kernel would cost a GEMV per row (kernels/quantized.DENSE_ROWS).

`Quantization` says which format each layer gets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from energon_hf import kernels
from energon_hf.kernels import compiled
from energon_hf.kernels import quantized as q

METHODS = ("int8", "int4")


@dataclass(frozen=True)
class Quantization:
    """Weight-only quantization of the transformer layers' linear products. Vocabulary heads and embeddings
    stay in the model's dtype: measured on SmolLM2 (bench/quality.py), an int8 head on top of its 4-bit layers
    took perplexity from +0.005 % to +0.27 % over float32 and greedy agreement from 72 % to 43 %."""

    method: str
    group_size: int = 32

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"quantization must be None or one of {METHODS}, got {self.method!r}")
        if self.method == "int4" and self.group_size not in q.INT4_GROUP_SIZES:
            raise ValueError(f"int4 group_size must be one of {q.INT4_GROUP_SIZES}, got {self.group_size}")

    @classmethod
    def parse(cls, value: str | Quantization | None) -> Quantization | None:
        """None, "none", "int8", "int4" (any case), or a Quantization."""
        if value is None or isinstance(value, Quantization):
            return value
        method = str(value).lower()
        return None if method == "none" else cls(method)

    def __str__(self) -> str:
        return self.method if self.method == "int8" else f"{self.method} (groups of {self.group_size})"


class DenseWeight:
    """A float weight, packed for the device's fastest product where it has one."""

    def __init__(self, weight: torch.Tensor):
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.packed = _onednn_packed(weight)
        self.weight = weight if self.packed is None else None

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.packed is None:
            return kernels.linear(x, self.weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")

    @property
    def nbytes(self) -> int:
        return self.out_features * self.in_features * self.dtype.itemsize

    @property
    def streamed_nbytes(self) -> int:
        """Bytes a product of a few rows reads (a decode step's)."""
        return self.nbytes


def _onednn_packed(weight: torch.Tensor) -> torch.Tensor | None:
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16) \
            or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)  # batch-size hint: decode steps
    except RuntimeError:  # this CPU lacks the instructions for the dtype
        return None


class Int8Weight:
    """w = q * scale per output channel."""

    def __init__(self, q8: torch.Tensor, scale: torch.Tensor):
        self.out_features, self.in_features = q8.shape
        self.q = q8.contiguous()
        self.scale = scale.float()
        self.kernel_scale = scale.to(q.CPU_COMPUTE_DTYPE) if q8.device.type == "cpu" else None
        self.expands = self.kernel_scale is not None and q.fast_bfloat16_gemm()

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Int8Weight:
        return cls(*q.quantize_int8(weight))

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.kernel_scale is None:
            out = F.linear(x, q.dequantize_int8(self.q, self.scale, x.dtype))
        elif self.expands and x.numel() >= q.DENSE_ROWS * self.in_features:
            out = q.int8_dense_matmul(x, self.q, self.kernel_scale)
        else:
            out = q.int8_matmul(x, self.q, self.kernel_scale)
        return out if bias is None else out + bias

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * (4 + (2 if self.kernel_scale is not None else 0))

    @property
    def streamed_nbytes(self) -> int:
        return self.nbytes


class Int4Weight:
    """w = (q - 8) * scale + zero, one scale and zero per `group_size` input features of a row."""

    def __init__(self, q4: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
        self.out_features, self.in_features = q4.shape
        self.group_size = self.in_features // scale.shape[1]
        self.nibbles = None  # for products of many rows (q.DENSE_ROWS), where the compiled ops built
        if q.int4_kernel_fits(self.out_features, self.in_features, self.group_size, q4.device):
            self.packed, self.scales_and_zeros = q.pack_int4(q4, scale, zero)
            self.parts = None
            if compiled.available() and q.fast_bfloat16_gemm():
                self.nibbles = q.pack_nibbles(q4, self.group_size)
        else:  # other devices and shapes: dequantized on the fly
            self.packed = self.scales_and_zeros = None
            self.parts = (q4, scale.float(), zero.float())

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int) -> Int4Weight:
        return cls(*q.quantize_int4(weight, group_size))

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.parts is not None:
            out = F.linear(x, q.dequantize_int4(*self.parts, x.dtype))
        elif self.nibbles is not None and x.numel() >= q.DENSE_ROWS * self.in_features and compiled.enabled():
            out = q.int4_dense_matmul(x, self.nibbles, self.scales_and_zeros, self.group_size)
        else:
            out = q.int4_matmul(x, self.packed, self.scales_and_zeros, self.group_size)
        return out if bias is None else out + bias

    @property
    def nbytes(self) -> int:
        nibbles = 0 if self.nibbles is None else self.nibbles.numel()
        return self.streamed_nbytes + nibbles

    @property
    def streamed_nbytes(self) -> int:
        """A product of few rows reads the kernel's packed form only (the nibbles serve products of many rows)."""
        if self.parts is not None:
            return sum(t.numel() * t.element_size() for t in self.parts)
        return self.packed.numel() + self.scales_and_zeros.numel() * 2


LinearWeight = DenseWeight | Int8Weight | Int4Weight


def linear_format(weight: torch.Tensor, quantization: Quantization | None, pack: bool,
                  name: str) -> LinearWeight | None:
    """The format of a linear layer's loaded weight; None: keep the plain parameter (`pack` off)."""
    if quantization is None:
        return DenseWeight(weight) if pack else None
    if quantization.method == "int8":
        return Int8Weight.quantize(weight)
    if weight.shape[1] % quantization.group_size:
        raise ValueError(f"{name}: {weight.shape[1]} input features (on this rank) are not a multiple of the "
                         f"int4 group size {quantization.group_size}; use quantization='int8', or a tp that "
                         f"splits the layer at group boundaries")
    return Int4Weight.quantize(weight, quantization.group_size)


@dataclass(frozen=True)
class FormatPlan:
    """What the loader makes of each layer's weight once it is loaded (`finish_loading` on the layer)."""

    quantization: Quantization | None = None
    pack: bool = True  # off when the weights are to be saved (the packed forms are device-specific)
    tied_head: str | None = None  # the embedding that is also the vocabulary head, on the rank that runs it


def weight_bytes(model: torch.nn.Module, streamed: bool = False) -> int:
    """Bytes of the weights this rank holds: loaded parameters and the layers' weight formats (`streamed`: only
    the forms that a product of few rows reads)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
    formats = (getattr(m, attr, None) for m in model.modules() for attr in ("format", "head"))
    return params + sum(f.streamed_nbytes if streamed else f.nbytes for f in formats if f is not None)
