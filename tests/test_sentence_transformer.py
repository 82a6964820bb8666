"""energon_hf.SentenceTransformer against sentence-transformers itself on the same folders: all-MiniLM-L6-v2 as
shipped, and tiny models that sentence-transformers saves with the other pooling modes, Dense, Normalize,
prompts and do_lower_case; encode()'s options; tp=2 and pp=2; and what is refused."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from sentence_transformers import SentenceTransformer as Reference
from sentence_transformers.base.modules import Dense, Normalize, Transformer
from sentence_transformers.sentence_transformer.modules import Pooling

from energon_hf import EnergonModel, SentenceTransformer, UnsupportedModelError
from energon_hf.serve.app import _sentence_embeddings

TEXT = (Path(__file__).resolve().parents[1] / "bench" / "data" / "alice_chapter1.txt").read_text().split()
# Mixed lengths (6 to 48 words), a text past max_seq_length, and one with surrounding spaces.
SENTENCES = [" ".join(TEXT[i: i + 6 + (i * 7) % 43]) for i in range(0, 7 * 24, 7)] + \
            ["word " * 300, "  Surrounding   spaces  "]


def tiny_st(folder: Path, minilm_path: Path, modules) -> Path:
    """A sentence-transformers folder over a tiny random BERT that uses MiniLM's tokenizer."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder / "bert")
    tokenizer.save_pretrained(folder / "bert")
    Reference(modules=modules(folder / "bert"), device="cpu").save(str(folder / "st"))
    return folder / "st"


@pytest.fixture(scope="module")
def cls_max_dense(tmp_path_factory, minilm_path) -> Path:
    """cls + max pooling concatenated, Normalize, a Tanh Dense down to 16, Normalize again (modules.json's order
    matters); max_seq_length 48."""
    return tiny_st(tmp_path_factory.mktemp("st_a"), minilm_path, lambda bert: [
        Transformer(str(bert), max_seq_length=48), Pooling(32, pooling_mode=("cls", "max")), Normalize(),
        Dense(64, 16), Normalize()])


@pytest.fixture(scope="module")
def prompt_model(tmp_path_factory, minilm_path) -> Path:
    """mean_sqrt_len + weightedmean + lasttoken without the prompt's tokens, a GELU Dense with a projected residual,
    a "query: " prompt and do_lower_case."""
    folder = tiny_st(tmp_path_factory.mktemp("st_b"), minilm_path, lambda bert: [
        Transformer(str(bert), do_lower_case=True),
        Pooling(32, pooling_mode=("mean_sqrt_len_tokens", "weightedmean", "lasttoken"), include_prompt=False),
        Dense(96, 48, activation_function=torch.nn.GELU(), use_residual=True)])
    config = folder / "config_sentence_transformers.json"
    config.write_text(json.dumps({**json.loads(config.read_text()),
                                  "prompts": {"query": "query: ", "document": ""}}))
    return folder


@pytest.fixture(scope="module")
def minilm(minilm_path):
    with SentenceTransformer(minilm_path) as model:
        yield model


def test_minilm_matches_sentence_transformers(minilm, minilm_path):
    reference = Reference(str(minilm_path), device="cpu")
    expected = reference.encode(SENTENCES, batch_size=8)
    ours = minilm.encode(SENTENCES, batch_size=16)
    assert ours.shape == expected.shape == (len(SENTENCES), 384) and ours.dtype == np.float32
    assert np.abs(ours - expected).max() <= 1e-5
    assert minilm.max_seq_length == reference.max_seq_length == 256
    assert minilm.get_embedding_dimension() == 384
    assert torch.allclose(minilm.similarity(ours[:3], ours[3:6]), reference.similarity(expected[:3], expected[3:6]),
                          atol=1e-5)


@pytest.mark.parametrize("model_name", ["cls_max_dense", "prompt_model"])
def test_pooling_dense_and_prompts_match(model_name, request):
    path = request.getfixturevalue(model_name)
    reference = Reference(str(path), device="cpu")
    with SentenceTransformer(path) as ours:
        assert ours.max_seq_length == reference.max_seq_length
        assert ours.get_embedding_dimension() == reference.get_embedding_dimension()
        calls = [{}, {"prompt": "Represent this: "}] if model_name == "cls_max_dense" else \
            [{}, {"prompt_name": "query"}, {"prompt": "A Prompt Here: "}]
        for kwargs in calls:
            expected = reference.encode(SENTENCES, batch_size=8, **kwargs)
            got = ours.encode(SENTENCES, batch_size=5, **kwargs)
            assert np.abs(got - expected).max() <= 1e-5, kwargs
        if model_name == "prompt_model":
            assert np.abs(ours.encode_query(SENTENCES[:4]) - reference.encode_query(SENTENCES[:4])).max() <= 1e-5
            assert np.abs(ours.encode(SENTENCES[:4], prompt_name="query")
                          - ours.encode(SENTENCES[:4])).max() > 1e-3  # the prompt reached the model


def test_encode_options(minilm, minilm_path):
    reference = Reference(str(minilm_path), device="cpu")
    texts = SENTENCES[:5]
    for kwargs in [{"convert_to_tensor": True}, {"normalize_embeddings": True, "truncate_dim": 8},
                   {"truncate_dim": 8}, {"precision": "binary"}, {"precision": "ubinary"}]:
        expected, got = reference.encode(texts, **kwargs), minilm.encode(texts, **kwargs)
        assert type(got) is type(expected) and got.shape == expected.shape and got.dtype == expected.dtype, kwargs
        assert np.abs(np.asarray(got, dtype=np.float64) - np.asarray(expected, dtype=np.float64)).max() <= 1e-5
    as_list = minilm.encode(texts, convert_to_numpy=False)
    assert isinstance(as_list, list) and len(as_list) == 5 and as_list[0].shape == (384,)
    single = minilm.encode(texts[0], show_progress_bar=True)
    assert single.shape == (384,) and np.abs(single - minilm.encode(texts)[0]).max() <= 1e-6
    tokens, expected = minilm.encode(texts, output_value="token_embeddings"), \
        reference.encode(texts, output_value="token_embeddings")
    assert [t.shape for t in tokens] == [t.shape for t in expected]
    assert max((a - b).abs().max().item() for a, b in zip(tokens, expected, strict=True)) <= 1e-5
    assert minilm.encode([]).shape == (0,) and minilm.encode([], convert_to_numpy=False) == []


def test_bad_encode_arguments(minilm):
    with pytest.raises(ValueError, match="precision must be one of"):
        minilm.encode(["a"], precision="int8")
    with pytest.raises(ValueError, match="output_value"):
        minilm.encode(["a"], output_value="logits")
    with pytest.raises(ValueError, match="prompt_name 'passage' is not one of this model's prompts"):
        minilm.encode(["a"], prompt_name="passage")
    with pytest.raises(ValueError, match="sentence 1 is a int"):
        minilm.encode(["a", 3])
    with pytest.raises(ValueError, match="batch_size"):
        minilm.encode(["a"], batch_size=0)
    assert minilm.encode(["still works"]).shape == (1, 384)


@pytest.mark.parametrize("parallel", [{"tp": 2}, {"pp": 2}], ids=["tp2", "pp2"])
def test_parallel_matches(cls_max_dense, parallel):
    expected = Reference(str(cls_max_dense), device="cpu").encode(SENTENCES, batch_size=8)
    with SentenceTransformer(cls_max_dense, **parallel) as ours:
        assert np.abs(ours.encode(SENTENCES) - expected).max() <= 1e-5


def test_half_precision_and_the_servers_path(prompt_model):
    """bfloat16 through a Dense with a projected residual (float32 weights), and embed_sequences, which the
    embeddings server calls outside encode(): no autograd graph, so its vectors convert to numpy."""
    expected = torch.from_numpy(Reference(str(prompt_model), device="cpu").encode(SENTENCES))
    with SentenceTransformer(prompt_model, dtype="bfloat16") as ours:
        got = ours.encode(SENTENCES, convert_to_tensor=True)
        assert torch.nn.functional.cosine_similarity(got, expected).min() > 0.99
        vectors = ours.embed_sequences(ours.tokenize(SENTENCES[:3]), normalize=True)
        assert not any(v.requires_grad for v in vectors) and vectors[0].float().numpy().shape == (48,)
        assert abs(vectors[0].float().norm().item() - 1) < 1e-2


@pytest.mark.parametrize("folder,dtype", [("minilm_path", "float16"), ("prompt_model", "bfloat16")])
def test_half_precision_outputs_have_sentence_transformers_dtypes(folder, dtype, request):
    """Tensors keep the model's half-precision dtype (a Dense module computes in it, as sentence-transformers casts
    the modules after the transformer), numpy arrays too except bfloat16 (which numpy lacks: float32), as
    sentence-transformers returns them from the same model in that dtype; the vectors agree."""
    folder = request.getfixturevalue(folder)
    reference = Reference(str(folder), device="cpu", model_kwargs={"dtype": getattr(torch, dtype)})
    texts = SENTENCES[:4]
    with SentenceTransformer(folder, dtype=dtype) as ours:
        for kwargs in [{}, {"convert_to_tensor": True}, {"convert_to_numpy": False},
                       {"convert_to_tensor": True, "normalize_embeddings": True, "truncate_dim": 8},
                       {"precision": "ubinary"}]:
            expected, got = reference.encode(texts, **kwargs), ours.encode(texts, **kwargs)
            assert type(got) is type(expected), kwargs
            expected, got = (torch.stack(v) if isinstance(v, list) else torch.as_tensor(v) for v in (expected, got))
            assert got.dtype == expected.dtype and got.shape == expected.shape, kwargs
            if "precision" not in kwargs:
                assert torch.nn.functional.cosine_similarity(got.double(), expected.double()).min() > 0.99, kwargs


def test_the_embeddings_server_applies_the_folders_default_prompt(tmp_path, prompt_model):
    """A folder whose config names a default_prompt_name: /v1/embeddings embeds each text behind that prompt (left
    out of the pooling, as include_prompt: false says), as sentence-transformers' encode() does."""
    import httpx
    from test_server_routes import ThreadedServer

    from energon_hf.serve.state import ServeSettings

    folder = tmp_path / "st"
    shutil.copytree(prompt_model, folder)
    config = folder / "config_sentence_transformers.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "default_prompt_name": "query"}))
    texts = SENTENCES[:3]
    expected = torch.from_numpy(Reference(str(folder), device="cpu").encode(texts))
    assert (expected - torch.from_numpy(Reference(str(prompt_model), device="cpu").encode(texts))).abs().max() > 1e-3
    model = EnergonModel.from_pretrained(folder)
    with ThreadedServer(model, transformers.AutoTokenizer.from_pretrained(folder), ServeSettings("st")) as server:
        body = httpx.post(server.url + "/v1/embeddings", json={"model": "st", "input": texts, "normalize": False},
                          timeout=60).json()
    got = torch.tensor([d["embedding"] for d in body["data"]])
    assert got.shape == expected.shape and (got - expected).abs().max() <= 1e-5


def test_a_transformer_in_a_subfolder(tmp_path, cls_max_dense):
    """Older sentence-transformers folders keep the model in 0_Transformer: modules.json says where."""
    folder = tmp_path / "old"
    shutil.copytree(cls_max_dense, folder)
    (folder / "0_Transformer").mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "sentence_bert_config.json"):
        (folder / name).rename(folder / "0_Transformer" / name)
    modules = json.loads((folder / "modules.json").read_text())
    modules[0]["path"] = "0_Transformer"
    (folder / "modules.json").write_text(json.dumps(modules))
    expected = Reference(str(folder), device="cpu").encode(SENTENCES)
    with SentenceTransformer(folder) as ours:
        assert ours.max_seq_length == 48 and np.abs(ours.encode(SENTENCES) - expected).max() <= 1e-5


def test_loader_settings_of_sentence_bert_config(tmp_path, cls_max_dense):
    """sentence_bert_config.json's tokenizer arguments (old name tokenizer_args) reach the tokenizer (a
    model_max_length of 20 wins over the config's max_seq_length of 48, uncapped, and truncates as
    sentence-transformers does) and its model dtype the model (dtype beside torch_dtype); a model setting we would
    not apply is refused by name."""
    folder = tmp_path / "st"
    shutil.copytree(cls_max_dense, folder)
    path = folder / "sentence_bert_config.json"
    settings = {**json.loads(path.read_text()), "max_seq_length": 48}  # as sentence-transformers < 6 wrote it
    path.write_text(json.dumps({**settings, "tokenizer_args": {"model_max_length": 20},
                                "model_args": {"torch_dtype": "bfloat16", "dtype": "bfloat16"}}))
    with SentenceTransformer(folder) as ours:
        assert ours.max_seq_length == 20 and ours.model.dtype == torch.bfloat16
    with SentenceTransformer(folder, dtype="float32") as ours:  # the caller's dtype wins, as in sentence-transformers
        assert np.abs(ours.encode(SENTENCES) - Reference(str(folder), device="cpu", model_kwargs={
            "dtype": torch.float32}).encode(SENTENCES)).max() <= 1e-5
    path.write_text(json.dumps({**settings, "model_kwargs": {"device_map": "auto", "attn_implementation": "eager"}}))
    with pytest.raises(UnsupportedModelError, match=r"model_kwargs\['device_map'\]"):
        SentenceTransformer(folder)
    path.write_text(json.dumps(settings))
    with pytest.raises(UnsupportedModelError, match="default prompt name 'passage' is not one of"):
        SentenceTransformer(folder, default_prompt_name="passage")


def test_refused_folders(tmp_path, cls_max_dense, tiny):
    folder = tmp_path / "odd"
    shutil.copytree(cls_max_dense, folder)
    modules = json.loads((folder / "modules.json").read_text())
    modules[1]["type"] = "sentence_transformers.models.WordWeights"
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(UnsupportedModelError, match="module 'sentence_transformers.models.WordWeights'"):
        SentenceTransformer(folder)
    with EnergonModel.from_pretrained(folder) as model:  # the server serves it, without /v1/embeddings
        assert _sentence_embeddings(model) is None and model.model is not None
    with EnergonModel.from_pretrained(tiny.make("BertForMaskedLM")) as masked_lm:
        with pytest.raises(UnsupportedModelError, match="need a base model's token embeddings"):
            SentenceTransformer(masked_lm)
