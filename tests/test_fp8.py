"""FP8 and the TE path: refusals, token rounding and padding, recomputation (CPU); recipes and training (GPU)."""

from __future__ import annotations

import pytest
import torch

from mor_dist.config import load_config
from mor_dist.errors import ConfigError
from mor_dist.model import mor as mor_module
from mor_dist.model.layers import FP8_MULTIPLE, fp8_pad_rows, fp8_unsupported, te_available, token_multiple, \
    transformer_config
from mor_dist.model.routing import capacity_tokens
from mor_dist.parallel.setup import init_single_process, teardown

needs_te = pytest.mark.skipif(not te_available(), reason="needs CUDA and transformer-engine")


def loss_and_grads(model, vocab: int = 256, batch: int = 3) -> tuple[float, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids, labels = (torch.randint(0, vocab, (batch, model.cfg.model.seq_length), generator=gen) for _ in range(2))
    loss = model(ids, labels=labels).mean()
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


# ---------------------------------------------------------------- CPU


def test_fp8_is_refused_on_cpu_naming_train_precision(world):
    cfg = load_config(None, ["train.precision=fp8"])
    with pytest.raises(ConfigError, match="train.precision=fp8 needs CUDA and transformer-engine"):
        transformer_config(cfg, on_cuda=False)


def test_delayed_scaling_is_refused_where_a_layer_runs_more_than_once(world):
    for kind in ("mor", "recursive"):
        cfg = load_config(None, [f"model.kind={kind}", "train.precision=fp8", "train.fp8_recipe=delayed"])
        with pytest.raises(ConfigError, match="train.fp8_recipe=delayed .*use train.fp8_recipe=tensorwise"):
            transformer_config(cfg, on_cuda=True)
    vanilla = load_config(None, ["model.kind=vanilla", "model.num_recursions=1", "train.precision=fp8",
                                 "train.fp8_recipe=delayed"])
    with pytest.raises(ConfigError, match="train.precision"):  # allowed for vanilla; only the device is missing here
        transformer_config(vanilla, on_cuda=False)


def test_fp8_needs_gemm_friendly_shapes(world):
    cfg = load_config(None, ["train.precision=fp8", "model.seq_length=100"])
    with pytest.raises(ConfigError, match="model.seq_length divisible by 16"):
        transformer_config(cfg, on_cuda=True)


def test_fp8_device_rules():
    assert "8.9" in fp8_unsupported("tensorwise", (8, 0), "12.4")
    assert fp8_unsupported("tensorwise", (8, 9), "12.4") is None
    assert fp8_unsupported("delayed", (9, 0), "13.0") is None
    assert "blockwise" in fp8_unsupported("blockwise", (8, 9), "13.0")
    assert "12.9" in fp8_unsupported("blockwise", (9, 0), "12.8")
    assert fp8_unsupported("blockwise", (9, 0), "13.0") is None


def test_fp8_and_sequence_parallel_pad_selections_with_masked_rows():
    assert token_multiple(load_config(None, ["train.precision=fp8"])) == FP8_MULTIPLE
    assert token_multiple(load_config(None, ["parallel.tp=2", "parallel.sequence_parallel=true"])) == 2
    assert token_multiple(load_config(None, [])) == 1


@pytest.mark.parametrize("overrides", [[], ["routing.kind=token_choice"]])
def test_padded_selections_select_the_same_tokens_and_give_the_same_model(build, overrides):
    """With selections padded to 16 rows (as FP8 needs), every recursion still takes exactly k_r = floor(c_r L)
    tokens (top-k) and the model's outputs do not change: the padding is masked, not extra tokens."""
    model, cfg = build("model.init_method_std=0.2", *overrides)
    ids = torch.randint(0, 256, (3, cfg.model.seq_length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids, labels=ids)
        depths = model.token_depths.clone()
        model.token_multiple = FP8_MULTIPLE
        if model.router is not None and hasattr(model.router, "token_multiple"):
            model.router.token_multiple = FP8_MULTIPLE
        padded = model(ids, labels=ids)
    torch.testing.assert_close(padded, reference, rtol=0, atol=1e-6)
    assert torch.equal(model.token_depths, depths)
    if not overrides:  # expert-choice: the selections themselves
        h = torch.randn(cfg.model.seq_length, 3, cfg.model.hidden_size)
        prev = None
        for r, c in enumerate(cfg.capacities):
            prev, _ = model.router.select(r, h, prev, causal=False)
            rows, k = prev.indices.shape[1], capacity_tokens(c, cfg.model.seq_length)
            assert rows % FP8_MULTIPLE == 0 or rows == cfg.model.seq_length
            assert (prev.valid.sum(1).tolist() if prev.valid is not None else [rows] * 3) == [k] * 3


def test_fp8_pad_rows_make_token_counts_gemm_friendly(world):
    cfg = load_config(None, [])
    config = transformer_config(cfg, on_cuda=False)
    assert fp8_pad_rows(config, 85, 3) == 0  # no FP8, no padding
    config.fp8 = "hybrid"
    for rows in range(1, 70):
        for batch in (1, 2, 3, 4, 8, 12):
            pad = fp8_pad_rows(config, rows, batch)
            assert (rows + pad) * batch % FP8_MULTIPLE == 0 and 0 <= pad < FP8_MULTIPLE


@pytest.mark.parametrize("overrides", [["routing.kind=token_choice"], ["routing.kv_sharing=true"]])
def test_fp8_padding_of_ragged_selections_leaves_real_tokens_unchanged(build, monkeypatch, overrides):
    """Token-choice and the capacity rounding-free path give ragged counts; padded rows must not leak."""
    reference, _ = build(*overrides)
    loss, grads = loss_and_grads(reference)
    padded, _ = build(*overrides)
    padded.config.fp8 = "hybrid"  # without TE, megatron's FP8 contexts are no-ops: only the padding changes
    pads: list[int] = []
    spy = mor_module.fp8_pad_rows
    monkeypatch.setattr(mor_module, "fp8_pad_rows", lambda *a: pads.append(spy(*a)) or pads[-1])
    loss_padded, grads_padded = loss_and_grads(padded)
    assert any(pads)
    assert loss_padded == pytest.approx(loss, rel=1e-6)
    torch.testing.assert_close(grads_padded, grads, rtol=1e-5, atol=1e-6)


def test_fp8_padding_under_the_causal_rule(build):
    model, _ = build("routing.inference_rule=threshold")
    model.eval()
    ids = torch.randint(0, 256, (3, 128), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids)
        model.config.fp8 = "hybrid"
        torch.testing.assert_close(model(ids), logits)


def test_full_recomputation_gives_the_same_loss_and_grads(build):
    loss, grads = loss_and_grads(build()[0])
    loss_r, grads_r = loss_and_grads(build("train.recompute=full")[0])
    assert loss_r == pytest.approx(loss, rel=1e-6)
    torch.testing.assert_close(grads_r, grads)


def test_recomputation_refusals(world):
    with pytest.raises(ConfigError, match="train.recompute=selective"):
        transformer_config(load_config(None, ["train.recompute=selective"]), on_cuda=False)
    with pytest.raises(ConfigError, match="routing.kv_sharing"):
        transformer_config(load_config(None, ["train.recompute=full", "routing.kv_sharing=true"]), on_cuda=False)


def test_curve_gap_compares_moving_averages():
    from mor_dist.bench.fp8_check import curve_gap

    curve = [10.0 - 0.02 * i for i in range(200)]
    assert curve_gap(curve, curve) == 0.0
    assert curve_gap(curve, [x * 1.03 for x in curve]) == pytest.approx(0.03)
    spiky = list(curve)
    spiky[50] *= 1.1  # one noisy step moves a 10-step mean by a tenth of it
    assert curve_gap(curve, spiky) == pytest.approx(0.01, rel=0.02)


# ---------------------------------------------------------------- GPU (CUDA + transformer-engine)


@pytest.fixture
def cuda_world():
    """An NCCL world of one on the GPU; the session's gloo world comes back afterwards."""
    from mor_dist.bench.harness import init_world

    init_world(True)
    yield
    teardown()
    init_single_process()


def skip_unless_supported(recipe: str) -> None:
    reason = fp8_unsupported(recipe, torch.cuda.get_device_capability(), torch.version.cuda)
    if reason:
        pytest.skip(reason)


@pytest.mark.gpu
@needs_te
@pytest.mark.parametrize("recipe", ["tensorwise", "blockwise", "delayed"])
def test_one_te_layer_looped_three_times_in_one_autocast(cuda_world, recipe):
    """One TE layer on shrinking token sets, 3 calls inside one FP8 region, vs bf16 (delayed scaling was once
    documented to forbid calling a module twice in a region)."""
    from megatron.core.fp8_utils import get_fp8_context
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.spec_utils import build_module

    from mor_dist.model.layers import layer_spec
    from mor_dist.parallel.setup import init_model_parallel

    skip_unless_supported(recipe)
    cfg = load_config(None, ["model.kind=vanilla", "model.num_recursions=1", "model.num_layers=1",
                             "model.hidden_size=256", "model.ffn_hidden_size=512", "train.precision=fp8",
                             f"train.fp8_recipe={recipe}"])
    init_model_parallel(cfg.parallel, cfg.train.seed)
    config = transformer_config(cfg, on_cuda=True)
    layer = build_module(layer_spec(cfg, True), config=config, layer_number=1, vp_stage=0).cuda()
    freqs = RotaryEmbedding(kv_channels=64, rotary_percent=1.0, use_cpu_initialization=True)(128).cuda()
    h = torch.randn(128, 2, 256, device="cuda", dtype=torch.bfloat16)

    def loop() -> list[tuple[torch.Tensor, torch.Tensor]]:
        x, calls = h, []
        for k in (128, 96, 48):  # the recursion's shrinking token sets (multiples of 16)
            y = layer(x[:k], attention_mask=None, rotary_pos_emb=freqs[:k])[0]
            calls.append((x[:k], y))
            x = y
        return calls

    with torch.no_grad():
        reference = loop()
        for _ in range(2):  # the second region runs on scales calibrated by the first (delayed scaling)
            with get_fp8_context(config):
                calls = loop()
    for (x_ref, y_ref), (x, y) in zip(reference, calls):
        update_ref, update = (y_ref - x_ref).float(), (y - x).float()
        assert torch.isfinite(update).all()
        assert (update - update_ref).norm() / update_ref.norm() < 0.15
    with get_fp8_context(config):
        out = loop()[-1][1]
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


def train_tiny(*overrides: str, steps: int):
    from mor_dist.bench.harness import synthetic_batches
    from mor_dist.train.step import train_step
    from mor_dist.train.trainable import Trainable

    cfg = load_config(None, ["train.micro_batch_size=4", "train.global_batch_size=4", f"train.steps={steps}",
                             "train.warmup_steps=2", *overrides])
    run = Trainable.build(cfg, 512, on_cuda=True)
    batches = synthetic_batches(cfg, 512, torch.device("cuda"), count=1)  # one batch: the loss must fall
    return [train_step(run, batches)["lm_loss"] for _ in range(steps)], run.model


@pytest.mark.gpu
@needs_te
@pytest.mark.parametrize("overrides", [
    ["train.fp8_recipe=tensorwise"],
    ["train.fp8_recipe=blockwise"],
    ["routing.kind=token_choice"],  # ragged selections: padded to FP8 shapes
    ["routing.kv_sharing=true"],  # megatron's local core attention inside the TE layers
    ["train.recompute=full"],  # TE's checkpoint around per-call FP8 regions
    ["model.kind=vanilla", "model.num_recursions=1", "train.fp8_recipe=delayed"],
])
def test_fp8_tiny_model_trains_with_finite_fp8_state(cuda_world, overrides):
    from mor_dist.bench.fp8_check import fp8_state

    if "train.fp8_recipe=blockwise" in overrides:
        skip_unless_supported("blockwise")
    losses, model = train_tiny("train.precision=fp8", *overrides, steps=20)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    state = fp8_state(model)
    assert state and all(torch.isfinite(t).all() for t in state.values())


@pytest.mark.gpu
@needs_te
def test_fp8_and_bf16_loss_curves_agree_on_the_shipped_corpus(cuda_world):
    """Acceptance: tiny MoR-3, first 200 steps, 10-step means within 2%, shared-block FP8 state finite."""
    from mor_dist.bench.fp8_check import check
    from mor_dist.config import DEFAULT_CONFIG

    result = check(DEFAULT_CONFIG, steps=200, micro_batch=8, overrides=[])
    assert result.state_tensors > 0 and result.state_finite
    assert result.gap <= 0.02, result
