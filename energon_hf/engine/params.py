"""Generation parameters: HF generate's names, defaults and checks."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from transformers import GenerationConfig

# HF's defaults for the parameters we support (GenerationConfig leaves them None and generate fills these).
_HF_DEFAULTS = {"max_length": 20, "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
                "repetition_penalty": 1.0, "min_new_tokens": 0, "no_repeat_ngram_size": 0, "num_return_sequences": 1,
                "num_beams": 1, "length_penalty": 1.0, "early_stopping": False}
# Accepted and ignored: they change nothing for a decoder-only model here.
_IGNORED = {"use_cache", "return_dict_in_generate", "output_scores", "output_logits", "output_attentions",
            "output_hidden_states", "bos_token_id"}


@dataclass
class GenerationParams:
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int = 0
    seed: int | None = None
    no_repeat_ngram_size: int = 0  # HF's NoRepeatNGramLogitsProcessor: no n-gram of a row occurs twice
    bad_words_ids: list[list[int]] = field(default_factory=list)  # HF's NoBadWordsLogitsProcessor
    num_return_sequences: int = 1  # samples per prompt (generate expands the batch, as HF)
    stop_strings: list[str] = field(default_factory=list)  # HF's StopStringCriteria (needs the tokenizer)
    num_beams: int = 1  # beam search (engine/beam_search.py) above 1
    length_penalty: float = 1.0  # a finished beam's score is its log-probability / generated length ** this
    early_stopping: bool | str = False  # HF's: True, False (its heuristic) or "never"

    @property
    def reads_history(self) -> bool:
        """Whether sampling reads each row's tokens (prompt included): the repetition penalty, n-gram and
        multi-token bans."""
        return self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0 or bool(self.bad_words_ids)

    @classmethod
    def resolve(cls, model_defaults: GenerationConfig | None, prompt_length: int, kwargs: dict) -> GenerationParams:
        """Merge, as HF does: HF defaults < the model's generation_config < the call's keyword arguments."""
        kwargs = dict(kwargs)
        cfg = GenerationConfig.from_dict(model_defaults.to_dict()) if model_defaults else GenerationConfig()
        if isinstance(kwargs.get("generation_config"), GenerationConfig):
            cfg = kwargs.pop("generation_config")
        ours = {f.name for f in fields(cls)} | {"max_length", "eos_token_id"}
        unknown = sorted(set(kwargs) - ours - _IGNORED)
        if unknown:
            raise ValueError(f"unsupported generate() arguments: {unknown}; supported: {sorted(ours)}")
        def pick(name: str):
            return next((v for v in (kwargs.get(name), getattr(cfg, name, None), _HF_DEFAULTS.get(name))
                         if v is not None), None)

        if kwargs.get("max_new_tokens") is not None:
            max_new = kwargs["max_new_tokens"]
        elif kwargs.get("max_length") is None and cfg.max_new_tokens is not None:
            max_new = cfg.max_new_tokens
        else:  # max_length counts the prompt
            max_new = pick("max_length") - prompt_length
        eos = kwargs.get("eos_token_id", cfg.eos_token_id)
        eos_ids = [] if eos is None else [int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])]
        pad = kwargs.get("pad_token_id", cfg.pad_token_id)
        if pad is None:  # HF falls back to the (first) EOS token
            pad = eos_ids[0] if eos_ids else 0
        stop = pick("stop_strings") or []
        params = cls(
            max_new_tokens=int(max_new), do_sample=bool(pick("do_sample")), temperature=float(pick("temperature")),
            top_k=int(pick("top_k")), top_p=float(pick("top_p")),
            repetition_penalty=float(pick("repetition_penalty")), min_new_tokens=int(pick("min_new_tokens")),
            eos_token_ids=eos_ids, pad_token_id=int(pad), seed=kwargs.get("seed"),
            no_repeat_ngram_size=int(pick("no_repeat_ngram_size")),
            bad_words_ids=_bad_words(pick("bad_words_ids"), eos_ids),
            num_return_sequences=int(pick("num_return_sequences")),
            stop_strings=[stop] if isinstance(stop, str) else list(stop), num_beams=int(pick("num_beams")),
            length_penalty=float(pick("length_penalty")), early_stopping=pick("early_stopping"),
        )
        params.validate()
        return params

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")
        if self.num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be >= 1, got {self.num_return_sequences}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("beam sampling (num_beams > 1 with do_sample=True) is not supported; use do_sample=False")
        if self.num_return_sequences > self.num_beams > 1:  # HF's own check
            raise ValueError(f"`num_return_sequences` ({self.num_return_sequences}) has to be smaller or equal to "
                             f"`num_beams` ({self.num_beams}).")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.num_return_sequences > 1 and not self.do_sample and self.num_beams == 1:  # HF's own check
            raise ValueError("Greedy methods without beam search do not support `num_return_sequences` different "
                             f"than 1 (got {self.num_return_sequences}); set do_sample=True")


def _bad_words(value, eos_ids: list[int]) -> list[list[int]]:
    """bad_words_ids as transformers' NoBadWordsLogitsProcessor takes them (its checks and messages; single-token
    entries that are an EOS token dropped), and no empty word (transformers would fail on it mid-generate)."""
    if value is None:
        return []
    from transformers.generation.logits_process import NoBadWordsLogitsProcessor

    words = [list(word) for word in NoBadWordsLogitsProcessor(value, eos_token_id=eos_ids or None).sequence_bias]
    if not all(words):
        raise ValueError(f"`bad_words_ids` holds an empty list: {value}")
    return words
