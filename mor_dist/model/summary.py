"""What `pretrain.py --dry-run` prints: layout, depth, parameter counts, FLOPs per token."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from mor_dist.config import JobConfig
from mor_dist.pretrained.source import source_shape
from mor_dist.pretrained.strategies import describe, slot_sources
from mor_dist.model.flops import budget_flops_per_token, forward_flops_per_token, recursion_tokens, training_budget


@dataclass(frozen=True)
class ModelSummary:
    """Counts for one config at full size (no parallel split)."""

    layout: str
    effective_depth: int
    unique_layers: int
    non_embedding_params: int
    embedding_params: int
    flops_per_token: float  # executed (MFU)
    budget_per_token: float  # the paper's App. D accounting
    training_budget: float  # train.steps x tokens per step x budget_per_token
    recursion_tokens: list[int]
    init_sources: str  # model.init_from: which source layers fill each slot ("" without it)

    def lines(self, cfg: JobConfig) -> list[str]:
        m = cfg.model
        routing = f"{cfg.routing.kind}, kv {'shared' if cfg.routing.kv_sharing else 'recursion-wise'}" \
            if cfg.layout.routed else "none"
        init = [f"init from        {m.init_from} ({m.init_strategy}; routers fresh), slot<-source layer(s):",
                f"                 {self.init_sources}"] if m.init_from else []
        return [
            f"model            {m.kind} (N_r={m.num_recursions}, routing: {routing})",
            f"layout           {self.layout}",
            f"effective depth  {self.effective_depth} layers ({self.unique_layers} unique)",
            *init,
            f"unique non-embedding parameters  {self.non_embedding_params / 1e6:,.1f}M",
            f"embedding parameters             {self.embedding_params / 1e6:,.1f}M"
            + (" (tied with the output layer)" if m.tie_embeddings else ""),
            f"tokens per recursion (of {m.seq_length})  {self.recursion_tokens}",
            f"forward FLOPs per token          {self.flops_per_token / 1e9:,.4f} GFLOP executed (output layer, "
            "routers, grouped K/V: what MFU counts)",
            f"                                 {self.budget_per_token / 1e9:,.4f} GFLOP in the paper's App. D accounting",
            f"training budget                  {self.training_budget:.3e} FLOPs (App. D) = {cfg.train.steps:,} steps x "
            f"{cfg.train.global_batch_size * m.seq_length:,} tokens",
            f"parallel         tp={cfg.parallel.tp} pp={cfg.parallel.pp} dp={cfg.parallel.dp} "
            f"-> {cfg.world_size} workers",
        ]


def summarize(cfg: JobConfig, vocab_size: int) -> ModelSummary:
    """Build the model on the meta device (no memory, no init) and count."""
    from mor_dist.model.mor import build_model
    from mor_dist.parallel.setup import init_single_process

    single = copy.deepcopy(cfg)
    single.parallel.tp = single.parallel.pp = single.parallel.dp = 1
    single.parallel.sequence_parallel = False
    single.train.precision = "fp32"
    init_single_process()
    with torch.device("meta"):
        model = build_model(single, vocab_size, on_cuda=False)
    embedding = model.embedding.word_embeddings.weight.numel()
    if not cfg.model.tie_embeddings:
        embedding += model.output_layer.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    m, layout = cfg.model, cfg.layout
    plan = layout.plan
    return ModelSummary(
        layout=plan.describe(),
        effective_depth=len(plan.unrolled),
        unique_layers=plan.num_unique,
        non_embedding_params=total - embedding,
        embedding_params=embedding,
        flops_per_token=forward_flops_per_token(cfg, vocab_size).total,
        budget_per_token=budget_flops_per_token(cfg).total,
        training_budget=training_budget(cfg),
        recursion_tokens=recursion_tokens(cfg, m.seq_length) if plan.num_recursions > 1 else [m.seq_length],
        init_sources=describe(slot_sources(plan, source_shape(m.init_from).num_layers, m.init_strategy,
                                           cfg.train.seed)) if m.init_from else "",
    )
