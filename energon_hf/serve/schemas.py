"""Request bodies of the OpenAI-compatible API (pydantic: a wrong type or a missing field is a 400 that
names the field)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StringConstraints, model_validator

# JavaScript's safe integers: every JSON tool reads these bounds, and the numbers next to them, exactly
# (near int64's bounds, binary64 rounds 1024 integers onto each bound). Generators get seed mod 2**64.
SEED_RANGE = dict(ge=-(1 << 53) + 1, le=(1 << 53) - 1)
MAX_CHOICES = 16
MAX_TOP_LOGPROBS = 20  # as OpenAI


def _json_integer(value: Any) -> Any:
    """JSON's integers: 3 and 3.0, never true or "3" (pydantic's lax mode would take both)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("Input should be an integer")
    return value


def _json_number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("Input should be a number")
    return value


# The types of the API's fields: exactly what their JSON schema says (a schema-driven client gets no surprise).
Int = Annotated[int, BeforeValidator(_json_integer)]


def integer(**bounds: int) -> Any:
    """Int within bounds (the bounds go first, or pydantic's JSON schema would not state them)."""
    return Annotated[int, Field(**bounds), BeforeValidator(_json_integer)]

Number = Annotated[float, BeforeValidator(_json_number)]
Bool = StrictBool
NonEmptyText = Annotated[str, StringConstraints(min_length=1)]
Text = Annotated[str, StringConstraints(pattern=r"\S")]  # not empty, not only whitespace


def lone_surrogate(value: Any, where: str = "body") -> str | None:
    """Where a string (or a key) holds a lone surrogate, which JSON's \\ud800 escapes allow but no text encoding
    does (the tokenizer would fail on it), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
    elif isinstance(value, dict):
        for key, item in value.items():
            found = lone_surrogate(key, where) or lone_surrogate(item, f"{where}.{key}")
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = lone_surrogate(item, f"{where}[{i}]")
            if found:
                return found
    return None


class Body(BaseModel):
    """A request body: text anywhere in it must be valid Unicode (a 400 naming where, not a 500 later)."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = lone_surrogate(data)
        if where is not None:
            raise ValueError(f"{where.removeprefix('body.')} holds a lone UTF-16 surrogate (\\ud800-\\udfff), "
                             f"which is not valid Unicode text")
        return data


class _Request(Body):
    model_config = ConfigDict(extra="ignore")  # as OpenAI's API: unknown fields are not an error

    model: str
    max_tokens: integer(gt=0) | None = None
    temperature: Number = Field(default=1.0, ge=0.0, le=2.0)
    top_p: Number = Field(default=1.0, gt=0.0, le=1.0)
    n: Int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: Bool = False
    stop: str | list[str] | None = None
    seed: integer(**SEED_RANGE) | None = None
    stream_options: dict | None = None  # {"include_usage": true}: a last chunk with the usage
    ignore_eos: Bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def choices(self) -> int:
        """The completions generated (more than answered with best_of)."""
        return self.n


class CompletionRequest(_Request):
    prompt: NonEmptyText | Annotated[list[integer(ge=0)], Field(min_length=1)]
    logprobs: integer(ge=0, le=MAX_TOP_LOGPROBS) | None = None  # the k most likely tokens and theirs
    # OpenAI's: generate best_of completions, answer the n with the highest log-probability per token (a best_of
    # below n generates n: the schema cannot state the bound, so a schema-valid request is served)
    best_of: integer(ge=1, le=MAX_CHOICES) | None = None

    @property
    def choices(self) -> int:
        return max(self.best_of or self.n, self.n)


class ChatMessage(Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: integer(gt=0) | None = None
    logprobs: Bool = False
    top_logprobs: integer(ge=0, le=MAX_TOP_LOGPROBS) | None = None  # without logprobs: no effect


class EmbeddingRequest(Body):
    model: str
    input: Text | Annotated[list[Text], Field(min_length=1)]
    encoding_format: Literal["float", "base64"] = "float"  # base64: little-endian float32, as OpenAI
    normalize: Bool = True
