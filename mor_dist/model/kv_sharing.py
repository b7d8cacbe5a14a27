"""Recursive KV sharing: recursion 1 records each shared layer's keys/values; later recursions reuse them
and project queries only (their K/V projections are skipped, not computed and discarded)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel


@dataclass
class KVSharingState:
    """What the shared block's attention does in the current recursion (set by the model)."""

    mode: str = "off"  # off | record | reuse
    query_positions: Optional[torch.Tensor] = None  # [b, k] original positions of the queries (reuse)
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def reset(self) -> None:
        self.mode, self.query_positions, self.cache = "off", None, {}


def reuse_mask(query_positions: torch.Tensor, num_keys: int) -> torch.Tensor:
    """[b, 1, k, s] boolean mask (True = hidden): a query sees the recursion-1 keys up to its position."""
    keys = torch.arange(num_keys, device=query_positions.device)
    return (keys[None, None, :] > query_positions[:, :, None]).unsqueeze(1)


def with_kv_sharing(core_attention_cls: type) -> type:
    """Subclass a megatron core-attention class so a KVSharingState can record or substitute K/V."""

    class KVSharingCoreAttention(core_attention_cls):
        kv_state: Optional[KVSharingState] = None

        def forward(self, query, key, value, attention_mask, *args, **kwargs):
            state = self.kv_state
            if state is not None and state.mode == "record":
                state.cache[id(self)] = (key, value)
            elif state is not None and state.mode == "reuse":
                key, value = state.cache[id(self)]
                attention_mask = reuse_mask(state.query_positions, key.shape[0])
            return super().forward(query, key, value, attention_mask, *args, **kwargs)

    KVSharingCoreAttention.__name__ = f"KVSharing{core_attention_cls.__name__}"
    return KVSharingCoreAttention


def query_rows(attention: torch.nn.Module) -> torch.Tensor:
    """The query rows of this rank's fused QKV weight, laid out [q heads of group 1, k1, v1 | group 2 ...]."""
    weight = attention.linear_qkv.weight
    groups = attention.num_query_groups_per_partition
    head = attention.hidden_size_per_attention_head
    per_group = attention.num_attention_heads_per_partition // groups * head
    return weight.view(groups, per_group + 2 * head, -1)[:, :per_group].reshape(-1, weight.shape[-1])


def with_query_only_reuse(self_attention_cls: type) -> type:
    """Subclass megatron's SelfAttention so a reusing recursion projects queries only.

    The K/V it returns are placeholders (zeros: RoPE on them is free of GEMMs) that the core attention
    replaces with recursion 1's. Megatron's ColumnParallelLinear is reproduced for the query rows: the
    input is gathered under sequence parallelism (or copied, for the backward all-reduce, under plain TP)
    and normed first where TE fuses the input norm into the QKV linear.
    """

    class QueryOnlyReuseAttention(self_attention_cls):
        kv_state: Optional[KVSharingState] = None

        def get_query_key_value_tensors(self, hidden_states, *args, **kwargs):
            state = self.kv_state
            if state is None or state.mode != "reuse" or kwargs.get("output_gate") \
                    or not kwargs.get("split_qkv", True):
                return super().get_query_key_value_tensors(hidden_states, *args, **kwargs)
            x = hidden_states
            norm_weight = getattr(self.linear_qkv, "layer_norm_weight", None)
            if norm_weight is not None:  # TE's LayerNormColumnParallelLinear (RMSNorm in this model)
                x = F.rms_norm(x.float(), (x.shape[-1],), norm_weight.float(),
                               self.config.layernorm_epsilon).to(x.dtype)
            if self.config.sequence_parallel:
                x = tensor_parallel.gather_from_sequence_parallel_region(x)
            elif self.world_size > 1:
                x = tensor_parallel.copy_to_tensor_model_parallel_region(x)
            query = F.linear(x, query_rows(self).to(x.dtype))
            query = query.view(*query.shape[:2], -1, self.hidden_size_per_attention_head)
            kv_shape = (*query.shape[:2], self.num_query_groups_per_partition, self.hidden_size_per_attention_head)
            return query, query.new_zeros(kv_shape), query.new_zeros(kv_shape)

    QueryOnlyReuseAttention.__name__ = f"QueryOnlyReuse{self_attention_cls.__name__}"
    return QueryOnlyReuseAttention
