"""Equal losses across (tp, pp, dp) layouts; pipeline stages hold only their share."""

from __future__ import annotations

import pytest
import torch

from mor_dist.config import load_config
from mor_dist.errors import ConfigError
from multiproc import run_ranks, run_world

LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1)]
BASE = ["train.steps=5", "train.warmup_steps=1", "train.log_interval=1", "train.micro_batch_size=4",
        "train.global_batch_size=8", "train.eval_interval=-1", "train.checkpoint_interval=-1",
        "tracking.enabled=false"]
KINDS = {
    "mor_expert_choice": [],
    "mor_token_choice": ["routing.kind=token_choice"],
    "vanilla": ["model.kind=vanilla", "model.num_recursions=1"],
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from mor_dist.data import padded_vocab_size, prepare_data

    data = prepare_data(load_config(None, BASE), tmp_path_factory.mktemp("cache"))
    return data.directory, padded_vocab_size(data.vocab_size)  # what launch gives every layout by default


@pytest.mark.parametrize("kind", list(KINDS))
def test_first_five_losses_equal_across_layouts(prepared, tmp_path, kind):
    """Expert-choice MoR (the main path) under every layout; the other kinds under the combined ones (tp x pp, dp),
    which fail wherever tp or pp alone would."""
    data_dir, vocab = prepared
    losses = {}
    layouts = LAYOUTS if kind == "mor_expert_choice" else [(1, 1, 1), (1, 1, 2), (2, 2, 1)]
    for tp, pp, dp in layouts:
        overrides = BASE + KINDS[kind] + [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.dp={dp}"]
        reports = run_world(tp * pp * dp, overrides, data_dir, vocab, tmp_path / f"{tp}{pp}{dp}")
        losses[(tp, pp, dp)] = [r["lm_loss"] for r in reports]
    reference = losses[(1, 1, 1)]
    assert len(reference) == 5 and reference[-1] < reference[0]  # it trains
    for layout, values in losses.items():
        assert values == pytest.approx(reference, rel=1e-4), layout
    assert losses[(2, 2, 1)] == pytest.approx(reference, rel=1e-5)  # the default vocabulary is the same at any tp


KV_SHARING = ["routing.kv_sharing=true", "model.init_method_std=0.2"]  # large weights: later queries matter


def test_kv_sharing_trains_the_same_under_tensor_and_sequence_parallelism(prepared, tmp_path):
    """Reusing recursions project queries through their own TP mappings; losses and grad norms agree."""
    data_dir, vocab = prepared
    layouts = {"tp1": ["parallel.tp=1"], "tp2": ["parallel.tp=2"],
               "tp2_sp": ["parallel.tp=2", "parallel.sequence_parallel=true"]}
    reports = {name: run_world(int(extra[0][-1]), BASE + KV_SHARING + extra, data_dir, vocab,
                                 tmp_path / name)
               for name, extra in layouts.items()}
    losses = {name: [r["lm_loss"] for r in runs] for name, runs in reports.items()}
    grads = {name: [r["grad_norm"] for r in runs] for name, runs in reports.items()}
    assert losses["tp1"][-1] < losses["tp1"][0]
    for name in ("tp2", "tp2_sp"):
        assert losses[name] == pytest.approx(losses["tp1"], rel=1e-4), name
        assert grads[name] == pytest.approx(grads["tp1"], rel=1e-4), name


def _stage_parameters(overrides: list[str]) -> dict:
    from mor_dist.model.mor import build_model

    cfg = load_config(None, overrides)
    model = build_model(cfg, 512, on_cuda=False)
    shared = {p.data_ptr() for p in model.shared_block_parameters()}
    return {
        "slots": sorted(model.slot_index),
        "shared": sum(p.numel() for p in model.parameters() if p.data_ptr() in shared),
        "router": model.router is not None,
        "embedding": hasattr(model, "embedding"),
        "head": hasattr(model, "output_layer"),
    }


def test_pipeline_stage_holds_only_its_share_of_the_shared_block(tmp_path):
    overrides = ["model.num_layers=14", "parallel.pp=2", "train.micro_batch_size=4"]  # 1 + 4x3 + 1
    whole = _stage_parameters_single(overrides[:1])
    stages = run_ranks(2, _stage_parameters, (overrides,), tmp_path)
    assert stages[0]["slots"] == [0, 1, 2] and stages[1]["slots"] == [3, 4, 5]
    assert stages[0]["shared"] == stages[1]["shared"] == whole["shared"] // 2
    assert [s["router"] for s in stages] == [True, False]
    assert [s["embedding"] for s in stages] == [True, False] and [s["head"] for s in stages] == [False, True]


def _stage_parameters_single(overrides: list[str]) -> dict:
    import torch.distributed as dist

    from mor_dist.parallel.setup import init_single_process

    init_single_process()
    assert dist.get_world_size() == 1
    with torch.device("cpu"):
        return _stage_parameters(overrides)


@pytest.mark.parametrize("overrides,needle", [
    (["parallel.pp=3"], "parallel.pp=3"),
    (["parallel.pp=2", "train.micro_batch_size=8"], "multiple of 2"),
    (["parallel.pp=2", "train.micro_batch_size=4", "routing.kv_sharing=true"], "routing.kv_sharing"),
    (["parallel.tp=3"], "parallel.tp=3"),
    (["parallel.dp=3"], "train.global_batch_size"),
])
def test_layouts_that_do_not_divide_are_refused(overrides, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, overrides)
