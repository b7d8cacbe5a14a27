"""megatron-core TransformerConfig and layer specs: TE (FP8-capable) on CUDA, the local spec otherwise.

FP8: TE layers everywhere on CUDA; recipes follow megatron's TransformerBlock
rule (one outer autocast per layer run for delayed scaling, one autocast per layer call for current
and block scaling). MoR's shared block runs N_r times per forward, and delayed scaling's amax
history is overwritten when a module runs twice before the reduction at autocast exit, so delayed
scaling is refused unless every layer runs once (`model.kind=vanilla`). FP8 GEMMs need token
counts divisible by 16: every selection is padded to a multiple of 16 rows (token_multiple) with
masked rows after the real tokens, so the model selects the same tokens as without FP8.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
from dataclasses import replace
from typing import ContextManager, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from megatron.core.fp8_utils import get_fp8_context
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from mor_dist.config import JobConfig
from mor_dist.errors import ConfigError
from mor_dist.model.kv_sharing import with_kv_sharing, with_query_only_reuse

FP8_MULTIPLE = 16  # TE FP8 GEMMs: token count and feature sizes divisible by 16

RECOMPUTE = {
    "none": {},
    # megatron's selective recomputation: attention scores (unfused path) and the SwiGLU MLP
    "selective": dict(recompute_granularity="selective", recompute_modules=["core_attn", "mlp"]),
    # every layer call is checkpointed (GPTModel: uniform, one layer per unit; MoRModel: layer_call)
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
}


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


def params_dtype(cfg: JobConfig) -> torch.dtype:
    return torch.float32 if cfg.train.precision == "fp32" else torch.bfloat16


def fp8_unsupported(recipe: str, capability: tuple[int, int], cuda: Optional[str]) -> Optional[str]:
    """Why a GPU cannot run an FP8 recipe (None if it can): sm 8.9+; block scaling sm 9.0+ and CUDA 12.9+."""
    if capability < (8, 9):
        return f"FP8 needs compute capability >= 8.9 (Ada, Hopper or newer); this GPU has {capability[0]}.{capability[1]}"
    if recipe == "blockwise":
        version = tuple(int(x) for x in (cuda or "0.0").split(".")[:2])
        if capability < (9, 0) or version < (12, 9):
            return (f"train.fp8_recipe=blockwise needs compute capability >= 9.0 and CUDA >= 12.9; this GPU has "
                    f"{capability[0]}.{capability[1]} with CUDA {cuda}")
    return None


def check_options(cfg: JobConfig, on_cuda: bool) -> None:
    """Refuse precision and recomputation settings this model or device cannot run, naming the key to change."""
    m, t = cfg.model, cfg.train
    if t.precision == "fp8":
        if t.fp8_recipe == "delayed" and m.kind != "vanilla":
            raise ConfigError(
                f"train.fp8_recipe=delayed needs every layer to run once per FP8 autocast region, but "
                f"model.kind={m.kind} runs the shared block {m.num_recursions} times per forward (TE overwrites "
                "the amax history before it is reduced); use train.fp8_recipe=tensorwise (default) or blockwise")
        for key in ("seq_length", "hidden_size", "ffn_hidden_size"):
            if getattr(m, key) % FP8_MULTIPLE:
                raise ConfigError(f"train.precision=fp8 needs model.{key} divisible by {FP8_MULTIPLE} (FP8 GEMM "
                                  f"shapes), got {getattr(m, key)}")
        if not (on_cuda and te_available()):
            raise ConfigError("train.precision=fp8 needs CUDA and transformer-engine (pip install 'mor-dist[gpu]'); "
                              "use train.precision=bf16 or fp32")
        reason = fp8_unsupported(t.fp8_recipe, torch.cuda.get_device_capability(), torch.version.cuda)
        if reason:
            raise ConfigError(f"train.precision=fp8 is not available: {reason}; use train.precision=bf16")
    if t.precision == "bf16" and not on_cuda:
        raise ConfigError("train.precision=bf16 is a GPU option here; use train.precision=fp32 on CPU")
    if t.recompute != "none" and m.kind != "vanilla" and cfg.routing.kv_sharing:
        raise ConfigError(f"train.recompute={t.recompute} cannot replay routing.kv_sharing (the recursion-1 keys are "
                          "gone by the backward pass); use train.recompute=none or routing.kv_sharing=false")
    if t.recompute == "selective" and not on_cuda:
        raise ConfigError("train.recompute=selective uses megatron's checkpoint, which saves CUDA RNG states; "
                          "use train.recompute=full or none on CPU")


def token_multiple(cfg: JobConfig) -> int:
    """Rows of every recursion's selection are padded to this: 16 for FP8 GEMMs, the TP size under sequence
    parallelism (the padding is masked: the selected tokens do not change)."""
    return math.lcm(FP8_MULTIPLE if cfg.train.precision == "fp8" else 1,
                    cfg.parallel.tp if cfg.parallel.sequence_parallel else 1)


def transformer_config(cfg: JobConfig, on_cuda: bool, virtual_size: int | None = None) -> TransformerConfig:
    """One TransformerConfig for every layer: Llama-style (RMSNorm, SwiGLU, RoPE, GQA, no biases)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    check_options(cfg, on_cuda)
    dtype = params_dtype(cfg)
    init = torch.nn.init.normal_
    std = m.init_method_std
    extra: dict = dict(RECOMPUTE[t.recompute])
    if t.precision == "fp8":
        extra.update(fp8="hybrid", fp8_recipe=t.fp8_recipe)
    if on_cuda and te_available() and t.fused_kernels:
        # TE's fused RoPE takes one angle row per position ([s, 1, 1, d]); routed tokens carry theirs
        # gathered per token ([k, b, 1, d]), so MoR keeps megatron's unfused RoPE.
        extra.update(apply_rope_fusion=not cfg.layout.routed, cross_entropy_loss_fusion=True,
                     cross_entropy_fusion_impl="te")
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
        bias_dropout_fusion=False,  # no bias, no dropout: the residual add is all that is left
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,  # shared weights get several grads per step; keep DDP's hooks
        persist_layer_norm=False,
        **extra,
    )


def layer_spec(cfg: JobConfig, on_cuda: bool) -> ModuleSpec:
    """TE spec on CUDA with transformer-engine, else the local spec with a norm that supports SP.

    KV sharing substitutes recursion-1 keys under an arbitrary boolean mask, which TE's fused
    attention does not take: under TE it uses megatron's local (unfused) core attention. Its later
    recursions project queries only (kv_sharing.with_query_only_reuse).
    """
    te_spec = on_cuda and te_available()
    if te_spec:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
        subs = replace(spec.submodules, input_layernorm=RMSNorm, pre_mlp_layernorm=RMSNorm)
        spec = ModuleSpec(module=spec.module, params=spec.params, submodules=subs)
    if cfg.model.kind != "vanilla" and cfg.routing.kv_sharing:
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        attn = spec.submodules.self_attention
        core = DotProductAttention if te_spec else attn.submodules.core_attention
        attn_subs = replace(attn.submodules, core_attention=with_kv_sharing(core))
        spec = ModuleSpec(module=spec.module, params=spec.params,
                          submodules=replace(spec.submodules,
                                             self_attention=ModuleSpec(with_query_only_reuse(attn.module),
                                                                       params=attn.params, submodules=attn_subs)))
    return spec


def final_norm(config: TransformerConfig, on_cuda: bool) -> torch.nn.Module:
    """The norm before the output layer."""
    if on_cuda and te_available():
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm(config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon)
    return RMSNorm(config, config.hidden_size, eps=config.layernorm_epsilon)


# ---------------------------------------------------------------- running layers (FP8, recomputation)


def fp8_region(config: TransformerConfig) -> ContextManager:
    """Delayed scaling: one FP8 autocast around a whole layer run (megatron's outer context); else nothing."""
    if config.fp8 and config.fp8_recipe == "delayed":
        return get_fp8_context(config)
    return contextlib.nullcontext()


def fp8_pad_rows(config: TransformerConfig, rows: int, batch: int) -> int:
    """Zero rows to append to a [rows, batch, d] input so FP8 GEMMs see rows * batch divisible by 16."""
    if not config.fp8:
        return 0
    return -rows % (FP8_MULTIPLE // math.gcd(FP8_MULTIPLE, batch))


def layer_call(config: TransformerConfig, layer: torch.nn.Module, h: torch.Tensor,
               rotary: torch.Tensor) -> torch.Tensor:
    """One transformer layer on [k, b, d]: its own FP8 autocast (current/block scaling) and full recomputation."""

    def run(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        per_call = config.fp8 and config.fp8_recipe != "delayed"
        with get_fp8_context(config, layer.layer_number - 1) if per_call else contextlib.nullcontext():
            return layer(x, attention_mask=None, rotary_pos_emb=freqs)[0]

    if config.recompute_granularity != "full" or not torch.is_grad_enabled():
        return run(h, rotary)
    if config.fp8:  # TE's checkpoint replays the FP8 state of the first pass
        from megatron.core import parallel_state, tensor_parallel
        from megatron.core.extensions.transformer_engine import te_checkpoint

        return te_checkpoint(run, False, tensor_parallel.random.get_cuda_rng_tracker,
                             parallel_state.get_tensor_model_parallel_group(), h, rotary)
    # No dropout anywhere, so torch's checkpoint (CPU and CUDA) recomputes exactly.
    return torch.utils.checkpoint.checkpoint(run, h, rotary, use_reentrant=False)
