"""One megatron TransformerLayer on a flat batch of tokens, attending to the KV cache instead of a sequence."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.transformer_layer import TransformerLayer

from mor_dist.model.kv_cache import CacheGroup


def attend(group: CacheGroup, site: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Write the tokens' K/V at `site`, then attend [m, heads, d] queries to the cached keys they may see."""
    group.write(site, k, v)
    keys, values = group.read(site)  # [R, kmax, groups, d]
    out = F.scaled_dot_product_attention(group.pack(q).transpose(1, 2), keys.transpose(1, 2),
                                         values.transpose(1, 2), attn_mask=group.mask, enable_gqa=True)
    return group.unpack(out.transpose(1, 2))


def layer_step(layer: TransformerLayer, x: torch.Tensor, freqs: torch.Tensor, group: CacheGroup,
               site: int) -> torch.Tensor:
    """x [n, 1, h] -> [n, 1, h]: the layer's own norms, QKV, RoPE, projection, residuals and MLP.

    `freqs` [n, 1, 1, d] are the RoPE angles at each token's absolute position; `site` is the layer's
    index in the cache pool the group reads.
    """
    attn = layer.self_attention
    q, k, v = attn.get_query_key_value_tensors(layer.input_layernorm(x))  # [n, 1, heads|groups, d]
    q = apply_rotary_pos_emb(q, freqs, config=attn.config, cp_group=attn.pg_collection.cp)
    k = apply_rotary_pos_emb(k, freqs, config=attn.config, cp_group=attn.pg_collection.cp)
    context = attend(group, site, q[:, 0], k[:, 0], v[:, 0])
    out = attn.linear_proj(context.reshape(x.shape[0], 1, -1))
    h = layer.self_attn_bda(layer.training, layer.config.bias_dropout_fusion)(out, x, layer.hidden_dropout)
    return layer._forward_mlp(h)
