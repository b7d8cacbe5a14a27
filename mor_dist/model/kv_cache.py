"""Recursion-wise KV cache for generation: preallocated K/V per layer and depth, per-row lengths, original positions.

A table holds one set of cached tokens: the prefix layers', the suffix layers', or one recursion depth
of the shared block (only the tokens active at that depth), `rows` sequences of `capacity` slots each;
capacity is ceil(fraction * max_len), the fraction being c_r for depth r when sized by capacity, so the
allocation itself is the memory a sequence costs. Tables of the same layers share one pool: K/V
[layers, slots, groups, head_dim] allocated once and written in place, the tables laid end to end, so
one gather reads the keys of tokens at different depths and a layer attends once per step whatever the
mix of depths. Keys are stored after RoPE at the token's original position, and each slot keeps that
position, so attention masks compare positions, never slot order. A (table, row) pair is a "sequence"
of the pool: seq = table * rows + row. Recursive KV sharing keeps only depth 1's table: deeper
recursions read it and write nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

NO_POSITION = 2**30  # query position of padding: sees every valid key, so no row is fully masked


def row_rank(rows: torch.Tensor) -> torch.Tensor:
    """Rank of each entry among the entries with the same row, in order of appearance."""
    order = torch.argsort(rows, stable=True)
    ranked = rows[order]
    rank = torch.empty_like(rows)
    rank[order] = torch.arange(len(rows), device=rows.device) - torch.searchsorted(ranked, ranked)
    return rank


class KVPool:
    """K/V of a stack of layers for several tables of `rows` sequences each, laid end to end in one allocation."""

    def __init__(self, num_layers: int, rows: int, capacities: list[int], groups: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.rows, self.capacities, self.num_layers = rows, capacities, num_layers
        slots = rows * sum(capacities)
        self.keys = torch.zeros((num_layers, slots, groups, head_dim), dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.positions = torch.zeros(slots, dtype=torch.int32, device=device)
        self.lengths = torch.zeros(len(capacities) * rows, dtype=torch.long, device=device)  # per seq
        cap = torch.tensor(capacities, device=device)
        self.capacity = cap.repeat_interleave(rows)  # per seq
        table_start = torch.cumsum(rows * cap, 0) - rows * cap
        self.start = table_start.repeat_interleave(rows) + torch.arange(rows, device=device).repeat(
            len(capacities)) * self.capacity  # first slot of each seq

    def admit(self, seqs: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Reserve a slot for each token while its sequence has room: (admitted mask, flat slots, all admitted)."""
        slots = self.lengths[seqs] + row_rank(seqs)
        ok = slots < self.capacity[seqs]
        flat = self.start[seqs] + slots
        every = bool(ok.all())
        if not every:
            seqs, flat, positions = seqs[ok], flat[ok], positions[ok]
        self.positions[flat] = positions.to(torch.int32)
        self.lengths.index_add_(0, seqs, torch.ones_like(seqs))
        return ok, flat, every

    def reset(self, rows: torch.Tensor) -> None:
        """Empty these rows in every table (a new sequence takes them)."""
        self.lengths.view(len(self.capacities), self.rows)[:, rows] = 0

    @property
    def slot_bytes(self) -> int:
        """K/V bytes one cached token costs (all the pool's layers)."""
        k = self.keys
        return 2 * self.num_layers * k.shape[-2] * k.shape[-1] * k.element_size()

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


@dataclass(frozen=True)
class KVTable:
    """One table of a pool: its index there, slots per row, and its rows' lengths (a view)."""

    pool: KVPool
    index: int

    @property
    def capacity(self) -> int:
        return self.pool.capacities[self.index]

    @property
    def lengths(self) -> torch.Tensor:
        rows = self.pool.rows
        return self.pool.lengths[self.index * rows:(self.index + 1) * rows]

    def seqs(self, rows: torch.Tensor) -> torch.Tensor:
        """The pool's sequence ids of these rows of this table."""
        return rows + self.index * self.pool.rows

    @property
    def nbytes(self) -> int:
        return self.pool.rows * self.capacity * self.pool.slot_bytes

    def used_bytes(self) -> int:
        return int(self.lengths.sum()) * self.pool.slot_bytes


class CacheGroup:
    """Queries of one step against one pool: write slots, queries packed [R, t] by sequence, and the key mask.

    `seqs` are the sequences the queries read; `writers` (None: all) select the queries whose K/V are
    stored, at `slots` (flat, one per writer).
    """

    def __init__(self, pool: KVPool, seqs: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 writers: Optional[torch.Tensor] = None) -> None:
        self.pool, self.slots, self.writers = pool, slots, writers
        self.useqs, self.inverse = torch.unique(seqs, return_inverse=True)
        self.rank = row_rank(seqs)
        lengths = pool.lengths[self.useqs]
        ascending = (seqs[1:] > seqs[:-1]).all() if len(seqs) > 1 else torch.ones((), dtype=torch.bool)
        # One host sync for every size the step needs.
        kmax, t, first, last, ascending = torch.stack([
            lengths.max(), self.rank.max() + 1, self.useqs[0], self.useqs[-1], ascending.long()]).tolist()
        self.kmax = kmax
        rows = pool.rows
        # Every row of one table, in order: read that table's slots as a view, without a gather.
        self.table = first // rows if len(self.useqs) == rows and first // rows == last // rows else None
        self.in_order = t == 1 and bool(ascending)  # one query per sequence, sequences ascending
        if self.table is not None:
            self.index = None
            keypos = self._table_view(pool.positions[None])[0]
        else:
            self.index = (pool.start[self.useqs, None] + torch.arange(kmax, device=seqs.device)).clamp_(
                max=pool.positions.shape[0] - 1)  # beyond a sequence's slots: masked by `valid`
            keypos = pool.positions[self.index]
        qpos = torch.full((len(self.useqs), t), NO_POSITION, dtype=torch.int32, device=seqs.device)
        qpos[self.inverse, self.rank] = positions.to(torch.int32)
        valid = torch.arange(kmax, device=seqs.device) < lengths[:, None]
        self.mask = (valid[:, None, :] & (keypos[:, None, :] <= qpos[:, :, None])).unsqueeze(1)  # [R, 1, t, k]

    def _table_view(self, x: torch.Tensor) -> torch.Tensor:
        """[layers, slots, ...] -> this group's table as [layers, rows, kmax, ...] (a view)."""
        pool, i = self.pool, self.table
        begin = pool.rows * sum(pool.capacities[:i])
        cap = pool.capacities[i]
        table = x[:, begin:begin + pool.rows * cap]
        return table.view(x.shape[0], pool.rows, cap, *x.shape[2:])[:, :, :self.kmax]

    def write(self, site: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store the writers' own K/V [m, groups, head_dim] in layer `site`."""
        if self.writers is not None:
            key, value = key[self.writers], value[self.writers]
        self.pool.keys[site][self.slots] = key
        self.pool.values[site][self.slots] = value

    def read(self, site: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [R, kmax, groups, head_dim] of the packed sequences."""
        keys, values = self.pool.keys[site], self.pool.values[site]
        if self.index is None:
            return self._table_view(keys[None])[0], self._table_view(values[None])[0]
        return keys[self.index], values[self.index]

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """Per-query [m, ...] -> per-sequence [R, t, ...] (padding zero)."""
        if self.in_order:
            return x[:, None]
        out = x.new_zeros((len(self.useqs), self.mask.shape[2]) + tuple(x.shape[1:]))
        out[self.inverse, self.rank] = x
        return out

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sequence [R, t, ...] -> per-query [m, ...]."""
        return x[:, 0] if self.in_order else x[self.inverse, self.rank]


@dataclass(frozen=True)
class CacheLayout:
    """What a model caches: prefix and suffix layers (all tokens) and the shared block at each depth."""

    prefix_layers: int
    block_layers: int
    suffix_layers: int
    num_recursions: int
    kv_sharing: bool
    fractions: tuple[float, ...]  # table size per depth, as a fraction of max_len (c_r, or 1.0)


class KVCache:
    """All pools and tables of one model for `rows` sequences of up to `max_len` tokens."""

    def __init__(self, layout: CacheLayout, rows: int, max_len: int, groups: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.layout, self.rows, self.max_len = layout, rows, max_len

        def pool(layers: int, fractions: tuple[float, ...]) -> KVPool:
            capacities = [max(1, math.ceil(f * max_len - 1e-9)) for f in fractions]
            return KVPool(layers, rows, capacities, groups, head_dim, dtype, device)

        self.pools: dict[str, KVPool] = {}
        self.tables: dict[str, KVTable] = {}
        if layout.prefix_layers:
            self.pools["prefix"] = pool(layout.prefix_layers, (1.0,))
            self.tables["prefix"] = KVTable(self.pools["prefix"], 0)
        if layout.block_layers:
            depths = 1 if layout.kv_sharing else layout.num_recursions
            self.pools["block"] = pool(layout.block_layers, layout.fractions[:depths])
            for r in range(depths):
                self.tables[f"depth{r + 1}"] = KVTable(self.pools["block"], r)
        if layout.suffix_layers:
            self.pools["suffix"] = pool(layout.suffix_layers, (1.0,))
            self.tables["suffix"] = KVTable(self.pools["suffix"], 0)

    def depth_table(self, depth: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Per token at recursion `depth` (0-based): its table in the block pool, and which tokens write there
        (None: all)."""
        if self.layout.kv_sharing:
            return torch.zeros_like(depth), depth == 0
        return depth, None

    def reset(self, rows: torch.Tensor) -> None:
        """Empty these rows in every table."""
        for pool in self.pools.values():
            pool.reset(rows)

    @property
    def nbytes(self) -> int:
        """K/V bytes allocated in all pools."""
        return sum(p.nbytes for p in self.pools.values())

    def report(self) -> dict[str, float]:
        """Allocation from the tables themselves: per sequence, per token of max_len, and per table."""
        out: dict[str, float] = {
            "kv_bytes": self.nbytes,
            "kv_bytes_per_sequence": self.nbytes / self.rows,
            "kv_bytes_per_token": self.nbytes / (self.rows * self.max_len),
            "kv_used_bytes": sum(t.used_bytes() for t in self.tables.values()),
        }
        for name, t in self.tables.items():
            out[f"{name}/bytes_per_token"] = t.nbytes / (self.rows * self.max_len)
            out[f"{name}/capacity"] = t.capacity
        return out
