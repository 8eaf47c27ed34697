"""Batch jobs: the OpenAI batch format in and out, one error line per bad line, crash-safe
resume by custom_id (a real subprocess killed with SIGKILL), and per-request sampling keyed by
id."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import moelens_jax as mj
from moelens_jax import batch
from moelens_jax.runtime import Engine, Request, SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET = "tiny-mixtral"  # float32 below: tokens do not depend on batch composition


@pytest.fixture(scope="module")
def model():
    return mj.load_model(PRESET, dtype="float32", seed=0)


def _engine(model):
    return Engine(model, kv_cache_bytes=4096 * model.config.kv_bytes_per_token("float32"))


def _line(cid, prompt, max_tokens=6, **body):
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/completions",
                       "body": {"prompt": prompt, "max_tokens": max_tokens, **body}})


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_error_lines_and_results(model, tmp_path):
    """Every malformed line, bad token id or impossible request gets its own error line (with
    its line number); the others complete with the engine's tokens."""
    rng = np.random.default_rng(0)
    good = [rng.integers(0, 256, n).tolist() for n in (5, 17, 9)]
    lines = [
        _line("a", good[0]),                                         # 1
        "{not json",                                                 # 2
        _line("b", good[1], temperature=0.8, top_p=0.9, seed=3),     # 3
        json.dumps({"body": {"prompt": [1, 2]}}),                    # 4 no custom_id
        _line("c", [1, 2.7, 3]),                                     # 5 float id
        _line("d", [1, 256]),                                        # 6 outside vocab
        _line("e", [1, 2], max_tokens=None),                         # 7
        _line("f", [1, 2], max_tokens=0),                            # 8
        _line("g", [1] * 5000),                                      # 9 beyond the KV cache
        _line("a", good[2]),                                         # 10 duplicate id
        _line("h", "text needs a tokenizer"),                        # 11
        _line("i", good[2], stop=["x"]),                             # 12 stop string
        "",                                                          # blank: skipped
        _line("j", good[2], stop=[7]),                               # 14
    ]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    with _engine(model) as eng:
        st = batch.run_batch(model, eng, str(inp), str(out), chunk=2)
        recs = _read(out)
        assert st.total_lines == 13 and st.done == 13 and st.errors == 10
        errors = {r["error"]["line"]: r for r in recs if r["error"]}
        assert sorted(errors) == [2, 4, 5, 6, 7, 8, 9, 10, 11, 12]
        assert "not JSON" in errors[2]["error"]["message"]
        assert "custom_id" in errors[4]["error"]["message"]
        assert "2.7 is not an integer" in errors[5]["error"]["message"]
        assert "outside the vocabulary" in errors[6]["error"]["message"]
        assert "max_tokens must be an integer >= 1, got None" in errors[7]["error"]["message"]
        assert "whole cache holds" in errors[9]["error"]["message"]
        assert errors[10]["error"]["code"] == "duplicate_custom_id"
        assert "tokenizer" in errors[11]["error"]["message"]
        ok = {r["custom_id"]: r["response"]["body"] for r in recs if not r["error"]}
        assert sorted(ok) == ["a", "b", "j"]
        want = eng.generate([Request(tuple(good[0]), 6)])[0].tokens
        assert ok["a"]["token_ids"] == want and ok["a"]["finish_reason"] == "length"
        assert ok["a"]["usage"] == {"prompt_tokens": 5, "completion_tokens": 6,
                                    "total_tokens": 11}
        j = ok["j"]
        assert j["finish_reason"] == "stop" or 7 not in j["token_ids"]
        # The sampled request draws by its id: alone, in another batch, it gives the same.
        alone = eng.generate([Request((1, 2, 3), 2), Request(
            tuple(good[1]), 6, sampling=SamplingParams(0.8, top_p=0.9, seed=3),
            sample_key=batch.sample_key("b"))])[1].tokens
        assert ok["b"]["token_ids"] == alone
    assert all(r["config"] == recs[0]["config"] for r in recs)
    status = json.loads((tmp_path / "out.jsonl.status.json").read_text())
    assert status["done"] == 13 and status["errors"] == 10


def test_default_chunk_fills_the_cache_and_every_replica():
    cfg = mj.config.get_preset("tiny-mixtral")
    per_seq = cfg.kv_bytes_per_token("float32") * 100
    assert batch.default_chunk(cfg, 1000 * per_seq, "float32", 100) == 8000  # 8 cache-fulls
    assert batch.default_chunk(cfg, per_seq, "float32", 100) == batch.CHUNK_MIN
    assert batch.default_chunk(cfg, 10**6 * per_seq, "float32", 100) == batch.CHUNK_MAX
    assert batch.default_chunk(cfg, 1000 * per_seq, "float32", 100, lines=9000,
                               replicas=4) == 2250  # no replica idles
    half = cfg.kv_bytes_per_token("int8") / cfg.kv_bytes_per_token("float32")
    assert batch.default_chunk(cfg, int(1000 * per_seq * half) + 1, "int8", 100) == 8000


def test_engine_rejects_bad_rows_without_losing_the_batch(model):
    """A float id is an error (never truncated), max_new_tokens=None rejects its request only."""
    with _engine(model) as eng:
        res = eng.generate([Request((1, 2.7), 3), Request((1, 2), None), Request((1, 2), 3),
                            Request((np.int64(4), 5.0), 2)])
    assert [r.finish_reason for r in res] == ["rejected", "rejected", "length", "length"]
    assert "not an integer" in res[0].error and "max_new_tokens" in res[1].error


def test_torn_last_line_and_foreign_output(model, tmp_path):
    """A torn last line is cut off and redone; a broken line before the last, or an output of
    another configuration, is refused without touching the file."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(_line(f"r{i}", [i + 1, 7, 9], 4) for i in range(5)) + "\n")
    with _engine(model) as eng:
        batch.run_batch(model, eng, str(inp), str(out))
        full = out.read_text().splitlines()
        out.write_text("\n".join(full[:3]) + "\n" + full[3][:20])  # died writing line 4
        st = batch.run_batch(model, eng, str(inp), str(out))
        assert st.skipped == 3 and st.done == 2
        assert sorted(out.read_text().splitlines()) == sorted(full)
        broken = out.read_text().splitlines()
        broken[1] = broken[1][:20]  # a broken line with results after it: never cut silently
        out.write_text("\n".join(broken) + "\n")
        with pytest.raises(batch.BatchError, match="line 2 is not a complete JSON line"):
            batch.run_batch(model, eng, str(inp), str(out))
        assert out.read_text().splitlines() == broken
    out.write_text("\n".join(full) + "\n")
    other = mj.load_model(PRESET, dtype="float32", seed=1)
    with _engine(other) as eng, pytest.raises(batch.BatchError, match="another model"):
        batch.run_batch(other, eng, str(inp), str(out))


def _run_batch_cmd(inp, out):
    return [sys.executable, "-m", "experiments.run_batch", f"--input={inp}", f"--output={out}",
            f"--model={PRESET}", "--dtype=float32", "--kv_cache_gb=0.002", "--chunk=6",
            "--token_budget=64"]


def test_resume_after_sigkill_gives_each_id_once_with_the_same_tokens(tmp_path):
    """A run killed with SIGKILL at random points and resumed writes each id exactly once, with
    the tokens of an uninterrupted run, sampled requests included."""
    rng = np.random.default_rng(5)
    lines = []
    for i in range(48):
        prompt = rng.integers(0, 256, int(rng.integers(3, 30))).tolist()
        extra = {"temperature": 0.9, "top_k": 20, "seed": i} if i % 3 == 0 else {}
        lines.append(_line(f"id-{i}", prompt, int(rng.integers(2, 12)), **extra))
    lines.insert(7, "garbage")
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    env = {**os.environ, "PYTHONPATH": ROOT}
    ref_out, out = tmp_path / "ref.jsonl", tmp_path / "out.jsonl"
    subprocess.run(_run_batch_cmd(inp, ref_out), cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=300)
    kills = 0
    for wait_lines in (6, 20):  # kill once some lines exist, at a random moment after
        proc = subprocess.Popen(_run_batch_cmd(inp, out), cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if out.exists() and out.read_text().count("\n") >= wait_lines:
                time.sleep(float(rng.uniform(0, 0.3)))
                proc.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.02)
        proc.wait(timeout=60)
    assert kills >= 1
    subprocess.run(_run_batch_cmd(inp, out), cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=300)
    got, want = _read(out), _read(ref_out)
    keys = [r["custom_id"] or f"line:{r['error']['line']}" for r in got]
    assert len(keys) == len(set(keys)) == 49
    by_key = lambda rs: {r["custom_id"] or "bad": r for r in rs}  # noqa: E731
    assert by_key(got) == by_key(want)
