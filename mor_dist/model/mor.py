"""MoRModel: embedding, unique layers, a shared block looped N_r times with routing, head."""

from __future__ import annotations

import contextlib
import zlib
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from mor_dist.config import JobConfig
from mor_dist.layout import ChunkPlan, Layout
from mor_dist.model.message import Carry, pack_expert, pack_token, unpack_expert, unpack_token
from mor_dist.model.kv_sharing import KVSharingState
from mor_dist.model.layers import final_norm, fp8_pad_rows, fp8_region, layer_call
from mor_dist.parallel.setup import init_model_parallel
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
    """Vanilla, recursive and MoR language models from one code path (sequence-first tensors).

    The model is a list of chunks (`layout`): with one pipeline stage, forward() runs them in
    order; with several, each stage holds its own chunks and the schedule runs them (run_chunk).
    """

    def __init__(self, config: TransformerConfig, cfg: JobConfig, layout: Layout, spec: ModuleSpec,
                 vocab_size: int, on_cuda: bool = False, token_multiple: int = 1, pp_rank: int = 0) -> None:
        super().__init__(config=config)
        self.vp_size = None  # one module holds all of this stage's virtual chunks (PipelineChunk views)
        self.cfg = cfg
        self.layout = layout
        m = cfg.model
        self.plan = layout.plan
        self.routed = layout.routed
        self.chunks = layout.chunks(pp_rank)
        self.token_multiple = token_multiple  # rows of every selection: real tokens, then masked padding
        self.vocab_size = vocab_size
        self.model_type = ModelType.encoder_or_decoder
        self.pre_process, self.post_process = pp_rank == 0, pp_rank == layout.pp - 1
        self.share_embeddings_and_output_weights = m.tie_embeddings
        self.sequence_parallel = config.sequence_parallel
        seed = cfg.train.seed
        if self.pre_process:
            with seeded(seed, "embedding"):
                self.embedding = LanguageModelEmbedding(config, vocab_size, m.seq_length,
                                                        position_embedding_type="rope")
        self.rotary_pos_emb = RotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=1.0,
                                              rotary_base=m.rotary_base, use_cpu_initialization=True)
        slots = layout.slots(pp_rank)
        layers = []
        for slot in slots:
            with seeded(seed, f"layer{slot}"):
                layer = build_module(spec, config=config, layer_number=slot + 1, vp_stage=0)
            layer.layer_number = slot + 1  # global slot, whatever the stage (checkpoint keys use it)
            layers.append(layer)
        self.layers = LayerSlots(layers)
        self.slot_index = {slot: i for i, slot in enumerate(slots)}
        self.router: Optional[torch.nn.Module] = None
        if self.routed and self.pre_process:
            with seeded(seed, "router"):
                if cfg.routing.kind == "expert_choice":
                    self.router = ExpertChoiceRouter(config, cfg.routing, cfg.capacities, token_multiple)
                else:
                    self.router = TokenChoiceRouter(config, cfg.routing, m.num_recursions)
        if self.post_process:
            self.final_layernorm = final_norm(config, on_cuda)
            with seeded(seed, "output_layer"):
                self.output_layer = tensor_parallel.ColumnParallelLinear(
                    config.hidden_size, vocab_size, config=config, init_method=config.init_method, bias=False,
                    skip_bias_add=False, gather_output=False,
                    skip_weight_param_allocation=self.pre_process and m.tie_embeddings)
        self.setup_embeddings_and_output_layer()
        self.kv_state = KVSharingState()
        for module in self.modules():
            if hasattr(type(module), "kv_state"):
                module.kv_state = self.kv_state
        self.router_stats: dict[str, torch.Tensor] = {}
        self.token_depths: Optional[torch.Tensor] = None  # [b, s] recursions each token took, when known
        self.eval_rule = cfg.routing.inference_rule  # expert-choice routing in eval mode: topk or threshold

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
        if h.shape[0] == 0:  # the causal rule can leave a recursion without tokens
            return h
        k = h.shape[0]
        pad = 0 if self.sequence_parallel else fp8_pad_rows(self.config, k, h.shape[1])
        if pad:  # FP8 GEMMs on a ragged selection: zero rows after every real token (causal: never seen)
            h, rotary = F.pad(h, (0, 0, 0, 0, 0, pad)), F.pad(rotary, (0, 0, 0, 0, 0, 0, 0, pad))
            if self.kv_state.mode == "reuse":
                self.kv_state.query_positions = F.pad(self.kv_state.query_positions, (0, pad))
        with fp8_region(self.config):
            for slot in slots:
                h = layer_call(self.config, self.layers[self.slot_index[slot]], h, rotary)
        return h[:k]

    def shared_block_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters of the layers that every recursion reuses (those on this stage)."""
        return [p for slot in dict.fromkeys(self.plan.block) if slot in self.slot_index
                for p in self.layers[self.slot_index[slot]].parameters()]

    def _set_kv_mode(self, r: int, sel: Selection) -> None:
        if self.cfg.routing.kv_sharing:
            self.kv_state.mode = "record" if r == 0 else "reuse"
            self.kv_state.query_positions = sel.indices

    # ------------------------------------------------------------ recursion chunks

    def _block_part(self, vs: ChunkPlan, carry: Carry, freqs: torch.Tensor) -> Optional[torch.Tensor]:
        """This chunk's layers on the in-flight tokens; their full-length output if the recursion ends here."""
        self._set_kv_mode(vs.recursion, carry.sel)
        x = self._run(vs.layers, carry.x, gather_rotary(freqs, carry.sel.indices))
        if not vs.merge:
            carry.x = x
            return None
        return self._full(x)

    def _expert_chunk(self, vs: ChunkPlan, carry: Carry, freqs: torch.Tensor, causal: bool) -> Carry:
        """Part of one expert-choice recursion: route (stage 0), shared layers, h + w * f(h) (last stage)."""
        r = vs.recursion
        if vs.route:
            sel, aux = self.router.select(r, carry.h, carry.prev, causal)
            self.router_stats.update(sel.stats)
            self.router_stats[f"r{r + 1}/aux_loss"] = aux.detach()
            if self.training:
                carry.h = AuxLossAttacher.apply(carry.h, aux)
            depths = carry.depths if carry.depths is not None else torch.zeros_like(sel.indices[:, :1]).expand(
                -1, carry.h.shape[0]).contiguous()
            add = torch.ones_like(sel.indices) if sel.valid is None else sel.valid.long()
            carry.depths = depths.scatter_add(1, sel.indices, add)
            if r == self.plan.num_recursions - 1:
                self.token_depths = carry.depths
            carry.sel, carry.x = sel, self._shard(gather_tokens(carry.h, sel.indices))
        out = self._block_part(vs, carry, freqs)
        if out is None:
            return carry
        sel = carry.sel
        gate = sel.gate if sel.valid is None else sel.gate * sel.valid.t().unsqueeze(-1).to(sel.gate.dtype)
        carry.h = scatter_add_tokens(carry.h, sel.indices, gate * out)  # h + w * f(h), selected only
        carry.prev, carry.sel, carry.x = sel, None, None
        return carry

    def _token_chunk(self, vs: ChunkPlan, carry: Carry, freqs: torch.Tensor) -> Carry:
        """Part of one token-choice recursion; a token's state is the block output until it exits."""
        r = vs.recursion
        if vs.route and r == 0:
            depth, gate, aux, stats = self.router.assign(carry.h)
            self.router_stats.update(stats)
            self.router_stats["r1/aux_loss"] = aux.detach()
            if self.training:
                carry.h = AuxLossAttacher.apply(carry.h, aux)
            carry.depth = carry.depths = self.token_depths = depth.detach()
            carry.gate, carry.state = gate, carry.h
        if vs.route:
            idx, valid = ragged_indices(carry.depth >= r + 1, self.token_multiple)
            carry.sel, carry.x = Selection(idx, None, valid), self._shard(gather_tokens(carry.state, idx))
        out = self._block_part(vs, carry, freqs)
        if out is None:
            return carry
        sel = carry.sel
        delta = (out - gather_tokens(carry.state, sel.indices)) * sel.valid.t().unsqueeze(-1).to(out.dtype)
        carry.state = scatter_add_tokens(carry.state, sel.indices, delta)
        carry.sel = carry.x = None
        if r == self.plan.num_recursions - 1:
            carry.h = carry.h + carry.gate * carry.state  # exit: H1 + w * f^(depth)(H1)
        return carry

    # ------------------------------------------------------------ forward

    def forward_chunk(self, vs: ChunkPlan, carry: Optional[Carry], input_ids: Optional[torch.Tensor],
                      labels: Optional[torch.Tensor], causal: bool):
        """Run one chunk; returns the Carry for the next chunk, or the loss/logits after the last."""
        s = input_ids.shape[1] if input_ids is not None else self.cfg.model.seq_length
        freqs = self.rotary_pos_emb(s)  # [s, 1, 1, d]
        cyclic = self.plan.cyclic
        if vs.first:
            h = self.embedding(input_ids=input_ids, position_ids=None)  # [s(/tp), b, d]
            if cyclic:
                h = self._run(self.plan.prefix, h, freqs)
            carry = Carry(h=self._full(h) if self.routed else h)
            if not self.routed:
                self.token_depths = torch.full_like(input_ids, self.plan.num_recursions)
        if not self.routed:
            carry.h = self._run(vs.layers, carry.h, freqs)
        elif self.cfg.routing.kind == "token_choice":
            carry = self._token_chunk(vs, carry, freqs)
        else:
            carry = self._expert_chunk(vs, carry, freqs, causal)
        if vs.recursion == self.plan.num_recursions - 1 and vs.merge:
            self.kv_state.reset()
        if not vs.last:
            return carry
        h = self._shard(carry.h) if self.routed else carry.h
        if cyclic:
            h = self._run(self.plan.suffix, h, freqs)
        h = self.final_layernorm(h)
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(h, weight=weight)  # [s, b, v/tp]
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        return self.compute_language_model_loss(labels, logits)

    def pack(self, carry: Carry) -> torch.Tensor:
        """A Carry as one fixed-shape pipeline message (sequence-parallel shard when SP is on)."""
        if not self.routed:
            return carry.h
        rows = self.layout.meta_rows
        msg = pack_token(carry, self._full, rows) if self.cfg.routing.kind == "token_choice" \
            else pack_expert(carry, self._full, rows)
        return self._shard(msg)

    def unpack(self, msg: torch.Tensor, vs: ChunkPlan) -> Carry:
        """The Carry a received message stands for."""
        if not self.routed:
            return Carry(h=msg)
        msg, seq = self._full(msg), self.cfg.model.seq_length
        if self.cfg.routing.kind == "token_choice":
            return unpack_token(msg, vs, seq, self._shard, self.token_multiple)
        return unpack_expert(msg, vs, seq, self._shard, self.token_multiple)

    def run_chunk(self, chunk: ChunkPlan, message: Optional[torch.Tensor], input_ids: torch.Tensor,
                  labels: Optional[torch.Tensor]):
        """One chunk as a pipeline stage runs it: the received message in, the message to send (or the loss) out."""
        self.router_stats, self.token_depths = {}, None
        carry = None if chunk.first else self.unpack(message, chunk)
        out = self.forward_chunk(chunk, carry, input_ids, labels, self.causal_now())
        return out if chunk.last else self.pack(out)

    def causal_now(self) -> bool:
        """Whether expert-choice routing uses the causal threshold rule now (eval mode with eval_rule=threshold)."""
        return not self.training and self.eval_rule == "threshold"

    def set_input_tensor(self, input_tensor) -> None:
        """Unused with one stage (PipelineChunk takes the schedule's input for each chunk)."""
        self.input_tensor = input_tensor

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                causal_routing: Optional[bool] = None) -> torch.Tensor:
        """Token ids [b, s] -> per-token loss [b, s] (with labels) or vocab-parallel logits [b, s, v/tp].

        `causal_routing`: expert-choice uses the threshold rule instead of top-k; None follows
        eval_rule (routing.inference_rule) in eval mode and top-k in training. One pipeline stage only.
        """
        if not (self.pre_process and self.post_process):
            raise RuntimeError("MoRModel.forward runs a whole model; pipeline stages run PipelineChunks")
        if causal_routing is None:
            causal_routing = self.causal_now()
        self.router_stats, self.token_depths = {}, None
        carry = None
        for vs in self.chunks:
            carry = self.forward_chunk(vs, carry, input_ids, labels, causal_routing)
        return carry


def build_model(cfg: JobConfig, vocab_size: int, on_cuda: bool) -> MoRModel:
    """megatron's parallel state for cfg's layout (over the existing process group), then this rank's model."""
    from mor_dist.model.layers import layer_spec, token_multiple, transformer_config

    from megatron.core import parallel_state

    layout = cfg.layout
    init_model_parallel(cfg.parallel, cfg.train.seed, layout.virtual_size)
    model = MoRModel(transformer_config(cfg, on_cuda, layout.virtual_size), cfg, layout, layer_spec(cfg, on_cuda),
                     vocab_size, on_cuda, token_multiple(cfg), parallel_state.get_pipeline_model_parallel_rank())
    return model.cuda() if on_cuda else model
