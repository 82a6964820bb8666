"""float32 weights in column panels (kernels/panels.py, csrc/panel_gemm.cpp): the compiled product against float64,
the PanelWeight format, and which models hold their layers that way."""

import pytest
import torch
import torch.nn.functional as F
from helpers import MIXED_LENGTHS, assert_forward_matches, assert_greedy_matches, padded_batch

from energon_hf import EnergonModel
from energon_hf.kernels import panels
from energon_hf.kernels.linear import BUFFERED_ROWS, amx_cpu
from energon_hf.nn.formats import DenseWeight, FormatPlan, PanelWeight, linear_format, panels_pay

needs_panels = pytest.mark.skipif(not panels.available(), reason="the panel kernel needs the compiled ops and AVX-512")
# Where models take panels: the kernel runs and float32 weights would otherwise stay plain (Xeons with AMX).
panels_here = pytest.mark.skipif(not panels_pay(torch.empty(1, 1)), reason="float32 weights take no panels here")


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected).abs().max() / expected.abs().max()).item()


def test_pack_holds_the_weight_in_panels_of_32_outputs():
    weight = torch.randn(50, 7)
    held = panels.pack(weight)
    assert held.shape == (2, 7, panels.PANEL)
    assert torch.equal(held[1, 3, 17], weight[32 + 17, 3])  # panel 1 holds outputs 32..63, input 3 at row 3
    assert (held[1, :, 50 - 32:] == 0).all()  # outputs past 50: zeros
    assert torch.equal(panels.unpack(held, 50), weight)


@needs_panels
@pytest.mark.parametrize("out_features,in_features", [(50, 37), (96, 64), (7, 3), (48, 16), (80, 16)])
def test_panel_product_matches_float64(out_features, in_features):
    """Every tile shape: 1-6 rows (two panels at a time, an odd panel count's last one alone), 7-12 rows, balanced
    tiles past 12 (13 = 7 + 6), past the 512-row block; a last panel holding fewer than 16, exactly 16, or 32
    outputs; sums started from the bias. Within 1e-5 of the float64 product (float32 accumulation over k, in
    order)."""
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features, dtype=torch.float64)
    bias = torch.randn(out_features, dtype=torch.float64)
    held = panels.pack(weight.float())
    for rows in (1, 2, 5, 6, 7, 12, 13, 25, 520):
        x = torch.randn(rows, in_features, dtype=torch.float64)
        for b in (None, bias):
            got = panels.linear(x.float(), held, out_features, None if b is None else b.float())
            assert got.shape == (rows, out_features) and got.dtype == torch.float32
            assert relative_error(got, F.linear(x, weight, b)) < 1e-5, (rows, b is None)


@needs_panels
def test_panel_product_of_empty_rows_and_features_and_into_a_buffer():
    held = panels.pack(torch.randn(40, 16))
    assert panels.linear(torch.randn(2, 0, 16), held, 40).shape == (2, 0, 40)
    assert torch.equal(panels.linear(torch.randn(3, 0), panels.pack(torch.randn(40, 0)), 40), torch.zeros(3, 40))
    x, out = torch.randn(BUFFERED_ROWS, 16), torch.empty(BUFFERED_ROWS, 40)
    got = panels.linear(x, held, 40, out=out)
    assert got.data_ptr() == out.data_ptr() and torch.allclose(got, x @ panels.unpack(held, 40).t(), atol=1e-5)
    fewer = panels.linear(x[:3], held, 40, out=out)  # decode-sized products keep their own output
    assert fewer.data_ptr() != out.data_ptr()


@needs_panels
def test_panel_product_refuses_what_it_cannot_read():
    held = panels.pack(torch.randn(40, 16))
    with pytest.raises(RuntimeError, match="x must be contiguous 2-D float32"):
        torch.ops.energon_hf.panel_linear(torch.randn(3, 32)[:, ::2], held, 40, None)
    with pytest.raises(RuntimeError, match="panels must be"):
        torch.ops.energon_hf.panel_linear(torch.randn(3, 8), held, 40, None)
    with pytest.raises(RuntimeError, match="cannot hold 70 outputs"):
        torch.ops.energon_hf.panel_linear(torch.randn(3, 16), held, 70, None)
    with pytest.raises(RuntimeError, match="bias must be"):
        torch.ops.energon_hf.panel_linear(torch.randn(3, 16), held, 40, torch.randn(39))


@needs_panels
def test_panel_weight_format_products():
    """Bias and GELU, 3-D rows, the decode loop's bare product, and a product autograd records (F.linear on the
    weight rebuilt: x gets F.linear's gradient)."""
    torch.manual_seed(0)
    weight, bias = torch.randn(40, 24), torch.randn(40)
    fmt = PanelWeight(weight)
    assert fmt.nbytes == 2 * 24 * 32 * 4  # two panels, the second padded
    x = torch.randn(2, 3, 24)
    assert relative_error(fmt(x, bias, "tanh"), F.gelu(F.linear(x.double(), weight.double(), bias.double()),
                                                        approximate="tanh")) < 1e-5
    rows = torch.randn(5, 24)
    assert torch.equal(fmt.bare_product(5)(rows), fmt(rows))
    x = torch.randn(4, 24, requires_grad=True)
    fmt(x, bias).sum().backward()
    assert torch.allclose(x.grad, weight.sum(0).expand(4, -1), atol=1e-5)


def test_only_generating_models_plan_panels():
    """float32 weights go into panels where a generating model loads them and the kernel runs; encoders, other
    dtypes and saved (unpacked) weights keep their forms."""
    weight = torch.randn(64, 32)
    if panels.available() and amx_cpu():
        assert panels_pay(weight)
    assert isinstance(linear_format(weight, FormatPlan(panels=True), "w"), PanelWeight if panels_pay(weight)
                      else DenseWeight)
    assert isinstance(linear_format(weight, FormatPlan(panels=False), "w"), DenseWeight)
    assert isinstance(linear_format(weight.bfloat16(), FormatPlan(panels=True), "w"), DenseWeight)
    assert linear_format(weight, FormatPlan(pack=False, panels=True), "w") is None


@panels_here
def test_gpt2_layers_in_panels_match_transformers(tiny):
    """GPT-2's biases and tanh GELU through the panel products: forward within the parity bound, greedy tokens
    equal; GPT2Model (no head, nothing to generate) keeps plain weights."""
    ours, hf = EnergonModel.from_pretrained(tiny.make("GPT2LMHeadModel"), dtype="float32"), tiny.hf("GPT2LMHeadModel")
    block = ours.model.layer_list[0]
    assert all(isinstance(m.format, PanelWeight) for m in (block.attn.qkv, block.attn.proj, block.fc, block.proj))
    ids, mask = padded_batch(MIXED_LENGTHS, 128, "left")
    assert_forward_matches(ours, hf, ids, mask)
    assert_greedy_matches(ours, hf, ids, mask, max_new_tokens=8)
    encoder = EnergonModel.from_pretrained(tiny.make("GPT2Model"), dtype="float32")
    assert isinstance(encoder.model.layer_list[0].fc.format, DenseWeight)
