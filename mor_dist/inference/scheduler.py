"""Continuous batching from a request queue: depth-wise for MoR, sequence-wise for vanilla, one loop for both.

Every step: new tokens enter (embedding + prefix), the shared block runs once over every token in
flight (each at its own depth), tokens that exit take the suffix and head, the next tokens are
sampled, and rows whose sequence finished are refilled from the queue. A sequence has one token in
flight, so with every row busy the block's batch is full whatever the depths. Vanilla models run all
their layers on entry: the same loop is then continuous sequence-wise batching.

The shared block's KV pool is paged: a request waits in the queue until its prompt's blocks are free,
and when the pool runs out mid-step the most recently admitted sequence is preempted (its blocks
freed, the request queued again from the start), as vLLM does; no token's recursion is cut short.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import torch

from mor_dist.inference.engine import Engine
from mor_dist.inference.sampling import Sampler
from mor_dist.inference.tokens import Tokens, concat
from mor_dist.model.kv_cache import BLOCK_TOKENS, OutOfBlocks


@dataclass
class Request:
    """A prompt (at least one token: BOS/EOS for none) and how many tokens to generate."""

    prompt: list[int]
    max_new_tokens: int


@dataclass
class RunStats:
    """What a run produced and how full it kept the engine."""

    outputs: list[list[int]]
    steps: int = 0
    block_batches: list[int] = field(default_factory=list)  # tokens per shared-block pass (MoR)
    busy_rows: list[int] = field(default_factory=list)  # rows holding a sequence, per step
    queued: list[int] = field(default_factory=list)  # requests still waiting, per step
    depths: list[int] = field(default_factory=list)  # recursions taken by each request's generated tokens
    preemptions: int = 0  # sequences restarted because the KV pool ran out of blocks
    seconds: float = 0.0

    @property
    def generated(self) -> int:
        return sum(len(o) for o in self.outputs)

    @property
    def depth_total(self) -> int:
        """Recursions taken by all generated tokens."""
        return sum(self.depths)


class Scheduler:
    """Runs requests through an engine's rows until every one has its tokens."""

    def __init__(self, engine: Engine, sampler: Sampler, eos_id: Optional[int] = None) -> None:
        self.engine, self.sampler, self.eos_id = engine, sampler, eos_id

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.engine.device)

    def run(self, requests: list[Request]) -> RunStats:
        """Generate for every request; outputs in request order."""
        engine = self.engine
        pool = engine.cache.pools.get("block")
        for req in requests:
            if not req.prompt or len(req.prompt) + req.max_new_tokens - 1 > engine.max_len:
                raise ValueError(f"request of {len(req.prompt)} prompt + {req.max_new_tokens} new tokens does not "
                                 f"fit max_len={engine.max_len} (and needs at least one prompt token)")
            if pool is not None and self._prompt_blocks(req) > pool.num_blocks:
                raise ValueError(f"a prompt of {len(req.prompt)} tokens needs more than the KV pool's "
                                 f"{pool.num_blocks} blocks; raise the block budget")
        stats = RunStats(outputs=[[] for _ in requests], depths=[0] * len(requests))
        queue = deque(range(len(requests)))
        free = list(range(engine.rows))
        owner: dict[int, int] = {}
        entering: list[tuple[int, int, int]] = []  # (row, position, token)
        inflight: Optional[Tokens] = None
        start = time.perf_counter()
        self._admit(requests, queue, free, owner, entering)
        while entering or inflight is not None:
            stats.steps += 1
            stats.busy_rows.append(len(owner))
            stats.queued.append(len(queue))
            done: list[Optional[Tokens]] = []
            if entering:
                rows, pos, ids = (self._tensor(list(c)) for c in zip(*sorted(entering)))
                want, out = engine.enter(rows, pos, ids)
                inflight, entering = concat([inflight, want]), []
                done.append(out)
            if inflight is not None:
                stats.block_batches.append(len(inflight))
                cont, out = self._block_pass(inflight, requests, stats, queue, free, owner)
                inflight = concat([cont])
                done.append(out)
            exited = concat(done)
            if exited is not None:
                exited = exited.take(torch.argsort(exited.rows))  # rows in order: cache reads without copies
                entering = self._sample(requests, exited, stats, free, owner)
            self._admit(requests, queue, free, owner, entering)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        stats.seconds = time.perf_counter() - start
        return stats

    def _prompt_blocks(self, req: Request) -> int:
        """Blocks a prompt's prefill may take at most (every prefilled token at every depth)."""
        pool = self.engine.cache.pools["block"]
        return pool.tables * math.ceil((len(req.prompt) - 1) / BLOCK_TOKENS)

    def _block_pass(self, inflight: Tokens, requests: list[Request], stats: RunStats, queue: deque,
                    free: list[int], owner: dict[int, int]) -> tuple[Optional[Tokens], Optional[Tokens]]:
        """engine.block_pass, preempting the newest sequences while the KV pool is short of blocks."""
        while True:
            try:
                return self.engine.block_pass(inflight)
            except OutOfBlocks:
                if len(owner) < 2:
                    raise RuntimeError("the KV pool holds fewer blocks than one sequence needs; raise the block "
                                       "budget") from None
                victim = next(reversed(owner))  # admitted last
                i = owner.pop(victim)
                stats.outputs[i].clear()
                stats.depths[i] = 0
                stats.preemptions += 1
                queue.appendleft(i)
                free.append(victim)
                self.engine.reset([victim])
                inflight = inflight.take(inflight.rows != victim)
                if not len(inflight):
                    return None, None

    def _sample(self, requests: list[Request], exited: Tokens, stats: RunStats, free: list[int],
                owner: dict[int, int]) -> list[tuple[int, int, int]]:
        """Head and sampling for exited tokens; the next tokens of unfinished sequences."""
        ids = self.sampler(self.engine.exit(exited)).tolist()
        nxt, finished = [], []
        for row, pos, tok, depth in zip(exited.rows.tolist(), exited.pos.tolist(), ids, exited.depth.tolist()):
            i = owner[row]
            out = stats.outputs[i]
            out.append(tok)
            stats.depths[i] += depth
            if len(out) >= requests[i].max_new_tokens or (self.eos_id is not None and tok == self.eos_id):
                del owner[row]
                free.append(row)
                finished.append(row)
            else:
                nxt.append((row, pos + 1, tok))
        if finished:
            self.engine.reset(finished)  # their KV blocks are free for whoever comes next
        return nxt

    def _admit(self, requests: list[Request], queue: deque, free: list[int], owner: dict[int, int],
               entering: list[tuple[int, int, int]]) -> None:
        """Give free rows to waiting requests: prefill all but the last prompt token, which enters."""
        new = []
        pool = self.engine.cache.pools.get("block")
        budget = pool.free_blocks if pool is not None else 0
        while free and queue:
            need = self._prompt_blocks(requests[queue[0]]) if pool is not None else 0
            if need > budget:
                break  # waits until sequences finish and return their blocks
            budget -= need
            row, i = free.pop(0), queue.popleft()
            owner[row] = i
            new.append((row, requests[i].prompt))
        if not new:
            return
        self.engine.reset([row for row, _ in new])
        head = [(row, p, tok) for row, prompt in new for p, tok in enumerate(prompt[:-1])]
        if head:
            self.engine.prefill(*(self._tensor(list(c)) for c in zip(*head)))
        entering += [(row, len(prompt) - 1, prompt[-1]) for row, prompt in new]
