"""Recursive KV sharing: recursion 1 records each shared layer's keys/values; later recursions reuse them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


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
