"""Batch jobs on a local Ray cluster: two engine replicas write what the single-process job
writes (results and error lines), resume each other's output, and refuse a foreign one."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import ray
from test_batch import PRESET, _engine, _line, _read

import moelens_jax as mj
from moelens_jax import batch, batch_ray

SPEC = {"path_or_preset": PRESET, "dtype": "float32", "seed": 0}


@pytest.fixture(scope="module")
def cluster():
    # Ray starts its processes with subprocess.Popen(preexec_fn=...), which runs JAX's at-fork
    # warning in this (JAX-initialised) process; each child execs at once, so it is harmless.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "os.fork", RuntimeWarning)
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """An input with sampled requests, bad lines and a repeated id, and the single-process
    job's output for it."""
    rng = np.random.default_rng(11)
    lines = []
    for i in range(30):
        prompt = rng.integers(0, 256, int(rng.integers(3, 30))).tolist()
        extra = {"temperature": 0.9, "top_p": 0.8, "seed": i} if i % 3 == 0 else {}
        lines.append(_line(f"id-{i}", prompt, int(rng.integers(2, 10)), **extra))
    lines[4:4] = ["not json", _line("id-2", [1, 2, 3]), _line("bad", [1, 99999]), ""]
    d = tmp_path_factory.mktemp("ray_job")
    inp, ref = d / "in.jsonl", d / "ref.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    model = mj.load_model(PRESET, dtype="float32", seed=0)
    with _engine(model) as eng:
        batch.run_batch(model, eng, str(inp), str(ref), chunk=7)
    return inp, _read(ref), model.config.kv_bytes_per_token("float32") * 4096


def _by_key(recs):
    out = {}
    for r in recs:
        key = r["custom_id"] or f"line:{r['error']['line']}"
        assert key not in out, f"{key} written twice"
        out[key] = r
    return out


def test_two_replicas_write_what_one_process_writes(cluster, job, tmp_path):
    inp, want, kv_bytes = job
    out = tmp_path / "out.jsonl"
    st = batch_ray.run_batch_ray(SPEC, str(inp), str(out), settings={"kv_cache_bytes": kv_bytes},
                                 replicas=2, chunk=6, replica_cpus=1)
    got = _read(out)
    assert _by_key(got) == _by_key(want)
    assert len(got) == 33 and st.done == 33 and st.errors == 3 and st.skipped == 0
    assert st.generated_tokens == sum(batch.completion_tokens(r) for r in want)
    assert json.loads((tmp_path / "out.jsonl.status.json").read_text())["done"] == 33


def test_resume_and_refusal(cluster, job, tmp_path):
    """Ray resumes the single-process job's output (a torn last line is redone, each id once)
    and refuses an output of another configuration without touching it."""
    inp, want, kv_bytes = job
    out = tmp_path / "out.jsonl"
    head = [json.dumps(r) for r in want[:13]]
    out.write_text("\n".join(head) + "\n" + json.dumps(want[13])[:25])
    settings = {"kv_cache_bytes": kv_bytes}
    st = batch_ray.run_batch_ray(SPEC, str(inp), str(out), settings=settings, replicas=2,
                                 chunk=6)
    assert st.skipped == 13 and st.done == 20
    assert _by_key(_read(out)) == _by_key(want)
    foreign = [dict(r, config="0" * 16) for r in want[:5]]
    out.write_text("".join(json.dumps(r) + "\n" for r in foreign))
    before = out.read_text()
    with pytest.raises(batch.BatchError, match="another model or engine configuration"):
        batch_ray.run_batch_ray(SPEC, str(inp), str(out), settings=settings, replicas=1)
    assert out.read_text() == before


def test_driver_scan_numbers_lines_as_the_single_process_reader(tmp_path):
    """The driver's blocks (scan + read_block) serve exactly the lines `read_input` would, with
    the same numbers and the same repeated-id marks, whatever the bytes: a lone "\\r" inside
    a line, CRLF, a BOM, invalid UTF-8, blank lines; done lines are skipped, and a long run of
    them ends a block."""
    model = mj.load_model(PRESET, dtype="float32", seed=0)
    raw = [_line("a", [1, 2]).encode() + b"\r\n",                      # 1 CRLF
           b"\xef\xbb\xbf" + _line("bom", [3]).encode() + b"\n",      # 2 BOM: not JSON
           _line("c", [4]).encode()[:-1] + b"\r}\n",                   # 3 lone \r inside
           b"   \n", b"\n",                                            # 4, 5 blank
           _line("d", [5]).encode().replace(b"]", b"] ", 1)[:-2] + b"\xe9\"}\n",  # 6 bad UTF-8
           _line("a", [6]).encode() + b"\n"]                           # 7 repeats "a"
    raw += [_line(f"k{i}", [i % 200]).encode() + b"\n" for i in range(20)]  # 8..27
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(raw))
    items = list(batch.read_input(str(path), model))
    done = {"k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7", "k8", "k9", "k15"}
    want = [(it.line, it.custom_id is None and it.error is not None
             and it.error[0] == "duplicate_custom_id") for it in items if it.key not in done]
    for chunk in (1, 3, 100):
        blocks, total, skipped = batch_ray.scan(str(path), done, chunk)
        got = [(r["line"], r["dup"]) for b in blocks for r in batch_ray.read_block(b, str(path))]
        assert got == want and total == len(items) and skipped == len(done), chunk
        assert all(b["lines"] <= chunk and len(b["skip"]) <= chunk for b in blocks)
    assert (7, True) in want and any(n == 3 for n, _ in want)
