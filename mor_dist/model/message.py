"""What passes from one model chunk to the next, and its fixed-shape message form for pipeline stages.

Between stages a routed chunk sends one message of a fixed shape (capacities are static): the
residual stream h [s], the current recursion's tokens scattered to full length [s], and a few rows
of per-token metadata (gate, selection mask, depth), so every message has the same size
(`Layout.message_rows`). Unrouted models send h alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from mor_dist.layout import ChunkPlan
from mor_dist.model.routing import Selection, gather_tokens, ragged_indices, scatter_add_tokens


@dataclass
class Carry:
    """The state of one micro-batch between chunks (sequence-first tensors)."""

    h: torch.Tensor  # residual stream; for token-choice H1, the input of the recursions
    x: Optional[torch.Tensor] = None  # active tokens in the middle of a recursion [k, b, d]
    sel: Optional[Selection] = None  # the recursion in progress
    prev: Optional[Selection] = None  # the last finished recursion (expert-choice filtering)
    state: Optional[torch.Tensor] = None  # token-choice: every token's current state [s, b, d]
    depth: Optional[torch.Tensor] = None  # token-choice: assigned depth [b, s]
    gate: Optional[torch.Tensor] = None  # token-choice: exit gate [s, b, 1]
    depths: Optional[torch.Tensor] = None  # recursions taken so far [b, s]


def pack_meta(values: list[torch.Tensor], rows: int, hidden: int) -> torch.Tensor:
    """[b, s] tensors -> [rows, b, hidden] (gradients kept)."""
    b = values[0].shape[0]
    flat = torch.cat([v.to(torch.float32) for v in values], dim=1)
    flat = torch.nn.functional.pad(flat, (0, rows * hidden - flat.shape[1]))
    return flat.view(b, rows, hidden).transpose(0, 1)


def unpack_meta(meta: torch.Tensor, count: int, seq: int) -> list[torch.Tensor]:
    """Inverse of pack_meta: [rows, b, hidden] -> `count` tensors [b, s]."""
    flat = meta.transpose(0, 1).reshape(meta.shape[1], -1).float()
    return [flat[:, i * seq:(i + 1) * seq] for i in range(count)]


def _mask(sel: Optional[Selection], b: int, s: int, device: torch.device) -> torch.Tensor:
    mask = torch.zeros(b, s, device=device)
    if sel is None:
        return mask
    src = torch.ones_like(sel.indices, dtype=mask.dtype) if sel.valid is None else sel.valid.to(mask.dtype)
    return mask.scatter(1, sel.indices, src)


def _selection(mask: torch.Tensor, multiple: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    idx, valid = ragged_indices(mask > 0.5, multiple)
    return idx, (None if bool(valid.all()) else valid)


def pack_expert(carry: Carry, full: Callable, meta_rows: int) -> torch.Tensor:
    """[h; x scattered to full length; meta(gate, selection mask, depths)] -> [2s + m, b, d]."""
    h = carry.h
    s, b, d = h.shape
    sel = carry.sel if carry.sel is not None else carry.prev
    xfull, gate_full = torch.zeros_like(h), h.new_zeros(b, s, dtype=torch.float32)
    if carry.sel is not None:
        xfull = scatter_add_tokens(xfull, sel.indices, full(carry.x))
        gate = sel.gate[..., 0].t().float()
        if sel.valid is not None:
            gate = gate * sel.valid
        gate_full = gate_full.scatter(1, sel.indices, gate)
    meta = pack_meta([gate_full, _mask(sel, b, s, h.device), carry.depths.float()], meta_rows, d).to(h.dtype)
    return torch.cat([h, xfull, meta])


def unpack_expert(msg: torch.Tensor, vs: ChunkPlan, seq: int, shard: Callable, multiple: int) -> Carry:
    """Inverse of pack_expert for the chunk `vs` that receives it (selections padded to `multiple` rows)."""
    h, xfull, meta = msg[:seq], msg[seq:2 * seq], msg[2 * seq:]
    gate_full, mask, depths = unpack_meta(meta, 3, seq)
    idx, valid = _selection(mask, multiple)
    carry = Carry(h=h, depths=depths.round().long())
    if vs.route:
        carry.prev = Selection(idx, None, valid)
    else:
        gate = gate_full.gather(1, idx).t().unsqueeze(-1).to(h.dtype)
        carry.sel, carry.x = Selection(idx, gate, valid), shard(gather_tokens(xfull, idx))
    return carry


def pack_token(carry: Carry, full: Callable, meta_rows: int) -> torch.Tensor:
    """[H1; states with the in-flight tokens written in; meta(gate, depth)] -> [2s + m, b, d]."""
    h, state = carry.h, carry.state
    s, b, d = h.shape
    if carry.sel is not None:
        idx, valid = carry.sel.indices, carry.sel.valid
        delta = full(carry.x) - gather_tokens(state, idx)
        state = scatter_add_tokens(state, idx, delta * valid.t().unsqueeze(-1).to(delta.dtype))
    gate = carry.gate[..., 0].t().float()
    meta = pack_meta([gate, carry.depth.float(), torch.zeros_like(gate)], meta_rows, d).to(h.dtype)
    return torch.cat([h, state, meta])


def unpack_token(msg: torch.Tensor, vs: ChunkPlan, seq: int, shard: Callable, multiple: int) -> Carry:
    """Inverse of pack_token for the chunk `vs` that receives it (selections padded to `multiple` rows)."""
    h, state, meta = msg[:seq], msg[seq:2 * seq], msg[2 * seq:]
    gate, depth, _ = unpack_meta(meta, 3, seq)
    depth = depth.round().long()
    carry = Carry(h=h, state=state, depth=depth, gate=gate.t().unsqueeze(-1).to(h.dtype), depths=depth)
    if not vs.route:
        idx, valid = ragged_indices(depth >= vs.recursion + 1, multiple)
        carry.sel, carry.x = Selection(idx, None, valid), shard(gather_tokens(state, idx))
    return carry
