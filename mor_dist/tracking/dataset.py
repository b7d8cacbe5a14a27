"""The training data as an MLflow dataset input: its `datasets` source (or a mixture's sources), a digest, its size."""

from __future__ import annotations

from typing import Any


def _hf_source(source: Any) -> Any:
    """The `datasets.load_dataset` arguments that read a Source's documents again."""
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

    return HuggingFaceDatasetSource(path=source.builder, config_name=source.config_name,
                                    data_files=list(source.data_files) or None, split=source.split)


def _mlflow_source(corpus: Any) -> Any:
    """A Source as a Hugging Face dataset source; a mixture (MLflow has no type for several sources) as a code
    source whose tags hold each source's `load_dataset` arguments and weight, and how they are interleaved."""
    from mlflow.data.code_dataset_source import CodeDatasetSource

    from mor_dist.data.mixture import STOPPING_STRATEGY, Mixture

    if not isinstance(corpus, Mixture):
        return _hf_source(corpus)
    sources = [{**_hf_source(s).to_dict(), "weight": w} for s, w in zip(corpus.sources, corpus.weights)]
    return CodeDatasetSource({"interleave_datasets": {"sources": sources, "seed": corpus.seed,
                                                      "stopping_strategy": STOPPING_STRATEGY}})


def dataset_input(manifest: dict[str, Any]) -> Any:
    """An MLflow DatasetInput for prepared data (its cache manifest), in the training context.

    A MetaDataset named as data.dataset is written (a file's name for local paths; a mixture's names joined by
    '+') over its source; the digest is the cache key, which changes with the documents, the tokenizer, the
    sequence length and a mixture's weights. The sizes go in as input tags.
    """
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.types import ColSpec, Schema

    from mor_dist.data.mixture import corpus_from_dict

    corpus = corpus_from_dict(manifest["source"])
    dataset = MetaDataset(_mlflow_source(corpus), name=corpus.name, digest=manifest["key"],
                          schema=Schema([ColSpec("string", corpus.text_column)]))
    tags = {"mlflow.data.context": "training", "tokenizer": str(manifest["tokenizer"]),
            "seq_length": str(manifest["seq_length"]), "streaming": str(manifest["streaming"]).lower()}
    for split in ("train", "validation"):
        for count in ("num_sequences", "num_tokens", "num_documents", "num_documents_by_source"):
            if manifest.get(count, {}).get(split) is not None:  # a stream has no training count
                tags[f"{split}.{count}"] = str(manifest[count][split])
    return DatasetInput(dataset._to_mlflow_entity(), [InputTag(k, v) for k, v in tags.items()])
