"""`jobs/benchmark.py train`: CPU rows on the tiny config, the GPTModel baseline, docs appending; GPU runs marked."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mor_dist.bench import train as bench
from mor_dist.bench.baseline import vanilla_twin
from mor_dist.bench.report import SECTION, append_under
from mor_dist.config import REPO_ROOT, load_config
from mor_dist.model.flops import forward_flops_per_token
from mor_dist.parallel.setup import init_single_process, teardown

SMALL = ["--steps", "2", "--warmup", "1", "--rounds", "3", "train.micro_batch_size=2", "model.seq_length=64"]


def table_rows(doc: Path) -> list[list[str]]:
    """Data rows of the markdown tables in `doc`, as cells."""
    lines = [line for line in doc.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if not line.startswith("| model |")]


def check_sane(cells: list[str]) -> None:
    median, low, high = (float(x.replace(",", "")) for x in re.fullmatch(r"([\d,]+) \(([\d,]+)-([\d,]+)\)",
                                                                          cells[4]).groups())
    tflops, mfu = float(cells[5]), float(cells[6].rstrip("%")) / 100
    assert 0 < low <= median <= high and tflops > 0  # median and range of the rounds
    assert 0 < mfu <= 1


def test_train_benchmark_on_cpu_with_and_without_baseline(world, tmp_path, capsys):
    doc = tmp_path / "benchmarks.md"
    assert bench.main(SMALL + ["--baseline", "--append", str(doc)]) == 0
    out = capsys.readouterr().out
    assert "the GPU (H100) figures are missing" in out and "python jobs/benchmark.py train --steps 2" in out
    base, mor = table_rows(doc)
    assert base[1] == "megatron-core GPTModel" and mor[1] == "mor-dist MoRModel"
    for cells in (base, mor):
        check_sane(cells)
    assert re.fullmatch(r"\d+\.\d\dx \(\d+\.\d\d-\d+\.\d\d\)", mor[8]) and mor[9] == "n/a"  # CPU memory: not meaningful
    line = re.search(r"tiny_mor \(.*\) vs vanilla 8 layers \(megatron-core GPTModel\), tokens/s: (\d+\.\d\d)x "
                     r"\(median, (\d+\.\d\d)-(\d+\.\d\d) over 3 rounds\)", out)
    assert line and float(line.group(2)) <= float(line.group(1)) <= float(line.group(3))
    assert mor[8].startswith(line.group(1))  # the table and the summary line agree

    assert bench.main(SMALL + ["--append", str(doc)]) == 0
    rows = table_rows(doc)
    assert len(rows) == 3 and rows[2][1] == "mor-dist MoRModel" and rows[2][8] == "n/a"
    check_sane(rows[2])


def test_fp8_is_refused_on_cpu_by_the_benchmark(world, capsys):
    assert bench.main(SMALL + ["train.precision=fp8"]) == 2
    assert "train.precision=fp8 needs CUDA" in capsys.readouterr().err


def test_vanilla_twin_keeps_the_shape_and_runs_every_layer():
    cfg = load_config(REPO_ROOT / "configs" / "mor_360m_nr3.yaml")
    twin = vanilla_twin(cfg)
    assert (twin.model.kind, twin.model.num_recursions, twin.model.num_layers) == ("vanilla", 1, 32)
    assert (twin.model.hidden_size, twin.model.ffn_hidden_size, twin.model.seq_length) == (960, 2560, 2048)
    assert twin.train.micro_batch_size == cfg.train.micro_batch_size and cfg.model.kind == "mor"
    assert forward_flops_per_token(twin, 49152).total > forward_flops_per_token(cfg, 49152).total


def test_append_under_keeps_the_section_order(tmp_path):
    doc = tmp_path / "b.md"
    doc.write_text(f"# B\n\n{SECTION}\n\nintro\n\n## Next\n\nkept\n")
    append_under(doc, "first")
    append_under(doc, "second\n")
    text = doc.read_text()
    assert text.index("intro") < text.index("first") < text.index("second") < text.index("## Next") < text.index("kept")
    fresh = tmp_path / "new.md"
    append_under(fresh, "row")
    assert fresh.read_text().strip().endswith(f"{SECTION}\n\nrow")


def test_benchmark_modules_import_without_ray_mlflow_or_datasets():
    code = ("import sys, mor_dist.bench.train, mor_dist.bench.fp8_check, mor_dist.bench.corpus; "
            "print(sorted({'ray', 'mlflow', 'datasets'} & {m.split('.')[0] for m in sys.modules}))")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.fixture
def cuda_world():
    """The benchmark's NCCL world of one; the session's gloo world comes back afterwards."""
    yield
    teardown()
    init_single_process()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_train_benchmark_on_gpu(cuda_world, precision, tmp_path):
    doc = tmp_path / "benchmarks.md"
    argv = ["--steps", "2", "--warmup", "1", "--baseline", "--append", str(doc), f"train.precision={precision}"]
    assert bench.main(argv) == 0
    base, mor = table_rows(doc)
    for cells in (base, mor):
        check_sane(cells)
    assert float(mor[9].rstrip("x")) > 0


@pytest.mark.parametrize("mode,argv,flag", [
    ("train", ["--steps", "0"], "--steps"),
    ("train", ["--micro-batches", "-1"], "--micro-batches"),
    ("inference", ["--batch", "0"], "--batch"),
    ("inference", ["--recursions", "5"], "--recursions"),
    ("inference", ["--requests", "x"], "--requests"),
    ("inference", ["--memory-gib", "0"], "--memory-gib"),
])
def test_benchmark_refuses_impossible_numbers_naming_the_flag(mode, argv, flag, capsys):
    from mor_dist.bench import inference as inference_bench

    parse = bench.parse_args if mode == "train" else inference_bench.parse_args
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    assert f"argument {flag}:" in capsys.readouterr().err


def test_anchors_decode_like_transformers_and_print_one_line_per_anchor(world, tmp_path, capsys):
    from mor_dist.bench import anchors

    doc = tmp_path / "benchmarks.md"
    argv = ["--batch", "2", "--new-tokens", "6", "--rounds", "2", "--threads", "1", "--append", str(doc),
            "model.num_layers=4"]
    contenders, cfg = anchors.run(anchors.parse_args(argv))
    ours, static, dynamic = contenders
    assert cfg.model.kind == "vanilla" and all(len(c.speeds) == 2 and min(c.speeds) > 0 for c in contenders)
    assert [len(row) for row in ours.outputs] == [6, 6]
    assert ours.outputs[0][:2] == static.outputs[0][:2] == dynamic.outputs[0][:2]  # same weights, same greedy start
    assert anchors.main(argv) == 0
    out = capsys.readouterr().out
    for cache in ("static", "dynamic"):
        assert re.search(rf"mor-dist engine vs transformers generate \({cache} cache\), tokens/s: \d+\.\d\dx "
                         r"\(median, \d+\.\d\d-\d+\.\d\d over 2 rounds\)", out), cache
    assert "| transformers generate (static cache) | 4 x 64 | 2 x 6 |" in doc.read_text()


def test_scaling_curves_measure_every_model_at_every_length(world, tmp_path):
    from mor_dist.bench import scaling

    argv = ["--sequences", "32", "64", "--recursions", "2", "--width", "32", "--tokens-per-step", "128", "--rounds",
            "1", "--no-memory", "--json", str(tmp_path / "curves.json"), "--plot", str(tmp_path / "curves.png")]
    assert scaling.main(argv) == 0
    records = json.loads((tmp_path / "curves.json").read_text())["records"]
    assert {(r["model"], r["seq_length"]) for r in records} == {
        (m, s) for m in ("vanilla", "recursive-2", "mor-2") for s in (32, 64)}
    by = {(r["model"], r["seq_length"]): r for r in records}
    assert by[("vanilla", 64)]["speed_vs_vanilla"] == 1.0 and by[("vanilla", 32)]["micro_batch"] == 4
    assert by[("mor-2", 64)]["predicted_speed_vs_vanilla"] > 1.0  # MoR executes fewer FLOPs than its vanilla depth
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    args = scaling.parse_args(["--width", "32", "--tokens-per-step", "512"])  # what each child process measures
    small, large = scaling.child_peak(args, "mor-2", 64), scaling.child_peak(args, "vanilla", 256)
    assert 0 < small < large  # four times the activations (and a deeper model)


def test_inference_curves_measure_mor_and_vanilla_at_every_point(tmp_path, capsys):
    from mor_dist.bench import inference_curves

    argv = ["--recursions", "2", "--batches", "2", "4", "--mean-lens", "4", "12", "--mean-len", "6", "--at-batch", "2",
            "--waves", "2", "--repeats", "1", "model.num_layers=8", "--json", str(tmp_path / "c.json"),
            "--plot", str(tmp_path / "c.png")]
    assert inference_curves.main(argv) == 0
    records = json.loads((tmp_path / "c.json").read_text())["records"]
    assert {(r["curve"], r["batch"], r["mean_len"], r["model"]) for r in records} == {
        (curve, b, m, model) for curve, b, m in (("batch", 2, 6), ("batch", 4, 6), ("length", 2, 4), ("length", 2, 12))
        for model in ("vanilla-8", "MoR-2")}
    mor = {(r["curve"], r["batch"], r["mean_len"]): r for r in records if r["model"] == "MoR-2"}
    assert mor[("length", 2, 12)]["kv_bytes_per_sequence"] > mor[("length", 2, 4)]["kv_bytes_per_sequence"]
    # 8 layers: 2 outside the shared block, 3 block layers x 2 recursions holding (2+1)/(2*2) of vanilla's KV
    assert mor[("batch", 2, 6)]["paper_kv_vs_vanilla"] == pytest.approx((2 + 6 * 0.75) / 8)
    assert all(0 < r["kv_vs_vanilla"] < 1 and 1 < r["mean_depth"] < 2 for r in mor.values())
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert "| length | 2 | 12 | MoR-2 |" in capsys.readouterr().out
