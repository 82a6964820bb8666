"""energon_hf.SentenceTransformer: sentence-transformers' `encode()` on the packed, padding-free model.

    from sentence_transformers import SentenceTransformer     # before
    from energon_hf import SentenceTransformer                # after: same folder, same calls, same vectors
    model = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")
    embeddings = model.encode(sentences, batch_size=32, normalize_embeddings=True)

The model folder's modules.json says what runs after the transformer, as sentence-transformers reads it:
Transformer (its sentence_bert_config.json: max_seq_length, do_lower_case, the tokenizer's arguments and the
model's dtype), Pooling (energon_hf.pooling), Dense and Normalize. A folder without modules.json gets
sentence-transformers' default, mean pooling. Any other module is refused by name at load. The tokens of a
batch are packed (no padding is computed) and pooled as they come out of the model.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from .errors import UnsupportedModelError
from .loading import resolve_model_path
from .modeling import EnergonModel
from .pooling import Pooling

SIMILARITIES = ("cosine", "dot", "euclidean", "manhattan")
# sentence_bert_config.json's keyword sets for the transformer's loaders, under sentence-transformers' current names
# and (before 5.0) the old ones; hub settings in them are the caller's business, attn_implementation is moot here
_LOADER_KWARGS = {"processor_kwargs": "tokenizer_args", "model_kwargs": "model_args", "config_kwargs": "config_args"}
_IGNORED_KWARGS = {"revision", "token", "cache_dir", "local_files_only", "trust_remote_code", "attn_implementation"}
PRECISIONS = ("float32", "binary", "ubinary")


def loader_kwargs(settings: dict) -> tuple[dict, dict]:
    """From sentence_bert_config.json: the tokenizer's keyword arguments (model_max_length, ...) and the model's
    dtype as from_pretrained arguments. Any other model or config setting would change the model without our
    applying it, so it is refused by name (before a model loads)."""
    # an old name's set replaces the new one's, as in sentence-transformers
    found = {new: settings.get(old, settings.get(new, {})) for new, old in _LOADER_KWARGS.items()}
    tokenizer, model, config = ({k: v for k, v in found[name].items() if k not in _IGNORED_KWARGS}
                                for name in _LOADER_KWARGS)
    dtype, torch_dtype = model.pop("dtype", None), model.pop("torch_dtype", None)
    dtype = dtype or torch_dtype
    refused = [f"model_kwargs[{k!r}]" for k in sorted(model)] + [f"config_kwargs[{k!r}]" for k in sorted(config)]
    if refused:
        raise UnsupportedModelError(f"sentence_bert_config.json sets {', '.join(refused)}, which energon_hf does "
                                    "not apply")
    return tokenizer, {} if dtype is None else {"dtype": str(dtype).removeprefix("torch.")}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclass
class Dense:
    """sentence-transformers' Dense module: activation(pooled @ W^T + b), plus the input (projected when the
    sizes differ) with `use_residual`."""

    linear: torch.nn.Linear
    activation: Callable[[torch.Tensor], torch.Tensor]
    residual: torch.nn.Linear | None = None
    use_residual: bool = False

    @classmethod
    def load(cls, folder: Path) -> Dense:
        config = _read_json(folder / "config.json")
        weights = _module_weights(folder)
        sizes = (config["in_features"], config["out_features"])
        linear = torch.nn.Linear(*sizes, bias=config.get("bias", True))
        linear.load_state_dict({k.removeprefix("linear."): v for k, v in weights.items() if k.startswith("linear.")})
        residual = None
        if config.get("use_residual") and sizes[0] != sizes[1]:
            residual = torch.nn.Linear(*sizes, bias=False)
            residual.load_state_dict({"weight": weights["residual.weight"]})
        return cls(linear.eval(), _activation(config.get("activation_function", "torch.nn.modules.activation.Tanh")),
                   residual, bool(config.get("use_residual")))

    def to(self, device: torch.device, dtype: torch.dtype) -> Dense:
        """On the model's device and in its dtype, as sentence-transformers casts the modules after the
        transformer."""
        self.linear.to(device, dtype)
        if self.residual is not None:
            self.residual.to(device, dtype)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.linear.weight.dtype)
        out = self.activation(self.linear(x))
        if self.use_residual:
            out = out + (x if self.residual is None else self.residual(x))
        return out


def _module_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(folder / "model.safetensors")
    return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A torch.nn module named by its full class name, built without arguments (what sentence-transformers
    saves: "torch.nn.modules.activation.Tanh"); nothing outside torch.nn is imported."""
    module, _, cls = name.rpartition(".")
    if not module.startswith("torch.nn") or not cls:
        raise UnsupportedModelError(f"Dense activation {name!r} is not a torch.nn module")
    return getattr(importlib.import_module(module), cls)()


@dataclass
class Modules:
    """What modules.json asks for after the transformer."""

    transformer_path: str = ""
    pooling: Pooling | None = None
    after: tuple[Dense | None, ...] = ()  # after pooling, in modules.json's order: a Dense, or None for Normalize

    @property
    def dense(self) -> list[Dense]:
        return [step for step in self.after if step is not None]

    @property
    def normalize(self) -> bool:
        return None in self.after

    @classmethod
    def load(cls, folder: Path) -> Modules:
        entries = json.loads((folder / "modules.json").read_text()) if (folder / "modules.json").is_file() else None
        if entries is None:  # a plain HF encoder: sentence-transformers makes it mean pooling
            return cls(pooling=Pooling())
        modules, after = cls(), []
        for position, entry in enumerate(sorted(entries, key=lambda e: e["idx"])):
            kind = entry["type"].rpartition(".")[2]
            path = folder / entry.get("path", "")
            config = _read_json(path / "config.json") if kind != "Transformer" else {}
            if kind == "Transformer" and position == 0:
                modules.transformer_path = entry.get("path", "")
            elif kind == "Pooling" and modules.pooling is None and position == 1:
                modules.pooling = Pooling.from_config(config)
            elif kind in ("Dense", "Normalize") and modules.pooling is not None and \
                    config.get("module_input_name", "sentence_embedding") == "sentence_embedding" and \
                    config.get("module_output_name", "sentence_embedding") == "sentence_embedding":
                after.append(Dense.load(path) if kind == "Dense" else None)
            else:
                raise UnsupportedModelError(f"sentence-transformers module {entry['type']!r} (modules.json entry "
                                            f"{entry['idx']}) is not supported there: a Transformer, a Pooling, then "
                                            "Dense and Normalize modules on the sentence embedding are")
        if modules.pooling is None:
            raise UnsupportedModelError("modules.json has no Pooling module: no sentence embedding to compute")
        modules.after = tuple(after)
        return modules


class SentenceTransformer:
    """sentence-transformers' SentenceTransformer for encoder models, on an EnergonModel (any tp, pp, dtype or
    quantization it loads with). `encode` returns what sentence-transformers returns for the same folder:
    equal within 1e-5 in float32 (tests/test_sentence_transformer.py)."""

    def __init__(self, model_name_or_path: str | os.PathLike | EnergonModel, *, truncate_dim: int | None = None,
                 prompts: dict[str, str] | None = None, default_prompt_name: str | None = None, **load_kwargs: Any):
        """`load_kwargs` go to EnergonModel.from_pretrained (dtype, device, tp, pp, quantization...). A loaded
        EnergonModel stays the caller's to close."""
        self._owns_model = not isinstance(model_name_or_path, EnergonModel)
        folder = resolve_model_path(model_name_or_path, load_kwargs.get("revision")) if self._owns_model else \
            Path(model_name_or_path.folder)
        self.modules = Modules.load(folder)  # refused folders are refused before any model loads
        transformer = folder / self.modules.transformer_path  # older folders keep the model in 0_Transformer
        settings = _read_json(transformer / "sentence_bert_config.json")
        task = settings.get("transformer_task", "feature-extraction")
        if task != "feature-extraction":
            raise UnsupportedModelError(f"sentence-transformers transformer_task {task!r} is not supported")
        tokenizer_kwargs, model_kwargs = loader_kwargs(settings)
        config = _read_json(folder / "config_sentence_transformers.json")
        self.prompts = {**config.get("prompts", {}), **(prompts or {})}
        self.default_prompt_name = default_prompt_name or config.get("default_prompt_name")
        if self.default_prompt_name is not None and self.default_prompt_name not in self.prompts:
            raise UnsupportedModelError(f"default prompt name {self.default_prompt_name!r} is not one of the "
                                        f"configured prompts {sorted(self.prompts)}")
        self.similarity_fn_name = config.get("similarity_fn_name") or "cosine"
        self.truncate_dim = truncate_dim
        if self._owns_model:
            self.model = EnergonModel.from_pretrained(transformer if self.modules.transformer_path else
                                                      model_name_or_path, **{**model_kwargs, **load_kwargs})
        else:
            self.model = model_name_or_path
        if "last_hidden_state" not in self.model.model.token_outputs:
            self.close()
            raise UnsupportedModelError(f"sentence embeddings need a base model's token embeddings; "
                                        f"{self.model.architecture.name} computes {self.model.model.token_outputs}")
        for dense in self.modules.dense:
            dense.to(self.model.device, self.model.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(transformer, **tokenizer_kwargs)
        # sentence-transformers: the tokenizer arguments' model_max_length wins over max_seq_length, uncapped
        from_tokenizer = "model_max_length" in tokenizer_kwargs
        self.max_seq_length = self._max_seq_length(None if from_tokenizer else settings.get("max_seq_length"),
                                                   capped=not from_tokenizer)
        if settings.get("do_lower_case"):
            _lowercase(self.tokenizer)

    def _max_seq_length(self, configured: int | None, capped: bool = True) -> int:
        """sentence_bert_config.json's max_seq_length where it gives one, else the tokenizer's model_max_length,
        capped at the model's max_position_embeddings unless the config set it (sentence-transformers' rules)."""
        if configured is not None:
            return int(configured)
        limit = getattr(self.model.config, "max_position_embeddings", None) if capped else None
        return min(self.tokenizer.model_max_length, limit) if limit else self.tokenizer.model_max_length

    def get_embedding_dimension(self) -> int:
        if self.modules.dense:
            dimension = self.modules.dense[-1].linear.out_features
        else:
            dimension = self.model.config.hidden_size * len(self.modules.pooling.modes)
        return min(dimension, self.truncate_dim) if self.truncate_dim else dimension

    get_sentence_embedding_dimension = get_embedding_dimension  # sentence-transformers < 5

    # -- encoding -----------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, truncation="longest_first", max_length=self.max_seq_length)["input_ids"]

    @torch.inference_mode()
    def embed_sequences(self, sequences: list[list[int]], prompt_length: int = 0,
                        normalize: bool | None = None) -> list[torch.Tensor]:
        """Token sequences -> one sentence embedding each (pooling and Dense as modules.json says), in the model's
        dtype (a Dense module computes in it too). `normalize`: None as the folder's Normalize module says; the
        embeddings server's batches pass False and normalize as each request asks (TEI's `normalize`)."""
        outputs, cu_seqlens = self.model.run_packed(sequences)
        vectors = self.modules.pooling(outputs["last_hidden_state"], cu_seqlens, prompt_length)
        for dense in self.modules.after:
            if dense is not None:
                vectors = dense(vectors)
            elif normalize is not False:
                vectors = F.normalize(vectors, p=2, dim=-1)
        if normalize and not self.modules.normalize:
            vectors = F.normalize(vectors, p=2, dim=-1)
        return list(vectors)

    @torch.inference_mode()
    def _token_embeddings(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        outputs, cu_seqlens = self.model.run_packed(sequences)
        return list(outputs["last_hidden_state"].split(torch.diff(cu_seqlens).tolist()))

    def prompted(self, texts: Sequence[str], prompt_name: str | None = None,
                 prompt: str | None = None) -> tuple[list[str], int]:
        """`texts` with the prompt encode() puts in front of them (`prompt`, else `prompt_name`'s, else the folder's
        default_prompt_name's; none without them), and the prompt's token count (pooled or not as modules.json's
        include_prompt says): embed_sequences' `prompt_length`."""
        prompt = self._prompt(prompt_name, prompt)
        if prompt is None:
            return list(texts), 0
        return [prompt + text for text in texts], self._prompt_length(prompt)

    def _prompt(self, prompt_name: str | None, prompt: str | None) -> str | None:
        if prompt is None:
            prompt_name = prompt_name or self.default_prompt_name
            if prompt_name is not None:
                if prompt_name not in self.prompts:
                    raise ValueError(f"prompt_name {prompt_name!r} is not one of this model's prompts: "
                                     f"{sorted(self.prompts)}")
                prompt = self.prompts[prompt_name]
        return prompt or None

    def _prompt_length(self, prompt: str) -> int:
        """The prompt's tokens at the start of each sequence, without a trailing special token (as
        sentence-transformers counts them for `include_prompt=False`)."""
        ids = self.tokenize([prompt])[0]
        return len(ids) - (ids[-1] in self.tokenizer.all_special_ids)

    @torch.inference_mode()
    def encode(self, sentences: str | Sequence[str], prompt_name: str | None = None, prompt: str | None = None,
               batch_size: int = 32, show_progress_bar: bool | None = None,
               output_value: str = "sentence_embedding", precision: str = "float32", convert_to_numpy: bool = True,
               convert_to_tensor: bool = False, device: str | None = None, normalize_embeddings: bool = False,
               truncate_dim: int | None = None) -> np.ndarray | torch.Tensor | list[torch.Tensor]:
        """sentence-transformers' encode: a [len(sentences), dim] array (convert_to_numpy, the default), a
        tensor (convert_to_tensor), or a list of tensors (neither); one vector for a single string.
        output_value="token_embeddings" gives each sentence's [tokens, hidden] tensor instead. Texts run in
        batches of `batch_size`, packed without padding."""
        if output_value not in ("sentence_embedding", "token_embeddings"):
            raise ValueError(f"output_value must be 'sentence_embedding' or 'token_embeddings', got {output_value!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r} (int8 and uint8 need "
                             "calibration ranges: sentence_transformers.quantization.quantize_embeddings)")
        if device is not None and torch.device(device).type != self.model.device.type:
            raise ValueError(f"this model runs on {self.model.device}; load it with device={device!r} instead")
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"sentence {i} is a {type(text).__name__}, not a str")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        texts, prompt_length = self.prompted(texts, prompt_name, prompt)
        batches = range(0, len(texts), batch_size)
        results: list[torch.Tensor] = []
        for start in tqdm(batches, desc="Batches", disable=not show_progress_bar):
            sequences = self.tokenize(texts[start: start + batch_size])
            if output_value == "token_embeddings":
                results.extend(self._token_embeddings(sequences))
            else:
                results.extend(self.embed_sequences(sequences, prompt_length))
        if output_value == "token_embeddings":
            return results[0] if single else results
        return self._finish(results, single, precision, convert_to_numpy, convert_to_tensor, normalize_embeddings,
                            truncate_dim or self.truncate_dim)

    def encode_query(self, sentences: str | Sequence[str], **kwargs: Any):
        """encode() with the model's "query" prompt, where it has one (sentence-transformers' encode_query)."""
        return self.encode(sentences, **self._task_prompt("query", kwargs))

    def encode_document(self, sentences: str | Sequence[str], **kwargs: Any):
        """encode() with the model's "document" prompt, where it has one."""
        return self.encode(sentences, **self._task_prompt("document", kwargs))

    def _task_prompt(self, name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        if "prompt" not in kwargs and "prompt_name" not in kwargs and name in self.prompts:
            kwargs["prompt_name"] = name
        return kwargs

    @staticmethod
    def _finish(vectors: list[torch.Tensor], single: bool, precision: str, to_numpy: bool, to_tensor: bool,
                normalize: bool, truncate_dim: int | None) -> np.ndarray | torch.Tensor | list[torch.Tensor]:
        """Truncate, normalize, pack bits and convert, in sentence-transformers' order and dtypes: tensors keep the
        model's dtype, numpy arrays too except bfloat16 (which numpy lacks), which becomes float32."""
        if not vectors:
            return torch.tensor([]) if to_tensor else np.array([]) if to_numpy else []
        stacked = torch.stack(vectors)
        if truncate_dim:
            stacked = stacked[:, :truncate_dim]
        if normalize:
            stacked = F.normalize(stacked, p=2, dim=-1)
        if precision != "float32":
            bits = np.packbits((stacked > 0).cpu().numpy(), axis=-1)
            stacked = torch.from_numpy(bits if precision == "ubinary" else (bits.astype(np.int16) - 128)
                                       .astype(np.int8))
        if to_tensor:
            return stacked[0] if single else stacked
        if to_numpy:
            array = (stacked.float() if stacked.dtype == torch.bfloat16 else stacked).cpu().numpy()
            return array[0] if single else array
        return stacked[0] if single else list(stacked)

    # -- similarity ---------------------------------------------------------------------------------
    def similarity(self, a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> torch.Tensor:
        """[len(a), len(b)] scores by the model's similarity_fn_name (cosine unless its config says otherwise;
        distances come negated, so higher is closer, as sentence-transformers)."""
        a, b = (torch.as_tensor(x, dtype=torch.float32) for x in (a, b))
        a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        if self.similarity_fn_name == "cosine":
            return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
        if self.similarity_fn_name == "dot":
            return a @ b.T
        if self.similarity_fn_name in ("euclidean", "manhattan"):
            return -torch.cdist(a, b, p=2.0 if self.similarity_fn_name == "euclidean" else 1.0)
        raise ValueError(f"similarity_fn_name must be one of {SIMILARITIES}, got {self.similarity_fn_name!r}")

    # -- lifetime -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the model if this object loaded it."""
        if self._owns_model:
            self.model.close()

    def __enter__(self) -> SentenceTransformer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"SentenceTransformer({self.model!r}, pooling={self.modules.pooling.modes}, "
                f"dense={len(self.modules.dense)}, normalize={self.modules.normalize})")


def _lowercase(tokenizer) -> None:
    """do_lower_case: a Lowercase normalizer in front of the fast tokenizer's own, as sentence-transformers adds."""
    from tokenizers.normalizers import Lowercase
    from tokenizers.normalizers import Sequence as NormalizerSequence

    backend = tokenizer.backend_tokenizer
    current = backend.normalizer
    backend.normalizer = NormalizerSequence([Lowercase()] + ([current] if current is not None else []))
