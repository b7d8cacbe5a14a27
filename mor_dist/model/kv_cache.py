"""Recursion-wise KV cache for generation: K/V per layer and depth, per-sequence lengths, original positions.

The prefix and suffix layers cache every token of a sequence: a contiguous pool of `max_len` slots per
row. The shared block caches a token at every depth it reaches: a paged pool of fixed-size blocks
(BLOCK_TOKENS tokens) shared by all depths, taken from a free list when a sequence's depth table grows
into a new block and returned when the sequence finishes, as vLLM-style engines page their caches. The
memory a sequence holds thus follows its router's choices, no depth is capped, and a full pool makes
the scheduler wait or preempt instead of cutting a token's recursions short. One pool per stack of
layers, K/V [layers, slots, groups, head_dim] written in place, so one gather reads the keys of tokens
at different depths and a layer attends once per step whatever the mix of depths. Keys are stored
after RoPE at the token's original position, and each slot keeps that position, so attention masks
compare positions, never slot order. A (depth table, row) pair is a "sequence" of the block pool:
seq = table * rows + row. Recursive KV sharing keeps only depth 1's table: deeper recursions read it
and write nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

NO_POSITION = 2**30  # query position of padding: sees every valid key, so no row is fully masked
BLOCK_TOKENS = 16


class OutOfBlocks(RuntimeError):
    """The paged pool has fewer free blocks than a step needs (`short` more are needed)."""

    def __init__(self, short: int) -> None:
        super().__init__(f"the KV pool needs {short} more blocks of {BLOCK_TOKENS} tokens")
        self.short = short


def row_rank(rows: torch.Tensor) -> torch.Tensor:
    """Rank of each entry among the entries with the same row, in order of appearance."""
    order = torch.argsort(rows, stable=True)
    ranked = rows[order]
    rank = torch.empty_like(rows)
    rank[order] = torch.arange(len(rows), device=rows.device) - torch.searchsorted(ranked, ranked)
    return rank


class KVPool:
    """K/V of a stack of layers for `rows` sequences of `max_len` contiguous slots each (prefix, suffix)."""

    contiguous = True

    def __init__(self, num_layers: int, rows: int, max_len: int, groups: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.rows, self.max_len, self.num_layers = rows, max_len, num_layers
        self.keys = torch.zeros((num_layers, rows * max_len, groups, head_dim), dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.positions = torch.zeros(rows * max_len, dtype=torch.int32, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self._peak_tokens = torch.zeros((), dtype=torch.long, device=device)  # on the device: no sync per step

    def admit(self, seqs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Reserve a slot for each token (sequences are rows); flat slots."""
        slots = self.lengths[seqs] + row_rank(seqs)
        if bool((slots >= self.max_len).any()):
            raise ValueError(f"a sequence outgrew the cache (max_len={self.max_len})")
        flat = seqs * self.max_len + slots
        self.positions[flat] = positions.to(torch.int32)
        self.lengths.index_add_(0, seqs, torch.ones_like(seqs))
        torch.maximum(self._peak_tokens, self.lengths.sum(), out=self._peak_tokens)
        return flat

    def slot_index(self, seqs: torch.Tensor, kmax: int) -> torch.Tensor:
        """Flat slots [R, kmax] of the first kmax tokens of each sequence (beyond its length: masked later)."""
        return seqs[:, None] * self.max_len + torch.arange(kmax, device=seqs.device)

    def table_view(self, x: torch.Tensor, kmax: int) -> torch.Tensor:
        """[layers, slots, ...] -> [layers, rows, kmax, ...] (a view: every row, in order)."""
        return x.view(x.shape[0], self.rows, self.max_len, *x.shape[2:])[:, :, :kmax]

    def reset(self, rows: torch.Tensor) -> None:
        """Empty these rows (a new sequence takes them)."""
        self.lengths[rows] = 0

    @property
    def slot_bytes(self) -> int:
        """K/V bytes one cached token costs (all the pool's layers)."""
        k = self.keys
        return 2 * self.num_layers * k.shape[-2] * k.shape[-1] * k.element_size()

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def used_bytes(self) -> int:
        return int(self.lengths.sum()) * self.slot_bytes

    @property
    def peak_used_bytes(self) -> int:
        return int(self._peak_tokens) * self.slot_bytes


class PagedPool(KVPool):
    """The shared block's K/V: `tables` depth tables of `rows` sequences, in blocks of BLOCK_TOKENS slots
    taken from one free list on demand."""

    contiguous = False

    def __init__(self, num_layers: int, rows: int, tables: int, max_len: int, groups: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, num_blocks: Optional[int] = None) -> None:
        self.rows, self.tables, self.max_len, self.num_layers = rows, tables, max_len, num_layers
        self.blocks_per_seq = math.ceil(max_len / BLOCK_TOKENS)
        self.num_blocks = num_blocks if num_blocks is not None else rows * tables * self.blocks_per_seq
        slots = self.num_blocks * BLOCK_TOKENS
        self.keys = torch.zeros((num_layers, slots, groups, head_dim), dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.positions = torch.zeros(slots, dtype=torch.int32, device=device)
        self.lengths = torch.zeros(tables * rows, dtype=torch.long, device=device)
        self.block_table = torch.full((tables * rows, self.blocks_per_seq), -1, dtype=torch.long, device=device)
        self.free = list(range(self.num_blocks - 1, -1, -1))  # a stack: the host decides, one sync per step
        self.peak_blocks = 0
        self._peak_tokens = torch.zeros((), dtype=torch.long, device=device)

    @property
    def free_blocks(self) -> int:
        return len(self.free)

    def admit(self, seqs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Reserve a slot for each token, taking blocks as sequences grow into them; flat slots. All or nothing:
        OutOfBlocks when the free list is short."""
        slots = self.lengths[seqs] + row_rank(seqs)
        block = slots // BLOCK_TOKENS
        if bool((block >= self.blocks_per_seq).any()):
            raise ValueError(f"a sequence outgrew the cache (max_len={self.max_len})")
        missing = self.block_table[seqs, block] < 0
        wanted = torch.unique(seqs[missing] * self.blocks_per_seq + block[missing])
        if len(wanted) > len(self.free):
            raise OutOfBlocks(len(wanted) - len(self.free))
        if len(wanted):
            taken = self.free[len(self.free) - len(wanted):]
            del self.free[len(self.free) - len(wanted):]
            self.block_table.view(-1)[wanted] = torch.tensor(taken, dtype=torch.long, device=seqs.device)
            self.peak_blocks = max(self.peak_blocks, self.num_blocks - len(self.free))
        flat = self.block_table[seqs, block] * BLOCK_TOKENS + slots % BLOCK_TOKENS
        self.positions[flat] = positions.to(torch.int32)
        self.lengths.index_add_(0, seqs, torch.ones_like(seqs))
        torch.maximum(self._peak_tokens, self.lengths.sum(), out=self._peak_tokens)
        return flat

    def slot_index(self, seqs: torch.Tensor, kmax: int) -> torch.Tensor:
        j = torch.arange(kmax, device=seqs.device)
        blocks = self.block_table[seqs][:, j // BLOCK_TOKENS].clamp(min=0)  # unallocated: masked by length
        return blocks * BLOCK_TOKENS + j % BLOCK_TOKENS

    def reset(self, rows: torch.Tensor) -> None:
        """Return these rows' blocks, at every depth, to the free list."""
        seqs = (torch.arange(self.tables, device=rows.device)[:, None] * self.rows + rows[None]).reshape(-1)
        held = self.block_table[seqs]
        self.free += held[held >= 0].tolist()
        self.block_table[seqs] = -1
        self.lengths[seqs] = 0

    @property
    def peak_block_bytes(self) -> int:
        """The most bytes held in blocks at once (tokens plus each table's unfilled last block)."""
        return self.peak_blocks * BLOCK_TOKENS * self.slot_bytes


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
        # Every row of a contiguous pool, in order: read its slots as a view, without a gather.
        self.as_view = pool.contiguous and len(self.useqs) == pool.rows and first == 0 and last == pool.rows - 1
        self.in_order = t == 1 and bool(ascending)  # one query per sequence, sequences ascending
        if self.as_view:
            self.index = None
            keypos = pool.table_view(pool.positions[None], kmax)[0]
        else:
            self.index = pool.slot_index(self.useqs, kmax).clamp_(max=pool.positions.shape[0] - 1)
            keypos = pool.positions[self.index]  # beyond a sequence's length: masked by `valid`
        qpos = torch.full((len(self.useqs), t), NO_POSITION, dtype=torch.int32, device=seqs.device)
        qpos[self.inverse, self.rank] = positions.to(torch.int32)
        valid = torch.arange(kmax, device=seqs.device) < lengths[:, None]
        self.mask = (valid[:, None, :] & (keypos[:, None, :] <= qpos[:, :, None])).unsqueeze(1)  # [R, 1, t, k]

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
            return self.pool.table_view(keys[None], self.kmax)[0], self.pool.table_view(values[None], self.kmax)[0]
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


class KVCache:
    """All pools of one model for `rows` sequences of up to `max_len` tokens; `block_budget` caps the paged
    pool's blocks (None: enough for every token at every depth, so it never runs out)."""

    def __init__(self, layout: CacheLayout, rows: int, max_len: int, groups: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, block_budget: Optional[int] = None) -> None:
        self.layout, self.rows, self.max_len = layout, rows, max_len
        self.pools: dict[str, KVPool] = {}
        if layout.prefix_layers:
            self.pools["prefix"] = KVPool(layout.prefix_layers, rows, max_len, groups, head_dim, dtype, device)
        if layout.block_layers:
            depths = 1 if layout.kv_sharing else layout.num_recursions
            self.pools["block"] = PagedPool(layout.block_layers, rows, depths, max_len, groups, head_dim, dtype,
                                            device, block_budget)
        if layout.suffix_layers:
            self.pools["suffix"] = KVPool(layout.suffix_layers, rows, max_len, groups, head_dim, dtype, device)

    def depth_table(self, depth: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Per token at recursion `depth` (0-based): its table in the block pool, and which tokens write there
        (None: all)."""
        if self.layout.kv_sharing:
            return torch.zeros_like(depth), depth == 0
        return depth, None

    def reset(self, rows: torch.Tensor) -> None:
        """Empty these rows in every pool (their blocks go back to the free list)."""
        for pool in self.pools.values():
            pool.reset(rows)

    @property
    def nbytes(self) -> int:
        """K/V bytes allocated in all pools."""
        return sum(p.nbytes for p in self.pools.values())

    @property
    def peak_used_bytes(self) -> int:
        """The most K/V bytes sequences held at once, per pool, summed (blocks for the paged pool)."""
        return sum(p.peak_used_bytes for p in self.pools.values())

    def report(self) -> dict[str, float]:
        """Allocation and use: bytes allocated (per sequence, per token of max_len), used now and at the peak."""
        out: dict[str, float] = {
            "kv_bytes": self.nbytes,
            "kv_bytes_per_sequence": self.nbytes / self.rows,
            "kv_bytes_per_token": self.nbytes / (self.rows * self.max_len),
            "kv_used_bytes": sum(p.used_bytes() for p in self.pools.values()),
            "kv_peak_used_bytes": self.peak_used_bytes,
        }
        for name, pool in self.pools.items():
            out[f"{name}/peak_used_bytes"] = pool.peak_used_bytes
        return out
