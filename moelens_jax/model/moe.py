"""The MoE block as named stages: route -> dispatch -> expert GEMMs -> combine.

Tokens are flattened to [n, h]. Routing picks the top-k experts per token; dispatch sorts the
n*k (token, expert) pairs by expert so each expert's rows are contiguous; the expert FFNs run as
grouped GEMMs; combine scatters the rows back and sums them with the routing weights.

`expert_ffn` is the one seam that chooses the expert-compute implementation. Every default path
computes only the routed rows (plus at most one block of padding per expert on accelerators):

* ``"grouped"`` (the default, ``"auto"``) — under `jax.lax.platform_dependent`: on the CPU
  backend the C++ kernel `ops.experts.grouped_expert_ffn` (XLA FFI; each expert's contiguous
  rows through its own small-group GEMMs or OpenBLAS sgemm; exactly the routed rows, group
  sizes read inside the kernel);
  on every other backend "blocked".
* ``"blocked"`` — pure XLA for any backend: a loop over experts, and inside it a loop over the
  expert's rows in blocks of `block_rows(m, E)` (dense SwiGLU per block, with the expert's
  weights sliced once per expert), so the rows computed are sum_e ceil(g_e / block) * block
  <= m + E * block. No ragged_dot, no E x intermediate: the temporaries are O(m * h + block * f).
* ``"capacity"`` — each expert's rows go to its slot of an [E, capacity, h] buffer and every
  projection is one batched GEMM; computes E x capacity rows (capacity >= the largest group, a
  static shape the caller must know). Kept as a comparison point for `bench_experts`.
* ``"ragged"`` — `jax.lax.ragged_dot`. jaxlib 0.10 lowers it to a dense masked GEMM on CPU and
  CUDA (E x the FLOPs and E x the intermediate memory), so no default path uses it; kept as a
  comparison point.

`reference.expert_ffn_loop` is the per-expert loop both are tested against.

Quantised experts (`weights.QuantisedMatrix`: int8 / int4 codes and scales, as the weight mover
hands them over on the CPU backend) go to the C++ kernel as codes, dequantised inside its GEMMs;
"blocked" dequantises one expert at a time inside its loop; "capacity" and "ragged" dequantise
the whole stack first.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from moelens_jax.config import ModelConfig
from moelens_jax.model.layers import linear
from moelens_jax.model.weights import QuantisedMatrix
from moelens_jax.ops import experts  # registers the CPU kernel's FFI target


class Routing(NamedTuple):
    weights_nk: jax.Array  # float32 routing weight of each selected expert
    experts_nk: jax.Array  # int32 expert ids


class Dispatch(NamedTuple):
    x_mh: jax.Array  # [m = n*k, h] token rows sorted by expert
    group_sizes_e: jax.Array  # [E] int32 rows per expert
    order_m: jax.Array  # [m] index into the flattened (token, slot) pairs of each sorted row


def route(cfg: ModelConfig, router_he: jax.Array, x_nh: jax.Array) -> Routing:
    """Softmax over all experts in float32, top-k, optional renormalisation."""
    with jax.named_scope("route"):
        logits = linear(x_nh, router_he)
        probs = jax.nn.softmax(logits, axis=-1)
        top_p, top_e = jax.lax.top_k(probs, cfg.num_experts_per_tok)
        if cfg.norm_topk_prob:
            top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
        return Routing(top_p, top_e.astype(jnp.int32))


def dispatch(routing: Routing, x_nh: jax.Array, num_experts: int,
             token_mask_n: jax.Array | None = None) -> Dispatch:
    """Sorts the (token, expert) pairs by expert (stable, so ties keep token order).

    With `token_mask_n` (bool [n]), masked-out tokens (batch padding) are dropped: their pairs
    sort last, outside every group (sum(group_sizes) = k * mask.sum()), and every expert path
    gives them zero output, so they cost no expert GEMM rows under "capacity".
    """
    with jax.named_scope("dispatch"):
        n, k = routing.experts_nk.shape
        flat_e = routing.experts_nk.reshape(-1)
        if token_mask_n is not None:
            flat_e = jnp.where(jnp.repeat(token_mask_n, k), flat_e, num_experts)
        order = jnp.argsort(flat_e, stable=True)
        x_mh = jnp.take(x_nh, order // k, axis=0)
        group_sizes = jnp.bincount(flat_e, length=num_experts).astype(jnp.int32)
        return Dispatch(x_mh, group_sizes, order)


EXPERT_IMPLS = ("auto", "grouped", "blocked", "capacity", "ragged")
MIN_BLOCK_ROWS, MAX_BLOCK_ROWS = 8, 512


def _swiglu(x_th, w_gate_hf, w_up_hf, w_down_fh):
    a = jax.nn.silu(linear(x_th, w_gate_hf)) * linear(x_th, w_up_hf)
    return linear(a.astype(w_down_fh.dtype), w_down_fh)


def expert_ffn(w_gate_ehf: jax.Array, w_up_ehf: jax.Array, w_down_efh: jax.Array,
               x_mh: jax.Array, group_sizes_e: jax.Array, impl: str = "auto",
               capacity: int | None = None) -> jax.Array:
    """SwiGLU FFN of every expert over its contiguous rows (rows sorted by expert).

    Args:
      w_gate_ehf, w_up_ehf: [E, h, f]; w_down_efh: [E, f, h] (arrays, or all three
        `QuantisedMatrix`).
      x_mh: [m, h] rows sorted by expert; group_sizes_e: [E] rows per expert (sum <= m; rows
        past the sum are padding and get zeros).
      impl: one of `EXPERT_IMPLS`.
      capacity: static rows per expert for "capacity" (>= the largest group size).

    Returns:
      [m, h] float32.
    """
    if impl in ("auto", "grouped"):
        return expert_ffn_grouped(w_gate_ehf, w_up_ehf, w_down_efh, x_mh, group_sizes_e)
    if isinstance(w_gate_ehf, QuantisedMatrix) and impl in ("capacity", "ragged"):
        w_gate_ehf, w_up_ehf, w_down_efh = (w.dequantise() for w in
                                            (w_gate_ehf, w_up_ehf, w_down_efh))
    if impl == "blocked":
        return expert_ffn_blocked(w_gate_ehf, w_up_ehf, w_down_efh, x_mh, group_sizes_e)
    if impl == "ragged":
        return expert_ffn_ragged(w_gate_ehf, w_up_ehf, w_down_efh, x_mh, group_sizes_e)
    if impl == "capacity":
        if capacity is None:
            raise ValueError('impl="capacity" needs a static capacity (see capacity_bucket)')
        return expert_ffn_capacity(w_gate_ehf, w_up_ehf, w_down_efh, x_mh, group_sizes_e,
                                   capacity)
    raise ValueError(f"unknown expert implementation {impl!r}; choose from {EXPERT_IMPLS}")


def expert_ffn_grouped(w_gate_ehf, w_up_ehf, w_down_efh, x_mh, group_sizes_e) -> jax.Array:
    """The C++ grouped kernel on the CPU backend, "blocked" on any other (chosen when the
    computation is lowered, so one jitted function serves every backend)."""
    with jax.named_scope("expert_gemms_grouped"):
        return jax.lax.platform_dependent(
            w_gate_ehf, w_up_ehf, w_down_efh, x_mh, group_sizes_e,
            cpu=_grouped_cpu, default=expert_ffn_blocked)


def _grouped_cpu(w_gate_ehf, w_up_ehf, w_down_efh, x_mh, group_sizes_e) -> jax.Array:
    if not isinstance(w_gate_ehf, QuantisedMatrix):
        return experts.grouped_expert_ffn(w_gate_ehf, w_up_ehf, w_down_efh, x_mh, group_sizes_e)
    ws = (w_gate_ehf, w_up_ehf, w_down_efh)
    return experts.grouped_expert_ffn(*(w.codes for w in ws), x_mh, group_sizes_e,
                                      scales=tuple(w.scale for w in ws),
                                      weight_dtype=w_gate_ehf.weight_dtype,
                                      dtype=w_gate_ehf.dtype)


def _expert(w, e) -> jax.Array:
    """Expert e's matrix in the model dtype (dequantised here when stored quantised)."""
    return w[e].dequantise() if isinstance(w, QuantisedMatrix) else w[e]


def block_rows(m: int, num_experts: int) -> int:
    """Row block of "blocked" for m routed rows: the largest power of two <= m / (4 E) (so the
    padding, at most one block per expert, stays <= 25 % of m), clamped to
    [MIN_BLOCK_ROWS, MAX_BLOCK_ROWS]."""
    target = max(1, m // (4 * num_experts))
    return min(MAX_BLOCK_ROWS, max(MIN_BLOCK_ROWS, 1 << (target.bit_length() - 1)))


def blocked_rows_computed(group_sizes, block: int) -> int:
    """Rows "blocked" computes for these group sizes (each group rounded up to the block)."""
    g = np.asarray(group_sizes, np.int64)
    return int(((g + block - 1) // block * block).sum())


def expert_ffn_blocked(w_gate_ehf, w_up_ehf, w_down_efh, x_mh, group_sizes_e,
                       block: int | None = None) -> jax.Array:
    """Grouped SwiGLU as a loop over experts, each over its rows in blocks (module docstring).

    Each block writes only its expert's rows (the tail of a group's last block keeps what is
    there), so blocks may overhang into the next group: no scatter into a padded layout.
    """
    with jax.named_scope("expert_gemms_blocked"):
        m, h = x_mh.shape
        E = w_gate_ehf.shape[0]
        out_h = w_down_efh.shape[-1]
        block = block or block_rows(m, E)
        ends = jnp.cumsum(group_sizes_e)
        starts = ends - group_sizes_e
        xp = jnp.pad(x_mh, ((0, block), (0, 0)))  # a block starting at any row < m fits
        rows_b = jnp.arange(block)

        def one_expert(e, y):
            wg, wu, wd = (_expert(w, e) for w in (w_gate_ehf, w_up_ehf, w_down_efh))

            def one_block(j, y):
                r0 = starts[e] + j * block
                yb = _swiglu(jax.lax.dynamic_slice_in_dim(xp, r0, block), wg, wu, wd)
                old = jax.lax.dynamic_slice_in_dim(y, r0, block)
                mine = (r0 + rows_b < ends[e])[:, None]
                return jax.lax.dynamic_update_slice_in_dim(y, jnp.where(mine, yb, old), r0, 0)

            return jax.lax.fori_loop(0, (group_sizes_e[e] + block - 1) // block, one_block, y)

        y = jax.lax.fori_loop(0, E, one_expert, jnp.zeros((m + block, out_h), jnp.float32))
        return y[:m]


def capacity_bucket(max_group_size: int) -> int:
    """Static capacity for `max_group_size` rows: a multiple of 8, at most ~4 sizes per
    octave (<= 25% padding), so a long run compiles few shapes."""
    c = max(8, int(max_group_size))
    step = max(8, 1 << max(0, c.bit_length() - 3))
    return -(-c // step) * step


def expert_ffn_capacity(w_gate_ehf, w_up_ehf, w_down_efh, x_mh, group_sizes_e,
                        capacity: int) -> jax.Array:
    """Grouped SwiGLU as batched GEMMs over [E, capacity, h] (see module docstring).

    Rows of a group beyond `capacity` would be lost, so the caller guarantees
    capacity >= max(group_sizes_e); rows past sum(group_sizes_e) (dropped padding) get zeros.
    """
    with jax.named_scope("expert_gemms_capacity"):
        m, h = x_mh.shape
        E = w_gate_ehf.shape[0]
        ends = jnp.cumsum(group_sizes_e)
        starts = ends - group_sizes_e
        rows = jnp.arange(m)
        row_expert = jnp.searchsorted(ends, rows, side="right")  # E for dropped rows
        dest = row_expert * capacity + rows - starts[jnp.minimum(row_expert, E - 1)]
        dt = w_gate_ehf.dtype
        xp = (jnp.zeros((E * capacity, h), dt).at[dest].set(x_mh.astype(dt), mode="drop")
              .reshape(E, capacity, h))
        g = jnp.einsum("ewh,ehf->ewf", xp, w_gate_ehf, preferred_element_type=jnp.float32)
        u = jnp.einsum("ewh,ehf->ewf", xp, w_up_ehf, preferred_element_type=jnp.float32)
        a = (jax.nn.silu(g) * u).astype(w_down_efh.dtype)
        y = jnp.einsum("ewf,efh->ewh", a, w_down_efh, preferred_element_type=jnp.float32)
        return y.reshape(E * capacity, -1).at[dest].get(mode="fill", fill_value=0.0)


def expert_ffn_ragged(w_gate_ehf, w_up_ehf, w_down_efh, x_mh, group_sizes_e) -> jax.Array:
    """Grouped SwiGLU with `jax.lax.ragged_dot` (one grouped GEMM per projection)."""
    with jax.named_scope("expert_gemms_ragged"):
        dt = w_gate_ehf.dtype
        x = x_mh.astype(dt)
        g = jax.lax.ragged_dot(x, w_gate_ehf, group_sizes_e, preferred_element_type=jnp.float32)
        u = jax.lax.ragged_dot(x, w_up_ehf, group_sizes_e, preferred_element_type=jnp.float32)
        a = (jax.nn.silu(g) * u).astype(dt)
        return jax.lax.ragged_dot(a, w_down_efh, group_sizes_e,
                                  preferred_element_type=jnp.float32)


def combine(routing: Routing, disp: Dispatch, y_mh: jax.Array) -> jax.Array:
    """Un-sorts expert outputs and sums each token's k rows weighted by its routing weights."""
    with jax.named_scope("combine"):
        n, k = routing.experts_nk.shape
        y_sorted = jnp.zeros_like(y_mh).at[disp.order_m].set(y_mh)  # back to (token, slot) order
        y_nkh = y_sorted.reshape(n, k, -1)
        return jnp.einsum("nkh,nk->nh", y_nkh, routing.weights_nk)


def shared_expert(lw, x_nh: jax.Array) -> jax.Array:
    """Qwen2-MoE shared expert: SwiGLU FFN scaled by sigmoid(x @ shared_expert_gate)."""
    with jax.named_scope("shared_expert"):
        a = jax.nn.silu(linear(x_nh, lw.shared_gate)) * linear(x_nh, lw.shared_up)
        y = linear(a.astype(lw.shared_down.dtype), lw.shared_down)
        return jax.nn.sigmoid(linear(x_nh, lw.shared_expert_gate)) * y


def moe_block(cfg: ModelConfig, lw, x_nh: jax.Array, ffn=expert_ffn,
              routing: Routing | None = None,
              token_mask_n: jax.Array | None = None) -> jax.Array:
    """Routed experts (+ shared expert) for tokens x[n, h] (already normalised); float32 out.

    `routing` may be precomputed (the engine routes first to size the "capacity" path);
    `token_mask_n` drops padding tokens from the routed experts (see `dispatch`).
    """
    with jax.named_scope("moe"):
        if routing is None:
            routing = route(cfg, lw.router, x_nh)
        disp = dispatch(routing, x_nh, cfg.num_experts, token_mask_n)
        y = ffn(lw.w_gate, lw.w_up, lw.w_down, disp.x_mh, disp.group_sizes_e)
        out = combine(routing, disp, y)
        if cfg.shared_expert_intermediate_size:
            out = out + shared_expert(lw, x_nh)
        return out
