"""Parameter counts, weight sharing, routing semantics, gradients, causality."""

from __future__ import annotations

import pytest
import torch

from mor_dist.config import load_config
from mor_dist.model.mor import build_model
from mor_dist.model.routing import gather_rotary, gather_tokens
from mor_dist.layout import layer_plan


def unique_non_embedding(name: str) -> float:
    cfg = load_config(f"configs/{name}.yaml", ["train.precision=fp32"])
    with torch.device("meta"):
        model = build_model(cfg, 49152, on_cuda=False)
    total = sum(p.numel() for p in model.parameters())
    return (total - model.embedding.word_embeddings.weight.numel()) / 1e6


@pytest.mark.parametrize("name,paper_m", [
    ("mor_360m_nr2", 167), ("mor_360m_nr3", 118), ("mor_360m_nr4", 98), ("vanilla_360m", 315),
    ("recursive_360m_nr3", 118), ("mor_135m_nr3", 42), ("mor_730m_nr3", 252),
    ("mor_1p7b_nr2", 870), ("mor_1p7b_nr3", 670),
])
def test_unique_parameters_match_paper(world, name, paper_m):
    assert unique_non_embedding(name) == pytest.approx(paper_m, rel=0.02)


def test_sharing_layouts_match_paper_example():
    assert layer_plan("cycle", 9, 3).unrolled == (0, 1, 2) * 3
    assert layer_plan("sequence", 9, 3).unrolled == (0, 0, 0, 1, 1, 1, 2, 2, 2)
    mc = layer_plan("middle_cycle", 32, 3)
    assert mc.prefix == (0,) and mc.suffix == (11,) and mc.block == tuple(range(1, 11))
    assert mc.unrolled == (0,) + tuple(range(1, 11)) * 3 + (11,) and mc.num_unique == 12
    ms = layer_plan("middle_sequence", 8, 3)
    assert ms.unrolled == (0, 1, 1, 1, 2, 2, 2, 3)


def test_shared_layers_are_the_same_tensors_in_every_recursion(build):
    model, cfg = build()
    calls: dict[int, list[int]] = {}
    hooks = [layer.register_forward_hook(
        lambda mod, _i, _o, slot=slot: calls.setdefault(slot, []).append(
            mod.self_attention.linear_qkv.weight.data_ptr()))
        for slot, layer in enumerate(model.layers)]
    model(torch.randint(0, 256, (2, cfg.model.seq_length)))
    for h in hooks:
        h.remove()
    plan = model.plan
    for slot in plan.block:
        assert len(calls[slot]) == cfg.model.num_recursions
        assert len(set(calls[slot])) == 1
    for slot in plan.prefix + plan.suffix:
        assert len(calls[slot]) == 1
    assert len(model.layers) == plan.num_unique == 4  # 1 + 2 shared + 1: no hidden copies


def _chain(model, h, causal=False):
    sels, prev = [], None
    for r in range(model.plan.num_recursions):
        prev, _ = model.router.select(r, h, prev, causal)
        sels.append(prev)
    return sels


def test_selected_sets_shrink_nest_and_have_k_r_tokens(build):
    model, cfg = build()
    s = cfg.model.seq_length
    h = torch.randn(s, 3, cfg.model.hidden_size)
    sels = _chain(model, h)
    expected = [max(1, int(c * s)) for c in cfg.capacities]
    assert [sel.indices.shape[1] for sel in sels] == expected == [128, 85, 42]
    for prev, nxt in zip(sels, sels[1:]):
        for b in range(3):
            assert set(nxt.indices[b].tolist()) <= set(prev.indices[b].tolist())
    for sel in sels:
        assert torch.all(sel.indices[:, 1:] > sel.indices[:, :-1])  # sorted, no repeats


def test_compacted_recursion_equals_masked_full_sequence(build):
    model, cfg = build()
    s, b = cfg.model.seq_length, 2
    h = torch.randn(s, b, cfg.model.hidden_size)
    freqs = model.rotary_pos_emb(s)
    for sel in _chain(model, h)[1:]:
        idx = sel.indices
        compact = model._run(model.plan.block, gather_tokens(h, idx), gather_rotary(freqs, idx))
        chosen = torch.zeros(b, s, dtype=torch.bool).scatter(1, idx, True)
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        allowed = causal & chosen[:, None, :] & chosen[:, :, None]
        allowed |= torch.eye(s, dtype=torch.bool)  # unselected rows see themselves (ignored below)
        h_full = h
        for slot in model.plan.block:
            h_full, _ = model.layers[slot](h_full, attention_mask=~allowed.unsqueeze(1), rotary_pos_emb=freqs)
        torch.testing.assert_close(compact, gather_tokens(h_full, idx), rtol=1e-5, atol=1e-5)
        # Positions matter: compacting with positions 0..k-1 would give another answer.
        x = gather_tokens(h, idx)
        wrong = model._run(model.plan.block, x, freqs[: idx.shape[1]])
        assert (wrong - compact).abs().max() > 1e-4  # well above fp32 noise (~1e-7)


def _router_grad(model, ids, coeff: float) -> torch.Tensor:
    model.zero_grad()
    model.router.routing.aux_loss_coeff = coeff
    model(ids, labels=ids).mean().backward()
    return model.router.weight.grad.clone()


def test_router_gets_gradients_from_lm_loss_and_aux_loss(build):
    model, cfg = build()
    ids = torch.randint(0, 256, (2, cfg.model.seq_length))
    lm_only = _router_grad(model, ids, 0.0)
    assert torch.all(lm_only.abs().sum(1) > 0)  # every recursion's router, through the gate
    aux_1 = _router_grad(model, ids, 1.0) - lm_only
    aux_2 = _router_grad(model, ids, 2.0) - lm_only
    assert aux_1.abs().sum() > 0
    torch.testing.assert_close(aux_2, 2 * aux_1, rtol=1e-3, atol=1e-7)  # linear in the coefficient


def test_token_choice_router_gets_gradients(build):
    model, cfg = build("routing.kind=token_choice")
    ids = torch.randint(0, 256, (2, cfg.model.seq_length))
    model(ids, labels=ids).mean().backward()
    assert model.router.weight.grad.abs().sum() > 0
    depth_fracs = [float(v) for k, v in model.router_stats.items() if k.endswith("depth_frac")]
    assert sum(depth_fracs) == pytest.approx(1.0)


@pytest.mark.parametrize("overrides", [
    (), ("routing.kv_sharing=true",), ("routing.aux_router=true",), ("routing.kind=token_choice",),
])
def test_causal_rule_prefix_logits_do_not_change_when_tokens_are_appended(build, overrides):
    model, cfg = build(*overrides)
    model.eval()
    ids = torch.randint(0, 256, (2, cfg.model.seq_length))
    with torch.no_grad():
        full = model(ids, causal_routing=True)
        prefix = model(ids[:, :50], causal_routing=True)
    torch.testing.assert_close(prefix, full[:, :50], rtol=1e-5, atol=1e-5)


def test_top_k_routing_is_not_causal(build):
    model, cfg = build()
    model.eval()
    ids = torch.randint(0, 256, (2, cfg.model.seq_length))
    with torch.no_grad():
        full = model(ids, causal_routing=False)
        prefix = model(ids[:, :50], causal_routing=False)
    assert not torch.allclose(prefix, full[:, :50], atol=1e-4)


def test_causal_rule_keeps_tokens_active_only_if_active_before(build):
    model, cfg = build()
    h = torch.randn(cfg.model.seq_length, 2, cfg.model.hidden_size)
    sels = _chain(model, h, causal=True)
    assert sels[0].valid.all()  # capacity 1.0: every token takes recursion 1
    for prev, nxt in zip(sels, sels[1:]):
        for b in range(2):
            now = set(nxt.indices[b][nxt.valid[b]].tolist())
            assert now <= set(prev.indices[b][prev.valid[b]].tolist())


def test_vanilla_and_recursive_come_from_the_same_code(build):
    vanilla, _ = build("model.kind=vanilla", "model.num_recursions=1")
    recursive, _ = build("model.kind=recursive")
    assert vanilla.router is None and recursive.router is None
    assert len(vanilla.layers) == 8 and len(recursive.layers) == 4
    assert type(vanilla) is type(recursive)


def test_kv_sharing_changes_later_recursions_only(build):
    """Same weights with and without KV sharing: recursion 1 (which records the K/V) gives the same outputs, so
    recursion 2 picks the same tokens; only the tokens that reach recursion 2 or 3 end up elsewhere."""
    plain, cfg = build("model.init_method_std=0.2")
    shared, _ = build("model.init_method_std=0.2", "routing.kv_sharing=true")
    shared.load_state_dict(plain.state_dict())
    suffix = plain.plan.suffix[0]
    ids = torch.randint(0, 256, (2, cfg.model.seq_length), generator=torch.Generator().manual_seed(0))
    before_suffix, depths = {}, {}
    for name, model in (("plain", plain), ("shared", shared)):
        layer = model.layers[model.slot_index[suffix]]
        hook = layer.register_forward_pre_hook(lambda _m, args, name=name: before_suffix.__setitem__(name, args[0]))
        with torch.no_grad():
            model(ids)
        hook.remove()
        depths[name] = model.token_depths.t()  # [s, b]
    assert torch.equal(depths["plain"] >= 2, depths["shared"] >= 2)  # recursion 2's choice: recursion-1 outputs
    once = depths["plain"] == 1
    assert once.any() and (~once).any()
    diff = (before_suffix["plain"] - before_suffix["shared"]).abs().amax(-1)  # [s, b]
    assert diff[once].max() < 1e-6  # tokens that stopped after recursion 1: untouched
    assert diff[~once].max() > 1e-3  # tokens that went on attended to recursion-1 keys instead


ISOFLOP_PRESETS = ["vanilla_360m", "recursive_360m_nr2", "recursive_360m_nr3", "recursive_360m_nr4", "mor_360m_nr2",
                   "mor_360m_nr3", "mor_360m_nr4", "mor_360m_nr3_token_choice", "mor_360m_nr3_kv_sharing"]


def test_the_360m_presets_spend_the_papers_budget_under_its_accounting():
    """App. D accounting: the presets' step counts (the paper's) give 16.5e18 forward FLOPs each, within 1%."""
    from mor_dist.model.flops import budget_flops_per_token, training_budget

    budgets = {name: training_budget(load_config(f"configs/{name}.yaml")) for name in ISOFLOP_PRESETS}
    for name, budget in budgets.items():
        assert budget == pytest.approx(16.5e18, rel=0.01), name
    per_token = {name: budget_flops_per_token(load_config(f"configs/{name}.yaml")).total
                 for name in ("mor_360m_nr3", "mor_360m_nr3_kv_sharing", "vanilla_360m", "mor_360m_nr2")}
    assert per_token["mor_360m_nr3_kv_sharing"] < per_token["mor_360m_nr3"]  # later recursions project no K/V
    assert per_token["vanilla_360m"] / per_token["mor_360m_nr2"] == pytest.approx(26.46 / 19.79, rel=0.01)


def test_executed_flops_count_what_runs():
    """Executed FLOPs add the output layer and the routers to the layers as built (grouped K/V projections)."""
    from mor_dist.model.flops import budget_flops_per_token, forward_flops_per_token, layer_matmul_params

    vanilla = load_config("configs/vanilla_360m.yaml")
    m = vanilla.model
    executed, budget = forward_flops_per_token(vanilla, 49152), budget_flops_per_token(vanilla)
    assert executed.attention == budget.attention
    assert executed.matmul == 2 * (layer_matmul_params(vanilla) * m.num_layers + m.hidden_size * 49152)
    grouped = 2 * m.hidden_size * 2 * (m.hidden_size - m.num_query_groups * m.hidden_size // m.num_attention_heads)
    assert budget.matmul - (executed.matmul - 2 * m.hidden_size * 49152) == grouped * m.num_layers


@pytest.mark.parametrize("overrides", [(), ("routing.kv_sharing=true",), ("model.kind=vanilla", "model.num_recursions=1")])
def test_executed_matmul_flops_equal_torchs_count_of_the_forward(build, overrides):
    """The executed count is what runs: torch's FLOP counter over a forward gives the same linear-layer FLOPs
    (KV sharing's later recursions run no K/V projection). Token choice is counted at perfect balance."""
    from torch.utils.flop_counter import FlopCounterMode

    from mor_dist.model.flops import forward_flops_per_token

    model, cfg = build(*overrides)
    ids = torch.randint(0, 256, (2, cfg.model.seq_length), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids)
    ops = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    assert ops["aten.mm"] + ops.get("aten.addmm", 0) == forward_flops_per_token(cfg, 256).matmul * ids.numel()


def test_reusing_recursions_compute_the_same_queries_from_the_query_rows_alone(build):
    model, cfg = build("routing.kv_sharing=true")
    attention = model.layers[model.slot_index[model.plan.block[0]]].self_attention
    x = torch.randn(5, 2, cfg.model.hidden_size, generator=torch.Generator().manual_seed(0))
    full_query, full_key, _ = super(type(attention), attention).get_query_key_value_tensors(x, None)
    model.kv_state.mode = "reuse"
    try:
        query, key, value = attention.get_query_key_value_tensors(x, None)
    finally:
        model.kv_state.reset()
    torch.testing.assert_close(query, full_query)
    assert key.shape == full_key.shape and not key.any() and not value.any()  # replaced by recursion 1's


def test_the_causal_rule_thresholds_what_the_bce_calibrates_whatever_the_gate(build):
    """routing.activation=tanh gates with tanh, but the rule compares sigmoid(logit) with the threshold (the BCE
    trains sigmoid(logit) towards top-k membership); tanh(logit) >= 0.5 would pick other tokens."""
    model, cfg = build("routing.activation=tanh", "model.init_method_std=0.2")
    h = torch.randn(cfg.model.seq_length, 2, cfg.model.hidden_size)
    first, _ = model.router.select(0, h, None, causal=True)
    second, _ = model.router.select(1, h, first, causal=True)
    logits = (gather_tokens(h, first.indices) @ model.router.weight[1]).t().float()  # [b, candidates]
    expected = (torch.sigmoid(logits) >= cfg.routing.threshold) & first.valid
    chosen = torch.zeros_like(expected).scatter(1, second.indices, second.valid)
    assert torch.equal(chosen, expected)
    assert not torch.equal(expected, (torch.tanh(logits) >= cfg.routing.threshold) & first.valid)


def test_the_bce_averages_over_real_candidates_only(build):
    """After a causal recursion the candidates are padded; padding counts in neither the sum nor the mean."""
    import torch.nn.functional as F

    model, cfg = build("model.init_method_std=0.2")
    h = torch.randn(cfg.model.seq_length, 2, cfg.model.hidden_size)
    first, _ = model.router.select(0, h, None, causal=True)  # capacity 1: every token
    second, _ = model.router.select(1, h, first, causal=True)
    third, _ = model.router.select(2, h, second, causal=True)
    assert not second.valid.all()  # the causal rule leaves ragged rows
    logits = (gather_tokens(h, second.indices) @ model.router.weight[2]).t().float()
    chosen = torch.stack([torch.isin(second.indices[b], third.indices[b][third.valid[b]]) for b in range(2)]).float()
    real = second.valid
    expected = F.binary_cross_entropy_with_logits(logits[real], chosen[real])
    bce = third.stats["r3/bce_loss"] / cfg.routing.aux_loss_coeff
    assert float(bce) == pytest.approx(float(expected), rel=1e-5)
