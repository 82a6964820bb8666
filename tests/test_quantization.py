"""Weight-only int8 / int4 quantization, measured rather than assumed: the formats against their own
dequantized weights, tiny random models and SmolLM2 within quality bounds of their float32 model, a GGUF's
4-bit and 8-bit blocks loaded as they are, Llama's decode loop against its modules, tensor and pipeline
parallelism, pipeline(), and the server's flags."""

import math
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import transformers
from helpers import MIXED_LENGTHS, padded_batch
from test_parity_llama import LLAMA_TINY
from test_parity_llama_family import save_tiny
from test_server import AUTH, start_server

from energon_hf import EnergonModel, pipeline
from energon_hf.convert import convert
from energon_hf.converters.gguf_blocks import BLOCKS_FILE, GGUFBlocks, decode_q4
from energon_hf.evaluate import agreement, forced_agreement, greedy_tokens, perplexity
from energon_hf.kernels import compiled
from energon_hf.kernels import quantized as q
from energon_hf.models.llama_decode import LlamaDecodeLoop
from energon_hf.nn.formats import DenseWeight, Int4Weight, Int8Weight, Quantization

ALICE = Path(__file__).resolve().parents[1] / "bench" / "data" / "alice_chapter1.txt"
# Tiny random Llama (hidden 64, intermediate 128 so that tp=2 splits int4 groups evenly).
LLAMA_Q = {**LLAMA_TINY, "intermediate_size": 128}
# Relative RMS error of the logits against float32, tiny Llama initialised at 0.02 (measured: int8 0.6 %, int4 7.5 %).
LOGIT_ERROR = {"int8": 0.02, "int4": 0.15}


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).pow(2).mean().sqrt() / expected.float().pow(2).mean().sqrt()).item()


# -- formats ----------------------------------------------------------------------------------------------
# Products of fewer than INT8_DENSE_ROWS / INT4_DENSE_ROWS rows run the compiled float32 kernels where they
# built (float32 rounding only); torch's CPU kernels, and the expansions for many rows, compute with bfloat16
# activations.
EXACT, BFLOAT16 = 1e-6, 0.01


@pytest.mark.parametrize("rows,cols", [(64, 96), (48, 64), (5, 32)])  # 48, 5 rows: no torch int4 packing
def test_formats_compute_their_own_dequantized_weights(rows, cols):
    torch.manual_seed(0)
    weight, x, bias = torch.randn(rows, cols), torch.randn(7, cols), torch.randn(rows)
    q8, scale8 = q.quantize_int8(weight)
    assert relative_error(q.dequantize_int8(q8, scale8), weight) < 0.01
    q4, scale4, zero4 = q.quantize_int4(weight, 32)
    assert q4.max() <= 15 and relative_error(q.dequantize_int4(q4, scale4, zero4), weight) < 0.12
    for fmt, dense in ((Int8Weight(q8, scale8), q.dequantize_int8(q8, scale8)),
                       (Int4Weight(q4, scale4, zero4), q.dequantize_int4(q4, scale4, zero4)),
                       (DenseWeight(weight), weight)):
        expected = torch.nn.functional.linear(x, dense, bias)
        got = fmt(x, bias)
        assert got.dtype == x.dtype and got.shape == expected.shape
        exact = compiled.available() or isinstance(fmt, DenseWeight) or fmt.in_features % 32
        assert relative_error(got, expected) < (EXACT if exact else BFLOAT16)


@pytest.mark.parametrize("gelu", ["none", "tanh"])
@pytest.mark.parametrize("rows", [3, 64])  # few rows: the GEMV or F.linear, then GELU; many: oneDNN's epilogue
def test_formats_fuse_bias_and_gelu(rows, gelu):
    """A Linear with a GELU hands it to its weight format (BERT's and GPT-2's MLP up-projections): the product
    with bias and GELU equals F.gelu(F.linear(...)) on the format's own weight, the expansions' bias and GELU
    in bfloat16 included."""
    torch.manual_seed(0)
    weight, x, bias = torch.randn(64, 96), torch.randn(rows, 96), torch.randn(64)
    q8, scale8 = q.quantize_int8(weight)
    q4, scale4, zero4 = q.quantize_int4(weight, 32)
    for fmt, dense in ((Int8Weight(q8, scale8), q.dequantize_int8(q8, scale8)),
                       (Int4Weight(q4, scale4, zero4), q.dequantize_int4(q4, scale4, zero4)),
                       (DenseWeight(weight), weight), (DenseWeight(weight.bfloat16()), weight.bfloat16().float())):
        expected = torch.nn.functional.gelu(torch.nn.functional.linear(x, dense, bias), approximate=gelu)
        dtype = fmt.dtype if isinstance(fmt, DenseWeight) else torch.float32
        got = fmt(x.to(dtype), bias.to(dtype), gelu)
        assert got.shape == expected.shape
        assert relative_error(got.float(), expected) < (1e-5 if got.dtype == torch.float32 and (
            isinstance(fmt, DenseWeight) or rows < q.INT8_DENSE_ROWS or not q.fast_bfloat16_gemm()) else BFLOAT16)


def test_an_mlp_up_projection_hands_bfloat16_to_the_next_product(tiny):
    """BERT's int8 MLP: the up-projection (feeds_product) returns its expanded product's bfloat16 to the down
    projection, which would round it so anyway: the layer's output equals the float32 hand-over's bit for bit."""
    model = EnergonModel.from_pretrained(tiny.make("BertModel"), quantization="int8")
    fc = model.model.layers[0].fc
    seen = []
    fc.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    ids = torch.randint(0, 100, (2, 20))
    with torch.inference_mode():
        kept = model(input_ids=ids).last_hidden_state
        for layer in model.model.layers:
            layer.fc.feeds_product = False
        converted = model(input_ids=ids).last_hidden_state
    expands = q.fast_bfloat16_gemm()
    assert seen == ([torch.bfloat16, torch.float32] if expands else [torch.float32] * 2)
    assert torch.equal(kept, converted)


@pytest.mark.skipif(not compiled.available(), reason="no C++ compiler: the compiled CPU ops cannot build here")
@pytest.mark.parametrize("rows", [1, 5, q.INT4_DENSE_ROWS - 1, q.INT4_DENSE_ROWS, 100])
def test_int4_products_run_exact_below_dense_rows_and_expand_above(rows, monkeypatch):
    """Below INT4_DENSE_ROWS rows an int4 product runs the compiled float32 kernel; from there on it expands the
    weight to bfloat16 (from the same nibbles and float16 table) for the dense GEMM. The format holds only that
    form: no copy packed for torch's kernel."""
    torch.manual_seed(0)
    weight, x = torch.randn(64, 96), torch.randn(rows, 96)
    q4, scale, zero = q.quantize_int4(weight, 32)
    fmt, dense = Int4Weight(q4, scale, zero), q.int4_dense_matmul
    assert fmt.packed is None and fmt.nbytes == 64 * 48 + 64 * 3 * 2 * 2  # nibbles, (scale, min) in float16
    exact = q.dequantize_int4(q4, scale, zero)
    expanded = torch.empty(64, 96, dtype=torch.bfloat16)
    torch.ops.energon_hf.dequantize_int4_into(fmt.nibbles, fmt.table, 32, expanded)
    assert torch.allclose(expanded.float(), exact, rtol=2**-8, atol=1e-6)  # one bfloat16 rounding
    dense_calls = []
    monkeypatch.setattr(q, "int4_dense_matmul", lambda *args, **kw: dense_calls.append(kw) or dense(*args, **kw))
    got = fmt(x)
    expands = rows >= q.INT4_DENSE_ROWS and q.fast_bfloat16_gemm()
    assert len(dense_calls) == expands  # the threshold picks the path
    assert got.dtype == torch.float32 and relative_error(got, x @ exact.t()) < (BFLOAT16 if expands else EXACT)
    # "int4-exact": the same turn, to a float32 expansion (exact: the bfloat16 one errs 1e-3 here)
    exact_fmt, dense_calls[:] = Int4Weight(q4, scale, zero, torch.float32), []
    assert relative_error(exact_fmt(x), x @ exact.t()) < EXACT
    assert dense_calls == ([{"dtype": torch.float32}] if rows >= q.INT4_DENSE_ROWS else [])
    with pytest.raises(RuntimeError, match="do not split into groups"):
        torch.ops.energon_hf.dequantize_int4_into(fmt.nibbles, fmt.table, 64 * 3, expanded)


def test_int8_without_the_vector_gemv_keeps_torchs_kernel(monkeypatch):
    """Where the compiled ops build without the GEMV's vector code, few-row int8 products run torch's int8 kernel
    (bfloat16 scales), not a dequantization of the whole matrix per call."""
    monkeypatch.setattr(q, "gemv_available", lambda: False)
    torch.manual_seed(0)
    fmt, calls, original = Int8Weight.quantize(torch.randn(64, 96)), [], q.int8_matmul
    monkeypatch.setattr(q, "int8_matmul", lambda *args: calls.append(args) or original(*args))
    x = torch.randn(2, 96)
    assert relative_error(fmt(x), x @ q.dequantize_int8(fmt.q, fmt.scale).t()) < BFLOAT16 and len(calls) == 1


@pytest.mark.skipif(not compiled.available(), reason="no C++ compiler: the compiled CPU ops cannot build here")
@pytest.mark.parametrize("cols", [96, 40])  # 40: groups and rows shorter than the 16-wide vector steps
def test_compiled_expansions_round_once(cols):
    """dequantize_int8_into (per channel, in groups) and dequantize_int4_into give the dequantized weight rounded
    once to bfloat16 (torch's `q * scale` with a bfloat16 scale rounds twice), or in float32 (the exact
    quantizations' expansions); wrong targets are named."""
    torch.manual_seed(0)
    q8 = torch.randint(-127, 128, (33, cols), dtype=torch.int8)
    weight = torch.randn(33, cols)
    q4, scale4, zero = q.quantize_int4(weight, cols // 4 if cols % 32 else 32)
    fmt = Int4Weight(q4, scale4, zero)
    exact = q.dequantize_int4(q4, scale4, zero)  # (q - 8) * scale + zero: float32 rounding apart from q * scale + min
    for dtype in (torch.bfloat16, torch.float32):
        for scale in (torch.rand(33, 1) / 100, torch.rand(33, cols // 8) / 100):
            expanded = torch.empty(33, cols, dtype=dtype)
            torch.ops.energon_hf.dequantize_int8_into(q8, scale, expanded)
            assert torch.equal(expanded, q.dequantize_int8(q8, scale).to(dtype))
        expanded = torch.empty(33, cols, dtype=dtype)
        torch.ops.energon_hf.dequantize_int4_into(fmt.nibbles, fmt.table, fmt.group_size, expanded)
        rounding = 2**-8 if dtype == torch.bfloat16 else 1e-6
        assert torch.allclose(expanded.float(), exact, rtol=rounding, atol=1e-6)
    with pytest.raises(RuntimeError, match="weight must be a contiguous .* bfloat16 or float32 tensor"):
        torch.ops.energon_hf.dequantize_int8_into(q8, torch.rand(33, 1), torch.empty(33, cols, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="scale must be a contiguous"):
        torch.ops.energon_hf.dequantize_int8_into(q8, torch.rand(33, 7), expanded)


@pytest.mark.parametrize("rows", [1, q.INT8_DENSE_ROWS - 1, q.INT8_DENSE_ROWS])
def test_int8_products_of_many_rows_expand_the_weight(rows, monkeypatch):
    """int8 takes the same turns as int4, at INT8_DENSE_ROWS (without the compiled ops: torch's int8 kernel below). A
    grouped weight that never expands (a GGUF Q8_0 head) runs every product in float32, an "int8-exact" one
    expands to float32."""
    torch.manual_seed(0)
    weight, x = torch.randn(64, 96), torch.randn(rows, 96)
    fmt, dense, calls = Int8Weight.quantize(weight), q.int8_dense_matmul, []
    blocks = torch.randint(-127, 128, (64, 96), dtype=torch.int8), torch.rand(64, 3)
    head, grouped = Int8Weight(*blocks, expansion=None), Int8Weight(*blocks, expansion=torch.float32)
    monkeypatch.setattr(q, "int8_dense_matmul", lambda *args, **kw: calls.append(kw) or dense(*args, **kw))
    got = fmt(x)
    expands = rows >= q.INT8_DENSE_ROWS and q.fast_bfloat16_gemm()
    assert len(calls) == expands
    bound = EXACT if compiled.available() and not expands else BFLOAT16
    assert got.dtype == torch.float32 and relative_error(got, x @ q.dequantize_int8(fmt.q, fmt.scale).t()) < bound
    assert grouped.group_size == 32
    calls.clear()
    assert relative_error(head(x), x @ q.dequantize_int8(*blocks).t()) < EXACT and calls == []
    assert relative_error(grouped(x), x @ q.dequantize_int8(*blocks).t()) < EXACT
    many = rows >= q.INT8_DENSE_ROWS and compiled.available()
    assert calls == ([{"dtype": torch.float32}] if many else [])


def test_products_autograd_records_stay_differentiable():
    """The compiled kernels have no backward: a product autograd records takes a differentiable path (the
    bfloat16 expansion, the exact formats' float32 one, or torch's float16 product) and gives x its gradient
    (torch's own int4 kernel, the path without them, has no derivative); empty inputs keep their shape."""
    torch.manual_seed(0)
    weight = torch.randn(64, 96)
    exact = (Int8Weight.quantize(weight, torch.float32), Int4Weight.quantize(weight, 32, torch.float32))
    for fmt in (Int8Weight.quantize(weight), Int4Weight.quantize(weight, 32), DenseWeight(weight.half()), *exact):
        dtype = torch.float16 if isinstance(fmt, DenseWeight) else torch.float32
        assert fmt(torch.empty(2, 0, 96, dtype=dtype)).shape == (2, 0, 64)
        if isinstance(fmt, Int4Weight) and fmt.nibbles is None and fmt.parts is None:
            continue
        x = torch.randn(3, 96, dtype=dtype, requires_grad=True)
        fmt(x).float().sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape, type(fmt).__name__
        if fmt in exact:  # d(sum x W^T)/dx: the column sums of the dequantized weight, in float32
            dense = fmt(torch.eye(96)).t()
            assert relative_error(x.grad, dense.sum(0).expand(3, -1)) < EXACT


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_plain_float_weights_take_the_gemv_for_its_row_counts(monkeypatch, dtype):
    """Plain float weights (float16: no oneDNN packing; float32 where packing does not pay) run the compiled kernel
    for the row counts of quantized.float_gemv_rows (float16 up to FLOAT16_GEMV_ROWS, float32 FLOAT32_GEMV_ROWS),
    F.linear for the others: float32 accumulation, rounded once to the weight's dtype, as F.linear."""
    torch.manual_seed(0)
    weight = torch.randn(40, 64).to(dtype)
    fmt = DenseWeight(weight)
    calls, original = [], torch.ops.energon_hf.float_gemv
    monkeypatch.setattr(torch.ops.energon_hf, "float_gemv", lambda *a: calls.append(a[0].shape[0]) or original(*a))
    counts = (1, 2, 3, 16, 17, q.FLOAT16_GEMV_ROWS, q.FLOAT16_GEMV_ROWS + 1)
    for rows in counts:
        x = torch.randn(rows, 64).to(dtype)
        got = fmt(x)
        assert got.dtype == dtype
        assert relative_error(got, x.float() @ weight.float().t()) < (1e-3 if dtype == torch.float16 else 1e-5)
    assert calls == [rows for rows in counts if fmt.gemv and rows in q.float_gemv_rows(dtype)]
    if fmt.gemv and dtype == torch.float16:
        assert calls[0] == 1 and calls[-1] == q.FLOAT16_GEMV_ROWS


@pytest.mark.skipif(not compiled.available(), reason="no C++ compiler: the compiled CPU ops cannot build here")
def test_expanded_int4_weights_share_one_buffer_safely():
    """Layers of different shapes take turns in the one expansion buffer; a product autograd records gets its
    own expanded weight, so backward reads the right one after the next layer has used the buffer."""
    torch.manual_seed(0)
    weights = [torch.randn(64, 96), torch.randn(32, 64), torch.randn(128, 96)]
    formats = [Int4Weight.quantize(w, 32) for w in weights]
    exact = [q.dequantize_int4(*q.quantize_int4(w, 32)) for w in weights]
    rows = q.INT4_DENSE_ROWS + 3
    for _ in range(2):
        for fmt, w in zip(formats, exact, strict=True):
            x = torch.randn(rows, w.shape[1])
            assert relative_error(fmt(x), x @ w.t()) < 0.01
    x = torch.randn(rows, 96, requires_grad=True)
    out = formats[0](x)
    formats[2](torch.randn(rows, 96))  # the next layer overwrites the shared buffer
    out.sum().backward()
    assert relative_error(x.grad, exact[0].sum(0).expand(rows, -1)) < 0.01


def test_quantization_names_and_group_errors():
    assert Quantization.parse(None) is None and Quantization.parse("none") is None
    assert Quantization.parse("INT4") == Quantization("int4", 32)
    exact = Quantization.parse("int4-exact")
    assert exact == Quantization("int4", 32, exact=True)
    assert str(exact) == "int4 (groups of 32), exact float32 products" and str(Quantization.parse("int8")) == "int8"
    with pytest.raises(ValueError, match="each also as '<method>-exact'"):
        Quantization.parse("int3-exact")
    with pytest.raises(ValueError, match="quantization must be None or one of"):
        Quantization.parse("int3")
    with pytest.raises(ValueError, match="group_size must be one of"):
        Quantization("int4", 16)
    with pytest.raises(ValueError, match="not a multiple of the int4 group size"):
        q.quantize_int4(torch.randn(16, 48), 32)


# -- tiny random models -----------------------------------------------------------------------------------
def fake_quantized(model: torch.nn.Module, method: str) -> torch.nn.Module:
    """transformers' model with each layer's linear weights replaced by their quantized-then-dequantized values
    (heads and embeddings untouched): the model our quantized layers should compute."""
    conv1d = transformers.pytorch_utils.Conv1D  # GPT-2 stores [in, out]
    for module in model.modules():
        if isinstance(module, torch.nn.Linear | conv1d) and module is not model.get_output_embeddings():
            weight = module.weight.data.t() if isinstance(module, conv1d) else module.weight.data
            weight = q.dequantize_int8(*q.quantize_int8(weight)) if method == "int8" \
                else q.dequantize_int4(*q.quantize_int4(weight, 32))
            module.weight.data = weight.t().contiguous() if isinstance(module, conv1d) else weight
    return model.eval()


def saved_llama(tmp_path_factory, **overrides):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama-q")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA_Q, **overrides})).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_q(tmp_path_factory):
    return saved_llama(tmp_path_factory)


def logits_on_real(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[mask.bool()]


@pytest.mark.parametrize("method", ["int8", "int4", "int8-exact", "int4-exact"])
def test_tiny_llama_computes_its_quantized_weights_within_bounds_of_float32(llama_q, tmp_path_factory, method):
    ours = EnergonModel.from_pretrained(llama_q, quantization=method)
    layer = ours.model.model.layers[0]
    base, exact = method.removesuffix("-exact"), method.endswith("-exact")
    kind = Int8Weight if base == "int8" else Int4Weight
    assert all(isinstance(m.format, kind) for m in (layer.self_attn.qkv, layer.self_attn.o_proj, layer.mlp.gate_up,
                                                   layer.mlp.down_proj))
    assert isinstance(ours.model.lm_head.head, DenseWeight) and ours.model.lm_head.head.dtype == torch.float32
    ids, mask = padded_batch(MIXED_LENGTHS[:5], 128, "left")  # 107 real rows: the products expand
    reference = fake_quantized(transformers.LlamaForCausalLM.from_pretrained(llama_q), base)
    got = logits_on_real(ours, ids, mask)
    assert got.dtype == torch.float32
    if exact:  # float32 expansions: transformers' float32 forward on the same weights, to the parity bound
        assert (got - logits_on_real(reference, ids, mask)).abs().max() <= 1e-4
        return
    # the same quantized weights: only the CPU kernels' bfloat16 activations differ (measured 1.5-1.6 %)
    assert relative_error(got, logits_on_real(reference, ids, mask)) < 0.03
    # quality: with a realistic init (0.02) the logits stay close to float32's (measured int8 0.6 %, int4 7.5 %)
    path = saved_llama(tmp_path_factory, initializer_range=0.02)
    quantized = logits_on_real(EnergonModel.from_pretrained(path, quantization=method), ids, mask)
    assert relative_error(quantized, logits_on_real(EnergonModel.from_pretrained(path), ids, mask)) < \
        LOGIT_ERROR[method]


def test_tiny_llama_int4_at_tp2_and_pp2_equals_tp1(llama_q):
    """int4 groups never straddle the row-parallel split here, so tp=2 holds exactly tp=1's quantized weights."""
    single = EnergonModel.from_pretrained(llama_q, quantization="int4")
    ids, mask = padded_batch(MIXED_LENGTHS[:5], 128, "left")
    expected = logits_on_real(single, ids, mask)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected_tokens = single.generate(ids, attention_mask=mask, **kwargs)[:, -8:].tolist()
    for tp, pp in ((2, 1), (1, 2)):
        with EnergonModel.from_pretrained(llama_q, tp=tp, pp=pp, quantization="int4", threads_per_rank=1) as ours:
            assert relative_error(logits_on_real(ours, ids, mask), expected) < 0.01  # bf16 sums in another order
            tokens = ours.generate(ids, attention_mask=mask, **kwargs)[:, -8:].tolist()
            assert agreement(tokens, expected_tokens) >= 0.75  # the decode path on quantized ranks


@pytest.mark.skipif(not compiled.available(), reason="no C++ compiler: the decode loop runs on the compiled ops")
@pytest.mark.parametrize("method,dtype,batch", [(None, "float32", 3), ("int8", "float32", 3), ("int4", "float32", 3),
                                                ("int4", "float32", q.INT4_DENSE_ROWS + 2),
                                                ("int8", "float32", q.INT8_DENSE_ROWS + 1),
                                                ("int8", "bfloat16", 3), (None, "bfloat16", 3), (None, "float16", 3),
                                                (None, "float16", q.FLOAT16_GEMV_ROWS + 1), (None, "float32", 17),
                                                ("bias", "float32", 3),
                                                ("qwen2", "float32", 3), ("qwen3", "float32", 3)])
def test_the_decode_loop_gives_the_modules_logits_bit_for_bit(llama_q, tmp_path_factory, method, dtype, batch,
                                                              monkeypatch):
    """Llama's decode steps on CPU run as one loop of bare ops (models/llama_decode.py): every decode step's
    logits equal the modules' exactly, for float32, half precision and both quantized formats, at row counts on
    both sides of each GEMV's threshold (int4 expands from 40 rows, int8 from 32, float16 takes F.linear past 24,
    float32 from 17);
    layers with biases (Llama's options, Qwen2's q/k/v) project with them in the loop, Qwen3's q/k norms run there
    too, and Qwen2's sliding layer attends through its own window's plan."""
    path = llama_q
    if method == "bias":
        path = saved_llama(tmp_path_factory, attention_bias=True, mlp_bias=True)
    elif method in ("qwen2", "qwen3"):
        path = tmp_path_factory.mktemp(method)
        save_tiny(path, f"{method.capitalize()}ForCausalLM")
    quantization = None if method in ("bias", "qwen2", "qwen3") else method
    ours = EnergonModel.from_pretrained(path, quantization=quantization, dtype=dtype)
    ids, mask = padded_batch((MIXED_LENGTHS * 6)[:batch], 128, "left")
    runner, loops = ours.batcher.runner, []
    original_run, original_loop = runner.run, LlamaDecodeLoop.run
    monkeypatch.setattr(LlamaDecodeLoop, "run", lambda self, *a: loops.append(1) or original_loop(self, *a))

    def steps_and_tokens() -> list:
        steps = []
        monkeypatch.setattr(runner, "run", lambda b, **kw: steps.append(original_run(b, **kw)["logits"]) or
                            {"logits": steps[-1]})
        tokens = ours.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        return [*steps, tokens]

    looped = steps_and_tokens()
    assert len(loops) == 5  # every step after the prompts'
    assert all(ops is not None for ops in ours.model.decode_loop.layer_ops(batch, getattr(torch, dtype)))  # bare
    monkeypatch.setattr(LlamaDecodeLoop, "applies", staticmethod(lambda x, batch: False))
    modules = steps_and_tokens()
    assert len(loops) == 5 and len(looped) == len(modules) == 7
    assert all(torch.equal(a, b) for a, b in zip(looped, modules, strict=True))


@pytest.mark.skipif(not compiled.available(), reason="no C++ compiler: the decode loop runs on the compiled ops")
def test_the_decode_loop_hands_a_pending_residual_to_a_module_layer(llama_q, monkeypatch):
    """A layer the loop cannot run bare runs its module; the residual the bare layer before it left pending is
    added first: logits bit for bit the modules' (layer 1 of 2 made to fall back)."""
    from energon_hf.models import llama_decode

    ours = EnergonModel.from_pretrained(llama_q, quantization="int4")
    ids, mask = padded_batch(MIXED_LENGTHS[:3], 128, "left")
    original = llama_decode._layer_ops
    monkeypatch.setattr(llama_decode, "_layer_ops", lambda layer, *a: None if layer.self_attn.layer_idx == 1
                        else original(layer, *a))

    def logits() -> list:
        steps, run = [], ours.batcher.runner.run
        monkeypatch.setattr(ours.batcher.runner, "run", lambda b, **kw: steps.append(run(b, **kw)["logits"]) or
                            {"logits": steps[-1]})
        ours.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        monkeypatch.setattr(ours.batcher.runner, "run", run)
        return steps

    mixed = logits()
    assert [ops is None for ops in ours.model.decode_loop.layer_ops(3, torch.float32)] == [False, True]
    monkeypatch.setattr(LlamaDecodeLoop, "applies", staticmethod(lambda x, batch: False))
    assert all(torch.equal(a, b) for a, b in zip(mixed, logits(), strict=True))


def test_a_pre_sharded_folder_quantizes_as_it_loads(llama_q, tmp_path):
    ids, mask = padded_batch(MIXED_LENGTHS[:3], 128, "left")
    direct = EnergonModel.from_pretrained(llama_q, quantization="int4")
    sharded = EnergonModel.from_pretrained(convert(llama_q, tmp_path / "sharded"), quantization="int4")
    assert isinstance(sharded.model.model.layers[1].mlp.down_proj.format, Int4Weight)
    assert torch.equal(logits_on_real(sharded, ids, mask), logits_on_real(direct, ids, mask))


def test_int4_split_inside_a_group_and_int8_at_tp2(tmp_path_factory):
    """LLAMA_TINY's intermediate size 96 splits into 48 features per rank: int4 names the layer, int8 runs
    (each rank's rows scaled on its own half: the same model as tp=1 up to those scales)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama-96")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_TINY)).save_pretrained(path)
    with pytest.raises(ValueError, match=r"mlp\.down_proj: 48 input features .* not a multiple of the int4 group"):
        EnergonModel.from_pretrained(path, tp=2, quantization="int4", threads_per_rank=1)
    ids, mask = padded_batch(MIXED_LENGTHS[:5], 128, "left")
    single = logits_on_real(EnergonModel.from_pretrained(path, quantization="int8"), ids, mask)
    with EnergonModel.from_pretrained(path, tp=2, quantization="int8", threads_per_rank=1) as ours:
        assert relative_error(logits_on_real(ours, ids, mask), single) < 0.03
        full_bytes = sum(p.numel() * 4 for p in transformers.LlamaForCausalLM.from_pretrained(path).parameters())
        assert ours.runner.rank_stats()[0]["param_bytes"] < full_bytes / 2


def test_gpt2_int8_and_pipeline_quantization_argument(tiny):
    """GPT-2's Conv1D weights and fused GELU linear on int8, through energon_hf.pipeline(quantization=)."""
    path = tiny.make("GPT2LMHeadModel")
    ours = EnergonModel.from_pretrained(path, quantization="int8")
    assert isinstance(ours.model.transformer.h[0].fc.format, Int8Weight)
    ids, mask = padded_batch(MIXED_LENGTHS[:4], 128, "left")
    reference = fake_quantized(tiny.hf("GPT2LMHeadModel"), "int8")
    assert relative_error(logits_on_real(ours, ids, mask), logits_on_real(reference, ids, mask)) < 0.03
    generator = pipeline("text-generation", model=path, quantization="int8")
    assert generator.model.quantization == Quantization("int8")
    prompt = torch.tensor([[5, 9, 11, 40]])
    out = generator.model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, ours.generate(prompt, max_new_tokens=6, do_sample=False))


# -- SmolLM2: the GGUF's own 4-bit blocks ------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_pair(smollm2_gguf):
    return EnergonModel.from_pretrained(smollm2_gguf), EnergonModel.from_pretrained(smollm2_gguf, quantization="int4")


def test_smollm2_int4_computes_on_the_files_q4_1_blocks(smollm2_pair, smollm2_gguf):
    reference, ours = smollm2_pair
    blocks = GGUFBlocks.open(ours.folder)
    # every linear layer's Q4_1 blocks, and the tied embedding's Q8_0
    assert blocks is not None and len(blocks.tensors) == 7 * ours.config.num_hidden_layers + 1
    entry = blocks.tensors["model.layers.0.mlp.down_proj.weight"]
    raw = np.fromfile(smollm2_gguf, dtype=np.uint8, count=entry["rows"] * entry["row_bytes"],
                      offset=entry["offset"]).reshape(entry["rows"], entry["row_bytes"])
    q4, scale, zero = decode_q4(raw, entry["type"])
    fmt = ours.model.model.layers[0].mlp.down_proj.format
    expected = Int4Weight(q4, scale, zero)
    held = ("nibbles", "table") if compiled.available() else ("packed", "scales_and_zeros")
    assert all(torch.equal(getattr(fmt, name), getattr(expected, name)) for name in held)
    # decoded blocks = transformers' dequantization (up to float32 rounding), so this is the file's own model
    dense = reference.model.model.layers[0].mlp.down_proj.format(torch.eye(1536)).t()
    assert (q.dequantize_int4(q4, scale, zero) - dense).abs().max() < 1e-5
    assert (ours.folder / BLOCKS_FILE).is_file()


@pytest.mark.skipif(not compiled.available(), reason="no C++ compiler: exact products expand with the compiled ops")
def test_smollm2_int4_exact_prompts_are_the_float32_models(smollm2_pair, smollm2_gguf):
    """"int4-exact" keeps the file's blocks and expands them to float32 for a prompt's products: its logits are
    the dequantized float32 model's (measured: equal), where the bfloat16 expansions differ by about 0.5."""
    reference, ours = smollm2_pair
    exact = EnergonModel.from_pretrained(smollm2_gguf, quantization="int4-exact")
    down, plain = (m.model.model.layers[0].mlp.down_proj.format for m in (exact, ours))
    assert down.expansion == torch.float32 and torch.equal(down.nibbles, plain.nibbles)
    ids = torch.randint(10, 40000, (1, q.INT4_DENSE_ROWS + 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        assert (exact(input_ids=ids).logits - expected).abs().max() <= 1e-4
        assert (ours(input_ids=ids).logits - expected).abs().max() > 1e-2
    exact.close()


@pytest.mark.skipif(not compiled.available(), reason="no C++ compiler: the head stays float32 without the ops")
def test_smollm2_int4_head_computes_on_the_files_q8_0_blocks(smollm2_pair, smollm2_gguf):
    """The tied vocabulary head is the file's Q8_0 tensor, multiplied in float32 for few rows (many take the
    float table lookups keep anyway): the dequantized model's head product to float32 rounding at one row and at
    many (no bfloat16 expansion)."""
    reference, ours = smollm2_pair
    embedding, expected = ours.model.model.embed_tokens, reference.model.model.embed_tokens
    blocks = embedding.head.few  # many rows: F.linear on the float table
    assert isinstance(blocks, Int8Weight) and blocks.group_size == 32
    assert embedding.head.rows == q.INT8_HEAD_GEMV_ROWS
    assert ours.folder == reference.folder and torch.equal(embedding.weight, expected.weight)
    assert torch.equal(q.dequantize_int8(blocks.q, blocks.scale), expected.weight)
    many = torch.randn(q.INT8_HEAD_GEMV_ROWS + 1, ours.config.hidden_size)
    assert blocks(many).shape[-1] == ours.config.vocab_size
    assert not blocks.expands  # rows the split gives it past INT8_DENSE_ROWS run the GEMV, no expanded copy
    torch.manual_seed(0)
    for rows in (1, q.INT8_DENSE_ROWS + 1, q.INT8_HEAD_GEMV_ROWS + 1):
        hidden = torch.randn(rows, ours.config.hidden_size)
        assert relative_error(embedding.logits(hidden), expected.logits(hidden)) < EXACT


def test_smollm2_int4_quality_and_paris(smollm2_pair, smollm2_gguf):
    reference, ours = smollm2_pair
    tokenizer = transformers.AutoTokenizer.from_pretrained(ours.folder)
    ids = tokenizer(ALICE.read_text(), return_tensors="pt").input_ids[0][:384]
    ppl_ref, ppl = perplexity(reference, ids), perplexity(ours, ids)
    assert math.isfinite(ppl) and abs(ppl / ppl_ref - 1) < 0.005  # the bound for the file's own weights
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    answer = ours.generate(**inputs, max_new_tokens=24)[0, inputs["input_ids"].shape[1]:]
    assert "Paris" in tokenizer.decode(answer, skip_special_tokens=True)
    prompt = inputs["input_ids"][0]
    tokens = greedy_tokens(reference, [prompt], 24)
    assert forced_agreement(ours, [prompt], tokens) >= 0.9
    if compiled.available():  # decode steps in float32 on the file's weights: the free-running bound
        assert agreement(greedy_tokens(ours, [prompt], 24), tokens) >= 0.9


# -- a Q8_0 file: int8 on the file's own 8-bit blocks ---------------------------------------------------
def write_q8_0_llama(source: Path, path: Path, layers: int) -> Path:
    """`source` (a Llama GGUF) cut to its first `layers` layers, every 4-bit tensor re-quantized to Q8_0 (as
    llama.cpp's `llama-quantize ... q8_0` would store it), metadata and tokenizer kept."""
    import re

    import gguf
    from gguf import GGMLQuantizationType, GGUFValueType

    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(path), arch)
    for key, field in reader.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            value = layers if key == f"{arch}.block_count" else field.contents()
            sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(key, value, field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        layer = re.match(r"blk\.(\d+)\.", tensor.name)
        if layer and int(layer.group(1)) >= layers:
            continue
        data, kind = tensor.data, tensor.tensor_type
        if kind in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1):
            data, kind = gguf.quants.quantize(gguf.quants.dequantize(data, kind), GGMLQuantizationType.Q8_0), \
                GGMLQuantizationType.Q8_0
        writer.add_tensor(tensor.name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def q8_0_gguf(tmp_path_factory, smollm2_gguf):
    """SmolLM2's first two layers in Q8_0 (39 MB, written in about 2 s)."""
    return write_q8_0_llama(smollm2_gguf, tmp_path_factory.mktemp("q8_0") / "smollm2-2-layers.Q8_0.gguf", 2)


def test_a_q8_0_file_computes_int8_on_its_own_blocks(q8_0_gguf):
    """int8 asked of a Q8_0 file takes its blocks as they are (groups of 32, no re-quantization per channel):
    the dequantized model's weights, multiplied in float32 for a decode step's row where the compiled GEMV runs
    it."""
    reference, ours = EnergonModel.from_pretrained(q8_0_gguf), EnergonModel.from_pretrained(q8_0_gguf,
                                                                                           quantization="int8")
    assert GGUFBlocks.open(ours.folder).covers(["model.layers.1.mlp.down_proj.weight"], ("Q8_0",))
    for ours_layer, reference_layer in zip(ours.model.model.layers, reference.model.model.layers, strict=True):
        for name in ("self_attn.qkv", "self_attn.o_proj", "mlp.gate_up", "mlp.down_proj"):
            fmt = ours_layer.get_submodule(name).format
            dense = reference_layer.get_submodule(name).format(torch.eye(fmt.in_features)).t()
            assert isinstance(fmt, Int8Weight) and fmt.group_size == 32
            assert (q.dequantize_int8(fmt.q, fmt.scale) - dense).abs().max() <= 1e-6 * dense.abs().max()
            if compiled.available():  # a decode step's product: float32 on the blocks
                x = torch.randn(1, fmt.in_features)
                assert relative_error(fmt(x), x @ dense.t()) < EXACT
    # a prompt's rows expand to bfloat16 (as every int8 product of many rows)
    prompt = torch.tensor([[1, 504, 3458, 314, 4055, 17, 2683, 30]])
    assert relative_error(ours(prompt).logits, reference(prompt).logits) < BFLOAT16


def test_a_q8_0_file_without_the_gemv_quantizes_per_channel(q8_0_gguf, monkeypatch):
    """Without the compiled GEMV a grouped int8 product would dequantize its matrix per call: int8 of a Q8_0 file
    then quantizes per channel, as for any checkpoint."""
    monkeypatch.setattr(q, "gemv_available", lambda: False)
    fmt = EnergonModel.from_pretrained(q8_0_gguf, quantization="int8").model.model.layers[0].mlp.down_proj.format
    assert isinstance(fmt, Int8Weight) and fmt.group_size == fmt.in_features


def test_a_q8_0_file_splits_its_blocks_at_tp3_and_pp2(q8_0_gguf):
    """SmolLM2's 9 heads split over 3 ranks; every split (columns, rows, the vocabulary head) falls on the blocks'
    groups of 32, so each rank holds the file's own blocks: tp=1's model, summed in another order."""
    single = EnergonModel.from_pretrained(q8_0_gguf, quantization="int8")
    prompt = torch.tensor([[1, 504, 3458, 314, 4055, 17, 2683, 30]])
    expected, expected_tokens = single(prompt).logits, single.generate(prompt, max_new_tokens=8, do_sample=False)
    for tp, pp in ((3, 1), (1, 2)):
        with EnergonModel.from_pretrained(q8_0_gguf, tp=tp, pp=pp, quantization="int8", threads_per_rank=1) as ours:
            assert relative_error(ours(prompt).logits, expected) < 1e-5
            assert torch.equal(ours.generate(prompt, max_new_tokens=8, do_sample=False), expected_tokens)


# -- the server's --dtype and --quantization --------------------------------------------------------------
def test_server_dtype_and_quantization_flags(chat_llama):
    """One server in bfloat16 with int8 layers whose products of many rows expand to float32 ("int8-exact"): its
    startup line says so, and its logprobs are those of the same configuration loaded here (and not those of
    the float32 model)."""
    process, url = start_server("--model", str(chat_llama), "--served-name", "tiny", "--dtype", "bfloat16",
                                "--quantization", "int8-exact", "--kv-cache-tokens", "1024")
    try:
        prompt = [5, 17, 99, 1000, 3]
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": 5}
        served = httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=120).json()
    finally:
        process.terminate()
        process.wait(30)
    assert "bfloat16, quantization=int8, exact float32 products" in "".join(process.output)
    top = served["choices"][0]["logprobs"]["top_logprobs"][0]

    def logprobs(**kwargs) -> torch.Tensor:
        model = EnergonModel.from_pretrained(chat_llama, **kwargs)
        return torch.log_softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1].float(), -1)

    same, float32 = logprobs(dtype="bfloat16", quantization="int8-exact"), logprobs()
    tokenizer = transformers.AutoTokenizer.from_pretrained(chat_llama)
    values, index = same.topk(5)
    assert list(top) == [tokenizer.decode([t]) for t in index.tolist()]
    got = torch.tensor(list(top.values()))
    assert (got - values).abs().max() < 1e-3 < (got - float32[index]).abs().max()
