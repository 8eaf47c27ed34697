"""How an iteration's tokens are laid out for the device stages, and what that layout costs.

One place for the shape rules the engine runs and the performance model charges: row buckets,
prefill tile pairs, logits rows, VSLPipe's split into two groups, and `IterationShape`, the
typed summary of one planned iteration that both the engine's per-iteration record and Stage 2
use (so the two cannot drift).

A group's rows: decode tokens first (their queries are q[:dec_b]), padding to dec_b, then every
prefill sequence's tokens, then padding to a multiple of TILE.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np

from moelens_jax.model.stages import TILE
from moelens_jax.runtime.scheduler import Plan

PAD_SEQ = -1  # a one-token sequence in the store that padding rows of decode attention read


def bucket(n: int, minimum: int = 8) -> int:
    """`n` rounded up to one of at most 4 sizes per octave (<= 25 % padding; power-of-two
    buckets padded 78 decode rows to 128, and their lm_head rows with them), >= `minimum`."""
    n = max(int(n), minimum, 1)
    step = 1 << max(0, n.bit_length() - 3)
    return -(-n // step) * step


def row_bucket(n: int) -> int:
    """Rows of a group: a multiple of TILE, at most 4 sizes per octave (<= 25 % padding, so a
    run compiles few shapes without doubling the rows of an iteration just over a power of
    two)."""
    n = max(int(n), TILE)
    step = max(TILE, 1 << (n.bit_length() - 3))
    return -(-n // step) * step


def padded_rows(n_prefill_tokens: int, n_decode: int) -> int:
    """Rows one group of the engine computes for these tokens (bucket padding included)."""
    dec_b = bucket(n_decode) if n_decode else 0
    return row_bucket(dec_b + n_prefill_tokens)


def prefill_tile_pairs(seg: np.ndarray, tile: int = TILE) -> np.ndarray:
    """(query tile, key tile) pairs whose rows can attend (same segment, causal), padded.

    `seg[r]` is the prefill segment of row r (-1 for decode and padding rows); each segment is
    a contiguous run of rows, so query tile i needs key tiles from the one holding the start of
    its first prefill row's segment up to i. Returns int32 [P_bucket, 3]: query tile, key tile,
    and 1 for a real pair / 0 for bucket padding (ignored by the attention).
    """
    seg = np.asarray(seg)
    is_pre = seg >= 0
    new_seg = is_pre & np.r_[True, seg[1:] != seg[:-1]]
    starts = np.maximum.accumulate(np.where(new_seg, np.arange(len(seg)), 0))
    pairs = []
    for i in range(len(seg) // tile):
        rows = np.flatnonzero(is_pre[i * tile:(i + 1) * tile])
        if len(rows):
            pairs += [(i, j, 1) for j in range(starts[i * tile + rows[0]] // tile, i + 1)]
    pairs += [(0, 0, 0)] * (bucket(len(pairs), 1) - len(pairs))
    return np.asarray(pairs, np.int32).reshape(-1, 3)


def tile_pair_count(prefill_lens: Sequence[int], n_decode: int) -> int:
    """Tile pairs the prefill attention of one group computes (bucket padding included):
    `len(prefill_tile_pairs(seg))` for the layout `build_group` makes, without building it."""
    lens = np.asarray(prefill_lens, np.int64)
    dec_b = bucket(n_decode) if n_decode else 0
    if not len(lens):
        return bucket(0, 1)
    starts = dec_b + np.concatenate([[0], np.cumsum(lens)[:-1]])
    end = dec_b + int(lens.sum())
    tiles = np.arange(dec_b // TILE, -(-end // TILE))
    first_row = np.maximum(tiles * TILE, dec_b)  # first prefill row of each tile
    seg_start = starts[np.searchsorted(starts, first_row, side="right") - 1]
    return bucket(int((tiles - seg_start // TILE + 1).sum()), 1)


def logit_rows(n_seqs: int) -> int:
    """Rows the lm_head computes for `n_seqs` sequences (bucket padding included)."""
    return bucket(n_seqs, 1)


@dataclasses.dataclass(frozen=True)
class GroupShape:
    """What one group of an iteration computes."""

    prefill_tokens: int
    decode_tokens: int
    prefill_seqs: int
    padded_rows: int  # rows of the device stages, bucket padding included
    tile_pairs: int  # prefill-attention tile pairs (0 where the C++ kernel needs none)
    attended_keys: int  # (row, key) pairs of the prefill attention: sum of n (n + 1) / 2
    logit_rows: int  # lm_head rows, bucket padding included
    kv_tokens_read: int  # cached tokens the decode rows attend to (per layer)
    decode_rows: int = 0  # decode rows the host stage attends, bucket padding included (dec_b)

    @property
    def tokens(self) -> int:
        return self.prefill_tokens + self.decode_tokens

    @classmethod
    def of(cls, prefill_lens: Sequence[int], decode_kv: Sequence[int],
           tile_pairs: bool = True) -> GroupShape:
        """The shape of a group with these prefill chunk lengths and decode rows (`decode_kv`:
        the tokens each decode row attends to); `tile_pairs` as `build_group` takes it."""
        lens = [int(n) for n in prefill_lens]
        n_dec = len(decode_kv)
        return cls(prefill_tokens=sum(lens), decode_tokens=n_dec, prefill_seqs=len(lens),
                   padded_rows=padded_rows(sum(lens), n_dec),
                   tile_pairs=tile_pair_count(lens, n_dec) if tile_pairs else 0,
                   attended_keys=sum(n * (n + 1) // 2 for n in lens),
                   logit_rows=logit_rows(len(lens) + n_dec),
                   kv_tokens_read=int(sum(decode_kv)),
                   decode_rows=bucket(n_dec) if n_dec else 0)


@dataclasses.dataclass(frozen=True)
class IterationShape:
    """One planned iteration as the engine lays it out: its groups (one, VSLPipe's two, or
    MoE-Lightning's micro-batches).
    Totals over the groups are properties; Stage 2 charges them, the engine records them."""

    groups: tuple[GroupShape, ...]

    @classmethod
    def of(cls, plan: Plan, decode_kv: Sequence[int], split: SplitCosts | None = None,
           tile_pairs: bool = True, micro_batch: int | None = None) -> IterationShape:
        """The layout of `plan` (`decode_kv[i]`: context of decode sequence i); with `split`,
        VSLPipe's two groups, with `micro_batch`, MoE-Lightning's (`plan_groups`)."""
        return cls.of_groups(plan_groups(plan, decode_kv, split, micro_batch), plan, decode_kv,
                             tile_pairs)

    @classmethod
    def of_groups(cls, parts, plan: Plan, decode_kv: Sequence[int],
                  tile_pairs: bool = True) -> IterationShape:
        """The layout of `plan` already split into `parts` (what `plan_groups` returned)."""
        kv = dict(zip(plan.decode, decode_kv, strict=True))
        return cls(tuple(GroupShape.of([n for _, n in p], [kv[r] for r in d], tile_pairs)
                         for d, p in parts))

    def _sum(self, field: str) -> int:
        return sum(getattr(g, field) for g in self.groups)

    prefill_tokens = property(lambda self: self._sum("prefill_tokens"))
    decode_tokens = property(lambda self: self._sum("decode_tokens"))
    prefill_seqs = property(lambda self: self._sum("prefill_seqs"))
    padded_rows = property(lambda self: self._sum("padded_rows"))
    tile_pairs = property(lambda self: self._sum("tile_pairs"))
    attended_keys = property(lambda self: self._sum("attended_keys"))
    logit_rows = property(lambda self: self._sum("logit_rows"))
    kv_tokens_read = property(lambda self: self._sum("kv_tokens_read"))
    decode_rows = property(lambda self: self._sum("decode_rows"))

    @property
    def tokens(self) -> int:
        return self.prefill_tokens + self.decode_tokens


NO_PAIRS = np.zeros((1, 3), np.int32)  # the CPU kernel needs no tile pairs: one shape


@dataclasses.dataclass
class Group:
    """One group of an iteration's tokens laid out for the stages.

    Rows: decode tokens first (their queries are q[:dec_b]), padding to dec_b, then every
    prefill sequence's tokens, then padding to nb (a multiple of TILE).
    """

    seqs: list[int]  # sequence ids in row order
    seqs_np: np.ndarray  # the same as int64, for the per-layer K/V append
    last_rows: list[int]  # row of each sequence's last token (its logits row)
    counts_np: np.ndarray  # int32 rows per sequence, for the KV append
    real_rows: np.ndarray  # rows holding real tokens, in append order
    mask_np: np.ndarray  # bool [nb]: real rows
    dec_b: int
    tok: jax.Array
    pos: jax.Array
    seg: jax.Array
    pairs: jax.Array
    dec_ids: jax.Array
    mask: jax.Array


def build_group(decode: Sequence[int], prefill: Sequence[tuple[int, int]],
                 tokens: dict[int, list[int]], tile_pairs: bool = True) -> Group:
    n_dec = len(decode)
    dec_b = bucket(n_dec) if n_dec else 0
    rows = [tokens[rid][-1] for rid in decode] + [0] * (dec_b - n_dec)
    pos = [len(tokens[rid]) - 1 for rid in decode] + [0] * (dec_b - n_dec)
    seg = [-1] * dec_b
    last = list(range(n_dec))
    for k, (rid, n) in enumerate(prefill):
        rows += tokens[rid][:n]
        pos += range(n)
        seg += [k] * n
        last.append(len(rows) - 1)
    nb = padded_rows(len(rows) - dec_b, n_dec)  # the rule Stage 2 charges for, too
    pad = nb - len(rows)
    mask = np.zeros(nb, bool)
    mask[:n_dec] = True
    mask[dec_b:len(rows)] = True
    seg_np = np.array(seg + [-1] * pad, np.int32)
    host = jax.devices("cpu")[0]
    seqs = list(decode) + [rid for rid, _ in prefill]
    return Group(
        seqs=seqs, seqs_np=np.asarray(seqs, np.int64), last_rows=last,
        counts_np=np.array([1] * n_dec + [n for _, n in prefill], np.int32),
        real_rows=np.flatnonzero(mask), mask_np=mask, dec_b=dec_b,
        tok=jax.device_put(np.array(rows + [0] * pad, np.int32)),
        pos=jax.device_put(np.array(pos + [0] * pad, np.int32)),
        seg=jax.device_put(seg_np),
        pairs=jax.device_put(prefill_tile_pairs(seg_np) if tile_pairs else NO_PAIRS),
        dec_ids=jax.device_put(
            np.array(list(decode) + [PAD_SEQ] * (dec_b - n_dec), np.int32), host),
        mask=jax.device_put(mask))


class SplitCosts(NamedTuple):
    """What `split_plan` balances: per-layer seconds per token (device stages + host K/V
    append) and per KV token a decode row's host attention reads. The default balances token
    counts; `perf.split_costs` derives both from a calibration or preset."""

    token_s: float = 1.0
    kv_token_s: float = 0.0


TOKEN_COUNT_SPLIT = SplitCosts()


def split_plan(plan: Plan, decode_kv: Sequence[int] | None = None,
               costs: SplitCosts = TOKEN_COUNT_SPLIT
               ) -> tuple[tuple[list[int], list[tuple[int, int]]], ...]:
    """VSLPipe's two groups (decode ids, prefill (id, tokens)), balanced on predicted time: a
    group's GA -> C -> GB is a chain, so the layer period is at least the longer chain.
    Sequences by decreasing cost go to the group with less so far (LPT); `decode_kv[i]` is
    the context decode sequence i attends to. Order within a group follows the plan. One
    group if either would be empty."""
    kv = decode_kv if decode_kv is not None else [0] * len(plan.decode)
    items = ([(costs.token_s + costs.kv_token_s * c, 0, i) for i, c in enumerate(kv)]
             + [(costs.token_s * n, 1, j) for j, (_, n) in enumerate(plan.prefill)])
    load, side = [0.0, 0.0], {}
    for cost, kind, i in sorted(items, key=lambda t: (-t[0], t[1], t[2])):
        g = 0 if load[0] <= load[1] else 1
        side[kind, i] = g
        load[g] += cost
    groups = tuple(([rid for i, rid in enumerate(plan.decode) if side[0, i] == g],
                    [p for j, p in enumerate(plan.prefill) if side[1, j] == g])
                   for g in (0, 1))
    if not all(d or p for d, p in groups):
        return ((list(plan.decode), list(plan.prefill)),)
    return groups


def micro_batches(plan: Plan, micro_batch: int
                  ) -> tuple[tuple[list[int], list[tuple[int, int]]], ...]:
    """MoE-Lightning's micro-batches: the plan's sequences (decode, then prefill, in plan
    order) in consecutive groups of `micro_batch`."""
    seqs = [(0, rid) for rid in plan.decode] + [(1, p) for p in plan.prefill]
    return tuple(([x for k, x in chunk if k == 0], [x for k, x in chunk if k == 1])
                 for chunk in (seqs[i:i + micro_batch]
                               for i in range(0, len(seqs), micro_batch)))


def plan_groups(plan: Plan, decode_kv: Sequence[int], split: SplitCosts | None,
                micro_batch: int | None = None
                ) -> tuple[tuple[list[int], list[tuple[int, int]]], ...]:
    """The plan's token groups as the engine runs them: MoE-Lightning's micro-batches of
    `micro_batch` sequences when given; else VSLPipe's two (`split_plan`, balanced on `split`)
    when `split` is given; else one."""
    if micro_batch is not None:
        return micro_batches(plan, micro_batch)
    if split is not None:
        return split_plan(plan, decode_kv, split)
    return ((list(plan.decode), list(plan.prefill)),)
