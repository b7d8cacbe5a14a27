"""Three small lm-eval tasks over local JSONL, written from the bundled corpus: the offline route to
`jobs/evaluate.py` (`python -m mor_dist.evaluation.local_tasks DIR`, then `--include-path DIR`).

- tiny_mc: multiple choice, which of four endings belongs to a sentence (chance 25%; acc_norm divides
  each ending's log-likelihood by its length in bytes, as for HellaSwag);
- tiny_ppl: word perplexity and bits per byte of held-out sentences (lm-eval's loglikelihood_rolling);
- tiny_gen: greedy continuation of a sentence's first six words, exact match of the next three.
The sentences come from the bundled Python documentation: a model trained on that corpus has seen them.
"""

from __future__ import annotations

import gzip
import json
import random
import sys
from pathlib import Path

from mor_dist.data.sources import BUNDLED_CORPUS

def sentences(count: int) -> list[str]:
    """Sentences of the bundled corpus, 8 to 30 words long, from its last documents."""
    with gzip.open(next(BUNDLED_CORPUS.glob("*.jsonl.gz")), "rt", encoding="utf-8") as handle:
        texts = [json.loads(line)["text"] for line in handle][-120:]
    out = []
    for text in texts:
        out += [s.strip() + "." for s in text.replace("\n", " ").split(". ") if 8 <= len(s.split()) <= 30]
    return out[:count]


def write_tasks(folder: Path) -> Path:
    """A multiple-choice task (which ending belongs to the sentence), a perplexity task and a generation task,
    as lm-eval YAML over JSONL."""
    folder.mkdir(parents=True, exist_ok=True)
    rows, rng = sentences(140), random.Random(0)
    mc = []
    for i, sentence in enumerate(rows[:100]):
        words = sentence.split()
        cut = len(words) // 2
        others = [" " + " ".join(rows[(i + k) % len(rows)].split()[cut:]) for k in (7, 13, 19)]
        choices = others + [" " + " ".join(words[cut:])]
        rng.shuffle(choices)
        mc.append({"question": " ".join(words[:cut]), "choices": choices,
                   "label": choices.index(" " + " ".join(words[cut:]))})
    files = {"mc": mc, "ppl": [{"text": s} for s in rows[100:120]],
             "gen": [{"prompt": " ".join(s.split()[:6]), "answer": " ".join(s.split()[6:9])} for s in rows[120:140]]}
    for name, docs in files.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = "dataset_path: json\ntest_split: test\nmetadata:\n  version: 1.0\n"
    (folder / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: choices\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    (folder / "tiny_ppl.yaml").write_text(
        f"task: tiny_ppl\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'ppl.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n    aggregation: weighted_perplexity\n    higher_is_better: false\n"
        "  - metric: bits_per_byte\n    aggregation: bits_per_byte\n    higher_is_better: false\n")
    (folder / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 8\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    return folder


if __name__ == "__main__":
    print(f"wrote tiny_mc, tiny_ppl, tiny_gen to {write_tasks(Path(sys.argv[1]).resolve())}")
