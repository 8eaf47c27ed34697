"""Offline batch jobs in the OpenAI batch file format, crash-safe and resumable by id.

Input: one JSON object per line,

    {"custom_id": "req-1", "method": "POST", "url": "/v1/completions",
     "body": {"prompt": "text" | [token ids], "max_tokens": 16, "temperature": 0.7,
              "top_p": 0.9, "top_k": 0, "seed": 1, "stop": [token ids]}}

(`method` and `url` are optional; a prompt given as text needs a model with a tokenizer; `stop`
holds token ids, or strings that are one token each). Output: one line per input line,

    {"custom_id": ..., "response": {"status_code": 200, "body": {"token_ids": [...],
     "text": ..., "finish_reason": "stop" | "length", "usage": {...}}}, "error": null,
     "config": "<hash>"}

or, for a line that cannot be served, `"response": null, "error": {"code": ..., "message": ...,
"line": n}`: a line that is not JSON, a missing or repeated custom_id, a malformed body, a token
id that is not an integer in the vocabulary, an impossible request. The rest of the batch
completes.

Crash safety: results are appended and flushed as requests finish. A rerun reads the output
first: lines already there are skipped by custom_id (by line number for lines without one), a
torn last line (the process died mid-write) is cut off and redone, and an output written under
another model or engine configuration (the `config` hash in every line) is refused. Draws are
keyed by (seed, a hash of custom_id, step), so a resumed sampled run produces exactly the tokens
an uninterrupted one would (exactly in float32; with 16-bit weights a different batch
composition can round differently, as in any run).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator

import numpy as np

from moelens_jax.runtime import Engine, GenerationResult, Request
from moelens_jax.runtime.sampling import SamplingParams

DEFAULT_MAX_TOKENS = 16
# Input lines handed to the engine at once (it bounds memory): by default 8 x the sequences
# the KV cache holds at the input's mean request size (`default_chunk`), within these bounds.
CHUNK_MIN, CHUNK_MAX = 256, 65536
CHARS_PER_TOKEN = 4  # to size text prompts before tokenising them


class BatchError(ValueError):
    """The output file cannot be resumed (written by another configuration)."""


@dataclasses.dataclass(frozen=True)
class BatchItem:
    """One input line: its id, the request, or why it cannot be served."""

    line: int  # 1-based line number in the input
    custom_id: str | None
    request: Request | None = None
    error: tuple[str, str] | None = None  # (code, message)

    @property
    def key(self) -> str:
        """What resume matches on: the custom_id, or the line number for lines without one."""
        return self.custom_id if self.custom_id is not None else f"line:{self.line}"


def sample_key(custom_id: str) -> int:
    """A 63-bit integer from `custom_id` (stable across runs and machines)."""
    return int.from_bytes(hashlib.sha256(custom_id.encode()).digest()[:8], "little") >> 1


def _int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def _stop_ids(stop, model) -> tuple[int, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, (str, int)) else stop
    if not isinstance(items, list):
        raise ValueError(f"stop must be a token id, a string or a list, got {stop!r}")
    ids = []
    for s in items:
        if isinstance(s, int) and not isinstance(s, bool):
            ids.append(s)
        elif isinstance(s, str):
            enc = model.encode(s) if model.tokenizer is not None else None
            if enc is None or len(enc) != 1:
                raise ValueError(f"stop string {s!r} is not one token of this model's "
                                 "tokenizer; give stop token ids")
            ids.append(enc[0])
        else:
            raise ValueError(f"stop entries must be token ids or strings, got {s!r}")
    return tuple(ids)


def parse_line(text: str, line: int, model) -> BatchItem:
    """One input line as a `BatchItem` (an error item when it cannot be served)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return BatchItem(line, None, error=("invalid_json", f"line {line} is not JSON: {e}"))
    cid = obj.get("custom_id") if isinstance(obj, dict) else None
    if not isinstance(cid, str) or not cid:
        return BatchItem(line, None, error=(
            "invalid_request", f"line {line}: custom_id must be a non-empty string"))
    try:
        body = obj.get("body")
        if not isinstance(body, dict):
            raise ValueError("body must be an object")
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            if model.tokenizer is None:
                raise ValueError("text prompts need a model with a tokenizer; give token ids")
            ids = tuple(model.encode(prompt))
        elif isinstance(prompt, list):
            bad = next((t for t in prompt if isinstance(t, bool) or not isinstance(t, int)),
                       None)
            if bad is not None:
                raise ValueError(f"token id {bad!r} is not an integer")
            ids = tuple(prompt)
        else:
            raise ValueError("prompt must be a string or a list of token ids")
        max_tokens = _int(body.get("max_tokens", DEFAULT_MAX_TOKENS), "max_tokens", 1)
        sampling = SamplingParams(
            temperature=_float(body.get("temperature", 0.0), "temperature"),
            top_k=_int(body.get("top_k", 0), "top_k", 0),
            top_p=_float(body.get("top_p", 1.0), "top_p"),
            seed=_int(body.get("seed", 0), "seed", 0))
        req = Request(ids, max_tokens, stop_ids=_stop_ids(body.get("stop"), model),
                      sampling=sampling, sample_key=sample_key(cid))
    except ValueError as e:
        return BatchItem(line, cid, error=("invalid_request", f"line {line}: {e}"))
    return BatchItem(line, cid, request=req)


def duplicate_item(line: int, custom_id: str) -> BatchItem:
    """The error item of a line whose custom_id an earlier line already has (keyed by line
    number, so the earlier line's result keeps the id)."""
    return BatchItem(line, None, error=("duplicate_custom_id", f"line {line}: custom_id "
                                        f"{custom_id!r} repeats an earlier line"))


def read_lines(f, first: int = 1) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of the non-blank lines of a binary file whose first line is
    number `first`: lines end at b"\n" only (a lone "\r" is inside a line), blank means ASCII
    whitespace only. Every reader of an input file (this module, `batch_ray`) numbers lines
    this way."""
    for n, raw in enumerate(f, first):
        if raw.strip():
            yield n, raw


def decode_line(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def read_input(path: str, model) -> Iterator[BatchItem]:
    """The input file's items, in order; blank lines are skipped; a repeated custom_id is an
    error item."""
    seen: set[str] = set()
    with open(path, "rb") as f:
        for n, raw in read_lines(f):
            item = parse_line(decode_line(raw), n, model)
            if item.custom_id is not None and item.custom_id in seen:
                item = duplicate_item(n, item.custom_id)
            elif item.custom_id is not None:
                seen.add(item.custom_id)
            yield item


def config_hash(model, engine: Engine) -> str:
    """What output lines must agree on to be resumed together: the model (shape, dtype,
    source, a fingerprint of its weights) and the engine settings that change tokens."""
    w = model.weights
    fp = hashlib.sha256()
    for arr in (w.embed, w.final_norm):  # a sample of the weights: seeds and checkpoints differ
        fp.update(np.asarray(arr).reshape(-1)[:4096].tobytes())
    key = {"config": dataclasses.asdict(model.config), "dtype": model.dtype,
           "source": model.source, "weights": fp.hexdigest(),
           "kv_dtype": engine.store.dtype}
    if model.weight_dtype is not None:  # (absent for float models: their hashes stay as were)
        key["weight_dtype"] = model.weight_dtype
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def read_done(path: str) -> tuple[set[str], str | None]:
    """The keys of the lines already in `path` and the config hash they were written under
    (None for a missing or empty file), read line by line. A torn last line (no newline, or
    not JSON) is cut off the file. A broken line before the last is an error: cutting there
    would drop the results after it.

    Raises:
      BatchError: a broken line before the last, or lines of different configurations.
    """
    done: set[str] = set()
    found = None
    if not os.path.exists(path):
        return done, found
    good = 0  # bytes up to the end of the last complete, parseable line
    torn = None
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if torn is not None:
                raise BatchError(f"{path}: line {torn} is not a complete JSON line but more "
                                 "lines follow it; repair or move the file")
            try:
                rec = json.loads(raw) if raw.endswith(b"\n") else None
            except json.JSONDecodeError:
                rec = None
            if rec is None:
                torn = n
                continue
            if not isinstance(rec, dict) or not rec.get("config"):
                raise BatchError(f"{path}: line {n} has no config hash (not written by "
                                 "run_batch); write to a new output file")
            found = rec["config"] if found is None else found
            if rec["config"] != found:
                raise BatchError(f"{path} mixes lines of configurations {found} and "
                                 f"{rec.get('config')} (line {n}); repair or move the file")
            err = rec.get("error") or {}
            done.add(rec["custom_id"] if rec.get("custom_id") is not None
                     else f"line:{err.get('line')}")
            good += len(raw)
    if torn is not None:
        with open(path, "r+b") as f:
            f.truncate(good)
    return done, found


def check_config(path: str, found: str | None, config: str) -> None:
    """Raises `BatchError` unless the output's lines (config `found`) may be resumed by a run
    of config `config`."""
    if found is not None and found != config:
        raise BatchError(f"{path} holds results of another model or engine configuration "
                         f"(config {found}, this run {config}); write to a new output file")


def _result_line(item: BatchItem, res: GenerationResult | None, model, config: str) -> dict:
    if item.error is not None or res is None or res.finish_reason == "rejected":
        # The engine names a rejected request by its place in the engine's batch, which
        # depends on chunking and resume; the line number names it here.
        code, msg = item.error or ("invalid_request", f"line {item.line}: " + re.sub(
            r"^request \d+: ", "", res.error))
        return {"custom_id": item.custom_id, "response": None,
                "error": {"code": code, "message": msg, "line": item.line}, "config": config}
    body = {"token_ids": res.tokens, "finish_reason": res.finish_reason,
            "usage": {"prompt_tokens": res.prompt_len, "completion_tokens": len(res.tokens),
                      "total_tokens": res.prompt_len + len(res.tokens)}}
    if model.tokenizer is not None:
        body["text"] = model.decode(res.tokens)
    return {"custom_id": item.custom_id, "response": {"status_code": 200, "body": body},
            "error": None, "config": config}


@dataclasses.dataclass
class BatchStatus:
    """Progress of a batch job (also written as JSON to `<output>.status.json`)."""

    total_lines: int = 0
    skipped: int = 0  # already in the output (resume)
    done: int = 0  # written by this run
    errors: int = 0  # error lines written by this run
    generated_tokens: int = 0
    elapsed_s: float = 0.0
    driver_s: float = 0.0  # Ray: the driver's own work (reading the output, scanning the
    #                        input, writing the lines); lines / driver_s caps many replicas

    @property
    def generated_tokens_per_s(self) -> float:
        return self.generated_tokens / self.elapsed_s if self.elapsed_s else 0.0

    def eta_s(self) -> float | None:
        left = self.total_lines - self.skipped - self.done
        return left * self.elapsed_s / self.done if self.done else None


def serve(model, engine: Engine, part: list[BatchItem], config: str,
          emit: Callable[[dict], None]) -> None:
    """Runs `part` through the engine and hands each output line to `emit` as it is known:
    error items first, then each request as it finishes."""
    served = [item for item in part if item.error is None]
    for item in part:
        if item.error is not None:
            emit(_result_line(item, None, model, config))
    engine.generate([item.request for item in served],
                    on_finish=lambda res: emit(_result_line(served[res.index], res, model,
                                                            config)))


def completion_tokens(rec: dict) -> int:
    """Generated tokens in an output line (0 for an error line)."""
    return 0 if rec["response"] is None else rec["response"]["body"]["usage"][
        "completion_tokens"]


class Output:
    """The output file, appended and flushed line by line, and the status file beside it
    (`<output>.status.json`, replaced atomically)."""

    def __init__(self, path: str, status: BatchStatus,
                 on_status: Callable[[BatchStatus], None] | None = None,
                 t0: float | None = None):
        self.status, self.on_status = status, on_status
        self.status_path = path + ".status.json"
        self._t0 = time.perf_counter() if t0 is None else t0  # elapsed_s counts from here
        self._f = open(path, "a", encoding="utf-8")

    def write(self, line: str, error: bool, tokens: int) -> None:
        """Appends one output line (JSON text without the newline) and flushes it."""
        self._f.write(line + "\n")
        self._f.flush()
        self.status.done += 1
        self.status.errors += error
        self.status.generated_tokens += tokens

    def write_record(self, rec: dict) -> None:
        self.write(json.dumps(rec), rec["error"] is not None, completion_tokens(rec))

    def report(self) -> None:
        """Updates the status file (and calls `on_status`)."""
        self.status.elapsed_s = time.perf_counter() - self._t0
        _write_status(self.status_path, self.status)
        if self.on_status is not None:
            self.on_status(self.status)

    def close(self) -> None:
        self._f.close()
        self.report()


def input_sizes(path: str) -> tuple[int, float]:
    """The non-blank lines of `path` and their mean tokens per request (prompt plus
    max_tokens; a text prompt counted as one token per `CHARS_PER_TOKEN` characters), read
    line by line. Lines that do not parse count as nothing."""
    lines, tokens = 0, 0.0
    with open(path, "rb") as f:
        for _, raw in read_lines(f):
            lines += 1
            tokens += _request_tokens(raw)
    return lines, tokens / max(lines, 1)


def _request_tokens(raw: bytes) -> float:
    try:
        body = json.loads(decode_line(raw)).get("body") or {}
        prompt, max_tokens = body.get("prompt"), body.get("max_tokens", DEFAULT_MAX_TOKENS)
        n = len(prompt) / CHARS_PER_TOKEN if isinstance(prompt, str) else len(prompt)
        return n + (max_tokens if isinstance(max_tokens, int) else 0)
    except (ValueError, AttributeError, TypeError):
        return 0.0


def default_chunk(cfg, kv_cache_bytes: int, kv_dtype: str | None, tokens_per_request: float,
                  lines: int | None = None, replicas: int = 1) -> int:
    """Input lines handed to one engine at once: 8 x the sequences its KV cache holds at
    `tokens_per_request`, within [CHUNK_MIN, CHUNK_MAX]. Each `generate` call ends in a tail
    where its last sequences run as a small batch; eight cache-fulls keep that tail short.
    With `lines` to serve over `replicas` engines, at most ceil(lines / replicas), so that no
    replica idles while another holds two blocks."""
    seqs = kv_cache_bytes / (cfg.kv_bytes_per_token(kv_dtype) * max(tokens_per_request, 1.0))
    chunk = int(min(CHUNK_MAX, max(CHUNK_MIN, 8 * seqs)))
    if lines is not None:
        chunk = min(chunk, max(1, -(-lines // replicas)))
    return chunk


def run_batch(model, engine: Engine, input_path: str, output_path: str, *,
              chunk: int | None = None, on_status: Callable[[BatchStatus], None] | None = None)\
        -> BatchStatus:
    """Runs every input line not yet in `output_path` (module docstring) and returns the
    status. Each result line is appended and flushed as its request finishes. `chunk`: lines
    handed to the engine at once (default: `default_chunk`).

    Raises:
      BatchError: the output holds lines of another configuration, or a broken line before
        its last.
    """
    config = config_hash(model, engine)
    done, found = read_done(output_path)
    check_config(output_path, found, config)
    total, tokens_per_request = input_sizes(input_path)
    chunk = chunk or default_chunk(model.config, engine.config.kv_cache_bytes,
                                   engine.config.kv_dtype or model.dtype, tokens_per_request)
    out = Output(output_path, BatchStatus(total_lines=total), on_status)
    try:
        part: list[BatchItem] = []  # the input is read as it is served, `chunk` at a time
        for item in read_input(input_path, model):
            if item.key in done:
                out.status.skipped += 1
                continue
            part.append(item)
            if len(part) == chunk:
                serve(model, engine, part, config, out.write_record)
                out.report()
                part = []
        if part:
            serve(model, engine, part, config, out.write_record)
    finally:
        out.close()
    return out.status


def _write_status(path: str, status: BatchStatus) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({**dataclasses.asdict(status), "eta_s": status.eta_s(),
                   "generated_tokens_per_s": status.generated_tokens_per_s}, f)
    os.replace(tmp, path)
