"""How a layer holds its [out, in] weight for the product it does every step.

A layer's weight is loaded as a plain float tensor (this rank's shard), then handed to one of these formats:

- `DenseWeight`: the float weight. On CPU (float32, bfloat16) it is reordered once into oneDNN's blocked
  layout for its inner-product kernel where that is faster on this kind of host (`onednn_packing_pays`). On the
  2-core AMD EPYC over SmolLM2-135M's 211 matrices, cold weights, float32: 26 ms per step at 1 token against
  F.linear's 45 ms, 24 against 39 ms at 8 tokens, 55 against 82 ms at 32; bfloat16: 13.5 ms at 1 token, 175
  against 213 ms at 256. On the 2-core Xeon float32 packing loses (26.3 against 16.9 ms for the 120 layer
  matrices at 1 token) and bfloat16's wins. A plain weight (float16 has no packing; float32 on those Xeons, where
  generating models take panels instead: below) runs the compiled GEMV for the row counts where it beats torch's
  product (kernels/quantized.float_gemv_rows: float16 up to 24 rows, float32 3-16; SmolLM2 float32 generate at
  batch 4 / 8 / 16, before panels: 92.7 / 135.7 / 179.7 against 65.4 / 98.8 / 159.4 new tokens/s through
  F.linear).
- `PanelWeight`: a generating model's float32 weight in column panels (kernels/panels.py), where the kernel is
  built (AVX-512) and the weight would otherwise be plain: every product through csrc/panel_gemm.cpp, whose decode
  steps of 2-128 rows run 1.1-1.8x faster than F.linear's. SmolLM2 float32 through the serving benchmark's 64
  requests (the model's batcher at the server's 512-token budget, processes alternating, 2026-12-07): 17.9 / 19.2
  against 20.2 / 19.6 s, its decode steps of 48-64 rows 109-113 against 128-132 ms.
- `Int8Weight`: int8 per output channel, or in groups (GGUF's Q8_0), weight-only.
- `Int4Weight`: int4 in groups along the input features (weight-only).
  Both run their products of few rows (decode steps) in float32 through the compiled GEMV where it built, and
  expand the weight to bfloat16 for the dense GEMM from kernels/quantized.*_DENSE_ROWS rows on (prompts, large
  decode batches) where torch's bfloat16 GEMM is oneDNN's (to float32 with Quantization(exact=True)); torch's
  quantized kernels would cost a GEMV per row. Where the Triton kernels run (CUDA), every product dequantizes
  its tiles in registers (kernels/triton_quantized.py).

`Quantization` says which format each layer gets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from energon_hf import kernels
from energon_hf.kernels import compiled, panels
from energon_hf.kernels import quantized as q
from energon_hf.kernels.dispatch import triton_installed
from energon_hf.kernels.linear import amx_cpu
from energon_hf.kernels.linear import linear as torch_linear

METHODS = ("int8", "int4")
# "int4-exact" / "int8-exact": the exact option's names. By default products of many rows (from INT4_DENSE_ROWS /
# INT8_DENSE_ROWS on) expand the weight to bfloat16, whose rounding of the activations moves greedy tokens at near
# ties: SmolLM2's 4-bit model agreed with its float32 model on 87.5 % of 8 prompts x 64 free-running tokens with
# bfloat16 prompts and 100 % with float32 ones (bench/quality.py); float32 expansions cost the products of many
# rows 1.4x / 1.9x / 2.8x the bfloat16 path's time at 40 / 128 / 512 rows (SmolLM2's 30 layers, 2026-12-07).
EXACT_SUFFIX = "-exact"
Product = Callable[[torch.Tensor], torch.Tensor]  # x [rows, in] -> x @ W^T


@dataclass(frozen=True)
class Quantization:
    """Weight-only quantization of the transformer layers' linear products. Vocabulary heads and embeddings
    stay in the model's dtype: measured on SmolLM2 (bench/quality.py), an int8 head (per channel, re-quantized,
    through torch's kernel, which rounds activations to bfloat16) on top of its 4-bit layers took perplexity
    from +0.005 % to +0.27 % over float32 and greedy agreement from 72 % to 43 %. The exception is a head the
    .gguf file itself holds in 8 bits (converters/loader.py): its product is the dequantized model's."""

    method: str
    group_size: int = 32
    # Every product exact to float32 rounding: products of many rows (prompts, large decode batches) expand the
    # weight to float32 instead of bfloat16 ("int4-exact", "int8-exact"). See EXACT_SUFFIX.
    exact: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"quantization must be None or one of {METHODS} (each also as '<method>{EXACT_SUFFIX}'), "
                             f"got {self.method!r}")
        if self.method == "int4" and self.group_size not in q.INT4_GROUP_SIZES:
            raise ValueError(f"int4 group_size must be one of {q.INT4_GROUP_SIZES}, got {self.group_size}")

    @classmethod
    def parse(cls, value: str | Quantization | None) -> Quantization | None:
        """None, "none", "int8", "int4", "int8-exact", "int4-exact" (any case), or a Quantization."""
        if value is None or isinstance(value, Quantization):
            return value
        method = str(value).lower()
        if method == "none":
            return None
        exact = method.endswith(EXACT_SUFFIX)
        return cls(method.removesuffix(EXACT_SUFFIX), exact=exact)

    def __str__(self) -> str:
        name = self.method if self.method == "int8" else f"{self.method} (groups of {self.group_size})"
        return f"{name}, exact float32 products" if self.exact else name

    @property
    def expansion(self) -> torch.dtype:
        """What a CPU product of many rows expands the layers' weights to (the formats' `expansion`)."""
        return torch.float32 if self.exact else q.CPU_COMPUTE_DTYPE


class DenseWeight:
    """A float weight, packed for the device's fastest product where it has one."""

    def __init__(self, weight: torch.Tensor):
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.packed = _onednn_packed(weight)
        self.weight = weight.detach() if self.packed is None else None  # the same memory, without autograd
        # a plain weight (float16 has no oneDNN packing; float32 where packing does not pay) runs our GEMV for the
        # row counts where it beats torch's (kernels/quantized.float_gemv_rows)
        self.gemv = weight.device.type == "cpu" and self.weight is not None and weight.is_contiguous() \
            and q.gemv_available()

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None, gelu: str | None = None,
                 keep_compute_dtype: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W^T (+ bias), then GELU ("none": erf, "tanh") if asked: in oneDNN's epilogue where the weight is
        packed. `keep_compute_dtype`: a product that computes in another dtype than x's may return its output in
        that dtype (the quantized formats' expansions: bfloat16); this one computes in x's. `out`: a buffer the
        plain weight's product of many rows writes into (batch.StepBuffers); the other forms, and the quantized
        formats, which compute elsewhere, return a new tensor."""
        if self.gemv and x.numel() // self.in_features in q.float_gemv_rows(self.dtype) and not q.records_grad(x):
            return _bias_gelu(q.gemv(torch.ops.energon_hf.float_gemv, x, self.weight), bias, gelu)
        if self.packed is None:
            return kernels.linear(x, self.weight, bias, out) if gelu is None else \
                kernels.linear_gelu(x, self.weight, bias, gelu, out)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none" if gelu is None else "gelu", [],
                                                  "" if gelu is None else gelu)

    def bare_product(self, rows: int) -> Product:
        """What `__call__` runs for `rows` contiguous rows outside autograd, without a bias, as bare a
        call as it gets (the decode loop of models/llama_decode.py: each wrapper costs about 10 us in a step)."""
        if self.gemv and rows in q.float_gemv_rows(self.dtype):
            return _gemv_product(torch.ops.energon_hf.float_gemv, (self.weight,))
        if self.packed is not None:
            packed = self.packed
            return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        weight = self.weight
        return lambda x: torch_linear(x, weight)

    @property
    def nbytes(self) -> int:
        return self.out_features * self.in_features * self.dtype.itemsize

    @property
    def streamed_nbytes(self) -> int:
        """Bytes a product of a few rows reads (a decode step's)."""
        return self.nbytes


def _onednn_packed(weight: torch.Tensor) -> torch.Tensor | None:
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16) \
            or not torch.backends.mkldnn.is_available() or not onednn_packing_pays(weight.dtype):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)  # batch-size hint: decode steps
    except RuntimeError:  # this CPU lacks the instructions for the dtype
        return None


def onednn_packing_pays(dtype: torch.dtype) -> bool:
    """Whether oneDNN's packed layout beats the plain weight on this CPU. bfloat16: everywhere measured. float32:
    not on Intel Xeons with AMX (kernels/linear.py: F.linear on the plain weight, 16.9 against 26.3 ms for
    SmolLM2's layers at one row), where it does on the AMD EPYC. (A calibration at load was tried: on weights
    warm in cache the ranking differs from a decode step's cold weights, so it picked wrongly.)"""
    return dtype == torch.bfloat16 or not amx_cpu()


class PanelWeight:
    """A float32 weight in column panels: products through csrc/panel_gemm.cpp, each sum started from the bias
    (kernels/panels.py; nn/formats' header has the numbers). Where autograd records the product, or x is not on
    the CPU, the plain weight is rebuilt for F.linear (a copy per call: such products are rare and not hot)."""

    dtype = torch.float32

    def __init__(self, weight: torch.Tensor):
        self.out_features, self.in_features = weight.shape
        self.panels = panels.pack(weight.detach())

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None, gelu: str | None = None,
                 keep_compute_dtype: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
        if q.records_grad(x) or x.device.type != "cpu":
            return _bias_gelu(F.linear(x, panels.unpack(self.panels, self.out_features)), bias, gelu)
        return _bias_gelu(panels.linear(x, self.panels, self.out_features, bias, out), None, gelu)

    def bare_product(self, rows: int) -> Product:
        """`__call__` on contiguous 2-D rows, without a bias (models/llama_decode.py)."""
        return _gemv_product(torch.ops.energon_hf.panel_linear, (self.panels, self.out_features, None))

    @property
    def nbytes(self) -> int:
        return self.panels.numel() * self.panels.element_size()

    @property
    def streamed_nbytes(self) -> int:
        return self.nbytes


class Int8Weight:
    """w = q * scale, one scale per output channel, or one per `group_size` input features of a row (GGUF's Q8_0:
    groups of 32, a Q8_0 file's layers and the embedded SmolLM2's vocabulary head).

    On CPU, products of fewer than INT8_DENSE_ROWS rows run the compiled float32 kernel (csrc/gemv.cpp; without it,
    torch's int8 kernel with bfloat16 activations, per-channel scales only), larger ones expand the weight to
    `expansion` for the dense GEMM. Where the Triton kernels run (CUDA), every product goes through
    kernels.int8_linear. Other devices dequantize on the fly."""

    def __init__(self, q8: torch.Tensor, scale: torch.Tensor, expansion: torch.dtype | None = q.CPU_COMPUTE_DTYPE):
        """`expansion`: bfloat16 (oneDNN's GEMM, where torch's bfloat16 GEMM is oneDNN's), float32 (the layers of
        Quantization(exact=True)) or None: never, every row count runs the compiled kernel (a GGUF's 8-bit
        vocabulary head, whose products of many rows take the float table: RowSplitWeight; its bfloat16 logits
        had cost SmolLM2's 4-bit model 0.8 points of teacher-forced greedy agreement, bench/quality.py). With
        float32 or None no product rounds activations to bfloat16 (without the compiled ops: the dequantized
        weight in x's dtype)."""
        self.out_features, self.in_features = q8.shape
        self.q = q8.contiguous()
        self.scale = scale.float().reshape(self.out_features, -1).contiguous()  # [out, groups]
        self.group_size = self.in_features // self.scale.shape[1]
        self.on_device = _device_kernels(q8.device)
        cpu = q8.device.type == "cpu" and not self.on_device
        self.gemv = cpu and q.gemv_available()  # decided at load, as Int4Weight's form
        bfloat16 = cpu and expansion == q.CPU_COMPUTE_DTYPE
        # torch's int8 kernel (few rows without the GEMV) and its `q * scale` expansion (without the compiled ops)
        # take bfloat16 scales; the compiled expansion float32 ones
        self.kernel_scale = self.scale.to(q.CPU_COMPUTE_DTYPE) if bfloat16 and not self.gemv else None
        self.expansion_scale = self.scale if cpu and compiled.available() else self.kernel_scale
        self.expansion = expansion
        self.expands = (bfloat16 and q.fast_bfloat16_gemm()) or (expansion == torch.float32 and self.gemv)

    @classmethod
    def quantize(cls, weight: torch.Tensor, expansion: torch.dtype | None = q.CPU_COMPUTE_DTYPE) -> Int8Weight:
        return cls(*q.quantize_int8(weight), expansion)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None, gelu: str | None = None,
                 keep_compute_dtype: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
        records = q.records_grad(x)
        if self.on_device:
            return _bias_gelu(kernels.int8_linear(x, self.q, self.scale), bias, gelu)
        if self.expands and (x.numel() >= q.INT8_DENSE_ROWS * self.in_features or records):
            return q.int8_dense_matmul(x, self.q, self.expansion_scale, bias, gelu, keep_compute_dtype,
                                       dtype=self.expansion)
        if self.gemv and not records:
            out = q.gemv(torch.ops.energon_hf.int8_gemv, x, self.q, self.scale)
        elif self.kernel_scale is not None and self.group_size == self.in_features:  # per-channel scales only
            out = q.int8_matmul(x, self.q, self.kernel_scale[:, 0])
        else:
            out = q.int8_linear(x, self.q, self.scale)
        return _bias_gelu(out, bias, gelu)

    def bare_product(self, rows: int) -> Product:
        """As DenseWeight.bare_product."""
        if self.expands and rows >= q.INT8_DENSE_ROWS:
            weights, expansion = (self.q, self.expansion_scale), self.expansion
            return lambda x: q.int8_dense_matmul(x, *weights, dtype=expansion)
        if self.gemv:
            return _gemv_product(torch.ops.energon_hf.int8_gemv, (self.q, self.scale))
        return self

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * (4 + (2 if self.kernel_scale is not None else 0))

    @property
    def streamed_nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * 4


class Int4Weight:
    """w = (q - 8) * scale + zero, one scale and zero per `group_size` input features of a row.

    On CPU it takes one of two forms at load. With the compiled GEMV: nibbles and a float16 (scale, min) table,
    which products of fewer than INT4_DENSE_ROWS rows multiply in float32 (csrc/gemv.cpp) and larger ones (and
    products autograd records) expand to `expansion` for the dense GEMM. Without it: torch's packed int4 kernel
    (bfloat16 activations), or with a float32 `expansion` the dequantized weight. Where the Triton kernels run
    (CUDA): nibbles and the table, every product through kernels.int4_linear. Other devices dequantize on the
    fly."""

    def __init__(self, q4: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 expansion: torch.dtype = q.CPU_COMPUTE_DTYPE):
        """`expansion`: bfloat16 (oneDNN's GEMM, where torch's bfloat16 GEMM is oneDNN's) or float32 (exact: the
        layers of Quantization(exact=True))."""
        self.out_features, self.in_features = q4.shape
        self.group_size = self.in_features // scale.shape[1]
        self.nibbles = self.table = self.packed = self.scales_and_zeros = self.parts = None
        self.expansion = expansion
        exact = expansion == torch.float32
        self.on_device = _device_kernels(q4.device)
        cpu = q4.device.type == "cpu" and not self.on_device
        self.expands = cpu and (exact or q.fast_bfloat16_gemm())
        if self.on_device or (cpu and q.gemv_available()):
            self.nibbles, self.table = q.pack_nibbles(q4, self.group_size), q.scales_and_mins(scale, zero)
        elif not exact and q.int4_kernel_fits(self.out_features, self.in_features, self.group_size, q4.device):
            self.packed, self.scales_and_zeros = q.pack_int4(q4, scale, zero)
        else:  # other devices and shapes, and exact products without the compiled ops: dequantized on the fly
            self.parts = (q4, scale.float(), zero.float())

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int,
                 expansion: torch.dtype = q.CPU_COMPUTE_DTYPE) -> Int4Weight:
        return cls(*q.quantize_int4(weight, group_size), expansion)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None, gelu: str | None = None,
                 keep_compute_dtype: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.on_device:
            out = kernels.int4_linear(x, self.nibbles, self.table, self.group_size)
        elif self.nibbles is not None:
            many = x.numel() >= q.INT4_DENSE_ROWS * self.in_features and self.expands
            if many or q.records_grad(x):
                return q.int4_dense_matmul(x, self.nibbles, self.table, self.group_size, bias, gelu,
                                           keep_compute_dtype, dtype=self.expansion)
            out = q.gemv(torch.ops.energon_hf.int4_gemv, x, self.nibbles, self.table, self.group_size)
        elif self.packed is not None:
            out = q.int4_matmul(x, self.packed, self.scales_and_zeros, self.group_size)
        else:
            out = F.linear(x, q.dequantize_int4(*self.parts, x.dtype))
        return _bias_gelu(out, bias, gelu)

    def bare_product(self, rows: int) -> Product:
        """As DenseWeight.bare_product."""
        if self.nibbles is None or self.on_device:
            return self
        weights, expansion = (self.nibbles, self.table, self.group_size), self.expansion
        if rows >= q.INT4_DENSE_ROWS and self.expands:
            return lambda x: q.int4_dense_matmul(x, *weights, dtype=expansion)
        return _gemv_product(torch.ops.energon_hf.int4_gemv, weights)

    @property
    def nbytes(self) -> int:
        return self.streamed_nbytes

    @property
    def streamed_nbytes(self) -> int:
        held = (self.nibbles, self.table) if self.nibbles is not None else \
            (self.packed, self.scales_and_zeros) if self.packed is not None else self.parts
        return sum(t.numel() * t.element_size() for t in held)


class RowSplitWeight:
    """Products of fewer than `rows` rows through `few`, the others through `many`, two forms of one weight: a
    GGUF's 8-bit vocabulary head (a third of the bytes a decode step streams) beside the float table a tied head
    keeps for lookups anyway (kernels/quantized.INT8_HEAD_GEMV_ROWS: where the two cross)."""

    def __init__(self, few: LinearWeight, many: LinearWeight, rows: int):
        self.few, self.many, self.rows = few, many, rows
        self.out_features, self.in_features = few.out_features, few.in_features

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None, gelu: str | None = None,
                 keep_compute_dtype: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
        return (self.few if x.numel() < self.rows * self.in_features else self.many)(x, bias, gelu,
                                                                                      keep_compute_dtype, out)

    @property
    def nbytes(self) -> int:
        """`few`'s bytes: `many` is the table the model holds anyway (counted with the parameters)."""
        return self.few.nbytes

    @property
    def streamed_nbytes(self) -> int:
        return self.few.streamed_nbytes


LinearWeight = DenseWeight | PanelWeight | Int8Weight | Int4Weight | RowSplitWeight


def _device_kernels(device: torch.device) -> bool:
    """Whether a quantized weight on `device` multiplies through the dispatch's Triton kernels (CUDA with the triton
    package; on CPU only where ENERGON_HF_KERNELS=triton forces them, as the tests do under Triton's interpreter)."""
    return kernels.backend_for(device) == "triton" and triton_installed()


def _bias_gelu(out: torch.Tensor, bias: torch.Tensor | None, gelu: str | None) -> torch.Tensor:
    """The bias and GELU after a product that did not take them (the fused kernel where both are there)."""
    if gelu is None:
        return out if bias is None else out + bias
    return F.gelu(out, approximate=gelu) if bias is None else kernels.bias_gelu(out, bias, gelu)


def _gemv_product(op, weights: tuple) -> Product:
    """A compiled product called bare on contiguous 2-D rows: op(x, *weights) (the GEMVs take and return every dtype
    of compiled.DTYPES; the panel product float32)."""
    return lambda x: op(x, *weights)


def linear_format(weight: torch.Tensor, plan: FormatPlan, name: str) -> LinearWeight | None:
    """The format of a linear layer's loaded weight; None: keep the plain parameter (`pack` off)."""
    quantization = plan.quantization
    if quantization is None:
        if not plan.pack:
            return None
        return PanelWeight(weight) if plan.panels and panels_pay(weight) else DenseWeight(weight)
    if quantization.method == "int8":
        return Int8Weight.quantize(weight, quantization.expansion)
    if weight.shape[1] % quantization.group_size:
        raise ValueError(f"{name}: {weight.shape[1]} input features (on this rank) are not a multiple of the "
                         f"int4 group size {quantization.group_size}; use quantization='int8', or a tp that "
                         f"splits the layer at group boundaries")
    return Int4Weight.quantize(weight, quantization.group_size, quantization.expansion)


def panels_pay(weight: torch.Tensor) -> bool:
    """Whether a float32 weight goes into column panels here: on CPU where the panel kernel is built and the weight
    would otherwise stay plain (oneDNN's packing, where it pays, was measured against F.linear only)."""
    return weight.dtype == torch.float32 and weight.device.type == "cpu" and not onednn_packing_pays(weight.dtype) \
        and panels.available()


@dataclass(frozen=True)
class FormatPlan:
    """What the loader makes of each layer's weight once it is loaded (`finish_loading` on the layer)."""

    quantization: Quantization | None = None
    pack: bool = True  # off when the weights are to be saved (the packed forms are device-specific)
    tied_head: str | None = None  # the embedding that is also the vocabulary head, on the rank that runs it
    # float32 layers in column panels where they pay (`panels_pay`): a generating model's, whose decode steps are
    # products of a few rows; an encoder's products of thousands of rows run faster through torch's GEMM.
    panels: bool = False


def weight_bytes(model: torch.nn.Module, streamed: bool = False) -> int:
    """Bytes of the weights this rank holds: loaded parameters and the layers' weight formats (`streamed`: only
    the forms that a product of few rows reads)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
    formats = (getattr(m, attr, None) for m in model.modules() for attr in ("format", "head"))
    return params + sum(f.streamed_nbytes if streamed else f.nbytes for f in formats if f is not None)
