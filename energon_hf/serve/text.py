"""Text out of generated tokens: incremental detokenization with stop strings, and logprobs in OpenAI's shapes."""

from __future__ import annotations

from energon_hf.engine.sampling import TokenLogprob


class TextStopper:
    """Incremental detokenization with stop strings: `push(tokens)` returns the text that is safe to send
    (never a partial UTF-8 character, never the start of a stop string) and whether a stop string ended it."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops, self.sent = tokenizer, [s for s in stops if s], 0
        self.hold = max((len(s) for s in self.stops), default=1) - 1

    def push(self, tokens: list[int], final: bool = False) -> tuple[str, bool]:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        hits = [text.find(s, max(0, self.sent - len(s))) for s in self.stops]
        hits = [h for h in hits if h >= 0]
        if hits:
            end, stopped = min(hits), True
        else:
            end, stopped = len(text) if final else len(text.rstrip("\ufffd")) - self.hold, False
        delta = text[self.sent:max(end, self.sent)]
        self.sent += len(delta)
        return delta, stopped


class LogprobFormatter:
    """Token log-probabilities as /v1/completions (`logprobs: k`) or /v1/chat/completions (`logprobs: true,
    top_logprobs: k`) return them; `text_offset` continues across the chunks of one stream."""

    def __init__(self, tokenizer, chat: bool):
        self.tokenizer, self.chat, self.offset = tokenizer, chat, 0

    def _text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def format(self, tokens: list[int], logprobs: list[TokenLogprob]) -> dict:
        texts = [self._text(t) for t in tokens]
        if self.chat:
            def entry(text: str, logprob: float) -> dict:
                return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
            return {"content": [{**entry(text, lp.logprob),
                                 "top_logprobs": [entry(self._text(t), v) for t, v in lp.top]}
                                for text, lp in zip(texts, logprobs, strict=True)]}
        offsets = []
        for text in texts:
            offsets.append(self.offset)
            self.offset += len(text)
        return {"tokens": texts, "token_logprobs": [lp.logprob for lp in logprobs],
                "top_logprobs": [{self._text(t): v for t, v in lp.top} for lp in logprobs],
                "text_offset": offsets}
