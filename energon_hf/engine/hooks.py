"""What HF generate calls back while it runs, for our batcher: stop strings (transformers' StopStringCriteria on each
sequence's tokens) and streamers (TextStreamer, TextIteratorStreamer or any object with put / end)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# transformers' own message: a caller who ported code from HF meets the same words
NO_TOKENIZER = ("There are one or more stop strings, either in the arguments to `generate` or in the model's "
                "generation config, but we could not locate a tokenizer. When generating with stop strings, you must "
                "pass the model's tokenizer to the `tokenizer` argument of `generate`.")


def stop_test(stop_strings: list[str], tokenizer: Any) -> Callable[[list[int]], bool] | None:
    """A test of a sequence's tokens (prompt and generated) that says whether its last token completed one of
    `stop_strings`, as transformers' StopStringCriteria decides it (the string may span tokens and overhang the last
    one's end; it must overlap the last token)."""
    if not stop_strings:
        return None
    if tokenizer is None:
        raise ValueError(NO_TOKENIZER)
    from transformers.generation.stopping_criteria import StopStringCriteria

    criteria = StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings)
    tail = criteria.maximum_token_len  # the most tokens a match can span: all it reads of a sequence
    return lambda tokens: bool(criteria(torch.tensor([tokens[-tail:]]), None)[0])


class StreamerSink:
    """A request's event queue that hands each new token to an HF streamer (`put` with a [1] tensor, as
    transformers' generate does for a batch of one); the end-of-request event is the caller's to turn into
    streamer.end(), once the request's result is in."""

    def __init__(self, streamer: Any):
        self.streamer = streamer

    def put(self, event: tuple) -> None:
        _, item = event
        if isinstance(item, int):
            self.streamer.put(torch.tensor([item]))
