"""Cached token-level forward of one MoRModel: enter (embedding + prefix), block passes, exit (suffix + head).

Vanilla and recursive models have no router: every layer runs on entry, in unrolled order, each layer
instance with its own K/V. MoR models run the prefix on entry, then one pass of the shared block per
call of `block_pass` for tokens that may sit at different depths (each attends to its depth's table),
then the suffix and head once a token exits.
"""

from __future__ import annotations

from typing import Optional

import torch

from mor_dist.inference.layer_step import layer_step
from mor_dist.inference.rules import make_rule
from mor_dist.inference.tokens import Tokens, concat
from mor_dist.model.kv_cache import CacheGroup, CacheLayout, KVCache
from mor_dist.model.mor import MoRModel


class Engine:
    """Generation state of one model for `rows` concurrent sequences of up to `max_len` tokens.

    `thresholds`: per-recursion thresholds of the expert-choice rule. `block_budget`: blocks of the
    shared block's paged KV pool (None: enough for every token at every depth); with fewer, block_pass
    raises OutOfBlocks and the scheduler preempts a sequence, never a token's recursion.
    """

    def __init__(self, model: MoRModel, rows: int, max_len: int, thresholds: Optional[list[float]] = None,
                 block_budget: Optional[int] = None) -> None:
        if not (model.pre_process and model.post_process) or model.config.tensor_model_parallel_size != 1:
            raise ValueError("generation runs an unsharded model (parallel.tp=1, parallel.pp=1)")
        plan, cfg = model.plan, model.cfg
        self.model, self.rows, self.max_len = model.eval(), rows, max_len
        self.n = plan.num_recursions
        self.prefix = plan.prefix if model.routed else plan.unrolled
        self.block = plan.block if model.routed else ()
        self.suffix = plan.suffix if model.routed else ()
        self.rule = make_rule(model.router, self.n, thresholds) if model.routed else None
        layout = CacheLayout(len(self.prefix), len(self.block), len(self.suffix), self.n,
                             model.routed and cfg.routing.kv_sharing)
        config = model.config
        param = next(model.parameters())
        self.cache = KVCache(layout, rows, max_len, config.num_query_groups, config.kv_channels,
                             param.dtype, param.device, block_budget)
        self.freqs = model.rotary_pos_emb(max_len).to(param.device)  # [max_len, 1, 1, d]
        self.device = param.device

    def _layer(self, slot: int):
        return self.model.layers[self.model.slot_index[slot]]

    def _stack(self, slots: tuple[int, ...], name: str, x: torch.Tensor, rows: torch.Tensor,
               pos: torch.Tensor) -> torch.Tensor:
        """Run unrouted layers (one table for all of them) on every token."""
        if not slots:
            return x
        pool = self.cache.pools[name]
        group = CacheGroup(pool, rows, pos, pool.admit(rows, pos))
        freqs = self.freqs[pos]
        for site, slot in enumerate(slots):
            x = layer_step(self._layer(slot), x, freqs, group, site)
        return x

    @torch.inference_mode()
    def enter(self, rows: torch.Tensor, pos: torch.Tensor, ids: torch.Tensor) -> tuple[Tokens, Tokens]:
        """New tokens: embedding and prefix layers; (tokens that take recursion 1, tokens done)."""
        x = self.model.embedding(input_ids=ids[None], position_ids=None)  # [n, 1, h]
        x = self._stack(self.prefix, "prefix", x, rows, pos)
        toks = Tokens(rows, pos, x[:, 0], torch.zeros_like(rows))
        if self.rule is None:
            return toks.take(torch.zeros_like(rows, dtype=torch.bool)), toks
        want = self.rule.enter(toks)
        return toks.take(want), toks.take(~want)

    @torch.inference_mode()
    def block_pass(self, toks: Tokens) -> tuple[Tokens, Optional[Tokens]]:
        """One pass of the shared block, each token at its own depth; (tokens that continue, tokens done).

        Every token attends once per layer, to its depth's table in the block pool, whatever the mix of depths.
        Raises OutOfBlocks, before any change, when the pool cannot take every token's K/V.
        """
        pool = self.cache.pools["block"]
        table, writers = self.cache.depth_table(toks.depth)
        seqs = table * self.rows + toks.rows
        order = torch.argsort(seqs, stable=True)  # sequences ascending: one query per sequence needs no packing
        toks, seqs = toks.take(order), seqs[order]
        writers = None if writers is None else writers[order]
        flat = pool.admit(seqs, toks.pos) if writers is None else pool.admit(seqs[writers], toks.pos[writers])
        group = CacheGroup(pool, seqs, toks.pos, flat, writers)
        x = self.rule.block_input(toks)[:, None]
        freqs = self.freqs[toks.pos]
        for site, slot in enumerate(self.block):
            x = layer_step(self._layer(slot), x, freqs, group, site)
        self.rule.update(toks, x[:, 0])
        toks.depth = toks.depth + 1
        go = self.rule.advance(toks)
        return toks.take(go), toks.take(~go)

    @torch.inference_mode()
    def exit(self, toks: Tokens, head: bool = True) -> Optional[torch.Tensor]:
        """Finished tokens: suffix layers, final norm and output layer; logits [n, vocab] (None if not head)."""
        x = (self.rule.exit_hidden(toks) if self.rule is not None else toks.h)[:, None]
        x = self._stack(self.suffix, "suffix", x, toks.rows, toks.pos)
        if not head:
            return None
        model = self.model
        x = model.final_layernorm(x)
        weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
        logits, _ = model.output_layer(x, weight=weight)
        return logits[:, 0].float()

    def prefill(self, rows: torch.Tensor, pos: torch.Tensor, ids: torch.Tensor) -> None:
        """Cache a prompt (tokens of several rows at once): every depth in turn, then the suffix."""
        want, done = self.enter(rows, pos, ids)
        finished = [done]
        while len(want):
            want, out = self.block_pass(want)
            finished.append(out)
        self.exit(concat(finished), head=False)

    def reset(self, rows: list[int]) -> None:
        """Free these rows for new sequences."""
        self.cache.reset(torch.tensor(rows, device=self.device))
