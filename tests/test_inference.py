"""Cached generation equals recomputation, KV memory per token, continuous batching."""

from __future__ import annotations

import json
import re

import pytest
import torch

from mor_dist.bench import inference as bench
from mor_dist.bench.inference import max_batch
from mor_dist.inference.engine import Engine
from mor_dist.inference.generation import generate, load_checkpoint
from mor_dist.inference.sampling import Sampler
from mor_dist.inference.scheduler import Request, Scheduler
from mor_dist.inference.tokens import concat

VANILLA = ("model.kind=vanilla", "model.num_recursions=1")
LIVELY = "model.init_method_std=0.2"  # at 0.02 a fresh tied-embedding model just repeats its input token


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core box: one thread avoids oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def routed(model, scale: float = 5.0):
    """A fresh router's logits sit near 0; scale them so tokens really take different depths."""
    if model.router is not None:
        with torch.no_grad():
            model.router.weight.mul_(scale)
    return model


def recompute(model, prompts: torch.Tensor, steps: int) -> list[list[int]]:
    """Greedy tokens from the full forward over the whole prefix at every step (causal routing)."""
    ids = prompts
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids, causal_routing=True)[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[:, prompts.shape[1]:].tolist()


def cached_last_logits(model, prompts: torch.Tensor) -> torch.Tensor:
    """Logits of each prompt's last token through the cache: prefill the rest, then one decode step."""
    b, s = prompts.shape
    engine = Engine(model, b, s)
    rows = torch.arange(b).repeat_interleave(s - 1)
    engine.prefill(rows, torch.arange(s - 1).repeat(b), prompts[:, :-1].reshape(-1))
    want, done = engine.enter(torch.arange(b), torch.full((b,), s - 1), prompts[:, -1])
    exits = [done]
    while len(want):
        want, out = engine.block_pass(want)
        exits.append(out)
    toks = concat(exits)
    return engine.exit(toks)[torch.argsort(toks.rows)]


CASES = [
    VANILLA,
    ("model.kind=recursive",),
    (),  # expert-choice, recursion-wise KV
    ("routing.kv_sharing=true",),
    ("routing.kind=token_choice",),
    ("routing.kind=token_choice", "routing.kv_sharing=true"),
    ("routing.aux_router=true",),
    ("model.sharing=cycle", "model.num_layers=6"),
]
IDS = ["vanilla", "recursive", "expert_choice", "expert_choice_kv_sharing", "token_choice", "token_choice_kv_sharing",
       "expert_choice_aux_router", "expert_choice_cycle"]


@pytest.mark.parametrize("overrides", CASES, ids=IDS)
def test_cached_logits_equal_the_full_forward(build, overrides):
    model, _ = build(LIVELY, *overrides)
    model = routed(model.eval())
    prompts = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(prompts, causal_routing=True)[:, -1]
    torch.testing.assert_close(cached_last_logits(model, prompts), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("overrides", CASES, ids=IDS)
def test_cached_greedy_equals_recompute(build, overrides):
    model, cfg = build(LIVELY, *overrides)
    model = routed(model.eval())
    prompts = torch.randint(0, 256, (3, 6), generator=torch.Generator().manual_seed(1))
    steps = 10
    outputs, stats, _ = generate(model, prompts.tolist(), steps)
    assert outputs == recompute(model, prompts, steps)
    assert len({t for o in outputs for t in o}) > len(outputs)  # not one repeated token per prompt
    if model.routed:  # the generated tokens really stopped at different depths
        assert 1.0 < stats.depth_total / stats.generated < cfg.model.num_recursions


def test_continuous_batching_keeps_rows_full_and_finishes_every_request(build):
    model, _ = build(LIVELY)
    model = routed(model.eval())
    gen = torch.Generator().manual_seed(2)
    reqs = [Request(torch.randint(0, 256, (1 + i % 3,), generator=gen).tolist(), 3 + (5 * i) % 7)
            for i in range(9)]
    engine = Engine(model, 3, 12)
    stats = Scheduler(engine, Sampler()).run(reqs)
    assert [len(o) for o in stats.outputs] == [r.max_new_tokens for r in reqs]
    while_waiting = [(busy, block) for busy, block, q in zip(stats.busy_rows, stats.block_batches, stats.queued) if q]
    assert while_waiting and all(busy == block == 3 for busy, block in while_waiting)
    # Refilled rows give every request the tokens it gets alone in a batch of its own rows.
    alone, _, _ = generate(model, [r.prompt for r in reqs], max(r.max_new_tokens for r in reqs))
    assert stats.outputs == [a[:r.max_new_tokens] for a, r in zip(alone, reqs)]


@pytest.mark.parametrize("sharing,threshold,depths", [(False, 0.0, 3), (False, 1.0, 1), (True, 0.0, 1)])
def test_kv_blocks_follow_the_routers_choices(build, sharing, threshold, depths):
    """The shared block's paged pool takes a block per 16 tokens a sequence caches at a depth: every depth when
    every token goes on (threshold 0), depth 1 only when none does (threshold 1), depth 1 only under KV sharing."""
    from mor_dist.model.kv_cache import BLOCK_TOKENS

    model, cfg = build(f"routing.kv_sharing={str(sharing).lower()}")
    n = cfg.model.num_recursions
    engine = Engine(model.eval(), 2, 48, thresholds=[threshold] * n)
    Scheduler(engine, Sampler()).run([Request([1], 48), Request([2], 48)])
    pool = engine.cache.pools["block"]
    per_table = -(-48 // BLOCK_TOKENS)  # 48 cached positions per sequence
    assert pool.peak_blocks == 2 * depths * per_table
    stored = pool.keys.untyped_storage().nbytes() + pool.values.untyped_storage().nbytes()
    assert pool.peak_block_bytes == stored * pool.peak_blocks // pool.num_blocks  # blocks are what is held
    assert pool.peak_used_bytes == 2 * depths * 48 * pool.slot_bytes  # the tokens in them
    assert pool.free_blocks == pool.num_blocks  # finished sequences gave every block back


def test_a_small_kv_pool_preempts_and_waits_but_changes_no_token(build):
    """With fewer blocks than the queue needs, sequences wait or are preempted and restarted: every output and
    the realised mean depth equal those of an unbounded pool (no token's recursion is cut short)."""
    model, cfg = build(LIVELY)
    model = routed(model.eval())
    gen = torch.Generator().manual_seed(3)
    reqs = [Request(torch.randint(0, 256, (1 + i % 4,), generator=gen).tolist(), 20 + 3 * i) for i in range(8)]
    free = Scheduler(Engine(model, 4, 64), Sampler()).run(reqs)
    small = Scheduler(Engine(model, 4, 64, block_budget=14), Sampler()).run(reqs)
    assert small.preemptions > 0 and free.preemptions == 0
    assert small.outputs == free.outputs
    assert small.depth_total / small.generated == free.depth_total / free.generated


def test_sampling_top1_is_greedy_and_seeded_sampling_repeats(build):
    model, _ = build(LIVELY)
    model = routed(model.eval())
    prompts = [[5, 6, 7], [8, 9, 10]]
    greedy, _, _ = generate(model, prompts, 6)
    assert generate(model, prompts, 6, Sampler(temperature=1.0, top_k=1))[0] == greedy
    first = generate(model, prompts, 6, Sampler(temperature=1.0, seed=3))[0]
    assert generate(model, prompts, 6, Sampler(temperature=1.0, seed=3))[0] == first


def test_exported_checkpoint_loads_and_generates_alike(build, tmp_path):
    model, cfg = build()
    model = routed(model.eval())
    path = tmp_path / "model.pt"
    torch.save({"config": cfg.to_dict(), "vocab_size": 256, "model": model.state_dict()}, path)
    loaded, _ = load_checkpoint(path)
    assert generate(loaded, [[3, 4]], 5)[0] == generate(model, [[3, 4]], 5)[0]


def test_a_file_that_is_not_an_export_is_refused(tmp_path):
    from mor_dist.errors import ConfigError

    text = tmp_path / "README.md"
    text.write_text("# not a model\n")
    with pytest.raises(ConfigError, match="is not an exported model file"):
        load_checkpoint(text)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ConfigError, match="is not an exported model file"):
        load_checkpoint(tmp_path / "list.pt")


def test_max_batch_scales_with_the_memory_mor_saves():
    gib = 2**30
    assert max_batch(32, 80 * gib, (1 * gib, 2.0), (1 * gib, 3.0)) == 48
    assert max_batch(32, 80 * gib, (1 * gib, 3.0), (1 * gib, 3.0)) == 32


def test_inference_benchmark_measures_mor_against_vanilla_and_appends(world, tmp_path, capsys):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Inference (`jobs/benchmark.py inference`)\n\nintro\n\n## Later\n")
    out = tmp_path / "rows.json"
    argv = ["--preset", "tiny", "--requests", "12", "--mean-len", "6", "--recursions", "2", "--repeats", "1",
            "--warmup-requests", "2", "--batch", "4", "--append", str(doc), "--json", str(out)]
    assert bench.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["setting"]) for r in rows] == [("MoR-2", "fixed"), ("MoR-2", "max")]
    assert all(r["tokens_per_s"] > 0 and r["vanilla"] == "vanilla-32" for r in rows)
    assert rows[1]["batch"] > rows[0]["batch"] == 4  # MoR's smaller cache fits more sequences
    assert 1.0 <= rows[0]["mean_depth"] <= 2.0 and rows[0]["kv_ratio"] < 1.0
    text = doc.read_text()
    assert text.index("| MoR-2 | vanilla-32 | fixed 4 |") < text.index("## Later")
    assert "jobs/benchmark.py inference --preset tiny" in text and "GPU (H100) figures are missing" in text
    summary = re.search(r"MoR-2 vs vanilla-32 at batch 4, tokens/s: (\d+\.\d\d)x \(median, (\d+\.\d\d)-(\d+\.\d\d) "
                        r"over 1 rounds\)", text)
    assert summary and float(summary.group(1)) == pytest.approx(rows[0]["ratio"], abs=0.006)
