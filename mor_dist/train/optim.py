"""megatron DDP, optimizer and the paper's warmup-stable-decay schedule."""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from mor_dist.config import JobConfig


def wrap_ddp(cfg: JobConfig, model: torch.nn.Module, on_cuda: bool) -> DistributedDataParallel:
    """megatron DDP (fp32 grad buffers; distributed optimizer only on CUDA: gloo has no reduce-scatter)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=on_cuda,
        check_for_nan_in_grad=True,
        average_in_collective=on_cuda,
    )
    return DistributedDataParallel(model.config, ddp_config, model)


def build_optimizer(cfg: JobConfig, chunks: list[DistributedDataParallel], on_cuda: bool):
    """AdamW with clipping (megatron optimizer) and its WSD scheduler."""
    t = cfg.train
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=1e-8,
        clip_grad=t.grad_clip,
        bf16=t.precision != "fp32",
        params_dtype=torch.float32 if t.precision == "fp32" else torch.bfloat16,
        use_distributed_optimizer=on_cuda,
    )
    optimizer = get_megatron_optimizer(opt_config, chunks, use_gloo_process_groups=not on_cuda)
    decay = max(1, round(t.decay_fraction * t.steps)) if t.decay_fraction > 0 else 0
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if t.warmup_steps else t.lr,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.warmup_steps,
        lr_decay_steps=t.steps,
        lr_decay_style="WSD" if decay else "constant",
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=t.steps,
        wd_incr_style="constant",
        wsd_decay_steps=decay or None,
        lr_wsd_decay_style="linear" if decay else None,
        # On resume, the schedule of the current config wins (so raising train.steps trains longer);
        # only the step count comes from the checkpoint.
        override_opt_param_scheduler=True,
        use_checkpoint_opt_param_scheduler=False,
    )
    return optimizer, scheduler
