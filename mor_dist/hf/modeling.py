"""A transformers model for mor-dist's recursive and MoR models (PreTrainedModel + GenerationMixin).

Llama layers under Llama's parameter names, one per unique slot, run in the order of the layer plan
(`unrolled`); a routed recursion runs with the causal rule the project's own engine uses (a token
takes recursion r iff it took r-1 and sigmoid(router logit) >= the recursion's threshold; capacity-1
recursions take every candidate), then h <- h + w * f(h) for the tokens that took it. Routing is
written with masks rather than gathered tokens: every token goes through the block, and a recursion's
attention only sees the keys of the tokens that took it (recursion-wise caching), so a full forward
and a cached decode agree. Under recursive KV sharing later recursions attend to recursion 1's
keys and values (no K/V projection of their own). Token-choice routing assigns each token its depth after the prefix and
exits with h + w * state, as the project's model does. The cache keeps K/V per unrolled layer
("site") and which tokens took each recursion; it trades the project engine's memory saving (mor_dist/inference) for portability.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from mor_dist.pretrained.llama import (EMBEDDING, FINAL_NORM, HF_EMBEDDING, HF_FINAL_NORM, HF_OUTPUT, LAYER_KEYS,
                                       OUTPUT, Heads, layer_to_hf)


CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


class MoRConfig(PretrainedConfig):
    """Llama's shape plus the layer plan and the expert-choice router's inference settings."""

    model_type = "mor_dist"

    def __init__(self, vocab_size: int = 1024, hidden_size: int = 64, intermediate_size: int = 192,
                 num_attention_heads: int = 4, num_key_value_heads: int = 2, head_dim: Optional[int] = None,
                 rope_theta: float = 10000.0, rms_norm_eps: float = 1e-5, max_position_embeddings: int = 2048,
                 num_slots: int = 1, unrolled: Optional[list[int]] = None, block: Optional[list[int]] = None,
                 num_recursions: int = 1, routed: bool = False, router_alpha: float = 0.1,
                 router_activation: str = "sigmoid", router_gating: str = "weighted",
                 capacities: Optional[list[float]] = None, thresholds: Optional[list[float]] = None,
                 aux_router: bool = False, router_kind: str = "expert_choice", loss_free_balancing: bool = False,
                 kv_sharing: bool = False,
                 tie_word_embeddings: bool = True, use_cache: bool = True, **kwargs: Any) -> None:
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_attention_heads, self.num_key_value_heads = num_attention_heads, num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.rope_theta, self.rms_norm_eps = rope_theta, rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.num_slots, self.unrolled, self.block = num_slots, list(unrolled or [0]), list(block or [])
        self.num_recursions, self.routed = num_recursions, routed
        self.router_alpha, self.router_activation, self.router_gating = router_alpha, router_activation, router_gating
        self.capacities = list(capacities or [1.0] * num_recursions)
        self.thresholds = list(thresholds or [0.5] * num_recursions)
        self.aux_router, self.use_cache = aux_router, use_cache
        self.router_kind, self.loss_free_balancing, self.kv_sharing = router_kind, loss_free_balancing, kv_sharing
        kwargs.setdefault("num_hidden_layers", len(self.unrolled))  # one cache layer per site
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @classmethod
    def from_job(cls, cfg: Any, llama_values: dict[str, Any]) -> "MoRConfig":
        """From a JobConfig (recursive or MoR)."""
        r = cfg.routing
        routed = cfg.layout.routed
        plan = cfg.layout.plan
        values = {k: v for k, v in llama_values.items() if k != "num_hidden_layers"}
        return cls(**values, num_slots=plan.num_unique, unrolled=list(plan.unrolled), block=list(plan.block),
                   num_recursions=plan.num_recursions, routed=routed,
                   router_alpha=(0.1 if r.kind == "expert_choice" else 1.0) if r.alpha is None else r.alpha,
                   router_activation=r.activation or ("sigmoid" if r.kind == "expert_choice" else "softmax"),
                   router_gating=r.gating, capacities=cfg.capacities, thresholds=[r.threshold] * plan.num_recursions,
                   aux_router=r.aux_router, router_kind=r.kind, loss_free_balancing=r.loss_free_balancing,
                   kv_sharing=routed and r.kv_sharing,
                   architectures=["MoRForCausalLM"])

    @property
    def prefix_len(self) -> int:
        """Unrolled positions before the routed block (the unique first layers)."""
        return self.unrolled.index(self.block[0]) if self.routed else len(self.unrolled)


def mor_weights(tensors: dict[str, torch.Tensor], cfg: Any, heads: Heads) -> dict[str, torch.Tensor]:
    """Megatron global tensors (by sharded key) -> MoRForCausalLM's names (slot i as model.layers.i)."""
    out = {HF_EMBEDDING: tensors[EMBEDDING], HF_FINAL_NORM: tensors[FINAL_NORM]}
    if not cfg.model.tie_embeddings:
        out[HF_OUTPUT] = tensors[OUTPUT]
    for slot in range(cfg.layout.plan.num_unique):
        out.update(layer_to_hf({key: tensors[f"layers.{slot}.{key}"] for key in LAYER_KEYS}, slot, heads))
    for name in ("weight", "aux_weight", "bias"):
        if f"router.{name}" in tensors:
            out[f"model.router.{name}"] = tensors[f"router.{name}"]
    return out


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(size)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


class Attention(nn.Module):
    def __init__(self, config: MoRConfig) -> None:
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.heads, self.groups, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.q_proj = nn.Linear(d, self.heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.groups * hd, bias=False)
        self.v_proj = nn.Linear(d, self.groups * hd, bias=False)
        self.o_proj = nn.Linear(self.heads * hd, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache: Optional[DynamicCache], site: int, shared: Optional[list] = None) -> torch.Tensor:
        """`shared` (KV sharing): an empty holder records this call's K/V (recursion 1); a filled one is
        attended to instead, with no K/V projection (later recursions)."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        if shared is not None and shared[0] is not None:
            k, v = shared[0]
        else:
            k, v = (proj(x).view(b, s, -1, self.head_dim).transpose(1, 2) for proj in (self.k_proj, self.v_proj))
            k = k * cos + rotate_half(k) * sin
            if cache is not None:
                k, v = cache.update(k, v, site)
            if shared is not None:
                shared[0] = (k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, config: MoRConfig) -> None:
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    """A Llama decoder layer (pre-norm attention and SwiGLU MLP, residuals)."""

    def __init__(self, config: MoRConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache: Optional[DynamicCache], site: int, shared: Optional[list] = None) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache, site, shared)
        return h + self.mlp(self.post_attention_layernorm(h))


class Router(nn.Module):
    def __init__(self, config: MoRConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.num_recursions, config.hidden_size))
        self.aux_weight = nn.Parameter(torch.zeros(config.num_recursions, config.hidden_size)) \
            if config.aux_router else None
        if config.router_kind == "token_choice":  # loss-free balancing's bias (zeros without it)
            self.register_buffer("bias", torch.zeros(config.num_recursions))


class MoRBackbone(nn.Module):
    def __init__(self, config: MoRConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([Layer(config) for _ in range(config.num_slots)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.router = Router(config) if config.routed else None


class MoRPreTrainedModel(PreTrainedModel):
    config_class = MoRConfig
    base_model_prefix = "model"
    _no_split_modules = ["Layer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """A fresh model (not from a folder) starts as the project's does: N(0, 0.02) weights, unit norms, zero
        routers; from_pretrained then overwrites what the folder holds."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, 0.02)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, Router):
            module.weight.normal_(0.0, 0.02)
            if module.aux_weight is not None:
                module.aux_weight.normal_(0.0, 0.02)


class MoRForCausalLM(MoRPreTrainedModel, GenerationMixin):
    """Recursive or MoR language model (expert- or token-choice, recursion-wise or shared KV), causal routing,
    per-site KV cache."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MoRConfig) -> None:
        super().__init__(config)
        self.model = MoRBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def _rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32,
                                                          device=positions.device) / c.head_dim))
        angles = positions.float()[..., None] * inv_freq  # [b, s, d/2]
        angles = torch.cat([angles, angles], dim=-1)[:, None]  # [b, 1, s, d]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def _route(self, r: int, h: torch.Tensor, took: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which tokens take recursion r (took: those that took r-1) and their gates [b, s, 1]."""
        c, router = self.config, self.model.router
        logits = (h.float() @ router.weight[r].float())
        probs = torch.sigmoid(logits) if c.router_activation == "sigmoid" else torch.tanh(logits)
        decide = torch.sigmoid(h.float() @ router.aux_weight[r].float() if router.aux_weight is not None else logits)
        takes = took if c.capacities[r] >= 1.0 else took & (decide >= c.thresholds[r])
        gate = probs * c.router_alpha if c.router_gating != "identity" else torch.ones_like(probs)
        return takes, gate[..., None].to(h.dtype)

    def _assign(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-choice: each token's depth (1..N_r) and gate [b, s, 1], decided once after the prefix."""
        c, router = self.config, self.model.router
        logits = h.float() @ router.weight.float().t()
        probs = logits.softmax(-1) if c.router_activation == "softmax" else torch.sigmoid(logits)
        choice = (probs + router.bias).argmax(-1) if c.loss_free_balancing else probs.argmax(-1)
        gate = probs.gather(-1, choice[..., None]) * c.router_alpha
        return choice + 1, (torch.ones_like(gate) if c.router_gating == "identity" else gate).to(h.dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                cache: Optional[DynamicCache] = None, use_cache: Optional[bool] = None,
                labels: Optional[torch.Tensor] = None, logits_to_keep: int = 0,
                past_key_values: Optional[DynamicCache] = None, **_: Any) -> CausalLMOutputWithPast:
        """`cache` (transformers >= 5.2) or `past_key_values` (earlier): the per-site KV cache."""
        c = self.config
        use_cache = c.use_cache if use_cache is None else use_cache
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        b, s = input_ids.shape
        h = self.model.embed_tokens(input_ids)
        positions = torch.arange(past, past + s, device=h.device).expand(b, s)
        cos, sin = self._rotary(positions, h.dtype)
        keys_ok = torch.ones(b, past + s, dtype=torch.bool, device=h.device) if attention_mask is None \
            else attention_mask[:, -(past + s):].bool()
        causal = torch.arange(past + s, device=h.device)[None, :] <= positions[..., None]  # [b, s, past+s]
        diagonal = torch.arange(past + s, device=h.device)[None, :] == positions[..., None]

        def mask(visible_keys: torch.Tensor) -> torch.Tensor:
            """[b, 1, s, past+s]: causal, over the keys that may be seen; a query always sees itself (a token
            that did not take a recursion still runs it, and its output is dropped)."""
            return ((causal & visible_keys[:, None, :]) | diagonal)[:, None]

        full = mask(keys_ok)
        sites = list(enumerate(c.unrolled))
        prefix = c.prefix_len
        for site, slot in sites[:prefix]:
            h = self.model.layers[slot](h, cos, sin, full, cache, site)
        if c.routed:
            history = getattr(cache, "mor_took", None) if cache is not None else None
            took = torch.ones(b, s, dtype=torch.bool, device=h.device)
            token_choice = c.router_kind == "token_choice"
            if token_choice:  # the state is the block output while a token recurses; h + w * state at exit
                depth, gate = self._assign(h)
                state = h
            new_history = []
            shared = [[None] for _ in c.block] if c.kv_sharing else [None] * len(c.block)
            for r in range(c.num_recursions):
                if token_choice:
                    took = depth >= r + 1
                else:
                    took, gate = self._route(r, h, took)
                seen = took if history is None else torch.cat([history[r], took], dim=1)
                new_history.append(seen)
                # KV sharing: every recursion attends to the keys of the tokens recursion 1 took
                x, sub = state if token_choice else h, mask((new_history[0] if c.kv_sharing else seen) & keys_ok)
                for i, slot in enumerate(c.block):
                    x = self.model.layers[slot](x, cos, sin, sub, cache, prefix + r * len(c.block) + i, shared[i])
                if token_choice:
                    state = torch.where(took[..., None], x, state)
                else:
                    h = h + (gate * x) * took[..., None].to(h.dtype)
            if token_choice:
                h = h + gate * state
            if cache is not None:
                cache.mor_took = new_history
            suffix_start = prefix + c.num_recursions * len(c.block)
        else:
            suffix_start = prefix
        for site, slot in sites[suffix_start:]:
            h = self.model.layers[slot](h, cos, sin, full, cache, site)
        h = self.model.norm(h)
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None})
