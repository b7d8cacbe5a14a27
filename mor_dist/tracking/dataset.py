"""The training data as an MLflow dataset input: its `datasets` source, a digest, its size."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def dataset_name(source: dict[str, Any]) -> str:
    """How the UI names the data: data.dataset as written (a file's name for local paths)."""
    spec = source["spec"]
    return Path(spec).name if source["data_files"] and spec != "bundled" else spec


def dataset_input(manifest: dict[str, Any]) -> Any:
    """An MLflow DatasetInput for prepared data (its cache manifest), in the training context.

    A MetaDataset over a HuggingFaceDatasetSource: the source records the `datasets.load_dataset` arguments that
    read the documents again; the digest is the cache key, which changes with the documents, the tokenizer and the
    sequence length. The sizes go in as input tags.
    """
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.types import ColSpec, Schema

    source = manifest["source"]
    hf_source = HuggingFaceDatasetSource(path=source["builder"], config_name=source["config_name"],
                                         data_files=source["data_files"] or None, split=source["split"])
    dataset = MetaDataset(hf_source, name=dataset_name(source), digest=manifest["key"],
                          schema=Schema([ColSpec("string", source["text_column"])]))
    tags = {"mlflow.data.context": "training", "tokenizer": str(manifest["tokenizer"]),
            "seq_length": str(manifest["seq_length"]), "streaming": str(manifest["streaming"]).lower()}
    for split in ("train", "validation"):
        for count in ("num_sequences", "num_tokens", "num_documents"):
            if manifest.get(count, {}).get(split) is not None:  # a stream has no training count
                tags[f"{split}.{count}"] = str(manifest[count][split])
    return DatasetInput(dataset._to_mlflow_entity(), [InputTag(k, v) for k, v in tags.items()])
