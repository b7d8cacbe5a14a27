"""FP8 against bf16 on the shipped corpus: the same model, data order and seed trained twice.

`python -m mor_dist.bench.fp8_check --config configs/mor_360m_nr3.yaml --steps 200 [--append docs/benchmarks.md]`
passes when the two loss curves' moving averages stay within the tolerance of each other and the
shared block's FP8 state (delayed scaling's scales and amax history; every TE weight's FP8 image)
is finite. Needs CUDA and transformer-engine.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from mor_dist.cmdline import positive_float, positive_int
from mor_dist.cmdline import command
from mor_dist.bench import corpus
from mor_dist.bench.harness import corpus_batches, init_world
from mor_dist.bench.report import append_under, block, environment
from mor_dist.config import DEFAULT_CONFIG, JobConfig, load_config
from mor_dist.model.mor import MoRModel
from mor_dist.train.step import train_step
from mor_dist.train.trainable import Trainable


def check_config(path: Path, steps: int, micro_batch: int, precision: str, overrides: list[str]) -> JobConfig:
    """The config trained for `steps` steps of one micro-batch (warm-up a tenth), at this precision."""
    return load_config(path, overrides + [f"train.precision={precision}", f"train.steps={steps}",
                                          f"train.warmup_steps={steps // 10}", f"train.micro_batch_size={micro_batch}",
                                          f"train.global_batch_size={micro_batch}", "tracking.enabled=false"])


def train_curve(cfg: JobConfig, steps: int) -> tuple[list[float], MoRModel]:
    """LM loss at every step on the shipped corpus (fixed order), and the trained model."""
    rows, vocab = corpus.load(cfg.model.seq_length)
    run = Trainable.build(cfg, vocab, on_cuda=True)
    batches = corpus_batches(rows, cfg.train.micro_batch_size, cfg.train.seed, torch.device("cuda"))
    return [train_step(run, batches)["lm_loss"] for _ in range(steps)], run.model


def curve_gap(reference: list[float], other: list[float], window: int = 10) -> float:
    """Largest relative gap between the two curves' trailing moving averages over `window` steps."""
    ref, oth = torch.tensor(reference, dtype=torch.float64), torch.tensor(other, dtype=torch.float64)
    kernel = torch.ones(1, 1, min(window, len(ref)), dtype=torch.float64) / min(window, len(ref))
    smooth = lambda x: torch.nn.functional.conv1d(x.view(1, 1, -1), kernel).view(-1)  # noqa: E731
    return float(((smooth(oth) - smooth(ref)).abs() / smooth(ref).abs()).max())


def fp8_state(model: MoRModel) -> dict[str, torch.Tensor]:
    """The shared block's TE FP8 state: delayed scaling's scales and amax history, else each weight's FP8 image."""
    out: dict[str, torch.Tensor] = {}
    for slot in dict.fromkeys(model.plan.block):
        for name, module in model.layers[model.slot_index[slot]].named_modules(prefix=f"layers.{slot}"):
            meta = getattr(module, "fp8_meta", None)
            if not isinstance(meta, dict):
                continue
            persistent = {f"{name}.{key}.{attr}": getattr(meta.get(key), attr)
                          for key in ("scaling_fwd", "scaling_bwd") for attr in ("scale", "amax_history")
                          if isinstance(getattr(meta.get(key), attr, None), torch.Tensor)}
            out.update(persistent)
            quantizers = getattr(module, "quantizers", {}).get("scaling_fwd") or []
            weight = getattr(module, "weight", None)
            if not persistent and len(quantizers) > 1 and isinstance(weight, torch.Tensor):
                out[f"{name}.weight_fp8"] = quantizers[1].quantize(weight.detach()).dequantize()  # TE's weight slot
    return out


@dataclass(frozen=True)
class CurveCheck:
    """FP8 against bf16 for one config."""

    name: str
    recipe: str
    steps: int
    bf16_final: float
    fp8_final: float
    gap: float
    state_tensors: int
    state_finite: bool

    def passed(self, tolerance: float) -> bool:
        return self.gap <= tolerance and self.state_tensors > 0 and self.state_finite

    def markdown(self, tolerance: float) -> str:
        verdict = "pass" if self.passed(tolerance) else "FAIL"
        return (f"| {self.name} | fp8-{self.recipe} | {self.steps} | {self.bf16_final:.4f} | {self.fp8_final:.4f} "
                f"| {self.gap:.2%} | {self.state_tensors}, {'finite' if self.state_finite else 'NOT finite'} "
                f"| {verdict} |")


HEADER = ("| config | FP8 recipe | steps | bf16 final loss | FP8 final loss | max gap (10-step means) "
          "| shared-block FP8 state | within tolerance |\n|---|---|---|---|---|---|---|---|")


def check(path: Path, steps: int, micro_batch: int, overrides: list[str]) -> CurveCheck:
    """Train bf16 then FP8 from the same seed on the same rows; compare curves and FP8 state."""
    init_world(True)
    bf16, _ = train_curve(check_config(path, steps, micro_batch, "bf16", overrides), steps)
    cfg = check_config(path, steps, micro_batch, "fp8", overrides)
    fp8, model = train_curve(cfg, steps)
    state = fp8_state(model)
    finite = all(bool(torch.isfinite(t).all()) for t in state.values())
    return CurveCheck(path.stem, cfg.train.fp8_recipe, steps, bf16[-1], fp8[-1], curve_gap(bf16, fp8), len(state),
                      finite)


@command
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m mor_dist.bench.fp8_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, action="append", default=None, help="run config, repeatable")
    p.add_argument("--steps", type=positive_int, default=200)
    p.add_argument("--micro-batch", type=positive_int, default=4, help="sequences per step (one micro-batch)")
    p.add_argument("--tolerance", type=positive_float, default=0.02, help="largest relative gap allowed")
    p.add_argument("--append", type=Path, default=None, help="append the results under the training section here")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.fp8_recipe=blockwise")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: the FP8 check needs CUDA and transformer-engine (train.precision=fp8)", file=sys.stderr)
        return 2
    results = [check(path, args.steps, args.micro_batch, args.overrides) for path in args.config or [DEFAULT_CONFIG]]
    line = "python -m mor_dist.bench.fp8_check " + " ".join(shlex.quote(a) for a in argv)
    rows = "\n".join([HEADER] + [r.markdown(args.tolerance) for r in results])
    notes = [f"Shipped corpus, {args.micro_batch} sequences per step, same seed and data order for both runs; the gap "
             "is the largest relative difference between the curves' 10-step moving averages."]
    text = block("FP8 against bf16 loss curves", environment(True), line, rows, notes)
    print(text)
    if args.append:
        append_under(args.append, text)
    return 0 if all(r.passed(args.tolerance) for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
