"""Write a Hugging Face model folder: config.json, model.safetensors, tokenizer files, generation_config.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mor_dist.errors import ConfigError
from mor_dist.pretrained.llama import (EMBEDDING, FINAL_NORM, HF_EMBEDDING, HF_FINAL_NORM, HF_OUTPUT, LAYER_KEYS,
                                       OUTPUT, Heads, layer_to_hf)

CONFIG_KEYS = {"hidden_size": "hidden_size", "ffn_hidden_size": "intermediate_size",
               "num_attention_heads": "num_attention_heads", "num_query_groups": "num_key_value_heads",
               "rotary_base": "rope_theta", "norm_epsilon": "rms_norm_eps", "tie_embeddings": "tie_word_embeddings",
               "seq_length": "max_position_embeddings"}


def llama_config_values(model: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """LlamaConfig arguments for a model.* config section (the padded vocabulary, as trained)."""
    values = {hf: model[ours] for ours, hf in CONFIG_KEYS.items()}
    values["rope_theta"] = float(values["rope_theta"])
    return {**values, "vocab_size": vocab_size, "head_dim": model["hidden_size"] // model["num_attention_heads"]}


def hf_weights(tensors: dict[str, torch.Tensor], slots: list[int], heads: Heads, tied: bool) -> dict[str, torch.Tensor]:
    """Megatron global tensors (by sharded key) -> HF Llama names, HF layer i taken from slot slots[i]."""
    out = {HF_EMBEDDING: tensors[EMBEDDING], HF_FINAL_NORM: tensors[FINAL_NORM]}
    if not tied:
        out[HF_OUTPUT] = tensors[OUTPUT]
    for index, slot in enumerate(slots):
        out.update(layer_to_hf({key: tensors[f"layers.{slot}.{key}"] for key in LAYER_KEYS}, index, heads))
    return out


def write_folder(out: Path, config: Any, weights: dict[str, torch.Tensor], tokenizer_json: str, eos_id: int) -> None:
    """A folder `from_pretrained(out)` reads: `config` a transformers PretrainedConfig, weights by HF name."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; give a new folder (nothing is overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    backend = Tokenizer.from_str(tokenizer_json)
    eos = backend.id_to_token(eos_id)
    config.eos_token_id = config.bos_token_id = eos_id
    config.save_pretrained(out)
    save_file({k: v.detach().contiguous().float() for k, v in weights.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, bos_token=eos).save_pretrained(out)
    GenerationConfig(eos_token_id=eos_id, bos_token_id=eos_id, pad_token_id=eos_id).save_pretrained(out)
