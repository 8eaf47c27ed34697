"""Device memory, planned before anything is allocated: weights + activations of the budget.

On an accelerator the engine holds, per iteration, the resident weights (embedding, final
norm, lm_head), a window of `device_weight_layers` streamed layers, and the activations of
one iteration's rows through GA and GB. `plan_device_memory` checks the weights against the
device's capacity first (a clear error naming every term), then lowers the token budget until
the activations fit too, saying why (`DevicePlan.reason`).

`stage_activation_bytes` is an analytic upper bound of what one GA call and one GB call
allocate beyond their weights (temporaries and outputs) on the accelerator's code path (tiled
prefill attention in bounded chunks of tile pairs, "blocked" experts). A test ties it to XLA's
memory analysis of that same code compiled here with float32 weights at real model shapes:
bfloat16 weights only make the activations smaller (x and K/V cast to the narrower type).
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp

from moelens_jax.config import ModelConfig, dtype_itemsize
from moelens_jax.model import moe
from moelens_jax.model.stages import TILE, ga_stage, gb_stage, pair_bytes, pair_chunk
from moelens_jax.model.weights import abstract_weights
from moelens_jax.runtime.layout import bucket, padded_rows, row_bucket, tile_pair_count

log = logging.getLogger(__name__)

F32 = 4


@functools.lru_cache(maxsize=4096)
def _group_rows(tokens: int) -> int:
    """The most rows one group of `tokens` tokens computes (any decode/prefill split)."""
    # Decode rows are bucketed: the padding is largest just past a bucket size, and the
    # row bucket of the total is monotone, so those counts (and the ends) are the candidates.
    candidates, d = {0, tokens}, 1
    while d <= tokens:
        candidates.add(d)
        d = bucket(d) + 1
    return max(padded_rows(tokens - d, d) for d in candidates)


def max_iteration_rows(token_budget: int, groups: int = 1) -> int:
    """An upper bound on the rows one iteration computes under `token_budget` (bucket padding
    included): exact for one group; for VSLPipe's two groups, padded apart, a bound over
    every split of the tokens (rows are monotone in tokens, so a grid of splits bounds the
    splits between). A prompt longer than the budget runs alone: `DevicePlan`
    `max_prompt_tokens` covers it."""
    if groups == 1:
        return _group_rows(token_budget)
    step = max(1, token_budget // 256)
    cuts = sorted({*range(0, token_budget, step), token_budget})
    return max(_group_rows(hi) + _group_rows(token_budget - lo)
               for lo, hi in zip(cuts, cuts[1:] + [token_budget], strict=True))


def ga_activation_bytes(cfg: ModelConfig, rows: int) -> int:
    """Bound on one GA call's temporaries + outputs over `rows` rows: float32 q/k/v (outputs,
    pre-RoPE copies, the kv-dtype K/V), the per-query-tile online-softmax state and the
    output, plus one chunk of tile pairs."""
    qkv = cfg.q_size + 2 * cfg.kv_size
    max_pairs = (rows // TILE) * (rows // TILE + 1) // 2
    chunk = pair_chunk(max(1, max_pairs), cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, F32)
    return rows * F32 * (3 * qkv + 2 * cfg.q_size) + chunk * pair_bytes(
        cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, F32)


def gb_activation_bytes(cfg: ModelConfig, rows: int, weight_dtype: str) -> int:
    """Bound on one GB call's temporaries + outputs over `rows` rows: the residual, normed and
    attention rows, the k routed copies of each row (dispatched, expert outputs, combine), the
    shared expert's intermediate, one expert's weight slices and one block's SwiGLU."""
    h, k = cfg.hidden_size, cfg.num_experts_per_tok
    per_row = 3 * k * h + 2 * h + cfg.q_size + 3 * cfg.shared_expert_intermediate_size
    m = rows * k
    block = moe.block_rows(m, cfg.num_experts)
    expert = 3 * h * cfg.intermediate_size * dtype_itemsize(weight_dtype)
    return rows * F32 * per_row + expert + 2 * block * F32 * (2 * cfg.intermediate_size + h)


def stage_activation_bytes(cfg: ModelConfig, rows: int, weight_dtype: str) -> int:
    """GA's plus GB's bound (both groups of VSLPipe live at once: their rows sum to the
    iteration's)."""
    return ga_activation_bytes(cfg, rows) + gb_activation_bytes(cfg, rows, weight_dtype)


def compiled_ga_memory(cfg: ModelConfig, rows: int, weight_dtype: str, prompt_len: int = 926,
                       attention=None):
    """What the GA bound stands for, measured: XLA's memory analysis of one GA call over
    `rows` rows of `prompt_len`-token prompts (RAG-like by default; one prompt when `rows` is
    smaller), compiled for the default backend at abstract weights (nothing is allocated),
    K/V stored in the weight dtype. `attention` overrides the per-backend choice (tests
    compile the accelerator's tiled path on a CPU)."""
    sds = jax.ShapeDtypeStruct
    pairs = tile_pair_count([prompt_len] * (rows // prompt_len) or [rows], 0)
    f = functools.partial(ga_stage, cfg, jnp.dtype(weight_dtype), attention=attention)
    return jax.jit(f).trace(
        abstract_weights(cfg, weight_dtype).layers[0], sds((rows, cfg.hidden_size), jnp.float32),
        sds((rows,), jnp.int32), sds((rows,), jnp.int32), sds((pairs, 3), jnp.int32)
    ).lower().compile().memory_analysis()


def compiled_gb_memory(cfg: ModelConfig, rows: int, weight_dtype: str, expert_ffn=None):
    """XLA's memory analysis of one GB call over `rows` rows (as `compiled_ga_memory`);
    `expert_ffn` overrides the per-backend expert path."""
    sds = jax.ShapeDtypeStruct
    f = functools.partial(gb_stage, cfg, expert_ffn=expert_ffn)
    return jax.jit(f).trace(
        abstract_weights(cfg, weight_dtype).layers[0], sds((rows, cfg.hidden_size), jnp.float32),
        sds((rows, cfg.num_heads, cfg.head_dim), jnp.float32), sds((rows,), jnp.bool_)
    ).lower().compile().memory_analysis()


@dataclasses.dataclass(frozen=True)
class DevicePlan:
    """What the engine will hold on the device.

    Attributes:
      capacity_bytes: device memory the engine may use.
      weight_bytes: resident weights + the streamed layer window.
      activation_bytes: `stage_activation_bytes` at the token budget's rows.
      token_budget: the budget that fits (the requested one unless `reason` says otherwise).
      max_prompt_tokens: the longest prompt whose iteration (it runs alone when it exceeds the
        budget) fits; the engine rejects longer ones.
      reason: why the budget was lowered (None if it was not).
    """

    capacity_bytes: int
    weight_bytes: int
    activation_bytes: int
    token_budget: int
    max_prompt_tokens: int
    reason: str | None = None


def plan_device_memory(cfg: ModelConfig, weight_dtype: str, token_budget: int,
                       weight_bytes: int, capacity_bytes: int, groups: int = 1,
                       window_desc: str = "") -> DevicePlan:
    """Checks the weights against `capacity_bytes`, then lowers `token_budget` (logging why)
    until the activations of an iteration (of `groups` token groups) fit beside them, and
    finds the longest prompt that fits when it runs alone.

    Raises:
      ValueError: the weights alone, or the weights plus the activations of a 1-token budget,
        do not fit.
    """
    if weight_bytes > capacity_bytes:
        raise ValueError(f"device_memory_bytes={capacity_bytes} is too small: the weights "
                         f"{window_desc}need {weight_bytes} B")
    free = capacity_bytes - weight_bytes

    def act(budget: int) -> int:
        return stage_activation_bytes(cfg, max_iteration_rows(budget, groups), weight_dtype)

    def largest_fitting(cost, hi: int) -> int:
        """The largest n in [0, hi] with cost(n) <= free (cost nondecreasing; 0 if none)."""
        if cost(hi) <= free:
            return hi
        lo = 0  # cost(lo) fits (or lo == 0), cost(hi) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if cost(mid) <= free else (lo, mid)
        return lo

    budget = largest_fitting(act, token_budget)
    if budget == 0:
        raise ValueError(
            f"device_memory_bytes={capacity_bytes}: after {weight_bytes} B of weights, "
            f"{free} B are left, less than the activations of a 1-token iteration ({act(1)} B)")
    alone = lambda n: stage_activation_bytes(cfg, row_bucket(n), weight_dtype)  # noqa: E731
    max_prompt = largest_fitting(alone, 1 << 22)
    reason = None
    if budget < token_budget:
        reason = (f"token_budget {token_budget} -> {budget}: its activations "
                  f"({act(token_budget)} B) do not fit the {free} B the device has beside "
                  f"{weight_bytes} B of weights")
        log.warning("device memory plan: %s", reason)
    return DevicePlan(capacity_bytes, weight_bytes, act(budget), budget, max_prompt, reason)
