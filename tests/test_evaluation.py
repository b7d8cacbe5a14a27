"""Few-shot evaluation through lm-evaluation-harness on local tasks: our model class against lm-eval's own hf
model on the same weights, MLflow records, MoR's mean depth, offline refusals."""

from __future__ import annotations

import json

import pytest
from lm_eval.api.instance import Instance
from mlflow import MlflowClient

from mor_dist.catalog import read_manifest
from mor_dist.errors import ConfigError
from mor_dist.evaluation.local_tasks import write_tasks
from llama_source import FROM_SOURCE, save_llama, train_briefly

VANILLA = ["model.kind=vanilla", "model.num_recursions=1"]


@pytest.fixture(scope="module")
def vanilla(tmp_path_factory):
    """A tiny Llama imported as vanilla, one step at a negligible lr (tracked), and its Hugging Face export."""
    from mor_dist.train.export import export_hf

    tmp = tmp_path_factory.mktemp("vanilla")
    save_llama(tmp / "llama", seed=1)
    checkpoint = train_briefly(tmp, [f"model.init_from={tmp / 'llama'}", *FROM_SOURCE, *VANILLA, "train.lr=1e-12"],
                               tracked=True)
    export_hf(checkpoint, tmp / "hf")
    return checkpoint, tmp / "hf", write_tasks(tmp / "tasks")


def test_our_model_class_scores_like_lm_evals_hf_model_on_the_same_weights(vanilla):
    """Per-request log-likelihoods (and greedy flags) within 1e-4, rolling ones too, identical accuracies."""
    from lm_eval.models.huggingface import HFLM

    from mor_dist.evaluation.run import evaluate, load_source

    checkpoint, hf_dir, tasks = vanilla
    ours, _ = load_source(checkpoint.parent, batch_size=4, routing="causal")
    theirs = HFLM(pretrained=str(hf_dir), batch_size=4, device="cpu")
    docs = [json.loads(line) for line in (tasks / "mc.jsonl").read_text().splitlines()]
    requests = [Instance("loglikelihood", doc, (doc["question"], choice), i)
                for doc in docs for i, choice in enumerate(doc["choices"])]
    for (a, greedy_a), (b, greedy_b) in zip(ours.loglikelihood(requests), theirs.loglikelihood(requests)):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b
    texts = [Instance("loglikelihood_rolling", {}, (json.loads(line)["text"],), 0)
             for line in (tasks / "ppl.jsonl").read_text().splitlines()]
    assert ours.loglikelihood_rolling(texts) == pytest.approx(theirs.loglikelihood_rolling(texts), abs=1e-3)
    by_us = evaluate(checkpoint.parent, ["tiny_mc"], include_path=tasks)
    by_hf = evaluate(hf_dir, ["tiny_mc"], include_path=tasks)
    assert by_us.results["tiny_mc"]["acc,none"] == by_hf.results["tiny_mc"]["acc,none"]


def test_results_land_in_the_training_runs_mlflow_run(vanilla):
    from mor_dist.evaluation.run import evaluate, record

    checkpoint, _, tasks = vanilla
    done = evaluate(checkpoint.parent, ["tiny_mc", "tiny_ppl", "tiny_gen"], include_path=tasks, limit=4)
    assert set(done.results) == {"tiny_mc", "tiny_ppl", "tiny_gen"}
    where = record(done, checkpoint.parent, ["tiny_mc", "tiny_ppl", "tiny_gen"])
    run_id = read_manifest(checkpoint)["run_id"]
    assert run_id in where
    run = MlflowClient(f"sqlite:///{checkpoint.parent.parent / 'mlflow.db'}").get_run(run_id)
    assert run.data.metrics["eval/tiny_mc/acc"] == done.results["tiny_mc"]["acc,none"]
    assert run.data.metrics["eval/tiny_ppl/word_perplexity"] > 1.0
    assert "eval/tiny_gen/exact_match" in run.data.metrics
    assert run.data.tags["eval.tiny_mc.version"] == "1.0" and run.data.tags["eval.routing.causal"] == "evaluated"


def test_a_mor_checkpoint_reports_its_mean_depth_under_each_routing_rule(tmp_path):
    from mor_dist.evaluation.run import evaluate

    tasks = write_tasks(tmp_path / "tasks")
    checkpoint = train_briefly(tmp_path, ["model.init_method_std=0.2"])
    causal = evaluate(checkpoint.parent, ["tiny_mc"], include_path=tasks, limit=6)
    topk = evaluate(checkpoint.parent, ["tiny_mc"], include_path=tasks, limit=6, routing="topk")
    assert 1.0 <= causal.mean_depth["tiny_mc"] <= 3.0
    assert topk.mean_depth["tiny_mc"] == pytest.approx(2.0, abs=0.05)  # top-k: capacities 1, 2/3, 1/3
    assert 0.0 <= causal.results["tiny_mc"]["acc,none"] <= 1.0


def test_unknown_and_unreachable_tasks_are_refused_before_loading_a_model(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    from mor_dist.evaluation.run import check_tasks, task_names

    assert task_names("paper") == ["lambada_openai", "hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge",
                                   "mmlu"]
    manager = TaskManager(include_path=str(write_tasks(tmp_path / "tasks")))
    check_tasks(["tiny_mc", "tiny_ppl"], manager)  # local: no hub needed
    with pytest.raises(ConfigError, match="unknown task"):
        check_tasks(["no_such_task"], manager)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # nothing listens there: the hub is unreachable
    with pytest.raises(ConfigError, match="--tasks hellaswag reads its data from the Hugging Face hub"):
        check_tasks(["hellaswag"], manager)
