"""megatron-core's own GPTModel at a run's shape: the vanilla model of the same effective depth."""

from __future__ import annotations

import copy
from typing import Optional

import torch
from megatron.core.models.gpt import GPTModel

from mor_dist.config import JobConfig
from mor_dist.model.layers import layer_spec, transformer_config
from mor_dist.parallel.setup import init_model_parallel


def vanilla_twin(cfg: JobConfig) -> JobConfig:
    """The run as a vanilla model: same effective depth, width, heads, FFN, sequence, batch and precision."""
    twin = copy.deepcopy(cfg)
    twin.model.kind, twin.model.num_recursions = "vanilla", 1
    twin.routing.kv_sharing = False
    return twin


class GPTBaseline(GPTModel):
    """GPTModel behind the interface train_step expects of MoRModel (no router, no depth statistics)."""

    router = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.router_stats: dict[str, torch.Tensor] = {}
        self.token_depths: Optional[torch.Tensor] = None

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token ids [b, s] -> per-token loss [b, s] (RoPE positions and the causal mask are implicit)."""
        return super().forward(input_ids, position_ids=None, attention_mask=None, labels=labels)


def build_baseline(cfg: JobConfig, vocab_size: int, on_cuda: bool) -> GPTBaseline:
    """megatron's parallel state, then GPTModel with the TE spec on CUDA (local spec on CPU) at the shape of
    `cfg`'s vanilla twin."""
    twin = vanilla_twin(cfg)
    init_model_parallel(twin.parallel, twin.train.seed)
    m = twin.model
    model = GPTBaseline(
        config=transformer_config(twin, on_cuda),
        transformer_layer_spec=layer_spec(twin, on_cuda),
        vocab_size=vocab_size,
        max_sequence_length=m.seq_length,
        share_embeddings_and_output_weights=m.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=m.rotary_base,
    )
    return model.cuda() if on_cuda else model
