"""energon_hf.pipeline against transformers.pipeline on the same checkpoints: same structure, keys, types,
labels and tokens, scores within 1e-4. Tiny models borrow real tokenizers (MiniLM's for BERT, SmolLM2's
for Llama) so the text goes through the real pre- and post-processing."""

import shutil

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import energon_hf
from energon_hf import EnergonModel

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "chat_template.jinja", "chat_template.json")
BERT = dict(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=128)
LABELS = {"BertForSequenceClassification": ["negative", "neutral", "positive"],
          "BertForTokenClassification": ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]}
TEXTS = ["Paris is the capital of France.", "I love this!", "Hugging Face and energon run models in Paris."]


def _with_tokenizer(folder, source):
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def bert(tmp_path_factory, minilm_path):
    """arch -> folder of a tiny random BERT with that head and MiniLM's tokenizer."""
    folders = {}
    for i, arch in enumerate(("BertModel", "BertForMaskedLM", "BertForSequenceClassification",
                              "BertForTokenClassification")):
        labels = LABELS.get(arch, ["LABEL_0", "LABEL_1"])
        config = transformers.BertConfig(**BERT, id2label=dict(enumerate(labels)),
                                         label2id={label: j for j, label in enumerate(labels)})
        torch.manual_seed(i)
        folder = tmp_path_factory.mktemp(arch)
        getattr(transformers, arch)(config).save_pretrained(folder)
        folders[arch] = _with_tokenizer(folder, minilm_path)
    return folders


@pytest.fixture(scope="module")
def llama(chat_llama):
    return chat_llama  # conftest: a tiny Llama with SmolLM2's tokenizer and chat template


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    folders = {}
    for arch in ("ViTModel", "ViTForImageClassification"):
        config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=96,
                                        id2label={0: "cat", 1: "dog", 2: "bird"},
                                        label2id={"cat": 0, "dog": 1, "bird": 2})
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(arch)
        getattr(transformers, arch)(config).save_pretrained(folder)
        transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
        folders[arch] = folder
    return folders


def _pictures(tmp_path):
    gen = np.random.default_rng(0)
    paths = []
    for i, size in enumerate(((40, 30), (32, 32), (64, 48))):
        path = tmp_path / f"picture{i}.png"
        Image.fromarray(gen.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def assert_same(ours, theirs, path="result"):
    """Same structure and types; numbers within 1e-4; everything else equal."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict) and ours.keys() == theirs.keys(), f"{path}: keys {ours.keys()} != {theirs.keys()}"
        for key in theirs:
            assert_same(ours[key], theirs[key], f"{path}[{key!r}]")
    elif isinstance(theirs, list | tuple):
        assert type(ours) is type(theirs) and len(ours) == len(theirs), f"{path}: {ours!r} != {theirs!r}"
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert_same(a, b, f"{path}[{i}]")
    elif isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor) and ours.shape == theirs.shape and (ours - theirs).abs().max() <= 1e-4
    elif isinstance(theirs, float | np.floating):
        assert isinstance(ours, float | np.floating) and abs(ours - theirs) <= 1e-4, f"{path}: {ours} != {theirs}"
    else:
        assert type(ours) is type(theirs) and ours == theirs, f"{path}: {ours!r} != {theirs!r}"


def _hf(task, folder, **kwargs):
    return transformers.pipeline(task, model=str(folder), device="cpu", dtype=torch.float32, **kwargs)


@pytest.mark.parametrize("call", [dict(), dict(top_k=2), dict(targets=["paris", "london"])],
                         ids=["default", "top_k", "targets"])
def test_fill_mask(bert, call):
    folder = bert["BertForMaskedLM"]
    texts = ["Paris is the [MASK] of France.", "I [MASK] this!"]
    ours = energon_hf.pipeline("fill-mask", model=folder)(texts, **call)
    assert_same(ours, _hf("fill-mask", folder)(texts, **call))


@pytest.mark.parametrize("call", [dict(), dict(top_k=None), dict(function_to_apply="sigmoid", top_k=2)],
                         ids=["default", "all-labels", "sigmoid"])
def test_text_classification_and_its_alias(bert, call):
    folder = bert["BertForSequenceClassification"]
    expected = _hf("text-classification", folder)(TEXTS, **call)
    assert_same(energon_hf.pipeline("sentiment-analysis", model=folder, batch_size=2)(TEXTS, **call), expected)


@pytest.mark.parametrize("strategy", ["none", "simple", "first", "max", "average"])
def test_token_classification(bert, strategy):
    folder = bert["BertForTokenClassification"]
    expected = _hf("ner", folder, aggregation_strategy=strategy)(TEXTS)
    assert_same(energon_hf.pipeline("ner", model=folder, aggregation_strategy=strategy)(TEXTS), expected)


def test_feature_extraction_lists_and_tensors(bert):
    folder = bert["BertModel"]
    pipe, hf = energon_hf.pipeline(model=folder), _hf("feature-extraction", folder)
    assert pipe.task == "feature-extraction"  # inferred from the architecture
    assert_same(pipe(TEXTS), hf(TEXTS))
    assert_same(pipe(TEXTS[0], return_tensors=True), hf(TEXTS[0], return_tensors=True))


def test_real_minilm_feature_extraction(minilm_path):
    texts = ["A man is eating food.", "A man is riding a horse."]
    assert_same(energon_hf.pipeline("feature-extraction", model=minilm_path, batch_size=2)(texts),
                _hf("feature-extraction", minilm_path)(texts))


@pytest.mark.parametrize("call", [dict(max_new_tokens=8, do_sample=False),
                                  dict(max_new_tokens=6, do_sample=False, return_full_text=False)],
                         ids=["full-text", "new-text"])
def test_text_generation(llama, call):
    prompts = ["The capital of France is", "Once upon a time"]
    ours = energon_hf.pipeline("text-generation", model=llama, batch_size=2)(prompts, **call)
    assert_same(ours, _hf("text-generation", llama)(prompts, **call))


def test_text_generation_chat_messages(llama):
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ours = energon_hf.pipeline(model=llama)(chat, max_new_tokens=6, do_sample=False)
    assert ours[0]["generated_text"][-1]["role"] == "assistant"
    assert_same(ours, _hf("text-generation", llama)(chat, max_new_tokens=6, do_sample=False))


def test_image_tasks(vit, tmp_path):
    pictures = _pictures(tmp_path)
    images = [Image.open(pictures[0]), pictures[1], pictures[2]]
    folder = vit["ViTForImageClassification"]
    processor = transformers.ViTImageProcessor.from_pretrained(folder)
    assert_same(energon_hf.pipeline(model=folder)(images, top_k=2),
                _hf("image-classification", folder, image_processor=processor)(images, top_k=2))
    folder = vit["ViTModel"]
    ours = energon_hf.pipeline("image-feature-extraction", model=folder)(pictures[:2])
    assert_same(ours, _hf("image-feature-extraction", folder, image_processor=processor)(pictures[:2]))


def test_streams_a_generator(bert):
    pipe = energon_hf.pipeline("text-classification", model=bert["BertForSequenceClassification"], batch_size=2)
    results = list(pipe(text for text in TEXTS))
    assert_same(results, pipe(TEXTS))


def test_tensor_parallel_pipeline(bert):
    folder = bert["BertForMaskedLM"]
    with EnergonModel.from_pretrained(folder, tp=2, threads_per_rank=1) as model:
        ours = energon_hf.pipeline("fill-mask", model=model)(["Paris is the [MASK] of France."], top_k=3)
    assert_same(ours, _hf("fill-mask", folder)(["Paris is the [MASK] of France."], top_k=3))


def test_bad_inputs_are_clear(bert):
    with pytest.raises(KeyError, match="Unknown task 'translation'.*supports text-generation"):
        energon_hf.pipeline("translation", model=bert["BertModel"])
    with pytest.raises(ValueError, match="needs model="):
        energon_hf.pipeline("fill-mask")
    pipe = energon_hf.pipeline("fill-mask", model=bert["BertForMaskedLM"])
    with pytest.raises(ValueError, match="None"):
        pipe(None)
    with pytest.raises(ValueError, match="empty string"):
        pipe(["Paris is the [MASK].", " "])
    with pytest.raises(ValueError, match="a mix of"):
        pipe(["Paris is the [MASK].", 3])
    with pytest.raises(transformers.pipelines.PipelineException, match="No mask_token"):
        pipe("Paris is the capital.")


def test_a_file_that_is_not_an_image(vit, tmp_path):
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("hello")
    pipe = energon_hf.pipeline("image-classification", model=vit["ViTForImageClassification"])
    with pytest.raises(ValueError, match="notes.txt"):
        pipe(str(not_an_image))
    with pytest.raises(ValueError, match="missing.png"):
        pipe([str(tmp_path / "missing.png")])
