"""What goes into the engine and what comes out: requests and per-request results."""

from __future__ import annotations

import dataclasses

from moelens_jax.runtime.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class Request:
    """A prompt (token ids, or text when the model has a tokenizer) and how many tokens to
    generate.

    Attributes:
      sampling: this request's `SamplingParams` (None: the ones `generate` was called with).
      sample_key: the integer its draws are keyed by, with the seed and the step (None: its
        position in the request list). A batch job keys by a hash of the request's id, so a
        resumed run draws exactly what an uninterrupted one would.
    """

    prompt: tuple[int, ...] | str
    max_new_tokens: int
    stop_ids: tuple[int, ...] = ()
    sampling: SamplingParams | None = None
    sample_key: int | None = None


@dataclasses.dataclass
class GenerationResult:
    index: int  # position in the request list
    tokens: list[int]  # generated token ids (prompt excluded)
    finish_reason: str  # "length", "stop" or "rejected"
    prompt_len: int
    error: str | None = None
    preemptions: int = 0
    text: str | None = None  # decoded output, for text prompts
