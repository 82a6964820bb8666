"""BERT against transformers on the same weights, tiny configs and the real all-MiniLM-L6-v2."""

import importlib

import pytest
import torch
import transformers
from helpers import ATOL, MIXED_LENGTHS, first_real_index, max_diff_on_real, padded_batch

from energon_hf import EnergonModel
from energon_hf.nn import formats

VOCAB = 100


def _inputs(side: str):
    ids, mask = padded_batch(MIXED_LENGTHS, VOCAB, side, seed=3)
    token_types = torch.randint(0, 2, ids.shape, generator=torch.Generator().manual_seed(4)) * mask
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=token_types)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ["BertModel", "BertForMaskedLM", "BertForTokenClassification"])
def test_token_outputs_match_transformers(tiny, arch, side):
    ours, hf = EnergonModel.from_pretrained(tiny.make(arch)), tiny.hf(arch)
    inputs = _inputs(side)
    with torch.no_grad():
        expected = hf(**inputs)
    got = ours(**inputs)
    assert type(got) is type(expected)
    field = "last_hidden_state" if arch == "BertModel" else "logits"
    assert getattr(got, field).shape == getattr(expected, field).shape
    assert max_diff_on_real(getattr(got, field), getattr(expected, field), inputs["attention_mask"]) <= ATOL


def test_layers_write_their_products_into_the_steps_buffers(tiny, monkeypatch):
    """A forward of 178 tokens: each layer's q/k/v and up-projection write into the step's buffers (float32 weights
    kept plain, as on this project's AMX hosts, where oneDNN packing would ignore the buffer), still transformers'
    output."""
    linear_module = importlib.import_module("energon_hf.kernels.linear")
    monkeypatch.setattr(formats, "onednn_packing_pays", lambda dtype: False)
    written, into = set(), linear_module._into  # products (weights) that wrote into a buffer

    def spy(out, x, weight):
        if into(out, x, weight):
            written.add(weight.data_ptr())
            return True
        return False

    monkeypatch.setattr(linear_module, "_into", spy)
    ours, hf = EnergonModel.from_pretrained(tiny.make("BertModel")), tiny.hf("BertModel")
    inputs = _inputs("right")
    got = ours(**inputs)
    layers = ours.model.layers
    assert written == {proj.format.weight.data_ptr() for layer in layers for proj in (layer.qkv, layer.fc)}
    with torch.no_grad():
        expected = hf(**inputs)
    assert max_diff_on_real(got.last_hidden_state, expected.last_hidden_state, inputs["attention_mask"]) <= ATOL


@pytest.mark.parametrize("side", ["left", "right"])
def test_pooler_and_classifier_use_the_cls_token(tiny, side):
    """Right padding: HF's outputs exactly. Left padding: HF pools column 0, a pad; we pool the first real
    token ([CLS]), so the reference is HF's own pooler and classifier applied to that token."""
    inputs = _inputs(side)
    cls_col = first_real_index(inputs["attention_mask"])
    rows = torch.arange(len(cls_col))

    base, hf_base = EnergonModel.from_pretrained(tiny.make("BertModel")), tiny.hf("BertModel")
    clf, hf_clf = (EnergonModel.from_pretrained(tiny.make("BertForSequenceClassification")),
                   tiny.hf("BertForSequenceClassification"))
    with torch.no_grad():
        hidden = hf_base(**inputs).last_hidden_state
        pooled = hf_base.pooler(hidden[rows, cls_col][:, None])
        clf_hidden = hf_clf.bert(**inputs).last_hidden_state
        logits = hf_clf.classifier(hf_clf.bert.pooler(clf_hidden[rows, cls_col][:, None]))
        if side == "right":
            assert torch.equal(pooled, hf_base(**inputs).pooler_output)
            assert torch.equal(logits, hf_clf(**inputs).logits)
    got = base(**inputs)
    assert (got.pooler_output - pooled).abs().max() <= ATOL
    got_logits = clf(**inputs)
    assert isinstance(got_logits, transformers.modeling_outputs.SequenceClassifierOutput)
    assert got_logits.logits.shape == (len(MIXED_LENGTHS), 3)
    assert (got_logits.logits - logits).abs().max() <= ATOL


def test_untied_mlm_decoder(tiny):
    ours, hf = EnergonModel.from_pretrained(tiny.make("BertForMaskedLM", tie_word_embeddings=False)), tiny.hf(
        "BertForMaskedLM", tie_word_embeddings=False)
    inputs = _inputs("right")
    with torch.no_grad():
        expected = hf(**inputs).logits
    assert max_diff_on_real(ours(**inputs).logits, expected, inputs["attention_mask"]) <= ATOL


def test_legacy_layernorm_names_in_a_bin_checkpoint(tiny, tmp_path):
    """TF-era checkpoints: pytorch_model.bin, LayerNorm gamma/beta, no `bert.` prefix for the body."""
    hf = tiny.hf("BertModel")
    hf.config.save_pretrained(tmp_path)
    state = {}
    for name, tensor in hf.state_dict().items():
        if "LayerNorm" in name:
            name = name.replace(".weight", ".gamma").replace(".bias", ".beta")
        state[name] = tensor
    torch.save(state, tmp_path / "pytorch_model.bin")
    inputs = _inputs("right")
    with torch.no_grad():
        expected = hf(**inputs).last_hidden_state
    got = EnergonModel.from_pretrained(tmp_path)(**inputs).last_hidden_state
    assert max_diff_on_real(got, expected, inputs["attention_mask"]) <= ATOL


SENTENCES = [
    "Hi",
    "The quick brown fox jumps over the lazy dog.",
    "energon_hf runs transformer inference on packed tokens, without padding, across processes and devices.",
    "A",
    "Paris is the capital of France.",
]


@pytest.mark.parametrize("side", ["left", "right"])
def test_real_minilm_matches_transformers(minilm_path, side):
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path, padding_side=side)
    long_text = " ".join(["token"] * 60)
    batch = tokenizer(SENTENCES + [long_text], padding=True, return_tensors="pt")
    assert batch["attention_mask"].sum(1).min() <= 3 and batch["input_ids"].shape[1] >= 60
    hf = transformers.AutoModel.from_pretrained(minilm_path).eval()
    ours = EnergonModel.from_pretrained(minilm_path)
    with torch.no_grad():
        expected = hf(**batch)
    got = ours(**batch)
    mask = batch["attention_mask"]
    assert max_diff_on_real(got.last_hidden_state, expected.last_hidden_state, mask) <= ATOL
    if side == "right":
        assert (got.pooler_output - expected.pooler_output).abs().max() <= ATOL
    # sentence-transformers' embedding: mean over real tokens, L2-normalized
    embed = lambda h: torch.nn.functional.normalize((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    assert (embed(got.last_hidden_state) - embed(expected.last_hidden_state)).abs().max() <= ATOL
