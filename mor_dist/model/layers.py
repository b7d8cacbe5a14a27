"""megatron-core TransformerConfig and layer specs: TE (FP8-capable) on CUDA, the local spec otherwise."""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from mor_dist.config import ConfigError, RunConfig
from mor_dist.model.kv_sharing import with_kv_sharing


class RMSNorm(torch.nn.Module):
    """RMSNorm that, unlike torch's through megatron's wrapper, accepts sequence parallelism."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: object) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # Replicated across TP ranks but fed a sequence shard: finalize_model_grads all-reduces it.
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


def te_available() -> bool:
    """transformer-engine importable and CUDA present (TE is never installed without CUDA)."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def params_dtype(cfg: RunConfig) -> torch.dtype:
    return torch.float32 if cfg.train.precision == "fp32" else torch.bfloat16


def transformer_config(cfg: RunConfig, on_cuda: bool, virtual_size: int | None = None) -> TransformerConfig:
    """One TransformerConfig for every layer: Llama-style (RMSNorm, SwiGLU, RoPE, GQA, no biases)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    if t.precision == "fp8" and not (on_cuda and te_available()):
        raise ConfigError("train.precision=fp8 needs CUDA and transformer-engine (pip install 'mor-dist[gpu]'); "
                          "use train.precision=bf16 or fp32")
    if t.precision == "bf16" and not on_cuda:
        raise ConfigError("train.precision=bf16 is a GPU option here; use train.precision=fp32 on CPU")
    dtype = params_dtype(cfg)
    init = torch.nn.init.normal_
    std = m.init_method_std
    fp8 = {}
    if t.precision == "fp8":
        fp8 = dict(fp8="hybrid", fp8_recipe=t.fp8_recipe)
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size,
        kv_channels=m.hidden_size // m.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method=lambda w: init(w, mean=0.0, std=std),
        output_layer_init_method=lambda w: init(w, mean=0.0, std=std),  # HF Llama init, as the paper
        init_method_std=std,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=virtual_size,
        sequence_parallel=p.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=True,  # full-size init then split: identical weights for every TP layout
        bias_dropout_fusion=False,
        apply_rope_fusion=False,  # RoPE is gathered per token (original positions), [k, b, 1, d]
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        **fp8,
    )


def layer_spec(cfg: RunConfig, on_cuda: bool) -> ModuleSpec:
    """TE spec on CUDA with transformer-engine, else the local spec with a norm that supports SP."""
    if on_cuda and te_available():
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
        subs = replace(spec.submodules, input_layernorm=RMSNorm, pre_mlp_layernorm=RMSNorm)
        spec = ModuleSpec(module=spec.module, params=spec.params, submodules=subs)
    if cfg.model.kind != "vanilla" and cfg.routing.kv_sharing:
        attn = spec.submodules.self_attention
        attn_subs = replace(attn.submodules, core_attention=with_kv_sharing(attn.submodules.core_attention))
        spec = ModuleSpec(module=spec.module, params=spec.params,
                          submodules=replace(spec.submodules,
                                             self_attention=ModuleSpec(attn.module, params=attn.params,
                                                                       submodules=attn_subs)))
    return spec


def final_norm(config: TransformerConfig, on_cuda: bool) -> torch.nn.Module:
    """The norm before the output layer."""
    if on_cuda and te_available():
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm(config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon)
    return RMSNorm(config, config.hidden_size, eps=config.layernorm_epsilon)
