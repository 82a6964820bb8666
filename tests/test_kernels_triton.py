"""Triton kernels (padding, fused activations, norms) against their torch versions and naive formulas, run by
Triton's interpreter on CPU (TRITON_INTERPRET=1 is set in conftest.py before any kernel module is imported).
The same tests run on a GPU when there is one (bench/gpu_kernels.py)."""

import os

import pytest
import torch

from energon_hf import kernels

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


@pytest.fixture(autouse=True)
def force_triton(monkeypatch):
    monkeypatch.setenv("ENERGON_HF_KERNELS", "triton")


def _torch(op, *args):
    return getattr(kernels.padding, op)(*args)


def _mask(lengths, seqlen, side):
    """[B, S] 0/1 mask; a row of length 0 has no real token at all."""
    cols = torch.arange(seqlen)[None, :]
    n = torch.tensor(lengths)[:, None]
    return (cols < n if side == "right" else cols >= seqlen - n).long()


@pytest.mark.parametrize("shape_tail", [(7,), (33,), (1500,), (), (3, 5)], ids=["h7", "h33", "h1500", "ids", "3d"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("lengths", [[1], [1, 4, 2], [0, 3, 4]], ids=["T=1", "mixed", "empty-row"])
def test_remove_and_rebuild_match_torch(shape_tail, side, lengths):
    seqlen = 4
    x = torch.randn(len(lengths), seqlen, *shape_tail, device=DEVICE)
    if not shape_tail:
        x = torch.randint(0, 1000, (len(lengths), seqlen), device=DEVICE)
    mask = _mask(lengths, seqlen, side).to(DEVICE)
    got = kernels.remove_padding(x, mask)
    expected = _torch("remove_padding", x, mask)
    for g, e in zip(got[:3], expected[:3], strict=True):
        assert torch.equal(g, e)
    assert got[3] == expected[3]
    rebuilt = kernels.rebuild_padding(got[0], got[1], len(lengths), seqlen)
    assert torch.equal(rebuilt, _torch("rebuild_padding", expected[0], expected[1], len(lengths), seqlen))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int32])
def test_dtypes(dtype, mask_dtype):
    x = torch.randn(3, 5, 12, device=DEVICE).to(dtype)
    mask = _mask([5, 2, 3], 5, "right").to(DEVICE, mask_dtype)
    packed, indices, cu, _ = kernels.remove_padding(x, mask)
    assert packed.dtype == dtype and torch.equal(packed, x[mask.bool()])
    assert torch.equal(kernels.rebuild_padding(packed, indices, 3, 5), x * mask[..., None].to(dtype))


def test_errors_match_torch():
    with pytest.raises(ValueError, match="shape"):
        kernels.remove_padding(torch.zeros(2, 3, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match="indices"):
        kernels.rebuild_padding(torch.zeros(3, 4), torch.tensor([0, 1]), 1, 4)


WIDTHS = [7, 33, 1500]  # not powers of two; 1500 spans two column blocks


def _naive_gelu(v: torch.Tensor, approximate: str) -> torch.Tensor:
    v = v.double()
    if approximate == "tanh":
        return 0.5 * v * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (v + 0.044715 * v**3)))
    return 0.5 * v * (1 + torch.erf(v / 2**0.5))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("rows", [1, 5])
def test_bias_gelu(approximate, width, rows):
    x, bias = torch.randn(rows, width, device=DEVICE), torch.randn(width, device=DEVICE)
    got = kernels.bias_gelu(x, bias, approximate)
    assert (got - kernels.elementwise.bias_gelu(x, bias, approximate)).abs().max() < 1e-5
    assert (got.double() - _naive_gelu(x + bias, approximate)).abs().max() < 1e-5


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_and_mul(width, dtype):
    x = torch.randn(3, 2 * width, device=DEVICE).to(dtype)
    got = kernels.silu_and_mul(x)
    gate, up = x.double().chunk(2, dim=-1)
    naive = gate * torch.sigmoid(gate) * up
    assert got.shape == (3, width) and got.dtype == dtype
    assert (got.double() - naive).abs().max() < (1e-5 if dtype == torch.float32 else 2e-2)
    assert (got - kernels.elementwise.silu_and_mul(x)).abs().max() < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("rows", [1, 4])
def test_layer_norm_and_rms_norm(width, rows):
    x = torch.randn(rows, width, device=DEVICE) * 3 + 1
    weight, bias = torch.randn(width, device=DEVICE), torch.randn(width, device=DEVICE)
    got = kernels.layer_norm(x, weight, bias, 1e-5)
    naive = (x.double() - x.double().mean(-1, keepdim=True)) / torch.sqrt(x.double().var(-1, unbiased=False,
                                                                                    keepdim=True) + 1e-5)
    assert (got.double() - (naive * weight.double() + bias.double())).abs().max() < 1e-4
    assert (got - kernels.elementwise.layer_norm(x, weight, bias, 1e-5)).abs().max() < 1e-5
    residual, proj_bias = torch.randn(rows, width, device=DEVICE), torch.randn(width, device=DEVICE)
    for extra in (None, proj_bias):
        got = kernels.add_layer_norm(x, residual, extra, weight, bias, 1e-5)
        expected = kernels.elementwise.add_layer_norm(x.cpu(), residual.cpu(), None if extra is None else extra.cpu(),
                                                      weight.cpu(), bias.cpu(), 1e-5)
        assert (got.cpu() - expected).abs().max() < 1e-5
    got = kernels.rms_norm(x, weight, 1e-6)
    naive = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * weight.double()
    assert (got.double() - naive).abs().max() < 1e-4
    assert (got - kernels.elementwise.rms_norm(x, weight, 1e-6)).abs().max() < 1e-5


def test_elementwise_errors():
    with pytest.raises(ValueError, match="even last dimension"):
        kernels.silu_and_mul(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="approximate"):
        kernels.bias_gelu(torch.zeros(2, 4), torch.zeros(4), "fast")


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    INTERPRETED, reason="the interpreter's tl.dot multiplies bf16 bit patterns (triton-lang/triton#11584); "
                        "bench/gpu_kernels.py runs this on CUDA"))])
def test_attention_half_precision(dtype):
    """Half inputs: products in the tensor-core precision, softmax and accumulation in float32."""
    lengths, heads, kv_heads, dim = [5, 33, 1], 4, 2, 16
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(sum(lengths), h, dim, device=DEVICE) for h in (heads, kv_heads, kv_heads))
    got = kernels.varlen_attention(q.to(dtype), k.to(dtype), v.to(dtype), cu, max(lengths), True)
    expected = kernels.attention.varlen_attention(q, k, v, cu, max(lengths), True)
    assert got.dtype == dtype and (got.float() - expected).abs().max() < 2e-2


@pytest.mark.parametrize("rows", [1, 20, 70])  # a decode row, a 64-row block with a masked tail, two blocks
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantized_products_equal_the_dequantized_reference(rows, dtype):
    """int4 nibbles with a (scale, min) table per group (32 and 64) and int8 with per-channel or grouped scales
    (plus a width no block divides: the reference runs): x @ W^T in x's dtype, equal to F.linear on the
    dequantized weight to float32 rounding (float16: the weight tile is rounded to float16 for the product)."""
    from energon_hf.kernels import quantized as q

    torch.manual_seed(rows)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    x = torch.randn(rows, 128).to(DEVICE, dtype)
    w = torch.randn(70, 128)

    def check(got, weight):
        expected = x.double() @ weight.double().t()
        assert got.dtype == dtype and got.shape == expected.shape
        assert (got.double() - expected).abs().max() <= tolerance * expected.abs().max()

    for group in (32, 64, 128):
        q4, scale, zero = q.quantize_int4(w, group)
        nibbles, table = q.pack_nibbles(q4, group).to(DEVICE), q.scales_and_mins(scale, zero).to(DEVICE)
        check(kernels.int4_linear(x, nibbles, table, group), q.dequantize_int4(q4, scale, zero))
    q4, scale, zero = q.quantize_int4(w, 32)  # 3-D rows, as a model's [batch, tokens, hidden] would come
    got = kernels.int4_linear(x.view(1, rows, 128), q.pack_nibbles(q4, 32).to(DEVICE),
                              q.scales_and_mins(scale, zero).to(DEVICE), 32)
    assert got.shape == (1, rows, 70)
    check(got[0], q.dequantize_int4(q4, scale, zero))
    q8, scale = q.quantize_int8(w)
    for scales in (scale.float().reshape(70, 1), torch.rand(70, 4), torch.rand(70, 16)):  # 16: groups of 8
        q8d, scales = q8.to(DEVICE), scales.contiguous().to(DEVICE)
        check(kernels.int8_linear(x, q8d, scales), q.dequantize_int8(q8d, scales))
