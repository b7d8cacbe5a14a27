"""Forward FLOPs per token as the paper counts them (App. D), per recursion and capacity."""

from __future__ import annotations

from dataclasses import dataclass

from mor_dist.config import JobConfig
from mor_dist.model.routing import capacity_tokens


@dataclass(frozen=True)
class Flops:
    """Forward FLOPs per token: matmuls (2 x parameters used) and causal attention (QK and AV)."""

    matmul: float
    attention: float

    @property
    def total(self) -> float:
        return self.matmul + self.attention

    @property
    def training(self) -> float:
        """Forward plus backward (twice the forward)."""
        return 3.0 * self.total


def layer_matmul_params(cfg: JobConfig) -> int:
    """Weights one transformer layer multiplies by (q, k, v, o projections and the SwiGLU MLP)."""
    m = cfg.model
    head = m.hidden_size // m.num_attention_heads
    q_dim, kv_dim = m.num_attention_heads * head, m.num_query_groups * head
    return m.hidden_size * (2 * q_dim + 2 * kv_dim) + 3 * m.hidden_size * m.ffn_hidden_size


def recursion_tokens(cfg: JobConfig, seq_len: int) -> list[int]:
    """Tokens that run each recursion of a sequence (token-choice assumes perfect balance)."""
    return [capacity_tokens(c, seq_len) for c in cfg.capacities]


def forward_flops_per_token(cfg: JobConfig, vocab_size: int, seq_len: int | None = None) -> Flops:
    """2 x matmul parameters per processed token plus causal attention, averaged over the sequence."""
    m = cfg.model
    n = seq_len or m.seq_length
    q_dim = m.hidden_size  # heads * head_dim
    per_layer = 2 * layer_matmul_params(cfg)

    def attention(queries: int, keys_avg: float) -> float:
        return 4.0 * q_dim * queries * keys_avg  # QK and AV, 2 FLOPs per multiply-add

    matmul = 2.0 * m.hidden_size * vocab_size * n  # output layer
    attn = 0.0
    layout = cfg.layout
    plan = layout.plan
    if not layout.routed:
        depth = len(plan.unrolled)
        matmul += per_layer * depth * n
        attn += depth * attention(n, (n + 1) / 2)
    else:
        unique = len(plan.prefix) + len(plan.suffix)
        matmul += per_layer * unique * n
        attn += unique * attention(n, (n + 1) / 2)
        tokens = recursion_tokens(cfg, n)
        for r, k in enumerate(tokens):
            matmul += per_layer * len(plan.block) * k
            shared_kv = cfg.routing.kv_sharing and r > 0
            attn += len(plan.block) * attention(k, (n + 1) / 2 if shared_kv else (k + 1) / 2)
        if cfg.routing.kind == "expert_choice":
            candidates = [n] + tokens[:-1]
            matmul += 2.0 * m.hidden_size * sum(candidates)
        else:
            matmul += 2.0 * m.hidden_size * m.num_recursions * n
    return Flops(matmul / n, attn / n)
