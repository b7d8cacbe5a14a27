"""Generation entry points: load a model (exported checkpoint or fresh), generate for prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from mor_dist.config import JobConfig, config_from_dict
from mor_dist.errors import ConfigError
from mor_dist.inference.engine import Engine
from mor_dist.inference.sampling import Sampler
from mor_dist.inference.scheduler import Request, RunStats, Scheduler
from mor_dist.model.mor import MoRModel, build_model


def build_single(cfg: JobConfig, vocab_size: int, on_cuda: bool) -> MoRModel:
    """An unsharded model in a world of one process (tp = pp = 1), in eval mode."""
    from mor_dist.parallel.setup import init_single_process

    if cfg.parallel.tp != 1 or cfg.parallel.pp != 1:
        raise ConfigError("generation runs one process: set parallel.tp=1 parallel.pp=1 parallel.dp=1")
    init_single_process()
    return build_model(cfg, vocab_size, on_cuda).eval()


def load_checkpoint(path: Path, on_cuda: bool = False) -> tuple[MoRModel, JobConfig]:
    """(model, cfg) from an exported file {"config", "vocab_size", "model"} of an unsharded MoRModel, or from a
    training checkpoint directory or a run directory (its newest whole checkpoint)."""
    if Path(path).is_dir():
        from mor_dist.train.export import load_single

        model, cfg, _ = load_single(Path(path))
        return (model.cuda() if on_cuda else model).eval(), cfg
    if not Path(path).is_file():
        raise ConfigError(f"--checkpoint {path} does not exist; give a run directory (runs/<name>), one of its "
                          "checkpoint_* directories, or a file jobs/export.py wrote")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # not a torch file at all (pickle, zip or EOF errors)
        raise ConfigError(f"--checkpoint {path} is not an exported model file (jobs/export.py writes one): "
                          f"{type(err).__name__}: {err}") from None
    if not isinstance(payload, dict):
        raise ConfigError(f"--checkpoint {path} is not an exported model file (jobs/export.py writes one)")
    missing = {"config", "vocab_size", "model"} - set(payload)
    if missing:
        raise ConfigError(f"{path} is not an exported checkpoint: missing {sorted(missing)}")
    cfg = config_from_dict(payload["config"])
    model = build_single(cfg, payload["vocab_size"], on_cuda)
    result = model.load_state_dict(payload["model"], strict=False)
    unexpected = [k for k in result.unexpected_keys if not k.endswith("_extra_state")]
    absent = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if unexpected or absent:
        raise ConfigError(f"{path} does not match its config: missing {absent[:5]}, unexpected {unexpected[:5]}")
    return model, cfg


def generate(model: MoRModel, prompts: list[list[int]], max_new_tokens: int, sampler: Optional[Sampler] = None,
             eos_id: Optional[int] = None, thresholds: Optional[list[float]] = None,
             block_budget: Optional[int] = None) -> tuple[list[list[int]], RunStats, Engine]:
    """New tokens for each prompt, every prompt in its own cache row, decoded with depth-wise batching."""
    max_len = max(len(p) for p in prompts) + max_new_tokens
    engine = Engine(model, len(prompts), max_len, thresholds, block_budget)
    stats = Scheduler(engine, sampler or Sampler(), eos_id).run([Request(p, max_new_tokens) for p in prompts])
    return stats.outputs, stats, engine


def generate_text(prompt: str, cfg: Optional[JobConfig] = None, checkpoint: Optional[Path] = None,
                  max_new_tokens: int = 64, sampler: Optional[Sampler] = None, stop_at_eos: bool = False,
                  on_cuda: bool = False) -> str:
    """Prompt text -> generated text, from an exported checkpoint or a fresh model of `cfg`."""
    from mor_dist.data import load_tokenizer, padded_vocab_size

    if checkpoint is not None:
        model, cfg = load_checkpoint(checkpoint, on_cuda)
    elif cfg is not None:
        tok = load_tokenizer(cfg.data.tokenizer)
        model = build_single(cfg, cfg.model.vocab_size or padded_vocab_size(tok.vocab_size), on_cuda)
    else:
        raise ConfigError("generate_text needs a config or a checkpoint")
    tok = load_tokenizer(cfg.data.tokenizer)
    sampler = sampler or Sampler()
    sampler.vocab_limit = tok.vocab_size
    ids = tok.encode(prompt) or [tok.eos_id]
    outputs, _, _ = generate(model, [ids], max_new_tokens, sampler, tok.eos_id if stop_at_eos else None)
    return tok.decode(outputs[0])
