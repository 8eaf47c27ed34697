"""What goes into the engine and what comes out: requests and per-request results."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Request:
    """A prompt (token ids, or text when the model has a tokenizer) and how many tokens to
    generate."""

    prompt: tuple[int, ...] | str
    max_new_tokens: int
    stop_ids: tuple[int, ...] = ()


@dataclasses.dataclass
class GenerationResult:
    index: int  # position in the request list
    tokens: list[int]  # generated token ids (prompt excluded)
    finish_reason: str  # "length", "stop" or "rejected"
    prompt_len: int
    error: str | None = None
    preemptions: int = 0
    text: str | None = None  # decoded output, for text prompts
