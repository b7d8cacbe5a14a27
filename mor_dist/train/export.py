"""Export a dist checkpoint (any layout): one file for the project's own engine (`jobs/generate.py
--checkpoint`), or a Hugging Face folder (`--format hf`): vanilla models as `LlamaForCausalLM`, recursive
and MoR ones as `mor_dist.hf`'s model class."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from mor_dist.config import JobConfig, config_from_dict
from mor_dist.errors import ConfigError
from mor_dist.catalog import resolve_checkpoint, verify


def load_single(checkpoint: Path) -> tuple[torch.nn.Module, JobConfig, dict[str, Any]]:
    """The checkpoint's model gathered into one process (tp=pp=1), its config and its saved loop state
    (with "checkpoint": the directory read; a run directory gives its newest whole checkpoint)."""
    from mor_dist.model.mor import build_model
    from mor_dist.parallel.setup import init_single_process

    checkpoint = resolve_checkpoint(checkpoint)
    problem = verify(checkpoint)
    if problem is not None:
        raise ConfigError(f"cannot export: {problem}")
    extra = dist_checkpointing.load_common_state_dict(str(checkpoint))["extra"]
    single = copy.deepcopy(config_from_dict(extra["config"]))
    single.parallel.tp = single.parallel.pp = single.parallel.dp = 1
    single.parallel.sequence_parallel = False
    init_single_process()
    model = build_model(single, extra["vocab_size"], on_cuda=False)
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(checkpoint))
    model.load_state_dict(loaded["model"], strict=False)
    return model, single, {**extra, "checkpoint": checkpoint}


def export(checkpoint: Path, out_file: Path) -> dict[str, Any]:
    """Gather the model into a single unsharded state dict: {"config", "vocab_size", "step", "model"}."""
    if out_file.is_dir():
        raise ConfigError(f"cannot export: {out_file} is a directory; give the file to write, e.g. {out_file / 'model.pt'}")
    model, single, extra = load_single(checkpoint)
    payload = {"config": single.to_dict(), "vocab_size": extra["vocab_size"], "step": extra["step"],
               "model": {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, out_file)
    params = sum(t.numel() for t in payload["model"].values())
    _record(extra["checkpoint"], single, extra, out_file, {"format": "pt", "step": extra["step"], "params": params})
    return payload


def _record(checkpoint: Path, cfg: JobConfig, extra: dict[str, Any], out: Path, info: dict[str, Any]) -> None:
    """Tag the training run's MLflow run with the export, when the run was tracked."""
    from mor_dist.tracking.experiment import tracking_uri
    from mor_dist.tracking.tracker import tag_export

    if extra.get("run_id") and cfg.tracking.enabled:
        tag_export(tracking_uri(cfg, checkpoint.resolve().parent), extra["run_id"], out, info)


def global_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A single-process model's weights under megatron's sharded (checkpoint) keys."""
    return {item.key: item.data for item in model.sharded_state_dict().values()
            if isinstance(item, (ShardedTensor, ShardedTensorFactory))}


def export_hf(checkpoint: Path, out: Path) -> dict[str, Any]:
    """Write a Hugging Face folder for the checkpoint; returns {"step", "class", "params"}."""
    from mor_dist.data import load_tokenizer
    from mor_dist.model.from_pretrained import heads_of
    from mor_dist.pretrained.llama import EMBEDDING, OUTPUT
    from mor_dist.pretrained.hf_folder import hf_weights, llama_config_values, write_folder

    if out.exists() and not out.is_dir():
        raise ConfigError(f"cannot export: {out} is a file; --format hf writes a folder")
    model, cfg, extra = load_single(checkpoint)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    vocab = tokenizer.vocab_size  # megatron's padding rows are dropped: no id the tokenizer cannot decode
    tensors = {key: value[:vocab] if key in (EMBEDDING, OUTPUT) else value for key, value in global_tensors(model).items()}
    values = llama_config_values(cfg.to_dict()["model"], vocab)
    if cfg.model.kind == "vanilla":
        from transformers import LlamaConfig

        config = LlamaConfig(num_hidden_layers=cfg.model.num_layers, architectures=["LlamaForCausalLM"], **values)
        weights = hf_weights(tensors, list(cfg.layout.plan.unrolled), heads_of(cfg), cfg.model.tie_embeddings)
    else:
        from mor_dist.hf import MoRConfig, mor_weights

        config = MoRConfig.from_job(cfg, values)
        weights = mor_weights(tensors, cfg, heads_of(cfg))
    write_folder(out, config, weights, tokenizer.to_json(), tokenizer.eos_id)
    params = sum(t.numel() for k, t in weights.items() if not (cfg.model.tie_embeddings and k == "lm_head.weight"))
    info = {"format": "hf", "step": extra["step"], "class": config.architectures[0], "params": params}
    _record(extra["checkpoint"], cfg, extra, out, info)
    return info
