"""Data: HF datasets (hub or local files), tokenizer, packing, DP-rank sharding, resumable position."""

from mor_dist.data.iterator import TrainIterator, validation_batches
from mor_dist.data.prepare import PreparedData, prepare_data
from mor_dist.data.streaming import StreamingTrainIterator
from mor_dist.data.tokenizer import Tokenizer, load_tokenizer
from mor_dist.layout import padded_vocab_size

__all__ = [
    "PreparedData",
    "StreamingTrainIterator",
    "Tokenizer",
    "TrainIterator",
    "load_tokenizer",
    "padded_vocab_size",
    "prepare_data",
    "validation_batches",
]
