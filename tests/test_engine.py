"""The engine against the oracles: greedy full recompute (`reference.greedy_generate`) and HF
transformers; invariance under page size, token budget and preemption; bad input."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
import transformers

import moelens_jax as mj
from moelens_jax import reference
from moelens_jax.model.model import Model
from moelens_jax.model.weights import random_init
from moelens_jax.ops.prefill import packed_prefill_attention
from moelens_jax.runtime import Engine, Request, SamplingParams


def _model(preset="tiny-mixtral", seed=1):
    cfg = mj.get_preset(preset).replace(dtype="float32")
    return Model(cfg, *random_init(cfg, seed=seed, init_std=0.1))  # decisive logits


def _requests(cfg, n=16, seed=0, max_prompt=60, max_gen=20):
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, max_prompt, n)
    lens[:3] = [1, 16, 55]  # one token, exactly one page, more than three pages
    return [Request(tuple(rng.integers(0, cfg.vocab_size, int(p)).tolist()), int(g))
            for p, g in zip(lens, rng.integers(1, max_gen, n), strict=True)]


def _kv_bytes(cfg, tokens, page_size):
    return (tokens // page_size + 1) * page_size * cfg.kv_bytes_per_token("float32")


@pytest.fixture(scope="module")
def oracle():
    model = _model()
    reqs = _requests(model.config)
    want = reference.greedy_generate(model, [r.prompt for r in reqs],
                                     [r.max_new_tokens for r in reqs])
    return model, reqs, want


@pytest.mark.parametrize("pipeline", ["serial", "vslpipe"])
@pytest.mark.parametrize("page_size,token_budget,kv_tokens,preempts", [
    (16, 512, 4096, False),   # everything fits
    (1, 512, 4096, False),    # one token per page
    (16, 24, 4096, False),    # small budget: many iterations, prompts admitted alone
    (16, 512, 96, True),      # tiny cache: preemption and recomputation
    (1, 64, 90, True),
])
def test_engine_equals_greedy_oracle(oracle, page_size, token_budget, kv_tokens, preempts,
                                     pipeline):
    model, reqs, want = oracle
    eng = Engine(model, kv_cache_bytes=_kv_bytes(model.config, kv_tokens, page_size),
                 page_size=page_size, token_budget=token_budget, pipeline=pipeline,
                 record_stages=True)
    got = eng.generate(reqs)
    assert eng.mode == eng.stats.mode == pipeline
    assert [r.tokens for r in got] == want
    assert all(r.finish_reason == "length" for r in got)
    assert (eng.stats.preemptions > 0) == preempts
    assert eng.store.free_pages() == eng.kv_pages  # every page returned
    assert eng.stats.generated_tokens == sum(len(w) for w in want)
    assert 0 < eng.stats.kv_peak_fraction <= 1
    # Telemetry: every layer of every iteration ran each stage; the trace holds them.
    L = model.config.num_layers
    stages = {(st, layer) for st, layer, *_ in eng.stats.stage_events}
    assert stages >= {(st, layer) for st in ("C", "GB") for layer in range(L)}
    assert all(it.c_s > 0 and it.gb_s > 0 for it in eng.stats.per_iteration)
    names = {e["name"] for e in eng.stats.chrome_trace()["traceEvents"]}
    assert {"C L0", "GB L0", "iteration 0"} <= names
    groups = {g for _, _, g, *_ in eng.stats.stage_events}
    assert groups == ({0, 1} if pipeline == "vslpipe" else {0})  # two groups did interleave


def test_engine_is_reusable(oracle):
    model, reqs, want = oracle
    eng = Engine(model, kv_cache_bytes=_kv_bytes(model.config, 2048, 16))
    assert [r.tokens for r in eng.generate(reqs[:5])] == want[:5]
    assert [r.tokens for r in eng.generate(reqs[5:])] == want[5:]
    assert eng.store.free_pages() == eng.kv_pages


@pytest.mark.parametrize("pipeline,kv_tokens", [("serial", 4096), ("vslpipe", 4096),
                                                ("serial", 96)])
def test_warmup_compiles_every_shape_the_run_uses(oracle, pipeline, kv_tokens):
    """After `warmup(reqs)`, `generate(reqs)` compiles nothing (preemption included) and gives
    the oracle's tokens; the warm-up served nothing and used no KV page."""
    model, reqs, want = oracle
    eng = Engine(model, kv_cache_bytes=_kv_bytes(model.config, kv_tokens, 16),
                 token_budget=40, pipeline=pipeline)
    assert eng.warmup(reqs) > 0
    assert eng.store.free_pages() == eng.kv_pages
    compiles = []

    def listener(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        got = eng.generate(reqs)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert [r.tokens for r in got] == want
    assert compiles == []


@pytest.mark.parametrize("preset", ["tiny-qwen2-moe", "tiny-qwen3-moe"])
def test_other_families_equal_oracle(preset):
    model = _model(preset, seed=2)
    reqs = _requests(model.config, n=6, seed=3, max_gen=8)
    want = reference.greedy_generate(model, [r.prompt for r in reqs],
                                     [r.max_new_tokens for r in reqs])
    eng = Engine(model, kv_cache_bytes=_kv_bytes(model.config, 80, 4), page_size=4)
    assert [r.tokens for r in eng.generate(reqs)] == want


@pytest.mark.parametrize("case", ["mixtral-g2-top2", "qwen3-g4-top2-hd12"])
def test_engine_equals_hf_generate(hf_checkpoints, case):
    folder = hf_checkpoints[case]
    model = mj.load_model(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, model.config.vocab_size, n).tolist() for n in (3, 18, 7)]
    eng = Engine(model, kv_cache_bytes=_kv_bytes(model.config, 512, 16))
    got = eng.generate([Request(tuple(p), 12) for p in prompts])
    for prompt, res in zip(prompts, got, strict=True):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12,
                              min_new_tokens=12, eos_token_id=None, pad_token_id=0)
        assert res.tokens == out[0, len(prompt):].tolist()


def test_stop_ids_end_a_request_early(oracle):
    model, reqs, want = oracle
    i = next(j for j, w in enumerate(want) if len(w) >= 4)
    stop = want[i][2]
    r = Request(reqs[i].prompt, reqs[i].max_new_tokens, stop_ids=(stop,))
    res = Engine(model, kv_cache_bytes=_kv_bytes(model.config, 512, 16)).generate([r])[0]
    k = want[i].index(stop)
    assert res.finish_reason == "stop" and res.tokens == want[i][:k + 1]


def test_sampling_is_deterministic_and_batch_independent(oracle):
    model, reqs, _ = oracle
    sp = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=7)
    a = Engine(model, kv_cache_bytes=_kv_bytes(model.config, 4096, 16)).generate(reqs, sp)
    b = Engine(model, kv_cache_bytes=_kv_bytes(model.config, 90, 1), page_size=1,
               token_budget=32).generate(reqs, sp)
    c = Engine(model, kv_cache_bytes=_kv_bytes(model.config, 4096, 16)).generate(
        reqs, SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=8))
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert [r.tokens for r in a] != [r.tokens for r in c]


def test_bad_requests_are_rejected_individually(oracle):
    model, reqs, want = oracle
    eng = Engine(model, kv_cache_bytes=_kv_bytes(model.config, 96, 16))
    cap = eng.kv_pages * 16
    bad = [Request((), 4), Request((1, model.config.vocab_size), 4), Request((1, 2), 0),
           Request((1,) * cap, 2)]
    got = eng.generate([reqs[0], *bad, reqs[1]])
    assert got[0].tokens == want[0] and got[5].tokens == want[1]
    assert [g.finish_reason for g in got[1:5]] == ["rejected"] * 4
    assert "empty prompt" in got[1].error
    assert f"token id {model.config.vocab_size} is outside the vocabulary" in got[2].error
    assert "max_new_tokens must be an integer >= 1, got 0" in got[3].error
    assert "but the whole cache holds" in got[4].error
    assert eng.store.free_pages() == eng.kv_pages


def test_kv_budget_too_small():
    model = _model()
    with pytest.raises(ValueError, match="holds no page"):
        Engine(model, kv_cache_bytes=100)
    with pytest.raises(ValueError, match="at least 2 are needed"):
        Engine(model, kv_cache_bytes=_kv_bytes(model.config, 15, 16))


def test_on_finish_streams_results_in_completion_order(oracle):
    model, reqs, want = oracle
    seen = []
    eng = Engine(model, kv_cache_bytes=_kv_bytes(model.config, 4096, 16))
    got = eng.generate(reqs[:6], on_finish=seen.append)
    assert sorted(r.index for r in seen) == list(range(6))
    assert [r.tokens for r in got] == want[:6]
    trace = eng.stats.chrome_trace()
    slices = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(slices) == eng.stats.iterations and all(e["dur"] > 0 for e in slices)


def test_interrupted_run_resumes_without_recomputing(oracle, tmp_path):
    from moelens_jax.runtime.results_io import generate_resumable, load_done
    model, reqs, want = oracle
    reqs, want = reqs[:8], want[:8]
    path = str(tmp_path / "results.jsonl")
    eng = Engine(model, kv_cache_bytes=_kv_bytes(model.config, 4096, 16))

    class Killed(Exception):
        pass

    calls = {"n": 0}
    real_step = eng._step

    def dying_step(*args):  # the process "dies" after a few iterations
        calls["n"] += 1
        if calls["n"] == 6:
            raise Killed
        return real_step(*args)

    eng._step = dying_step
    with pytest.raises(Killed):
        generate_resumable(eng, reqs, path)
    first = load_done(path)
    assert 0 < len(first) < len(reqs)
    assert eng.store.free_pages() == eng.kv_pages  # the interrupted engine leaked nothing
    with open(path, "a") as f:
        f.write('{"id": 7, "tok')  # a torn line, as a crash mid-write would leave
    eng._step = real_step
    records, computed = generate_resumable(eng, reqs, path)
    assert sorted(computed) == sorted(set(range(len(reqs))) - set(first))
    with open(path) as f:
        ids = [json.loads(line)["id"] for line in f if line.strip().endswith("}")]
    assert sorted(ids) == list(range(len(reqs)))  # every request exactly once
    assert [records[i]["tokens"] for i in range(len(reqs))] == want
    _, again = generate_resumable(eng, reqs, path)
    assert again == []


@pytest.mark.parametrize("seed", range(2))  # 24 random layouts (each compiles; ~25 s a seed)
def test_tiled_prefill_attention_equals_dense_segment_attention(seed):
    """Random layouts: segments straddling tiles, tiles shared by segments and decode/padding
    rows, pair counts that need bucket padding; pairs in chunks of any size and order."""
    import jax.numpy as jnp

    from moelens_jax.model.stages import tiled_prefill_attention
    from moelens_jax.reference import segment_causal_attention
    from moelens_jax.runtime.layout import prefill_tile_pairs, row_bucket
    rng = np.random.default_rng(seed)
    for trial in range(12):
        lens = [int(x) for x in rng.integers(1, 140, rng.integers(1, 6))]
        n_pre = sum(lens)
        lead = int(rng.integers(0, 40))  # decode rows come first in an engine group
        n = row_bucket(lead + n_pre + int(rng.integers(0, 40)))
        seg = np.full(n, -1)
        pos = np.zeros(n, np.int64)
        row = lead
        for k, ln in enumerate(lens):
            seg[row:row + ln], pos[row:row + ln] = k, np.arange(ln)
            row += ln
        q = rng.standard_normal((n, 8, 16)).astype(np.float32)
        k_ = rng.standard_normal((n, 2, 16)).astype(np.float32)
        v = rng.standard_normal((n, 2, 16)).astype(np.float32)
        pairs = prefill_tile_pairs(seg)
        want = segment_causal_attention(q, k_, v, jnp.asarray(seg), jnp.asarray(pos))
        # Default chunk (all pairs at once here), and chunks that split a query tile's pairs
        # across scan steps (the online-softmax merge), in shuffled pair order.
        variants = [(None, None), (1, None), (3, rng.permutation(len(pairs)))]
        for chunk, perm in variants if trial < 3 else variants[:1]:  # (each compiles a scan)
            p_ = pairs if perm is None else pairs[perm]
            got = tiled_prefill_attention(q, k_, v, jnp.asarray(seg), jnp.asarray(pos),
                                          jnp.asarray(p_), chunk=chunk)
            reference.assert_close(got, want, atol=1e-5,
                                   name=f"tiled prefill attention {lens} chunk {chunk}")
        real = pairs[pairs[:, 2] > 0]
        assert len({tuple(p) for p in real}) == len(real)  # no pair counted twice
        fast = packed_prefill_attention(q, k_, v, jnp.asarray(seg), jnp.asarray(pos))
        reference.assert_close(fast, want, atol=1e-5, name=f"C++ prefill attention {lens}")
        np.testing.assert_array_equal(np.asarray(fast)[seg < 0], 0.0)


@pytest.mark.parametrize("heads,kv_heads,d,scale", [(8, 2, 16, None), (12, 1, 24, 0.3),
                                                    (20, 2, 64, None), (4, 4, 8, 1.7)])
def test_cpu_prefill_attention_shapes_and_scale(heads, kv_heads, d, scale):
    """GQA groups above the kernel's head block (10 heads per kv head), MHA, head dims that are
    not a multiple of the SIMD width, explicit scales; a segment longer than one page block."""
    import jax.numpy as jnp

    from moelens_jax.reference import segment_causal_attention

    rng = np.random.default_rng(heads)
    lens = [300, 3, 1, 40]
    n = sum(lens) + 5
    seg, pos = np.full(n, -1), np.zeros(n, np.int64)
    row = 2
    for k, ln in enumerate(lens):
        seg[row:row + ln], pos[row:row + ln] = k, np.arange(ln)
        row += ln
    q = rng.standard_normal((n, heads, d)).astype(np.float32)
    k_ = rng.standard_normal((n, kv_heads, d)).astype(np.float32)
    v = rng.standard_normal((n, kv_heads, d)).astype(np.float32)
    got = packed_prefill_attention(q, k_, v, jnp.asarray(seg), jnp.asarray(pos), scale=scale)
    if scale is not None:
        q = q * scale * d ** 0.5  # the reference always scales by d^-0.5
    want = segment_causal_attention(q, k_, v, jnp.asarray(seg), jnp.asarray(pos))
    reference.assert_close(got, want, atol=1e-5, name="C++ prefill attention")


def test_cpu_prefill_attention_rejects_bad_layouts():
    import jax.numpy as jnp

    q = np.ones((6, 2, 8), np.float32)
    kv = np.ones((6, 1, 8), np.float32)
    bad = {"not contiguous": ([0, 0, 1, 0, -1, -1], [0, 1, 0, 2, 0, 0]),
           "not consecutive": ([0, 0, 0, -1, -1, -1], [0, 1, 3, 0, 0, 0])}
    for match, (seg, pos) in bad.items():
        with pytest.raises(Exception, match=match):
            jax.block_until_ready(packed_prefill_attention(q, kv, kv, jnp.asarray(seg),
                                                           jnp.asarray(pos)))
    for scale in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="finite positive"):
            packed_prefill_attention(q, kv, kv, jnp.zeros(6, jnp.int32), jnp.arange(6),
                                     scale=scale)


def test_shape_rules_shared_with_stage2():
    """tile_pair_count (Stage 2 charges it) == the pairs the engine builds, on random group
    layouts."""
    from moelens_jax.runtime.layout import GroupShape, build_group, tile_pair_count

    rng = np.random.default_rng(0)
    for _ in range(300):
        n_dec = int(rng.integers(0, 70))
        lens = [int(x) for x in rng.integers(1, 300, rng.integers(0 if n_dec else 1, 6))]
        tokens = {i: [1] * int(rng.integers(1, 200)) for i in range(n_dec)}
        tokens.update({100 + j: [1] * n for j, n in enumerate(lens)})
        g = build_group(list(range(n_dec)), [(100 + j, n) for j, n in enumerate(lens)], tokens)
        assert tile_pair_count(lens, n_dec) == g.pairs.shape[0]
        shape = GroupShape.of(lens, [len(tokens[i]) for i in range(n_dec)])
        assert shape.padded_rows == g.tok.shape[0] and shape.tile_pairs == g.pairs.shape[0]
        assert shape.logit_rows >= len(g.last_rows) and shape.decode_tokens == n_dec


def test_vslpipe_split_balances_predicted_time():
    """split_plan: every sequence in exactly one group, plan order kept within a group, the
    two loads within one item of each other; a decode row with a long context counts more."""
    from moelens_jax.runtime.layout import SplitCosts, split_plan
    from moelens_jax.runtime.scheduler import Plan

    rng = np.random.default_rng(1)
    for _ in range(200):
        decode = list(range(int(rng.integers(0, 20))))
        prefill = [(100 + j, int(n)) for j, n in enumerate(rng.integers(1, 90, rng.integers(0, 5)))]
        if not decode and not prefill:
            continue
        kv = [int(x) for x in rng.integers(1, 4000, len(decode))]
        costs = SplitCosts(1.0, float(rng.choice([0.0, 0.01])))
        groups = split_plan(Plan(prefill, decode, []), kv, costs)
        assert sorted(r for d, _ in groups for r in d) == decode
        assert sorted(p for _, ps in groups for p in ps) == prefill
        for d, ps in groups:
            assert d == sorted(d) and ps == sorted(ps)
        if len(groups) == 2:
            cost = {**{r: 1 + costs.kv_token_s * kv[r] for r in decode},
                    **{r: float(n) for r, n in prefill}}
            loads = [sum(cost[r] for r in d) + sum(cost[r] for r, _ in ps) for d, ps in groups]
            assert abs(loads[0] - loads[1]) <= max(cost.values()) + 1e-9
        else:
            assert len(decode) + len(prefill) == 1
    # one decode row reading 10x the KV of the others balances against them all
    groups = split_plan(Plan([], [0, 1, 2, 3], []), [4000, 400, 400, 400], SplitCosts(0.0, 1.0))
    assert sorted(len(d) for d, _ in groups) == [1, 3]


def test_public_api_contract():
    """DESIGN section 6: the research API names users depend on."""
    assert mj.Engine is Engine and mj.Request is Request and mj.SamplingParams is SamplingParams
    import dataclasses
    # Engine(model, *, kv_cache_bytes, page_size=16, policy="moe-lens", ...): the keywords are
    # EngineConfig fields, whose defaults live there once.
    fields = {f.name: f for f in dataclasses.fields(mj.EngineConfig)}
    assert fields["page_size"].default == 16 and fields["policy"].default == "moe-lens"
    assert fields["kv_cache_bytes"].default is dataclasses.MISSING
    model = _model()
    with mj.Engine(model, kv_cache_bytes=_kv_bytes(model.config, 64, 16), page_size=16,
                   policy="moe-lens") as eng:
        assert eng.config == mj.EngineConfig(kv_cache_bytes=_kv_bytes(model.config, 64, 16))
    with pytest.raises(TypeError, match="kv_cache_bytes"):
        mj.Engine(model, page_size=16)
    with pytest.raises(TypeError, match="no_such_setting"):
        mj.Engine(model, kv_cache_bytes=1 << 20, no_such_setting=1)


def test_text_prompts_with_the_checkpoint_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from moelens_jax.checkpoint import save_hf
    model = _model()
    folder = tmp_path / "ck"
    save_hf(model, str(folder))
    vocab = {f"w{i}": i for i in range(model.config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    loaded = mj.load_model(folder)
    assert loaded.encode("w5 w17 w3") == [5, 17, 3]
    eng = Engine(loaded, kv_cache_bytes=_kv_bytes(loaded.config, 512, 16))
    streamed = []
    text_res, ids_res = eng.generate(["w5 w17 w3", Request((5, 17, 3), 6)],
                                     max_new_tokens=6, on_finish=streamed.append)
    assert text_res.tokens == ids_res.tokens
    assert text_res.text == " ".join(f"w{t}" for t in text_res.tokens)
    assert ids_res.text is None
    assert any(r.text == text_res.text for r in streamed)
    with pytest.raises(ValueError, match="text prompts need a tokenizer"):
        Engine(model, kv_cache_bytes=_kv_bytes(model.config, 512, 16)).generate(["w1 w2"])


@pytest.mark.parametrize("kv_tokens,max_batch", [(4096, None), (200, None), (4096, 3)])
def test_moe_lightning_policy_equals_oracle(oracle, kv_tokens, max_batch):
    """The MoE-Lightning policy runs on the same kernels and yields the same greedy tokens;
    its static batches reserve KV, so it never preempts."""
    model, reqs, want = oracle
    eng = Engine(model, kv_cache_bytes=_kv_bytes(model.config, kv_tokens, 16),
                 policy="moe-lightning", max_batch=max_batch)
    got = eng.generate(reqs)
    assert [r.tokens for r in got] == want
    assert eng.stats.preemptions == 0 and eng.store.free_pages() == eng.kv_pages
    assert all(it.shape.decode_tokens == 0 or it.shape.prefill_tokens == 0
               for it in eng.stats.per_iteration)  # prefill and decode never share a pass


@pytest.mark.parametrize("pipeline", ["serial", "vslpipe"])
def test_moe_lightning_micro_batches_equal_oracle_and_stage2(oracle, pipeline):
    """N sequences as mu-sized micro-batches (MoE-Lightning's plan) through either executor:
    the oracle's tokens, every iteration in ceil(sequences / mu) groups of at most mu, and
    Stage 2 planning the same iterations laid out exactly as the engine ran them."""
    import dataclasses

    from moelens_jax import perf
    model, reqs, want = oracle
    mu = 2
    config = mj.EngineConfig(kv_cache_bytes=_kv_bytes(model.config, 4096, 16),
                             policy="moe-lightning", max_batch=5, micro_batch=mu,
                             pipeline=pipeline, record_stages=True)
    with Engine(model, config) as eng:
        assert [r.tokens for r in eng.generate(reqs)] == want
        records = eng.stats.per_iteration
    for it in records:
        seqs = it.shape.decode_tokens + it.shape.prefill_seqs
        assert len(it.shape.groups) == -(-seqs // mu)
        assert all(g.decode_tokens + g.prefill_seqs <= mu for g in it.shape.groups)
    costs = perf.EngineCosts.from_hardware(model.config, perf.get_hardware("a40"))
    costs = dataclasses.replace(costs, shared_cores=True)  # the engine ran on a CPU
    pred = perf.predict(model.config, costs, perf.Workload.from_requests(reqs), config)
    assert pred.iterations == len(records)
    # The layout rule Stage 2 charges (IterationShape.of on the simulated plans) is the one
    # the engine ran, iteration by iteration.
    from moelens_jax.runtime.layout import IterationShape
    from moelens_jax.runtime.scheduler import make_scheduler
    sched = make_scheduler("moe-lightning", eng.kv_pages, 16, config.token_budget, 5)
    for i, r in enumerate(reqs):
        sched.add(i, len(r.prompt), r.max_new_tokens)
    shapes = []
    while not sched.done:
        plan = sched.schedule()
        kv = [sched.seqs[rid].total for rid in plan.decode]
        shapes.append(IterationShape.of(plan, kv, tile_pairs=False, micro_batch=mu))
        sched.complete(plan, set())
    assert shapes == [it.shape for it in records]
    with pytest.raises(ValueError, match="micro_batch is MoE-Lightning's"):
        mj.EngineConfig(kv_cache_bytes=1 << 20, micro_batch=4)


def test_profile_group_times_a_designed_layout_and_frees_its_pages():
    """The calibration micro-profile: shape as Stage 2 charges it, positive stage times, no
    page left behind, the engine still generates the oracle's tokens afterwards."""
    model = _model()
    with Engine(model, kv_cache_bytes=_kv_bytes(model.config, 4096, 16)) as eng:
        shape, t = eng.profile_group([40] * 3, [70, 9], repeats=2)
        assert (shape.decode_tokens, shape.prefill_tokens, shape.kv_tokens_read) == (3, 79, 120)
        assert shape.attended_keys == 70 * 71 // 2 + 9 * 10 // 2
        assert all(t[k] > 0 for k in ("ga_s", "c_s", "gb_s"))
        assert eng.store.free_pages() == eng.kv_pages
        reqs = [Request((5, 6, 7), 4), Request(tuple(range(1, 30)), 3)]
        want = reference.greedy_generate(model, [r.prompt for r in reqs], [4, 3])
        assert [r.tokens for r in eng.generate(reqs)] == want


@pytest.mark.parametrize("kv_dtype,min_prefix", [("int8", 0.9), ("float8_e4m3fn", 0.6)])
def test_quantised_kv_cache_end_to_end(oracle, kv_dtype, min_prefix):
    """An 8-bit KV cache (a scale per token and kv head) on the engine: the first token of
    every request is the oracle's (prefill attends to unquantised K/V on the device), later
    tokens follow the oracle for most of each request (measured on this model: int8 170/176
    tokens before the first divergence, float8 e4m3 125/176), the cache holds 4d / (d + 4) times
    the tokens of a float32 one in the same bytes, and Stage 2 sizes it as the engine does."""
    from moelens_jax import perf
    model, reqs, want = oracle
    cfg = model.config
    kv = _kv_bytes(cfg, 4096, 16)
    eng = Engine(model, kv_cache_bytes=kv, kv_dtype=kv_dtype)
    got = [r.tokens for r in eng.generate(reqs)]
    assert all(g[0] == w[0] for g, w in zip(got, want, strict=True))
    prefix = sum(next((i for i, (a, b) in enumerate(zip(g, w, strict=False))
                       if a != b), len(w))
                 for g, w in zip(got, want, strict=True))
    assert prefix >= min_prefix * sum(len(w) for w in want)
    assert eng.kv_pages == perf.engine_pages(cfg, kv, 16, kv_dtype)
    f32 = Engine(model, kv_cache_bytes=kv)
    d = cfg.head_dim  # 4 bytes per element vs 1 byte plus a 4-byte scale per row of d
    assert abs(eng.kv_pages + 1 - (f32.kv_pages + 1) * 4 * d / (d + 4)) <= 4 * d / (d + 4)
