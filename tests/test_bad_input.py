"""Bad checkpoints and bad inputs raise clear ValueError-family exceptions naming the problem."""

import json
import shutil

import pytest
import torch
from helpers import padded_batch

from energon_hf import CheckpointError, EnergonModel, ModelNotFoundError, UnsupportedModelError


@pytest.fixture(scope="module")
def gpt2(tiny):
    return EnergonModel.from_pretrained(tiny.make("GPT2LMHeadModel"))


@pytest.fixture(scope="module")
def bert(tiny):
    return EnergonModel.from_pretrained(tiny.make("BertModel"))


def _copy(tiny, arch, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny.make(arch), dst)
    return dst


# -- checkpoints -----------------------------------------------------------------------------------
def test_missing_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        EnergonModel.from_pretrained(tmp_path / "nope")
    assert issubclass(ModelNotFoundError, ValueError) and issubclass(ModelNotFoundError, FileNotFoundError)


def test_unreachable_hub_id():
    with pytest.raises(ModelNotFoundError, match="could not be fetched from the Hugging Face Hub"):
        EnergonModel.from_pretrained("no-such-org/no-such-model")


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        EnergonModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("model_type", ["t5", "not-a-model"])
def test_unsupported_model_type_lists_supported(tmp_path, model_type):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(UnsupportedModelError, match=model_type) as err:
        EnergonModel.from_pretrained(tmp_path)
    if model_type == "t5":
        assert "gpt2" in str(err.value) and "bert" in str(err.value)


def test_unsupported_architecture_lists_supported(tiny, tmp_path):
    path = _copy(tiny, "BertModel", tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["BertForQuestionAnswering"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="BertForQuestionAnswering.*BertForMaskedLM"):
        EnergonModel.from_pretrained(path)


def test_truncated_safetensors(tiny, tmp_path):
    path = _copy(tiny, "GPT2LMHeadModel", tmp_path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        EnergonModel.from_pretrained(path)


def test_corrupt_safetensors(tiny, tmp_path):
    path = _copy(tiny, "GPT2LMHeadModel", tmp_path)
    (path / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        EnergonModel.from_pretrained(path)


def test_corrupt_bin(tiny, tmp_path):
    path = _copy(tiny, "GPT2LMHeadModel", tmp_path)
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        EnergonModel.from_pretrained(path)


def test_no_weights(tiny, tmp_path):
    path = _copy(tiny, "GPT2LMHeadModel", tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        EnergonModel.from_pretrained(path)


def test_shapes_that_do_not_match_the_config(tiny, tmp_path):
    path = _copy(tiny, "BertModel", tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"intermediate.dense.weight.*\(128, 64\).*\(96, 64\)"):
        EnergonModel.from_pretrained(path)


def test_missing_tensors_are_named(tiny, tmp_path):
    path = _copy(tiny, "BertModel", tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"lacks .* weights: .*encoder.layer.2"):
        EnergonModel.from_pretrained(path)


def test_bad_dtype(tiny):
    with pytest.raises(ValueError, match="dtype 'float8'"):
        EnergonModel.from_pretrained(tiny.make("BertModel"), dtype="float8")


# -- inputs ------------------------------------------------------------------------------------------
def test_ids_outside_the_vocabulary(gpt2):
    with pytest.raises(ValueError, match="token id 128 is outside"):
        gpt2(input_ids=torch.tensor([[5, 128, 3]]))
    with pytest.raises(ValueError, match="token id -1 is outside"):
        gpt2.generate(torch.tensor([[5, -1]]), max_new_tokens=2)


def test_pad_ids_outside_the_vocabulary_are_ignored(gpt2):
    ids, mask = padded_batch([2, 4], 128, "right")
    out = gpt2(input_ids=ids.masked_fill(mask == 0, 10_000), attention_mask=mask)
    assert torch.isfinite(out.logits).all()


def test_sequence_longer_than_positions(gpt2, bert):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        gpt2(input_ids=torch.ones(1, 129, dtype=torch.long))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        bert(input_ids=torch.ones(1, 129, dtype=torch.long))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        gpt2.generate(torch.ones(1, 100, dtype=torch.long), max_new_tokens=29)


@pytest.mark.parametrize("mask,match", [
    (torch.ones(2, 3, dtype=torch.long), "shape"),
    (torch.full((2, 4), 2), "only 0 and 1"),
    (torch.ones(2, 4, dtype=torch.float32), "bool or integer"),
    (torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]), "sequence 1 .* no tokens"),
])
def test_bad_attention_masks(gpt2, mask, match):
    with pytest.raises(ValueError, match=match):
        gpt2(input_ids=torch.ones(2, 4, dtype=torch.long), attention_mask=mask)


def test_mask_with_holes_is_handled_like_transformers(tiny, gpt2):
    """A 0 between 1s just hides that token: positions stay the columns, as in HF's forward."""
    hf = tiny.hf("GPT2LMHeadModel")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 0, 1, 1]])
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
    got = gpt2(input_ids=ids, attention_mask=mask).logits
    assert (got - expected)[mask.bool()].abs().max() <= 1e-4


def test_float_ids_and_bad_ranks(gpt2):
    with pytest.raises(ValueError, match="integer token ids"):
        gpt2(input_ids=torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"\[batch, seq_len\]"):
        gpt2(input_ids=torch.ones(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids is required"):
        gpt2()


def test_token_type_ids_out_of_range(bert):
    with pytest.raises(ValueError, match="token_type_ids"):
        bert(input_ids=torch.ones(1, 3, dtype=torch.long), token_type_ids=torch.tensor([[0, 1, 2]]))


def test_unsupported_forward_arguments(gpt2):
    with pytest.raises(ValueError, match="labels is not supported"):
        gpt2(input_ids=torch.ones(1, 3, dtype=torch.long), labels=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="unexpected arguments"):
        gpt2(input_ids=torch.ones(1, 3, dtype=torch.long), bogus=1)


def test_bad_generate_arguments(gpt2, bert):
    ids = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="cannot generate"):
        bert.generate(ids, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        gpt2.generate(ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="num_beams must be >= 1"):
        gpt2.generate(ids, max_new_tokens=2, num_beams=0)
    with pytest.raises(ValueError, match=r"unsupported generate\(\) arguments: \['bogus'\]"):
        gpt2.generate(ids, max_new_tokens=2, bogus=True)
    with pytest.raises(ValueError, match="top_p"):
        gpt2.generate(ids, max_new_tokens=2, do_sample=True, top_p=0.0)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        gpt2.generate(ids, attention_mask=torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2)


def test_the_model_still_works_after_errors(gpt2):
    with pytest.raises(ValueError):
        gpt2(input_ids=torch.tensor([[999]]))
    assert gpt2.generate(torch.tensor([[5, 6]]), max_new_tokens=3, eos_token_id=None).shape == (1, 5)
