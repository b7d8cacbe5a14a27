"""Tokenizer loading: the bundled GPT-2 BPE, a local tokenizer.json (or its directory), or a hub name."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer as BackendTokenizer

from mor_dist.errors import ConfigError
from mor_dist.hub import require_hub
from mor_dist.pretrained.source import PACKAGE_PREFIX, local_folder

BUNDLED = Path(__file__).resolve().parent / "bundled"
NAMED = {"bundled": BUNDLED / "tokenizer",  # GPT-2's 50,257 ids (the tiny demo's)
         "smollm2": BUNDLED / "smollm2"}  # SmolLM2's 49,152 ids (the paper presets')
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[EOS]")


@dataclass(frozen=True)
class Tokenizer:
    """A loaded tokenizer: text to ids and back, its vocabulary size and end-of-text id."""

    name: str
    backend: BackendTokenizer
    eos_id: int

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (special tokens included)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Ids of one text, without any added special tokens."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids of many texts (parallel inside `tokenizers`)."""
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        """Text of a list of ids (special tokens kept)."""
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def to_json(self) -> str:
        """The tokenizer.json content, enough to rebuild this tokenizer anywhere."""
        return self.backend.to_str()


def _looks_like_path(spec: str) -> bool:
    """Whether `data.tokenizer` names a local file or directory rather than a hub repo."""
    return spec.startswith(("/", "./", "../", "~")) or spec.endswith(".json") or Path(spec).exists()


def _eos_id(backend: BackendTokenizer, config_file: Path | None) -> int | None:
    """The end-of-text id: tokenizer_config.json's eos_token if present, else a well-known name."""
    names = list(EOS_CANDIDATES)
    if config_file is not None and config_file.is_file():
        eos = json.loads(config_file.read_text()).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if isinstance(eos, str):
            names.insert(0, eos)
    for name in names:
        token_id = backend.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


def load_tokenizer(spec: str) -> Tokenizer:
    """Load `data.tokenizer`: "bundled" (GPT-2), "smollm2", a tokenizer.json file or its directory, a hub name,
    or a model file that `model.init_from` takes (a .gguf file or package:NAME/FILE: the tokenizer inside it)."""
    config_file, name = None, spec
    if spec.startswith(PACKAGE_PREFIX) or spec.endswith(".gguf"):
        spec = str(local_folder(spec))
    if spec in NAMED:
        spec = str(NAMED[spec])
    if _looks_like_path(spec):
        path = Path(spec).expanduser()
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(
                f"data.tokenizer={spec!r}: no tokenizer.json found there; point data.tokenizer at a directory "
                "holding a Hugging Face tokenizer.json, at the file itself, a hub name, or 'bundled'")
        config_file = file.parent / "tokenizer_config.json"
        try:
            backend = BackendTokenizer.from_file(str(file))
        except Exception as err:  # tokenizers raises plain Exception on malformed files
            raise ConfigError(f"data.tokenizer={spec!r}: {file} is not a readable tokenizer.json ({err})") from err
    else:
        require_hub("data.tokenizer", spec)
        try:
            backend = BackendTokenizer.from_pretrained(spec)
        except Exception as err:  # network, missing repo or missing tokenizer.json all land here
            raise ConfigError(
                f"data.tokenizer={spec!r}: could not load it from the Hugging Face hub ({err}); use 'bundled', "
                "a local directory with tokenizer.json, or a hub repo that has a tokenizer.json") from err
    eos_id = _eos_id(backend, config_file)
    if eos_id is None:
        raise ConfigError(f"data.tokenizer={spec!r} has no end-of-text token (tried {list(EOS_CANDIDATES)}); "
                          "documents are joined with it, so pick a tokenizer that has one")
    return Tokenizer(name=name, backend=backend, eos_id=eos_id)


def tokenizer_from_json(name: str, content: str, eos_id: int) -> Tokenizer:
    """Rebuild a tokenizer saved with `Tokenizer.to_json` (workers read it from the data cache)."""
    return Tokenizer(name=name, backend=BackendTokenizer.from_str(content), eos_id=eos_id)
