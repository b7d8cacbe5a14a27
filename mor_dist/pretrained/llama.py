"""Hugging Face Llama weights <-> megatron-core's, by megatron's sharded (checkpoint) keys.

One mapping in both directions. Megatron fuses Q, K and V into one weight laid out per query group
([q heads of group g; k_g; v_g] for each g) and the SwiGLU gate and up projections into one
([gate; up]); norms sit under the linear they precede. Keys are those of a tp=1 model's sharded
state dict, whose tensors are the global ones any tp/pp layout slices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

LAYER_KEYS = ("self_attention.linear_qkv.layer_norm_weight", "self_attention.linear_qkv.weight",
              "self_attention.linear_proj.weight", "mlp.linear_fc1.layer_norm_weight", "mlp.linear_fc1.weight",
              "mlp.linear_fc2.weight")
EMBEDDING, FINAL_NORM, OUTPUT = "embedding.word_embeddings.weight", "final_layernorm.weight", "output_layer.weight"
HF_EMBEDDING, HF_FINAL_NORM, HF_OUTPUT = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


@dataclass(frozen=True)
class Heads:
    """Attention shape: query heads, key/value groups and the head size."""

    heads: int
    groups: int
    size: int

    def fuse_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """[heads*size, d], [groups*size, d] x2 -> megatron's [groups*(heads/groups + 2)*size, d]."""
        d = q.shape[-1]
        q = q.reshape(self.groups, self.heads // self.groups * self.size, d)
        return torch.cat([q, k.reshape(self.groups, self.size, d), v.reshape(self.groups, self.size, d)], 1).reshape(-1, d)

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The inverse of fuse_qkv."""
        d = qkv.shape[-1]
        per_group = self.heads // self.groups * self.size
        grouped = qkv.reshape(self.groups, per_group + 2 * self.size, d)
        q, k, v = grouped.split([per_group, self.size, self.size], 1)
        return q.reshape(-1, d), k.reshape(-1, d), v.reshape(-1, d)


def layer_from_hf(get: Callable[[str], torch.Tensor], index: int, heads: Heads) -> dict[str, torch.Tensor]:
    """One HF layer's weights (read with `get(name)`) under megatron's per-layer keys (LAYER_KEYS)."""
    p = f"model.layers.{index}."
    return {
        LAYER_KEYS[0]: get(p + "input_layernorm.weight"),
        LAYER_KEYS[1]: heads.fuse_qkv(*(get(p + f"self_attn.{x}_proj.weight") for x in "qkv")),
        LAYER_KEYS[2]: get(p + "self_attn.o_proj.weight"),
        LAYER_KEYS[3]: get(p + "post_attention_layernorm.weight"),
        LAYER_KEYS[4]: torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]),
        LAYER_KEYS[5]: get(p + "mlp.down_proj.weight"),
    }


def layer_to_hf(layer: dict[str, torch.Tensor], index: int, heads: Heads) -> dict[str, torch.Tensor]:
    """Megatron's per-layer weights as HF layer `index`'s."""
    p = f"model.layers.{index}."
    q, k, v = heads.split_qkv(layer[LAYER_KEYS[1]])
    gate, up = layer[LAYER_KEYS[4]].chunk(2)
    return {p + "input_layernorm.weight": layer[LAYER_KEYS[0]], p + "self_attn.q_proj.weight": q,
            p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": layer[LAYER_KEYS[2]],
            p + "post_attention_layernorm.weight": layer[LAYER_KEYS[3]], p + "mlp.gate_proj.weight": gate,
            p + "mlp.up_proj.weight": up, p + "mlp.down_proj.weight": layer[LAYER_KEYS[5]]}


def pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """An embedding or output weight padded with zero rows to megatron's padded vocabulary."""
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], weight.shape[1])]) if rows > len(weight) else weight
