"""A run's layout, derived once from its config: which layer slot runs at each depth, how pipeline stages
split the layers into chunks, and the counts every part of the code needs.

The paper's four sharing layouts become a LayerPlan. Pipeline parallelism follows the recursion:
stage p holds layers `block[p*B/PP:(p+1)*B/PP]` of the shared block, and recursion r on stage p is
virtual stage `r*PP + p`, so megatron's interleaved schedule runs the recursions as model chunks
over the same weights. Stage 0 also holds the embedding, the first layer and the routers; the last
stage the last layer, the final norm and the head. Vanilla and sequence layouts split their
unrolled layers contiguously, one chunk per stage.

This module imports nothing of the project but its errors, so that the config's validation and
every other module can use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mor_dist.errors import ConfigError

CYCLIC = ("cycle", "middle_cycle")
VOCAB_MULTIPLE = 1024  # Megatron's 128 per tensor-parallel rank, for every tp up to 8: one model whatever the layout


def padded_vocab_size(vocab_size: int) -> int:
    """Round the vocabulary up to a multiple of 1024, so the embedding splits over tp = 1, 2, 4 or 8 alike."""
    return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


SEQUENTIAL = ("sequence", "middle_sequence")


@dataclass(frozen=True)
class LayerPlan:
    """Which unique layer slot runs at each unrolled depth.

    `prefix` runs once on all tokens, then `block` runs `num_recursions` times (the recursion
    MoR routes), then `suffix` once. Sequence layouts repeat each layer in place instead, so
    their recursion is inside `block` and they cannot be routed.
    """

    sharing: str
    prefix: tuple[int, ...]
    block: tuple[int, ...]
    num_recursions: int
    suffix: tuple[int, ...]
    unrolled: tuple[int, ...]

    @property
    def num_unique(self) -> int:
        return len(set(self.unrolled))

    @property
    def cyclic(self) -> bool:
        """Cycle layouts loop the block as a whole: those have one chunk per recursion."""
        return self.sharing in CYCLIC

    def describe(self) -> str:
        """Paper notation, e.g. '1 + 10x3 + 1'."""
        if self.cyclic:
            parts = [str(len(self.prefix))] if self.prefix else []
            parts.append(f"{len(self.block)}x{self.num_recursions}")
            parts += [str(len(self.suffix))] if self.suffix else []
            return " + ".join(parts) + f" ({self.sharing})"
        if self.num_recursions == 1:
            return f"{len(self.unrolled)} unique (vanilla)"
        inner = len(self.unrolled) - len(self.prefix) - len(self.suffix)
        return f"{len(self.prefix)} + {inner // self.num_recursions}x{self.num_recursions} + {len(self.suffix)} ({self.sharing})"


def layer_plan(sharing: str, num_layers: int, num_recursions: int) -> LayerPlan:
    """Map the effective depth L onto unique slots for one sharing layout (one recursion: every layer unique)."""
    n, depth = num_recursions, num_layers
    if n == 1:
        slots = tuple(range(depth))
        return LayerPlan("none", (), slots, 1, (), slots)
    if sharing not in CYCLIC + SEQUENTIAL:
        raise ConfigError(f"model.sharing={sharing!r} is unknown; choose cycle, sequence, middle_cycle or middle_sequence")
    middle = sharing.startswith("middle_")
    inner = depth - 2 if middle else depth
    if inner < n or inner % n:
        extra = (n - inner % n) % n or n
        where = "num_layers - 2" if middle else "num_layers"
        raise ConfigError(
            f"model.num_layers={depth} cannot be shared as {sharing} over {n} recursions: {where}={inner} "
            f"is not a positive multiple of {n}; use model.num_layers={depth + extra} (the paper adds layers)"
        )
    block_size = inner // n
    prefix, suffix = ((0,), (block_size + 1,)) if middle else ((), ())
    first = 1 if middle else 0
    if sharing in CYCLIC:
        block = tuple(range(first, first + block_size))
        return LayerPlan(sharing, prefix, block, n, suffix, prefix + block * n + suffix)
    block = tuple(s for s in range(first, first + block_size) for _ in range(n))
    return LayerPlan(sharing, prefix, block, n, suffix, prefix + block + suffix)


@dataclass(frozen=True)
class ChunkPlan:
    """What one model chunk (a virtual pipeline stage) does."""

    index: int  # virtual stage number
    recursion: Optional[int]  # None for vanilla / sequence layouts
    first: bool  # embedding (+ prefix layers of cycle layouts)
    route: bool  # a recursion starts here (routing on stage 0)
    layers: tuple[int, ...]  # unique slots this chunk runs
    merge: bool  # a recursion ends here (results return to the residual stream)
    last: bool  # suffix layers, final norm, head


def _split(items: tuple[int, ...], parts: int, what: str) -> list[tuple[int, ...]]:
    if len(items) % parts:
        raise ConfigError(f"{what} has {len(items)} layers, not divisible by parallel.pp={parts}; "
                          f"change model.num_layers or parallel.pp")
    n = len(items) // parts
    return [items[i * n:(i + 1) * n] for i in range(parts)]


def stage_chunks(plan: LayerPlan, rank: int, size: int) -> list[ChunkPlan]:
    """The chunks pipeline stage `rank` of `size` runs, in virtual-stage order."""
    if plan.cyclic:
        part = _split(plan.block, size, "the shared block")[rank]
        n = plan.num_recursions
        return [ChunkPlan(r * size + rank, r, r == 0 and rank == 0, rank == 0, part, rank == size - 1,
                          r == n - 1 and rank == size - 1) for r in range(n)]
    # Contiguous split that keeps every repeat of a slot on one stage.
    unique = tuple(dict.fromkeys(plan.unrolled))
    mine = set(_split(unique, size, "the model")[rank])
    layers = tuple(s for s in plan.unrolled if s in mine)
    return [ChunkPlan(rank, None, rank == 0, False, layers, False, rank == size - 1)]


def stage_slots(plan: LayerPlan, rank: int, size: int) -> tuple[int, ...]:
    """Unique layer slots whose weights live on pipeline stage `rank`."""
    slots: list[int] = []
    for chunk in stage_chunks(plan, rank, size):
        if chunk.first and plan.cyclic:
            slots += plan.prefix
        slots += chunk.layers
        if chunk.last and plan.cyclic:
            slots += plan.suffix
    return tuple(dict.fromkeys(slots))


@dataclass(frozen=True)
class Layout:
    """Everything derived from the config that more than one module needs."""

    plan: LayerPlan
    routed: bool  # a router chooses the tokens of each recursion (model.kind=mor)
    tp: int
    pp: int
    dp: int
    micro_batches: int  # per optimizer step on each data-parallel rank
    virtual_size: Optional[int]  # megatron's virtual pipeline size: N_r chunks per stage for cycle layouts under PP
    meta_rows: int  # rows of per-token metadata in a routed stage-to-stage message
    message_rows: int  # the sequence length megatron's schedule is given: a stage-to-stage message's under PP

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def chunks(self, pp_rank: int) -> list[ChunkPlan]:
        """The chunks of pipeline stage `pp_rank`."""
        return stage_chunks(self.plan, pp_rank, self.pp)

    def slots(self, pp_rank: int) -> tuple[int, ...]:
        """The unique layer slots whose weights stage `pp_rank` holds."""
        return stage_slots(self.plan, pp_rank, self.pp)


def micro_batches_per_step(dp_size: int, micro_batch_size: int, global_batch_size: int) -> int:
    """global_batch_size / (micro_batch_size * dp_size): the micro-batches each data-parallel rank runs per step."""
    per_round = micro_batch_size * dp_size
    if micro_batch_size < 1 or dp_size < 1 or global_batch_size < per_round or global_batch_size % per_round:
        raise ConfigError(f"train.global_batch_size={global_batch_size} must be a positive multiple of "
                          f"train.micro_batch_size * parallel.dp = {micro_batch_size} * {dp_size}")
    return global_batch_size // per_round


def derive_layout(kind: str, sharing: str, num_layers: int, num_recursions: int, seq_length: int,
                  hidden_size: int, tp: int, pp: int, dp: int, sequence_parallel: bool, micro_batch_size: int,
                  global_batch_size: int, kv_sharing: bool) -> Layout:
    """The layout of a model of `kind` (vanilla, recursive, mor) on tp x pp x dp ranks; refuses what cannot run."""
    plan = layer_plan("none" if kind == "vanilla" else sharing, num_layers, num_recursions)
    routed = kind == "mor"
    if routed and not plan.cyclic:
        raise ConfigError(f"model.sharing={sharing} cannot be routed: MoR needs cycle or middle_cycle")
    micro_batches = micro_batches_per_step(dp, micro_batch_size, global_batch_size)
    if pp > 1:
        stage_chunks(plan, 0, pp)  # raises naming model.num_layers / parallel.pp
        if kind != "vanilla" and kv_sharing:
            raise ConfigError("routing.kv_sharing is not supported with parallel.pp > 1 yet (the recursion-1 cache "
                              "is per micro-batch); use parallel.pp=1 or routing.kv_sharing=false")
        if plan.cyclic and micro_batches % pp:
            raise ConfigError(f"the interleaved pipeline runs micro-batches in groups of parallel.pp={pp}: "
                              f"train.global_batch_size / (train.micro_batch_size * parallel.dp) = {micro_batches} "
                              f"must be a multiple of {pp}")
    rows = -(-3 * seq_length // hidden_size)  # gate, mask and depth: 3 values per token
    sp = tp if sequence_parallel else 1
    meta_rows = -(-(2 * seq_length + rows) // sp) * sp - 2 * seq_length
    return Layout(plan, routed, tp, pp, dp, micro_batches, num_recursions if pp > 1 and plan.cyclic else None,
                  meta_rows, 2 * seq_length + meta_rows if routed and pp > 1 else seq_length)
