"""Fill a built model (any tp/pp layout) from a Hugging Face Llama: each rank takes its own slices of the
global tensors its sharded state dict describes, as a checkpoint load would; routers keep their fresh init."""

from __future__ import annotations

from typing import Any, Callable

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from mor_dist.config import JobConfig
from mor_dist.errors import ConfigError
from mor_dist.pretrained.llama import (EMBEDDING, FINAL_NORM, HF_EMBEDDING, HF_FINAL_NORM, HF_OUTPUT, LAYER_KEYS,
                                       OUTPUT, Heads, layer_from_hf, pad_rows)
from mor_dist.pretrained.source import SourceWeights, local_folder, source_shape
from mor_dist.pretrained.strategies import slot_sources

FRESH = ("router.",)  # new modules: no source weights


def heads_of(cfg: JobConfig) -> Heads:
    m = cfg.model
    return Heads(m.num_attention_heads, m.num_query_groups, m.hidden_size // m.num_attention_heads)


def _local(sharded: ShardedTensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a global tensor."""
    if tuple(full.shape) != tuple(sharded.global_shape):
        raise ConfigError(f"the pretrained {sharded.key} is {tuple(full.shape)} but the model's is "
                          f"{tuple(sharded.global_shape)}; does model.* match model.init_from?")
    if sharded.prepend_axis_num or sharded.flattened_range is not None:
        raise NotImplementedError(f"{sharded.key}: stacked or flattened shards are not used by MoRModel")
    return full[tuple(slice(o, o + n) for o, n in zip(sharded.global_offset, sharded.local_shape))]


def _slices(item: Any, full: torch.Tensor) -> torch.Tensor:
    """A ShardedTensor's slice, or a factory's (megatron's SwiGLU: gate and up sharded apart, then joined)."""
    if isinstance(item, ShardedTensorFactory):
        return item.merge_fn([_local(part, full) for part in item.build()])
    return _local(item, full)


def global_tensors(cfg: JobConfig, vocab_size: int) -> tuple[Callable[[int], dict[str, torch.Tensor]],
                                                              dict[str, Callable[[], torch.Tensor]]]:
    """(slot -> its megatron layer weights, {non-layer key: reader}) from model.init_from."""
    spec = cfg.model.init_from
    read = SourceWeights(local_folder(spec))
    sources = slot_sources(cfg.layout.plan, source_shape(spec).num_layers, cfg.model.init_strategy, cfg.train.seed)
    heads = heads_of(cfg)

    def slot(index: int) -> dict[str, torch.Tensor]:
        layers = [layer_from_hf(read, i, heads) for i in sources[index]]
        return {key: torch.stack([layer[key] for layer in layers]).mean(0) for key in LAYER_KEYS}

    output = HF_OUTPUT if HF_OUTPUT in read else HF_EMBEDDING  # a tied source has no lm_head
    others = {EMBEDDING: lambda: pad_rows(read(HF_EMBEDDING), vocab_size),
              OUTPUT: lambda: pad_rows(read(output), vocab_size),
              FINAL_NORM: lambda: read(HF_FINAL_NORM)}
    return slot, others


@torch.no_grad()
def load_pretrained(model: torch.nn.Module, cfg: JobConfig) -> list[str]:
    """Copy model.init_from's weights into this rank's part of `model`; returns the fresh (router) keys."""
    slot_weights, others = global_tensors(cfg, model.vocab_size)
    by_slot: dict[int, list[tuple[str, Any, str]]] = {}
    state, fresh = {}, []
    for name, item in model.sharded_state_dict().items():
        if not isinstance(item, (ShardedTensor, ShardedTensorFactory)):
            continue  # TE's _extra_state (FP8 metadata): starts fresh
        key = item.key
        if key.startswith(FRESH):
            fresh.append(name)
        elif key.startswith("layers."):
            index, _, suffix = key[len("layers."):].partition(".")
            by_slot.setdefault(int(index), []).append((name, item, suffix))
        elif key in others:
            state[name] = _slices(item, others[key]())
        else:
            raise ConfigError(f"no pretrained weights map to {key}; mor-dist imports Llama models")
    for index, items in by_slot.items():  # one slot at a time: a rank holds one layer's global tensors at most
        weights = slot_weights(index)
        state.update({name: _slices(item, weights[suffix]) for name, item, suffix in items})
    missing = set(model.load_state_dict(state, strict=False).missing_keys)
    untouched = {k for k in missing if not k.endswith("_extra_state") and not k.startswith(FRESH)}
    if untouched:
        raise ConfigError(f"model.init_from left {sorted(untouched)[:4]} without weights")
    return fresh
