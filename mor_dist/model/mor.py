"""MoRModel: embedding, unique layers, a shared block looped N_r times with routing, head."""

from __future__ import annotations

import contextlib
import zlib
from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from mor_dist.config import RunConfig
from mor_dist.model.kv_sharing import KVSharingState
from mor_dist.model.layers import final_norm
from mor_dist.model.routing import (
    AuxLossAttacher,
    ExpertChoiceRouter,
    Selection,
    TokenChoiceRouter,
    gather_rotary,
    gather_tokens,
    ragged_indices,
    scatter_add_tokens,
)
from mor_dist.model.sharing import LayerPlan, layer_plan


class LayerSlots(torch.nn.ModuleList):
    """The unique layers; checkpoint keys use each layer's global slot (layer_number - 1)."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        out = {}
        for local, layer in enumerate(self):
            local_prefix, global_prefix = f"{prefix}{local}.", f"{prefix}{layer.layer_number - 1}."
            layer_sd = layer.sharded_state_dict(prefix=local_prefix, sharded_offsets=sharded_offsets,
                                                metadata=metadata)
            replace_prefix_for_sharding(layer_sd, local_prefix, global_prefix)
            out.update(layer_sd)
        return out


@contextlib.contextmanager
def seeded(seed: int, name: str):
    """Initialise one module from its own seed, so weights do not depend on the parallel layout."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        yield


class MoRModel(LanguageModule):
    """Vanilla, recursive and MoR language models from one code path (sequence-first tensors)."""

    def __init__(self, config: TransformerConfig, cfg: RunConfig, spec: ModuleSpec, vocab_size: int,
                 on_cuda: bool = False, token_multiple: int = 1) -> None:
        super().__init__(config=config)
        self.cfg = cfg
        m = cfg.model
        self.plan: LayerPlan = layer_plan(m.sharing, m.num_layers, m.num_recursions) if m.kind != "vanilla" \
            else layer_plan("none", m.num_layers, 1)
        self.vocab_size = vocab_size
        self.model_type = ModelType.encoder_or_decoder
        self.pre_process = self.post_process = True
        self.share_embeddings_and_output_weights = m.tie_embeddings
        self.sequence_parallel = config.sequence_parallel
        seed = cfg.train.seed
        with seeded(seed, "embedding"):
            self.embedding = LanguageModelEmbedding(config, vocab_size, m.seq_length, position_embedding_type="rope")
        self.rotary_pos_emb = RotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=1.0,
                                              rotary_base=int(m.rotary_base), use_cpu_initialization=True)
        layers = []
        for slot in range(self.plan.num_unique):
            with seeded(seed, f"layer{slot}"):
                layers.append(build_module(spec, config=config, layer_number=slot + 1))
        self.layers = LayerSlots(layers)
        self.router: Optional[torch.nn.Module] = None
        if m.kind == "mor":
            with seeded(seed, "router"):
                if cfg.routing.kind == "expert_choice":
                    self.router = ExpertChoiceRouter(config, cfg.routing, cfg.capacities, token_multiple)
                else:
                    self.router = TokenChoiceRouter(config, cfg.routing, m.num_recursions)
        self.final_layernorm = final_norm(config, on_cuda)
        with seeded(seed, "output_layer"):
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size, vocab_size, config=config, init_method=config.init_method, bias=False,
                skip_bias_add=False, gather_output=False,
                skip_weight_param_allocation=m.tie_embeddings)
        self.setup_embeddings_and_output_layer()
        self.kv_state = KVSharingState()
        for module in self.modules():
            if hasattr(type(module), "kv_state"):
                module.kv_state = self.kv_state
        self.router_stats: dict[str, torch.Tensor] = {}
        self.token_depths: Optional[torch.Tensor] = None  # [b, s] recursions each token took (last forward)

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline schedules hand each stage its input here (None on the first stage)."""
        self.input_tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor

    # ------------------------------------------------------------ helpers

    def _full(self, h: torch.Tensor) -> torch.Tensor:
        """Sequence-parallel shard -> full sequence, replicated (backward keeps the local slice)."""
        if not self.sequence_parallel:
            return h
        return tensor_parallel.gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=False)

    def _shard(self, h: torch.Tensor) -> torch.Tensor:
        """Replicated full sequence -> this rank's sequence-parallel shard."""
        if not self.sequence_parallel:
            return h
        return tensor_parallel.scatter_to_sequence_parallel_region(h)

    def _run(self, slots: tuple[int, ...], h: torch.Tensor, rotary: torch.Tensor) -> torch.Tensor:
        for slot in slots:
            h, _ = self.layers[slot](h, attention_mask=None, rotary_pos_emb=rotary)
        return h

    def shared_block_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters of the layers that every recursion reuses."""
        return [p for slot in sorted(set(self.plan.block)) for p in self.layers[slot].parameters()]

    # ------------------------------------------------------------ recursion

    def _expert_choice(self, h: torch.Tensor, freqs: torch.Tensor, causal: bool) -> torch.Tensor:
        """Expert-choice recursions on the full-sequence residual stream h [s, b, d]."""
        sel: Optional[Selection] = None
        aux_total = h.new_zeros((), dtype=torch.float32)
        depths = torch.zeros(h.shape[1], h.shape[0], dtype=torch.long, device=h.device)
        sharing = self.cfg.routing.kv_sharing
        for r in range(self.plan.num_recursions):
            sel, aux = self.router.select(r, h, sel, causal)
            aux_total = aux_total + aux
            self.router_stats.update(sel.stats)
            if sel.indices.shape[1] == 0:
                break
            depths.scatter_add_(1, sel.indices, torch.ones_like(sel.indices) if sel.valid is None else sel.valid.long())
            x = self._shard(gather_tokens(h, sel.indices))
            if sharing:
                self.kv_state.mode = "record" if r == 0 else "reuse"
                self.kv_state.query_positions = sel.indices
            out = self._full(self._run(self.plan.block, x, gather_rotary(freqs, sel.indices)))
            gate = sel.gate if sel.valid is None else sel.gate * sel.valid.t().unsqueeze(-1).to(sel.gate.dtype)
            h = scatter_add_tokens(h, sel.indices, gate * out)  # h + w * f(h) on the selected tokens
        self.kv_state.reset()
        self.token_depths = depths
        self.router_stats["aux_loss"] = aux_total.detach()
        return AuxLossAttacher.apply(h, aux_total) if self.training else h

    def _token_choice(self, h: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        """Token-choice: depth per token from one router; exit output H1 + w * f^(depth)(H1)."""
        depth, gate, aux, stats = self.router.assign(h)
        self.router_stats.update(stats)
        self.token_depths = depth.detach()
        x = h
        sharing = self.cfg.routing.kv_sharing
        for r in range(self.plan.num_recursions):
            idx, valid = ragged_indices(depth >= r + 1)
            if idx.shape[1] == 0:
                break
            if sharing:
                self.kv_state.mode = "record" if r == 0 else "reuse"
                self.kv_state.query_positions = idx
            out = self._full(self._run(self.plan.block, self._shard(gather_tokens(x, idx)), gather_rotary(freqs, idx)))
            # Replace the active tokens' state with the block output (no gate until a token exits).
            delta = (out - gather_tokens(x, idx)) * valid.t().unsqueeze(-1).to(out.dtype)
            x = scatter_add_tokens(x, idx, delta)
        self.kv_state.reset()
        self.router_stats["aux_loss"] = aux.detach()
        h = h + gate * x
        return AuxLossAttacher.apply(h, aux) if self.training else h

    # ------------------------------------------------------------ forward

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                causal_routing: Optional[bool] = None) -> torch.Tensor:
        """Token ids [b, s] -> per-token loss [b, s] (with labels) or vocab-parallel logits [b, s, v/tp].

        `causal_routing`: expert-choice uses the threshold rule instead of top-k; None follows
        routing.inference_rule in eval mode and top-k in training.
        """
        if causal_routing is None:
            causal_routing = not self.training and self.cfg.routing.inference_rule == "threshold"
        s = input_ids.shape[1]
        h = self.embedding(input_ids=input_ids, position_ids=None)  # [s(/tp), b, d]
        freqs = self.rotary_pos_emb(s)  # [s, 1, 1, d]
        self.router_stats = {}
        self.token_depths = torch.full_like(input_ids, self.plan.num_recursions)
        if self.router is None:
            h = self._run(self.plan.unrolled, h, freqs)
        else:
            h = self._run(self.plan.prefix, h, freqs)
            h = self._full(h)
            if isinstance(self.router, ExpertChoiceRouter):
                h = self._expert_choice(h, freqs, causal_routing)
            else:
                h = self._token_choice(h, freqs)
            h = self._run(self.plan.suffix, self._shard(h), freqs)
        h = self.final_layernorm(h)
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(h, weight=weight)  # [s, b, v/tp]
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        return self.compute_language_model_loss(labels, logits)


def build_model(cfg: RunConfig, vocab_size: int, on_cuda: bool) -> MoRModel:
    """The run's model on this rank (parallel_state must be initialised)."""
    from mor_dist.model.layers import layer_spec, transformer_config

    config = transformer_config(cfg, on_cuda)
    multiple = 16 if cfg.train.precision == "fp8" else 1
    if cfg.parallel.sequence_parallel:
        multiple = multiple * cfg.parallel.tp // torch.gcd(torch.tensor(multiple), torch.tensor(cfg.parallel.tp)).item()
    model = MoRModel(config, cfg, layer_spec(cfg, on_cuda), vocab_size, on_cuda, multiple)
    return model.cuda() if on_cuda else model
