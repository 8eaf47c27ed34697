"""Streaming results to a JSONL file, so an interrupted run loses nothing that finished.

Each finished request is appended as one JSON line (request id, tokens, finish reason, error,
text if any) and flushed at once. `generate_resumable` reads the file first and skips every
request id already there, so rerunning the same command after an interruption only computes
what is missing and the file ends with every request exactly once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

from moelens_jax.runtime.engine import Engine
from moelens_jax.runtime.requests import GenerationResult, Request


def load_done(path: str) -> dict[int, dict]:
    """Records already in `path` by request id (a torn last line from a crash is ignored)."""
    done: dict[int, dict] = {}
    if not os.path.exists(path):
        return done
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
                done[int(rec["id"])] = rec
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
    return done


def generate_resumable(engine: Engine, requests: Sequence[Request], path: str, *,
                       sampling=None, decode: Callable[[list[int]], str] | None = None,
                       progress: bool = False) -> tuple[dict[int, dict], list[int]]:
    """Runs the requests missing from `path`, appending each result as it finishes.

    Args:
      requests: the full request list; a request's id is its index here.
      decode: optional token-ids -> text function (adds a "text" field).

    Returns:
      (all records by id, the ids computed in this call).
    """
    done = load_done(path)
    if os.path.exists(path) and os.path.getsize(path):
        with open(path, "rb+") as f:  # terminate a torn last line before appending
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
    todo = [i for i in range(len(requests)) if i not in done]
    with open(path, "a") as f:
        def write(res: GenerationResult) -> None:
            rec = {"id": todo[res.index], "tokens": res.tokens,
                   "finish_reason": res.finish_reason, "prompt_len": res.prompt_len,
                   "error": res.error}
            if res.text is not None:
                rec["text"] = res.text
            elif decode is not None and res.tokens:
                rec["text"] = decode(res.tokens)
            f.write(json.dumps(rec) + "\n")
            f.flush()
            done[rec["id"]] = rec

        if todo:
            engine.generate([requests[i] for i in todo], sampling, on_finish=write,
                            progress=progress)
    return done, todo
