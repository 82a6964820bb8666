"""A real model end to end: SmolLM2-135M-Instruct from its GGUF file, against transformers reading the same
file; the GGUF conversion cache; unsupported GGUF architectures."""

import pytest
import torch
import transformers

from energon_hf import EnergonModel, UnsupportedModelError


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    ours = EnergonModel.from_pretrained(smollm2_gguf)
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                           dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                           padding_side="left")
    return ours, hf, tokenizer


PROMPTS = ["Hello, my name is", "The quick brown fox jumps over the lazy dog and then", "1 2 3", "Q"]


def test_logits_and_greedy_tokens_match_transformers(smollm2):
    ours, hf, tokenizer = smollm2
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = hf(**batch).logits
        expected_tokens = hf.generate(**batch, max_new_tokens=32, do_sample=False)
    mask = batch["attention_mask"].bool()
    assert (ours(**batch).logits[mask] - expected[mask]).abs().max() <= 1e-3
    assert torch.equal(ours.generate(**batch, max_new_tokens=32, do_sample=False), expected_tokens)


def test_chat_template_answers_paris(smollm2):
    ours, _, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    out = ours.generate(**inputs, max_new_tokens=24)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_conversion_is_cached_and_a_folder_with_the_gguf_loads(smollm2, smollm2_gguf, gguf_cache):
    folders = [p for p in gguf_cache.iterdir() if p.name.startswith("SmolLM2")]
    assert len(folders) == 1 and (folders[0] / "model.safetensors").is_file()
    stamp = (folders[0] / "model.safetensors").stat().st_mtime_ns
    again = EnergonModel.from_pretrained(smollm2_gguf.parent)  # the package folder holds one .gguf
    assert again.config.model_type == "llama"
    assert (folders[0] / "model.safetensors").stat().st_mtime_ns == stamp


def test_unsupported_gguf_architecture_is_named(tmp_path):
    import gguf

    path = tmp_path / "tiny-rwkv.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv6")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="GGUF architecture 'rwkv6'.*supported: .*llama, mistral"):
        EnergonModel.from_pretrained(path)


def test_generate_example_runs_as_documented(smollm2):
    """examples/generate.py, as the README shows it, on the embedded SmolLM2."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "generate.py"
    cmd = [sys.executable, "-P", str(script), "--chat", "--prompt", "What is the capital of France?",
           "--max-new-tokens", "12"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Paris" in done.stdout
