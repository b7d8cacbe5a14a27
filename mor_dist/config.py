"""Typed run config: model, routing, parallel, data, train, tracking, run; YAML plus dotted overrides."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from mor_dist.errors import ConfigError
from mor_dist.layout import Layout, derive_layout, padded_vocab_size
from mor_dist.location import check_uri

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "tiny_mor.yaml"


@dataclass
class ModelConfig:
    """Transformer shape and the recursion layout."""

    kind: Literal["vanilla", "recursive", "mor"] = "mor"
    num_layers: int = 8  # effective (unrolled) depth, the paper's L
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 2
    ffn_hidden_size: int = 192
    seq_length: int = 128
    vocab_size: Optional[int] = None  # None: the tokenizer's size, padded to a multiple of 1024 (tp up to 8)
    num_recursions: int = 3
    sharing: Literal["cycle", "sequence", "middle_cycle", "middle_sequence"] = "middle_cycle"
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    tie_embeddings: bool = True
    init_from: Optional[str] = None  # a Hugging Face Llama (folder, .gguf, hub name, package:NAME/FILE): its shape
    init_strategy: Literal["stepwise", "lower", "upper", "average", "random"] = "stepwise"  # source layer -> slot


@dataclass
class RoutingConfig:
    """Router of a MoR model (ignored by vanilla and recursive models)."""

    kind: Literal["expert_choice", "token_choice"] = "expert_choice"
    capacities: Optional[list[float]] = None  # None: c_r = (N_r - r + 1) / N_r
    alpha: Optional[float] = None  # gate scale; None: 0.1 expert-choice, 1.0 token-choice
    activation: Optional[Literal["sigmoid", "softmax", "tanh"]] = None  # None: sigmoid / softmax
    gating: Literal["weighted", "identity"] = "weighted"
    aux_loss_coeff: float = 0.001  # expert-choice BCE
    z_loss_coeff: float = 0.0  # 0 disables router z-loss
    aux_router: bool = False  # expert-choice: extra router on detached input, used at inference
    balance_loss_coeff: float = 0.1  # token-choice
    loss_free_balancing: bool = False  # token-choice: bias update instead of balancing loss
    bias_update_rate: float = 0.001
    kv_sharing: bool = False  # recursion-1 keys/values reused by later recursions
    inference_rule: Literal["topk", "threshold"] = "topk"  # threshold: causal rule
    threshold: float = 0.5  # on sigmoid(logit), the point the BCE aux loss trains towards


@dataclass
class ParallelConfig:
    """megatron-core parallel layout; workers = tp * pp * dp."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    use_gpu: Literal["auto", "true", "false"] = "auto"
    oversubscribe: bool = False  # a local cluster may start more workers than the machine has cores


@dataclass
class MixtureEntry:
    """One source of a data mixture; the keys left unset take the data section's."""

    dataset: str  # like data.dataset
    weight: float  # relative: the weights are normalised into the chance of drawing a document from this source
    text_column: Optional[str] = None
    dataset_config: Optional[str] = None
    split: Optional[str] = None


@dataclass
class DataConfig:
    """Corpus and tokenizer."""

    dataset: str = "bundled"  # "bundled", a local file/dir (txt, jsonl, parquet) or a hub name
    mixture: Optional[list[MixtureEntry]] = None  # weighted sources instead of data.dataset (docs/data.md, Mixtures)
    dataset_config: Optional[str] = None  # hub datasets: the configuration (subset) name
    split: str = "train"  # hub datasets: the split to train on (local files are one "train" split)
    tokenizer: str = "bundled"  # "bundled" (GPT-2), "smollm2", a local directory, a hub name, a model file
    text_column: str = "text"
    validation_fraction: float = 0.05
    streaming: bool = False
    # Streams: documents shuffled in a buffer of this many, reshuffled each epoch; 0 keeps stream order. A
    # resumed stream refills the buffer (datasets does not save it), so only 0 resumes bit-identically.
    shuffle_buffer: int = 0
    num_proc: int = 1  # processes tokenizing on the driver (datasets' map)


@dataclass
class TrainConfig:
    """Optimisation and loop settings."""

    steps: int = 60
    micro_batch_size: int = 8
    global_batch_size: int = 8
    lr: float = 3e-3
    min_lr: float = 0.0
    warmup_steps: int = 6
    decay_fraction: float = 0.2  # warmup-stable-decay: linear cool-down over the last fraction
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 1.0
    precision: Literal["fp32", "bf16", "fp8"] = "fp32"
    fp8_recipe: Literal["tensorwise", "blockwise", "delayed"] = "tensorwise"  # delayed: model.kind=vanilla only
    recompute: Literal["none", "selective", "full"] = "none"  # activation recomputation (megatron's granularity)
    fused_kernels: bool = True  # CUDA + TE: fused RoPE (unrouted models) and TE's fused cross-entropy
    seed: int = 1234
    log_interval: int = 5
    eval_interval: int = 0  # 0: only at the end; -1: never
    eval_batches: int = 4
    checkpoint_interval: int = 0  # 0: only at the end; -1: never


@dataclass
class TrackingConfig:
    """MLflow."""

    uri: Optional[str] = None  # None: MLFLOW_TRACKING_URI, else sqlite under run.storage_path
    experiment: str = "mor-dist"
    enabled: bool = True
    system_metrics_interval: float = 10.0  # seconds between samples of each node's CPU/GPU/memory; 0: off


@dataclass
class RunSettings:
    """Where outputs go and how failures are handled."""

    name: Optional[str] = None  # None: derived from the config file name
    storage_path: str = "runs"
    max_failures: int = 0
    keep_checkpoints: int = 3  # the newest N checkpoints are kept


@dataclass
class JobConfig:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunSettings = field(default_factory=RunSettings)

    @property
    def world_size(self) -> int:
        return self.parallel.tp * self.parallel.pp * self.parallel.dp

    @property
    def capacities(self) -> list[float]:
        """Per-recursion capacity c_r (all 1.0 when there is no router)."""
        n = self.model.num_recursions
        if self.model.kind != "mor":
            return [1.0] * n
        if self.routing.capacities is not None:
            return list(self.routing.capacities)
        return [(n - r) / n for r in range(n)]

    @property
    def layout(self) -> Layout:
        """The layer plan, pipeline chunks and derived counts of this config (pure; cheap to recompute)."""
        m, p, t = self.model, self.parallel, self.train
        return derive_layout(m.kind, m.sharing, m.num_layers, m.num_recursions, m.seq_length, m.hidden_size, p.tp,
                             p.pp, p.dp, p.sequence_parallel, t.micro_batch_size, t.global_batch_size,
                             self.routing.kv_sharing)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- loading


def _did_you_mean(given: str, choices: list[str], prefix: str = "") -> str:
    """' (did you mean X?)' for the closest choice (difflib), or nothing when none is close."""
    close = difflib.get_close_matches(given, choices, n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check (and lightly coerce) one value against its dataclass annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        if isinstance(value, bool) and all(isinstance(a, str) for a in args):
            value = str(value).lower()
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not allowed{_did_you_mean(str(value), [str(a) for a in args])}; "
                              f"choose one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping of {annotation.__name__} fields "
                              f"{[f.name for f in dataclasses.fields(annotation)]}, got {value!r}")
        return _build(annotation, value, f"{key}.")
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str) and SCIENTIFIC.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 (PyYAML) reads 1e-4 and 3e18, without a dot, as strings
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Instantiate a config dataclass from a dict, rejecting unknown keys by name."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{dotted}'{_did_you_mean(key, names, prefix)}; valid keys under "
                              f"'{prefix or '.'}' are {names}")
        kwargs[key] = _coerce(value, hints[key], dotted)
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in kwargs]
    if missing:
        raise ConfigError(f"'{prefix.rstrip('.')}' lacks {missing}; it needs {required} (optional: "
                          f"{[name for name in names if name not in required]})")
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, raw: str) -> None:
    """Apply one `a.b=value` override to a nested dict (value parsed as YAML)."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge two config trees (top wins)."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML would silently keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"key '{key}' appears twice in one section (line {key_node.start_mark.line + 1}); "
                                  "keep one")
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    """One config file as a mapping, with errors that name the file and the fix."""
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.yaml"))
        raise ConfigError(f"--config {path} is a directory; give one YAML file"
                          + (f", e.g. {path / found[0]}" if found else ""))
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; presets are in {REPO_ROOT / 'configs'}")
    try:
        tree = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not a text file ({err.reason} at byte {err.start}); give a YAML "
                          "file") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    except ConfigError as err:
        raise ConfigError(f"config file {path}: {err}") from err
    if tree is None:
        raise ConfigError(f"config file {path} is empty; give at least one section (e.g. `inherit: tiny_mor.yaml`), "
                          "or leave out --config for the defaults")
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return tree


def _read_tree(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    """Read one YAML file, resolving its optional `inherit: other.yaml` (relative to the file)."""
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} inherits itself through {[str(p) for p in seen]}")
    tree = _read_yaml(path)
    parent = tree.pop("inherit", None)
    if parent is None:
        return tree
    if not isinstance(parent, str):
        raise ConfigError(f"config file {path}: inherit must name one YAML file (relative to it), got {parent!r}; "
                          "chain files by letting the parent inherit in turn")
    return _merge(_read_tree(path.parent / parent, seen + (path.resolve(),)), tree)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Load YAML (default: configs/tiny_mor.yaml), apply `key.sub=value` overrides, validate."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    tree = _read_tree(path, seen=())
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), raw.strip())
    _apply_source(tree)
    cfg = _build(JobConfig, tree, "")
    if cfg.run.name is None:
        cfg.run.name = path.stem
    validate(cfg)
    return cfg


def _source_depth(model: dict[str, Any], source_layers: int) -> int:
    """The deepest effective depth <= the source's that the model's sharing layout divides."""
    kind = model.get("kind", ModelConfig.kind)
    n = model.get("num_recursions", ModelConfig.num_recursions)
    if kind == "vanilla" or not isinstance(n, int) or n < 2:
        return source_layers
    middle = 2 if str(model.get("sharing", ModelConfig.sharing)).startswith("middle_") else 0
    return middle + (source_layers - middle) // n * n


def _apply_source(tree: dict[str, Any]) -> None:
    """model.init_from fixes the shape: fill the keys it sets and refuse the ones that contradict it."""
    model = tree.get("model") if isinstance(tree.get("model"), dict) else {}
    spec = model.get("init_from")
    if not spec:
        return
    from mor_dist.pretrained.source import source_shape

    shape = source_shape(str(spec))
    for key, value in shape.values.items():
        given = model.get(key)
        same = given == value or (isinstance(value, float) and isinstance(given, (int, float))
                                  and abs(given - value) <= 1e-6 * abs(value))
        if given is not None and not same:
            raise ConfigError(f"model.{key}={given!r} contradicts model.init_from={spec!r}, whose {key} is {value!r}; "
                              f"remove model.{key} (the source sets it)")
        model[key] = value
    depth = model.get("num_layers")
    kind = model.get("kind", ModelConfig.kind)
    if depth is None:
        model["num_layers"] = _source_depth(model, shape.num_layers)
    elif isinstance(depth, int) and (depth > shape.num_layers or (kind == "vanilla" and depth != shape.num_layers)):
        raise ConfigError(f"model.num_layers={depth} does not fit model.init_from={spec!r}, which has "
                          f"{shape.num_layers} layers: a vanilla model takes them all, a recursive one at most that "
                          "many (fewer are subsampled evenly); remove model.num_layers to use the deepest that fits")
    vocab = model.get("vocab_size")
    if vocab is None:
        model["vocab_size"] = padded_vocab_size(shape.vocab_size)
    elif isinstance(vocab, int) and vocab < shape.vocab_size:
        raise ConfigError(f"model.vocab_size={vocab} is smaller than model.init_from={spec!r}'s {shape.vocab_size} "
                          "embedding rows; remove model.vocab_size")
    data = tree.setdefault("data", {})
    if isinstance(data, dict):
        data.setdefault("tokenizer", str(spec))


# ---------------------------------------------------------------- validation


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _validate_storage(storage_path: str) -> None:
    """A directory, or a URI of an object store pyarrow.fs opens (as Ray Train does)."""
    try:
        check_uri(storage_path)
    except ConfigError as err:
        raise ConfigError(f"run.storage_path={err}") from None


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=@,-]{0,199}")


def _validate_run_name(name: Optional[str]) -> None:
    """A run name is one directory under run.storage_path, and an MLflow run name."""
    _require(name is not None and RUN_NAME.fullmatch(name) is not None,
             f"run.name={name!r} must be 1-200 characters of letters, digits and . _ - + = @ , starting with a letter "
             "or digit (it names a directory under run.storage_path), e.g. run.name=my_run")


def _validate_dataset(spec: str, key: str) -> None:
    """A dataset name that could name a file, directory or hub dataset."""
    _require(spec != "", f"{key} is empty; give 'bundled', a local file or directory, or a hub name")
    _require(all(len(part) <= 255 for part in Path(spec).parts),
             f"{key}={spec[:40]!r}... has a part longer than 255 characters, which no file or hub dataset name can "
             "have; check the value")


def _validate_mixture(data: DataConfig) -> None:
    """data.mixture: two or more entries with finite weights > 0, and data.dataset left at its default."""
    if data.mixture is None:
        return
    _require(data.dataset == DataConfig.dataset,
             f"data.dataset={data.dataset!r} and data.mixture are both set, so which data to train on is ambiguous; "
             f"add {{dataset: {data.dataset}, weight: ...}} to data.mixture and leave data.dataset unset (or "
             f"data.dataset={DataConfig.dataset}, its default), or remove data.mixture")
    _require(len(data.mixture) >= 2, f"data.mixture lists {len(data.mixture)} source(s); a mixture needs at least "
             "two (for one source set data.dataset instead)")
    for i, entry in enumerate(data.mixture):
        _validate_dataset(entry.dataset, f"data.mixture[{i}].dataset")
        _require(math.isfinite(entry.weight) and entry.weight > 0,
                 f"data.mixture[{i}].weight must be a finite number > 0 (weights are relative), got {entry.weight}")


def validate(cfg: JobConfig) -> None:
    """Reject impossible combinations before anything expensive starts."""
    m, r, p, t = cfg.model, cfg.routing, cfg.parallel, cfg.train
    for key in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                "ffn_hidden_size", "seq_length", "num_recursions"):
        _require(getattr(m, key) >= 1, f"model.{key} must be >= 1, got {getattr(m, key)}")
    _require(m.hidden_size % m.num_attention_heads == 0,
             f"model.hidden_size={m.hidden_size} must be divisible by model.num_attention_heads={m.num_attention_heads}")
    _require(m.num_attention_heads % m.num_query_groups == 0,
             f"model.num_attention_heads={m.num_attention_heads} must be divisible by "
             f"model.num_query_groups={m.num_query_groups}")
    if m.kind == "vanilla":
        _require(m.num_recursions == 1, f"model.kind=vanilla needs model.num_recursions=1, got {m.num_recursions}")
        _require(not r.kv_sharing, "routing.kv_sharing needs recursions; it is not available for model.kind=vanilla")
    else:
        _require(m.num_recursions >= 2,
                 f"model.kind={m.kind} needs model.num_recursions >= 2 (use model.kind=vanilla for 1)")
    for key in ("tp", "pp", "dp"):
        _require(getattr(p, key) >= 1, f"parallel.{key} must be >= 1, got {getattr(p, key)}")
    _require(t.micro_batch_size >= 1, f"train.micro_batch_size must be >= 1, got {t.micro_batch_size}")
    cfg.layout  # the plan, the pipeline split and the batch split; raises naming the key and the fix
    if m.kind == "mor":
        caps = cfg.capacities
        _require(len(caps) == m.num_recursions,
                 f"routing.capacities has {len(caps)} entries; it needs one per recursion ({m.num_recursions})")
        _require(all(0.0 < c <= 1.0 for c in caps), f"routing.capacities must lie in (0, 1], got {caps}")
        _require(all(a >= b for a, b in zip(caps, caps[1:])),
                 f"routing.capacities must not increase across recursions, got {caps}")
        _require(r.kind == "expert_choice" or not r.aux_router,
                 "routing.aux_router is an expert-choice option; set routing.kind=expert_choice")
        _require(0.0 < r.threshold < 1.0, f"routing.threshold must lie in (0, 1), got {r.threshold}")
    _require(m.num_attention_heads % p.tp == 0,
             f"model.num_attention_heads={m.num_attention_heads} is not divisible by parallel.tp={p.tp}")
    _require(m.num_query_groups % p.tp == 0,
             f"model.num_query_groups={m.num_query_groups} is not divisible by parallel.tp={p.tp}")
    _require(m.ffn_hidden_size % p.tp == 0,
             f"model.ffn_hidden_size={m.ffn_hidden_size} is not divisible by parallel.tp={p.tp}")
    if p.sequence_parallel:
        _require(p.tp > 1, "parallel.sequence_parallel needs parallel.tp > 1")
        _require(m.seq_length % p.tp == 0,
                 f"model.seq_length={m.seq_length} must be divisible by parallel.tp={p.tp} for sequence parallel")
    _require(t.steps >= 1, f"train.steps must be >= 1, got {t.steps}")
    _require(0 <= t.seed < 2**32, f"train.seed must lie in [0, 2**32), got {t.seed}")
    _require(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    _require(0 <= t.min_lr <= t.lr, f"train.min_lr must lie in [0, train.lr], got {t.min_lr}")
    _require(0 <= t.warmup_steps < t.steps or t.steps == 1,
             f"train.warmup_steps={t.warmup_steps} must be below train.steps={t.steps}")
    _require(0.0 <= t.decay_fraction <= 1.0, f"train.decay_fraction must lie in [0, 1], got {t.decay_fraction}")
    _require(t.log_interval >= 1, f"train.log_interval must be >= 1, got {t.log_interval}")
    for key in ("eval_interval", "checkpoint_interval"):
        _require(getattr(t, key) >= -1, f"train.{key} must be -1 (never), 0 (at the end) or a step count")
    _require(0.0 < cfg.data.validation_fraction < 1.0,
             f"data.validation_fraction must lie in (0, 1), got {cfg.data.validation_fraction}")
    if m.vocab_size is not None:
        _require(m.vocab_size % p.tp == 0, f"model.vocab_size={m.vocab_size} is not divisible by parallel.tp={p.tp}")
    _validate_run_name(cfg.run.name)
    _validate_storage(cfg.run.storage_path)
    _validate_dataset(cfg.data.dataset, "data.dataset")
    _validate_mixture(cfg.data)
    _require(cfg.data.shuffle_buffer >= 0, f"data.shuffle_buffer must be >= 0 documents, got {cfg.data.shuffle_buffer}")
    _require(cfg.data.num_proc >= 1, f"data.num_proc must be >= 1, got {cfg.data.num_proc}")
    _require(cfg.run.keep_checkpoints >= 1, f"run.keep_checkpoints must be >= 1, got {cfg.run.keep_checkpoints}")
    _require(cfg.run.max_failures >= 0, f"run.max_failures must be >= 0, got {cfg.run.max_failures}")
    _require(cfg.tracking.system_metrics_interval >= 0, "tracking.system_metrics_interval must be >= 0 seconds (0 "
             f"turns system metrics off), got {cfg.tracking.system_metrics_interval}")


# Keys that change the model's parameters (their names or shapes): a checkpoint only loads into the same.
STATE_KEYS = ("model.kind", "model.num_layers", "model.hidden_size", "model.num_attention_heads",
              "model.num_query_groups", "model.ffn_hidden_size", "model.vocab_size", "model.num_recursions",
              "model.sharing", "model.tie_embeddings", "routing.kind", "routing.aux_router")


def state_changes(saved: dict[str, Any], cfg: JobConfig) -> list[str]:
    """'key: saved -> now' for every parameter-defining key where `cfg` differs from a saved config dict."""
    old, new = flatten(saved), flatten(cfg.to_dict())
    routed = new.get("model.kind") == "mor" or old.get("model.kind") == "mor"
    keys = [k for k in STATE_KEYS if routed or not k.startswith("routing.")]
    return [f"{k}: {old.get(k)} -> {new.get(k)}" for k in keys if k in old and old.get(k) != new.get(k)]


def config_from_dict(values: dict[str, Any]) -> JobConfig:
    """Rebuild a JobConfig from `to_dict()` output (as workers receive it), validated again."""
    cfg = _build(JobConfig, values, "")
    validate(cfg)
    return cfg


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dict -> {"model.hidden_size": 64, ...} (stable names for tracking)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
