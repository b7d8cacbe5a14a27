"""A small random Hugging Face Llama with its own tokenizer, written as a user's save_pretrained folder."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mor_dist.config import load_config
from mor_dist.data.sources import BUNDLED_CORPUS
from multiproc import run_world

VOCAB = 1024
# The tiny config's width (so only the depth differs from configs/tiny_mor.yaml), six layers.
SHAPE = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
             rope_theta=5e4, rms_norm_eps=1e-5, max_position_embeddings=256)
FROM_SOURCE = ["model.num_layers=null"]  # the tiny config's 8 layers: the source says 6


def bundled_texts(count: int) -> list[str]:
    """The first texts of the bundled corpus."""
    with gzip.open(next(BUNDLED_CORPUS.glob("*.jsonl.gz")), "rt", encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line, _ in zip(handle, range(count))]


def save_tokenizer(path: Path, texts: list[str]) -> None:
    """A small byte-level BPE with an end-of-text token, trained here, next to the model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))


def save_llama(path: Path, tied: bool = False, seed: int = 0, **shape: object) -> LlamaForCausalLM:
    """A random LlamaForCausalLM written by save_pretrained (config.json and model.safetensors) with a tokenizer."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, tie_word_embeddings=tied, **{**SHAPE, **shape})).eval()
    with torch.no_grad():  # visible norms, so that a norm mapped to the wrong place shows in the logits
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    save_tokenizer(path, bundled_texts(200))
    return model


def train_briefly(tmp_path: Path, overrides: list[str], tracked: bool = False) -> Path:
    """One training step in a gloo world of one (no Ray); the checkpoint it writes."""
    from mor_dist.data import prepare_data

    overrides = [*overrides, "train.steps=1", "train.warmup_steps=0", "train.micro_batch_size=2",
                 "train.global_batch_size=2", "train.eval_batches=1", f"tracking.enabled={str(tracked).lower()}"]
    cfg = load_config(None, overrides)
    data = prepare_data(cfg, tmp_path / "cache")
    from mor_dist.data import padded_vocab_size

    vocab = cfg.model.vocab_size or padded_vocab_size(data.vocab_size)
    return Path(run_world(1, overrides, data.directory, vocab, tmp_path / "train")[-1]["checkpoint"])
