"""FLOPs per token, counted two ways (docs/flops.md).

- Executed: what the hardware runs, for MFU and throughput: every matmul of the model as built
  (grouped K/V projections, the output layer, the routers) plus causal attention (QK and AV), with
  each recursion on the tokens its capacity selects.
- Budget: the paper's App. D accounting, which its isoFLOP step counts follow: forward only,
  non-embedding, 2 x (4 d^2 + 3 d f) per token and layer (q, k, v and o counted d x d whatever the
  grouping), causal attention, capacities for MoR's recursions, and under recursive KV sharing no
  K/V projection in later recursions, whose queries attend to all recursion-1 keys. Under it the
  360M presets' step counts give 16.5e18 FLOPs each.
"""

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


def _count(cfg: JobConfig, n: int, per_layer: float, kv_projection: float) -> Flops:
    """Layers' matmuls and causal attention per token of an n-token sequence. `per_layer` is a layer's matmul
    FLOPs per token; a later recursion under KV sharing skips `kv_projection` of them."""
    m = cfg.model
    plan = cfg.layout.plan

    def attention(queries: int, keys_avg: float) -> float:
        return 4.0 * m.hidden_size * queries * keys_avg  # QK and AV, 2 FLOPs per multiply-add

    if not cfg.layout.routed:
        depth = len(plan.unrolled)
        return Flops(per_layer * depth, depth * attention(n, (n + 1) / 2) / n)
    unique = len(plan.prefix) + len(plan.suffix)
    matmul, attn = per_layer * unique * n, unique * attention(n, (n + 1) / 2)
    for r, k in enumerate(recursion_tokens(cfg, n)):
        shared_kv = cfg.routing.kv_sharing and r > 0  # recursion-1 keys: every query sees all earlier positions
        matmul += (per_layer - (kv_projection if shared_kv else 0.0)) * len(plan.block) * k
        attn += len(plan.block) * attention(k, (n + 1) / 2 if shared_kv else (k + 1) / 2)
    return Flops(matmul / n, attn / n)


def forward_flops_per_token(cfg: JobConfig, vocab_size: int, seq_len: int | None = None) -> Flops:
    """Executed forward FLOPs per token: the layers as built, the output layer and the routers."""
    m = cfg.model
    n = seq_len or m.seq_length
    head = m.hidden_size // m.num_attention_heads
    kv_projection = 2.0 * 2 * m.hidden_size * m.num_query_groups * head  # skipped by reusing recursions
    layers = _count(cfg, n, 2.0 * layer_matmul_params(cfg), kv_projection)
    extra = 2.0 * m.hidden_size * vocab_size  # output layer
    if cfg.layout.routed and cfg.routing.kind == "expert_choice":
        tokens = recursion_tokens(cfg, n)
        extra += 2.0 * m.hidden_size * (n + sum(tokens[:-1])) / n  # each recursion's router scores its candidates
    elif cfg.layout.routed:
        extra += 2.0 * m.hidden_size * m.num_recursions
    return Flops(layers.matmul + extra, layers.attention)


def budget_flops_per_token(cfg: JobConfig) -> Flops:
    """The paper's App. D accounting per token (see the module docstring)."""
    m = cfg.model
    d = m.hidden_size
    per_layer = 2.0 * (4 * d * d + 3 * d * m.ffn_hidden_size)
    return _count(cfg, m.seq_length, per_layer, 2.0 * 2 * d * d)


def training_budget(cfg: JobConfig) -> float:
    """The run's compute budget under the paper's accounting: train.steps x tokens per step x budget FLOPs."""
    t = cfg.train
    return budget_flops_per_token(cfg).total * t.steps * t.global_batch_size * cfg.model.seq_length
