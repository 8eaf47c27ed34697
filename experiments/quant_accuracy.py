"""What lower precision costs in quality, per model and (weight format, KV format).

For each model, weight format (the model's dtype, or its layers' matrices quantised to int8 /
int4: `Model.quantised`) and KV dtype, over a fixed seeded prompt set, against the model in its
own dtype with float32 K/V:

* logits: the full-sequence forward in which every query attends to K/V rounded as that
  store holds them (`reference.forward_with_stored_kv`, the numerics of each decode step):
  relative L2 error and top-1 agreement over every position;
* greedy continuations: the engine with that weight format and KV dtype against the engine on
  the model with float32 KV: the fraction of generated tokens before each request's first
  divergence, and of requests identical.

`predict --accuracy_json` reads this JSON to pick the fastest combination under
`--max_logit_rel_err`.

    python -m experiments.quant_accuracy
    python -m experiments.quant_accuracy --models /data/Mixtral-8x7B-v0.1 --num_prompts 8
"""

from __future__ import annotations

import itertools

import numpy as np
from absl import app, flags

import moelens_jax as mj
from experiments import common
from moelens_jax import reference
from moelens_jax.kv import KV_DTYPES
from moelens_jax.model.weights import WEIGHT_DTYPES
from moelens_jax.runtime import Engine, Request

_MODELS = flags.DEFINE_list("models", ["tiny-mixtral", "small-mixtral", "tiny-qwen3-moe"],
                            "Presets or HF checkpoint folders.")
_KV_DTYPES = flags.DEFINE_list("kv_dtypes", ["bfloat16", "int8", "float8_e4m3fn"],
                               f"KV formats to measure (of {', '.join(KV_DTYPES)}).")
_WEIGHT_DTYPES = flags.DEFINE_list("weight_dtypes", ["model", "int8", "int4"],
                                   "Weight formats: 'model' (its own dtype), int8, int4.")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 16, "Prompts in the fixed set.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Tokens per prompt.")
_GEN_LEN = flags.DEFINE_integer("gen_len", 16, "Greedy tokens generated per prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for random weights and the prompts.")


def _prefix_agreement(got, want) -> float:
    """Fraction of generated tokens before each request's first divergence."""
    same = sum(next((i for i, (a, b) in enumerate(zip(g, w, strict=False)) if a != b), len(w))
               for g, w in zip(got, want, strict=True))
    return same / max(1, sum(len(w) for w in want))


def measure(model, kv_dtypes, num_prompts: int, prompt_len: int, gen_len: int,
            seed: int, weight_dtypes=("model",)) -> list[dict]:
    """One row per (weight format, KV dtype) for `model` (module docstring); weight format
    "model" is the model as loaded."""
    cfg = model.config
    for d in kv_dtypes:
        if d not in KV_DTYPES:
            raise ValueError(f"unknown KV dtype {d!r}; choose from {KV_DTYPES}")
    for w in weight_dtypes:
        if w != "model" and w not in WEIGHT_DTYPES:
            raise ValueError(f"unknown weight format {w!r}; choose 'model' or one of "
                             f"{WEIGHT_DTYPES}")
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, cfg.vocab_size, (num_prompts, prompt_len))
    exact = np.asarray(reference.forward_with_stored_kv(model, prompts, "float32"))
    kv_bytes = 2 * num_prompts * (prompt_len + gen_len + 16) * cfg.kv_bytes_per_token("float32")
    reqs = [Request(tuple(int(t) for t in p), gen_len) for p in prompts]

    def greedy(m, kv_dtype):
        with Engine(m, kv_cache_bytes=kv_bytes, kv_dtype=kv_dtype,
                    weight_dtype=m.weight_dtype) as eng:
            return [r.tokens for r in eng.generate(reqs)]

    # every format quantised before any engine runs (an accelerator engine releases the
    # float layers it streams from)
    formats = {w: model if w == "model" else model.quantised(w) for w in weight_dtypes}
    want = greedy(model, "float32")
    rows = []
    for w, d in itertools.product(weight_dtypes, kv_dtypes):
        m = formats[w]
        logits = np.asarray(reference.forward_with_stored_kv(m, prompts, d))
        got = greedy(m, d)
        rows.append({
            "model": cfg.name or model.source, "dtype": model.dtype,
            "weight_dtype": m.weight_dtype or model.dtype, "kv_dtype": d,
            "kv_bytes_per_token": cfg.kv_bytes_per_token(d),
            "layer_bytes": m.host_layers[0].layout.nbytes,
            "logit_rel_l2": float(np.linalg.norm(logits - exact) / np.linalg.norm(exact)),
            "top1_agreement": float((logits.argmax(-1) == exact.argmax(-1)).mean()),
            "greedy_prefix_agreement": _prefix_agreement(got, want),
            "greedy_identical_requests": sum(g == w for g, w in zip(got, want, strict=True)),
            "num_prompts": num_prompts, "prompt_len": prompt_len, "gen_len": gen_len})
    return rows


def main(argv):
    del argv
    settings = common.log_flags(__name__)
    print(common.table([
        ("reference", "the model in its own dtype, float32 K/V"),
        ("prompts", f"{_NUM_PROMPTS.value} x {_PROMPT_LEN.value} tokens, seed {_SEED.value}; "
                    f"{_GEN_LEN.value} greedy tokens each"),
    ], "== quant_accuracy card =="), flush=True)
    rows = []
    for name in _MODELS.value:
        model = mj.load_model(name, seed=_SEED.value)
        new = measure(model, _KV_DTYPES.value, _NUM_PROMPTS.value, _PROMPT_LEN.value,
                      _GEN_LEN.value, _SEED.value, _WEIGHT_DTYPES.value)
        rows += new
        for r in new:
            print(f"{r['model']:>16} weights {r['weight_dtype']:>8} KV {r['kv_dtype']:>13}: "
                  f"logits rel-L2 "
                  f"{r['logit_rel_l2']:.4f}, top-1 {r['top1_agreement']:.3f}, greedy prefix "
                  f"{r['greedy_prefix_agreement']:.3f} ({r['greedy_identical_requests']}/"
                  f"{r['num_prompts']} identical)", flush=True)
    common.print_json({"settings": rows, "flags": settings,
                       "machine": common.machine_fingerprint()})


if __name__ == "__main__":
    app.run(main)
