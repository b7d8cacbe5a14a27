"""Recursion-wise KV cache for generation: preallocated K/V per layer and depth, per-row lengths, original positions.

A table holds one set of cached tokens: the prefix layers', the suffix layers', or one recursion depth
of the shared block (only the tokens active at that depth). Its keys and values are
[layers, rows, capacity, groups, head_dim], allocated once and written in place; capacity is
ceil(fraction * max_len), the fraction being c_r for depth r when sized by capacity, so the allocation
itself is the memory a sequence costs. Keys are stored after RoPE at the token's original position, and
each slot keeps that position, so attention masks compare positions, never slot order.
Recursive KV sharing keeps only depth 1's table: deeper recursions read it and write nothing.
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


class KVTable:
    """One cached token set: K/V of each layer that caches it, slot positions and per-row lengths."""

    def __init__(self, name: str, num_layers: int, rows: int, capacity: int, groups: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.name, self.rows, self.capacity, self.num_layers = name, rows, capacity, num_layers
        shape = (num_layers, rows, capacity, groups, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.positions = torch.zeros(rows, capacity, dtype=torch.int32, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)

    def admit(self, rows: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reserve a slot for each token while its row has room: (admitted mask, slots)."""
        slots = self.lengths[rows] + row_rank(rows)
        ok = slots < self.capacity
        self.positions[rows[ok], slots[ok]] = positions[ok].to(torch.int32)
        self.lengths.index_add_(0, rows[ok], torch.ones_like(rows[ok]))
        return ok, slots

    def reset(self, rows: torch.Tensor) -> None:
        """Empty these rows (a new sequence takes them)."""
        self.lengths[rows] = 0

    @property
    def slot_bytes(self) -> int:
        """K/V bytes one cached token costs in this table (all its layers)."""
        k = self.keys
        return 2 * self.num_layers * k.shape[-2] * k.shape[-1] * k.element_size()

    @property
    def nbytes(self) -> int:
        """K/V bytes allocated."""
        return self.keys.nbytes + self.values.nbytes

    def used_bytes(self) -> int:
        """K/V bytes holding tokens now."""
        return int(self.lengths.sum()) * self.slot_bytes


class CacheGroup:
    """Queries of one step against one table: their write slots, rows packed [R, t], and the key mask."""

    def __init__(self, table: KVTable, rows: torch.Tensor, positions: torch.Tensor,
                 slots: Optional[torch.Tensor]) -> None:
        self.table, self.rows, self.slots = table, rows, slots
        self.urows, self.inverse = torch.unique(rows, return_inverse=True)
        self.rank = row_rank(rows)
        t = int(self.rank.max()) + 1
        lengths = table.lengths[self.urows]
        self.kmax = int(lengths.max())
        qpos = torch.full((len(self.urows), t), NO_POSITION, dtype=torch.int32, device=rows.device)
        qpos[self.inverse, self.rank] = positions.to(torch.int32)
        keypos = table.positions[self.urows, :self.kmax]
        valid = torch.arange(self.kmax, device=rows.device) < lengths[:, None]
        self.mask = (valid[:, None, :] & (keypos[:, None, :] <= qpos[:, :, None])).unsqueeze(1)  # [R, 1, t, k]
        self.whole = len(self.urows) == table.rows  # every row: read the cache without a gather
        self.in_order = t == 1 and bool((rows[1:] > rows[:-1]).all())  # one query per row, rows ascending

    def write(self, site: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store the queries' own K/V [m, groups, head_dim] in layer `site` (no-op for a read-only group)."""
        if self.slots is not None:
            self.table.keys[site][self.rows, self.slots] = key
            self.table.values[site][self.rows, self.slots] = value

    def read(self, site: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [R, kmax, groups, head_dim] of the packed rows."""
        keys, values = self.table.keys[site], self.table.values[site]
        if self.whole:
            return keys[:, :self.kmax], values[:, :self.kmax]
        return keys[self.urows, :self.kmax], values[self.urows, :self.kmax]

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """Per-query [m, ...] -> per-row [R, t, ...] (padding zero)."""
        if self.in_order:
            return x[:, None]
        out = x.new_zeros((len(self.urows), self.mask.shape[2]) + tuple(x.shape[1:]))
        out[self.inverse, self.rank] = x
        return out

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row [R, t, ...] -> per-query [m, ...]."""
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
    """All tables of one model for `rows` sequences of up to `max_len` tokens."""

    def __init__(self, layout: CacheLayout, rows: int, max_len: int, groups: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.layout, self.rows, self.max_len = layout, rows, max_len

        def table(name: str, layers: int, fraction: float = 1.0) -> KVTable:
            capacity = max(1, math.ceil(fraction * max_len - 1e-9))
            return KVTable(name, layers, rows, capacity, groups, head_dim, dtype, device)

        self.tables: dict[str, KVTable] = {}
        if layout.prefix_layers:
            self.tables["prefix"] = table("prefix", layout.prefix_layers)
        depths = 1 if layout.kv_sharing else layout.num_recursions
        if layout.block_layers:
            for r in range(depths):
                self.tables[f"depth{r + 1}"] = table(f"depth{r + 1}", layout.block_layers, layout.fractions[r])
        if layout.suffix_layers:
            self.tables["suffix"] = table("suffix", layout.suffix_layers)

    def depth_table(self, r: int) -> tuple[KVTable, bool]:
        """The table recursion r (0-based) attends to, and whether it writes there."""
        if self.layout.kv_sharing:
            return self.tables["depth1"], r == 0
        return self.tables[f"depth{r + 1}"], True

    def reset(self, rows: torch.Tensor) -> None:
        """Empty these rows in every table."""
        for table in self.tables.values():
            table.reset(rows)

    @property
    def nbytes(self) -> int:
        """K/V bytes allocated in all tables."""
        return sum(t.nbytes for t in self.tables.values())

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
